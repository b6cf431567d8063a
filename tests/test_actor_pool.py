"""infra/actor_pool.py run_pool with a follow-up per unit (finish), on real Ray actors of the session's Ray: the
follow-up runs while its actor works on the next unit (at most FINISHING_AHEAD ahead), a unit counts as done
only with its follow-up, a follow-up's error ends the run, and an actor that dies in a follow-up has its unit
handed out again. The encoder's push on a real S3 store: tests/test_s3_push.py."""

import os
import time

import pytest
import ray

from rayindex.infra.actor_pool import FINISHING_AHEAD, run_pool

WORK_S, FINISH_S = 0.5, 1.0  # a follow-up slower than the work, as an upload to a slow store


def worker_class():
    """The actor: work(unit) then finish(worked) in a concurrency group of its own, each saying when it ran
    (defined here so that Ray ships it by value to its workers)."""

    class Worker:
        def __init__(self, die_marker: str | None, fail_unit: int | None):
            self.die_marker, self.fail_unit = die_marker, fail_unit

        def work(self, unit: int) -> tuple[int, float, float]:
            started = time.time()
            time.sleep(WORK_S)
            return unit, started, time.time()

        def finish(self, worked: tuple[int, float, float]) -> dict:
            unit, started, ended = worked
            began = time.time()
            if self.die_marker and unit == 0 and not os.path.exists(self.die_marker):
                open(self.die_marker, "w").close()
                os._exit(1)  # the actor's process dies during its follow-up, once
            if unit == self.fail_unit:
                raise ValueError(f"unit {unit}'s follow-up failed")
            time.sleep(FINISH_S)
            return {"unit": unit, "work": (started, ended), "finish": (began, time.time())}

    return ray.remote(max_concurrency=2, concurrency_groups={"finish": 1}, max_restarts=1, max_task_retries=1)(Worker)


def run(units: list[int], die_marker: str | None = None, fail_unit: int | None = None, results=None) -> list[dict]:
    """The units through one actor; the results as on_result got them (into results, when given)."""
    cls, results = worker_class(), [] if results is None else results
    run_pool(
        units,
        1,
        lambda: {"num_cpus": 1},
        lambda options: cls.options(**options).remote(die_marker, fail_unit),
        lambda actor, unit: actor.work.remote(unit),
        results.append,
        finish=lambda actor, worked: actor.finish.options(concurrency_group="finish", max_task_retries=0).remote(
            worked
        ),
    )
    return results


def test_a_units_follow_up_runs_while_its_actor_works_on_the_next(ray_address):
    results = run([0, 1, 2, 3])
    assert [r["unit"] for r in results] == [0, 1, 2, 3]  # each once, done when its follow-up is
    for done, after in zip(results, results[1:]):
        assert after["work"][0] < done["finish"][1], (done, after)  # unit k+1 began before k's follow-up ended
    assert FINISHING_AHEAD == 1
    for done, second in zip(results, results[2:]):  # ... but k+2 waited for it: one follow-up ahead, no pile-up
        assert second["work"][0] >= done["finish"][1], (done, second)


def test_a_failed_follow_up_ends_the_run_with_the_units_done_before_it(ray_address):
    done: list[dict] = []
    with pytest.raises(ray.exceptions.RayTaskError, match="unit 1's follow-up failed"):
        run([0, 1, 2, 3], fail_unit=1, results=done)
    assert [r["unit"] for r in done] == [0]  # unit 0 was done; 1 failed; 2, worked meanwhile, never counted


def test_an_actor_dying_in_a_follow_up_has_its_unit_done_again(ray_address, tmp_path):
    marker = tmp_path / "died"
    results = run([0, 1, 2], die_marker=str(marker))
    assert marker.exists()  # it did die, during unit 0's follow-up
    assert sorted(r["unit"] for r in results) == [0, 1, 2]  # every unit once, unit 0's from its second run
