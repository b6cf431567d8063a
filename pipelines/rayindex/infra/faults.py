"""Fault injection for resume drills: with RAYINDEX_KILL_AFTER=<stage>:<n> in its environment, the
driver SIGKILLs itself right after the n-th unit of work of that stage (an encoded shard, an added
shard, a shard merged into the result), exactly where a crash hurts most. Tests use it to prove
that re-running the same command resumes; operators can use it to rehearse."""

from __future__ import annotations

import os
import signal

KILL_AFTER = "RAYINDEX_KILL_AFTER"


def checkpoint(stage: str, done: int) -> None:
    if os.environ.get(KILL_AFTER) == f"{stage}:{done}":
        os.kill(os.getpid(), signal.SIGKILL)
