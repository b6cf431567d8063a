"""An actor pool that follows the cluster: actors are asked for while there is work for them, start as nodes
join, are handed work units one at a time, and exit as soon as no unit is left for them.

An actor asked for but not yet placed is a pending demand, which is what Ray's autoscaler scales on: the pool
keeps as many asked for as could be busy (up to its ceiling and the units left), so GPU (or CPU) workers are
added while work waits and, once the actors that held them have exited, removed after their idle timeout.
At most max(MIN_WAITING, actors started) wait at once: Ray's autoscaler itself launches at most
max(5, upscaling_speed x nodes) nodes a round, so more demand would not come sooner, and a cluster that
cannot grow holds few pending actors. Actors waiting with options that no longer fit (a GPU node joined and
told the CPUs per GPU) are asked for again.

A unit may end in two steps (finish): the actor's main work, then a follow-up call on the same actor (the
encoder's push of a shard's files to the output store) that runs while the actor already works on its next
unit; the unit's result is the follow-up's, so a unit counts as done only once its follow-up succeeded. An
actor is handed a new unit while at most FINISHING_AHEAD of its follow-ups run, and is not let go before
they have all ended.

Why not Ray's own pools: `ray.util.ActorPool` takes a fixed list of started actors (it neither asks for
more as nodes join nor lets idle ones go); Ray Data's autoscaling actor pool (`ActorPoolStrategy(min_size,
max_size)`) would make a shard a row of a Dataset: its output, retries and progress belong to Ray Data,
while the build's unit of resume, checksum and progress is the shard (docs/build.md).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import ray

from rayindex.errors import RayIndexError

MIN_WAITING = 8  # actors asked for but not placed, at least (see above)
TICK_S = 0.5  # how often progress and the cluster are looked at while units run
# follow-ups (finish) an actor may have running when it is handed its next unit: one overlaps the next unit's
# work; a second waits for the first (the store is then slower than the actors: their files would pile up)
FINISHING_AHEAD = 1


def waiting_wanted(ceiling: int, unassigned: int, busy: int, started: int) -> int:
    """How many actors to keep asked for but not yet placed: those that could be busy (up to the ceiling and
    the units not handed out) beyond the ones started, at most max(MIN_WAITING, started)."""
    return max(0, min(min(ceiling, busy + unassigned) - started, max(MIN_WAITING, started)))


def creation_error(exc: ray.exceptions.RayActorError) -> BaseException:
    """The error an actor's constructor raised (a RayIndexError is the user's message), else exc itself."""
    task_error = exc.args[0] if exc.args and isinstance(exc.args[0], ray.exceptions.RayTaskError) else None
    cause = getattr(task_error, "cause", None)
    return cause if isinstance(cause, RayIndexError) else exc


def run_pool(
    units: list,
    ceiling: int,
    actor_options: Callable[[], dict],
    new_actor: Callable[[dict], Any],
    submit: Callable[[Any, Any], ray.ObjectRef],
    on_result: Callable[[Any], None],
    on_started: Callable[[Any], None] = lambda actor: None,
    on_tick: Callable[[list], None] = lambda started: None,
    on_none_started: Callable[[float], None] = lambda waited_s: None,
    on_retire: Callable[[Any], None] = lambda actor: None,
    finish: Callable[[Any, Any], ray.ObjectRef] | None = None,
) -> None:
    """Run every unit through actors that come and go with the cluster; results in completion order.

    actor_options(): the options an actor is asked for with now; new_actor(options) asks for one. submit(actor,
    unit) starts a unit on a started actor; on_result gets what it returned, or, with finish, what
    finish(actor, that) returned: a follow-up call on the same actor, run while the actor works on its next
    unit (at most FINISHING_AHEAD of them ahead). on_started(actor) runs when an actor is placed and
    constructed, before it gets a unit; on_tick(started actors) every TICK_S; on_none_started(seconds waited)
    every TICK_S while no actor has started (it may raise: a deadline); on_retire(actor) before an idle actor
    with nothing left to do is killed. A unit's, a follow-up's or a constructor's error ends the run (the
    constructor's RayIndexError as itself), except a follow-up's actor dying: its unit starts over."""
    pending = list(units)
    waiting: dict[ray.ObjectRef, tuple[Any, dict]] = {}  # ready probe -> (actor, options it was asked with)
    busy: dict[ray.ObjectRef, tuple[Any, Any]] = {}  # unit's result -> (actor, unit)
    finishing: dict[ray.ObjectRef, tuple[Any, Any]] = {}  # follow-up's result -> (actor, unit)
    idle: list = []  # started actors that may take a unit now
    started: list = []
    began = time.monotonic()

    def follow_ups(actor) -> int:
        return sum(1 for a, _ in finishing.values() if a == actor)

    def free(actor) -> None:  # its unit (or follow-up) ended: it takes another unless too many follow-ups run
        if actor not in idle and actor not in (a for a, _ in busy.values()) and follow_ups(actor) <= FINISHING_AHEAD:
            idle.append(actor)

    try:
        while pending or busy or finishing:
            while idle and pending:
                actor = idle.pop()
                unit = pending.pop(0)
                busy[submit(actor, unit)] = (actor, unit)
            # actors waiting for their follow-ups will take units: counted as busy ones
            engaged = len(busy) + sum(1 for a in started if a not in idle and a not in (b for b, _ in busy.values()))
            # surplus waiting actors are cancelled before idle ones exit: none takes the resources they free
            resize_waiting(waiting, actor_options, new_actor, waiting_wanted(ceiling, len(pending), engaged, engaged))
            for actor in [a for a in idle if not follow_ups(a)]:  # nothing left to hand out: let its node go idle
                on_retire(actor)
                started.remove(actor)
                idle.remove(actor)
                ray.kill(actor)
            if not pending and not busy and not finishing:
                break
            ready, _ = ray.wait([*busy, *finishing, *waiting], num_returns=1, timeout=TICK_S)
            if ready:
                rest = [r for r in (*busy, *finishing, *waiting) if r not in ready]
                ready += ray.wait(rest, num_returns=len(rest), timeout=0)[0] if rest else []
            for ref in ready:
                if ref in waiting:
                    actor, _ = waiting.pop(ref)
                    try:
                        ray.get(ref)
                    except ray.exceptions.RayActorError as exc:
                        raise creation_error(exc) from exc
                    started.append(actor)
                    on_started(actor)
                    idle.append(actor)
                elif ref in busy:
                    actor, unit = busy.pop(ref)
                    if finish is None:
                        on_result(ray.get(ref))
                    else:
                        finishing[finish(actor, ray.get(ref))] = (actor, unit)
                    free(actor)
                else:
                    actor, unit = finishing.pop(ref)
                    try:
                        result = ray.get(ref)
                    except ray.exceptions.RayActorError:  # died during the follow-up: the unit starts over
                        pending.insert(0, unit)
                    else:
                        on_result(result)
                    free(actor)
            if not started:
                on_none_started(time.monotonic() - began)
            else:
                on_tick(started)
    finally:
        actors = [*started, *idle, *(a for a, _ in busy.values()), *(a for a, _ in finishing.values())]
        for actor in dict.fromkeys([*actors, *(a for a, _ in waiting.values())]):
            ray.kill(actor)


def resize_waiting(waiting: dict, actor_options: Callable[[], dict], new_actor: Callable[[dict], Any], wanted: int):
    """Keep `wanted` actors asked for with the current options: stale or surplus ones are cancelled (killing an
    actor not yet placed frees nothing and removes its demand), missing ones asked for."""
    options = actor_options() if waiting or wanted else None
    for ref, (actor, asked_with) in list(waiting.items()):
        if asked_with != options or len(waiting) > wanted:
            del waiting[ref]
            ray.kill(actor)
    while len(waiting) < wanted:
        actor = new_actor(options)
        waiting[actor.__ray_ready__.remote()] = (actor, options)
