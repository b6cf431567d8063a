"""An actor pool that follows the cluster: actors are asked for while there is work for them, start as nodes
join, are handed work units one at a time, and exit as soon as no unit is left for them.

An actor asked for but not yet placed is a pending demand, which is what Ray's autoscaler scales on: the pool
keeps as many asked for as could be busy (up to its ceiling and the units left), so GPU (or CPU) workers are
added while work waits and, once the actors that held them have exited, removed after their idle timeout.
At most max(MIN_WAITING, actors started) wait at once: Ray's autoscaler itself launches at most
max(5, upscaling_speed x nodes) nodes a round, so more demand would not come sooner, and a cluster that
cannot grow holds few pending actors. Actors waiting with options that no longer fit (a GPU node joined and
told the CPUs per GPU) are asked for again.

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
) -> None:
    """Run every unit through actors that come and go with the cluster; results in completion order.

    actor_options(): the options an actor is asked for with now; new_actor(options) asks for one. submit(actor,
    unit) starts a unit on a started actor; on_result gets what it returned. on_started(actor) runs when an
    actor is placed and constructed, before it gets a unit; on_tick(started actors) every TICK_S;
    on_none_started(seconds waited) every TICK_S while no actor has started (it may raise: a deadline);
    on_retire(actor) before an idle actor with nothing left to do is killed. A unit's or a constructor's
    error ends the run (the constructor's RayIndexError as itself)."""
    pending = list(units)
    waiting: dict[ray.ObjectRef, tuple[Any, dict]] = {}  # ready probe -> (actor, options it was asked with)
    busy: dict[ray.ObjectRef, Any] = {}  # unit's result -> actor
    idle: list = []
    started: list = []
    began = time.monotonic()
    try:
        while pending or busy:
            while idle and pending:
                actor = idle.pop()
                busy[submit(actor, pending.pop(0))] = actor
            # surplus waiting actors are cancelled before idle ones exit: none takes the resources they free
            resize_waiting(
                waiting, actor_options, new_actor, waiting_wanted(ceiling, len(pending), len(busy), len(busy))
            )
            for actor in idle:  # nothing left to hand out: let its node go idle
                on_retire(actor)
                started.remove(actor)
                ray.kill(actor)
            idle.clear()
            if not pending and not busy:
                break
            ready, _ = ray.wait([*busy, *waiting], num_returns=1, timeout=TICK_S)
            if ready:
                rest = [r for r in (*busy, *waiting) if r not in ready]
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
                else:
                    actor = busy.pop(ref)
                    on_result(ray.get(ref))
                    idle.append(actor)
            if not started:
                on_none_started(time.monotonic() - began)
            else:
                on_tick(started)
    finally:
        for actor in dict.fromkeys([*started, *idle, *busy.values(), *(a for a, _ in waiting.values())]):
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
