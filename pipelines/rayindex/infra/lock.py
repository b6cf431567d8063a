"""The output lock: one run at a time on an output (a build or a reindex), with an expiry, so that a
second run refuses with a message naming the holder, and a run that died leaves a lock others can take.

The lock is a series of generations, LOCK/<generation>, each created only if absent: an atomic
create-with-content (a hard link of a complete temp file on a local or NFS folder, a conditional
PUT `If-None-Match: *` on S3). The highest generation is the lock. Taking over an expired one (or
one whose process on this host is gone) means creating the next generation, so of any number of
runs taking over the same expired lock exactly one wins: there is no read-compare-write. The holder
renews its own generation's expiry; it has lost the lock as soon as a higher generation exists.
The generation is the fencing token: `check_held` (run just before CURRENT is written) refuses to
publish unless the holder's generation is still the highest, unexpired.

Expiry compares wall clocks of the hosts involved: keep them in sync (NTP).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time

from rayindex.errors import RayIndexError
from rayindex.infra.storage import Store
from rayindex.layout import LOCK_DIR

DEFAULT_TTL_S = 600.0
_held_here: set[str] = set()  # run ids whose lock this process holds now


def generation_rel(generation: int) -> str:
    return f"{LOCK_DIR}/{generation:012d}"


def holder_is_gone(holder: dict) -> bool:
    """Released, expired, or its process on this very host has exited (or is this process, which no
    longer holds it: a run that failed while the store was down could not release its lock)."""
    if holder.get("released") or holder.get("expires_at", 0) <= time.time():
        return True
    if holder.get("host") != socket.gethostname():
        return False
    if holder.get("pid") == os.getpid():
        return holder.get("run_id") not in _held_here
    try:
        os.kill(int(holder.get("pid", 0)), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError):
        return False
    return False


class OutputLock:
    def __init__(self, store: Store, run_id: str, ttl_s: float = DEFAULT_TTL_S):
        self.store = store
        self.run_id = run_id
        self.ttl_s = ttl_s
        self.generation: int | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self._writing = threading.Lock()  # the renewer's look-and-write and adopt's change of run id, one at a time
        self.lost: str | None = None  # why the lock is no longer ours, if it was taken away

    def _content(self, released: bool = False) -> str:
        return json.dumps(
            {
                "run_id": self.run_id,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "generation": self.generation,
                "expires_at": 0 if released else time.time() + self.ttl_s,
                "released": released,
            }
        )

    def current(self) -> tuple[int, dict] | None:
        """(generation, holder) of the highest generation, or None when the output was never locked.
        A generation file that is not a lock refuses the run, naming the file."""
        generations = sorted(int(name) for name in self.store.list_files(LOCK_DIR) if name.isdigit())
        if not generations:
            return None
        text = self.store.read_text(generation_rel(generations[-1]))
        if text is None:
            return generations[-1], {"released": True}  # deleted under us by a newer taker: look again
        try:
            holder = json.loads(text)
            if not isinstance(holder, dict):
                raise ValueError
        except ValueError:
            raise RayIndexError(
                f"{self.store.url(generation_rel(generations[-1]))} is not a rayindex lock; delete "
                f"{self.store.url(LOCK_DIR)} if no run is using this output"
            ) from None
        return generations[-1], holder

    def acquire(self) -> None:
        for _ in range(20):
            seen = self.current()
            if seen is not None and not holder_is_gone(seen[1]):
                holder = seen[1]
                raise RayIndexError(
                    f"{self.store.url(LOCK_DIR)}: the output is locked by run {holder.get('run_id')} "
                    f"(host {holder.get('host')}, pid {holder.get('pid')}) "
                    f"until {time.strftime('%H:%M:%S', time.localtime(holder['expires_at']))}; "
                    f"wait for it to finish, or delete {self.store.url(LOCK_DIR)} if that run is gone"
                )
            self.generation = (seen[0] if seen else 0) + 1
            try:
                self.store.create_exclusive(generation_rel(self.generation), self._content())
            except FileExistsError:
                continue  # another run took this generation first: look again
            newest = self.current()
            if newest is not None and newest[0] > self.generation:
                # A listing made while another taker created generation g+1 and deleted g may show neither
                # (readdir need not return entries added or removed while it runs), so this run saw no lock
                # and created a lower generation than the highest: it lost. Seen in tests/test_lock.py's race
                # as two winners of one round (1 round in 50, 32 takers on 2 cores).
                self.store.delete(generation_rel(self.generation))
                continue
            break
        else:
            raise RayIndexError(
                f"could not take {self.store.url(LOCK_DIR)}: other runs are taking it at the same moment; try again"
            )
        _held_here.add(self.run_id)
        for older in range(max(1, self.generation - 3), self.generation):  # the generations this one replaced
            self.store.delete(generation_rel(older))
        self._renewer = threading.Thread(target=self._renew, daemon=True, name="rayindex-lock-renew")
        self._renewer.start()

    def _superseded(self) -> str | None:
        seen = self.current()
        if seen is None or seen[0] != self.generation or seen[1].get("run_id") != self.run_id:
            return f"{self.store.url(LOCK_DIR)} was taken over by another run"
        return None

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                with self._writing:
                    self.lost = self._superseded()
                    if self.lost:
                        return
                    self.store.write_text(
                        generation_rel(self.generation), self._content()
                    )  # only this run writes its generation
                    self.lost = self._superseded()  # a taker that came in between wins: its generation is higher
                    if self.lost:
                        return
            except RayIndexError:
                continue  # the store is down: try again; if another run takes the lock meanwhile, the next look says so

    def adopt(self, run_id: str) -> None:
        """Hold the lock as run_id from now on (a resumed run: the lock names the version folder being
        written, not the id this attempt started with). Refused like check_held if the lock was lost."""
        with self._writing:
            self.check_held()
            _held_here.discard(self.run_id)
            self.run_id = run_id
            _held_here.add(run_id)
            self.store.write_text(generation_rel(self.generation), self._content())

    def check_held(self) -> None:
        """The fence before publishing: this run's generation is still the highest and unexpired."""
        reason = self.lost or self._superseded()
        if reason is None:
            holder = self.current()[1]
            if holder.get("expires_at", 0) <= time.time():
                reason = f"{self.store.url(LOCK_DIR)} expired (not renewed for {self.ttl_s:.0f} s)"
        if reason:
            raise RayIndexError(f"lost the output lock ({reason}); not publishing. Re-run the build")

    def release(self) -> None:
        self._stop.set()
        if self._renewer:
            self._renewer.join()
        _held_here.discard(self.run_id)
        try:
            if self.generation is not None and self._superseded() is None:
                self.store.write_text(generation_rel(self.generation), self._content(released=True))
        except RayIndexError:
            pass  # the store is down: the lock expires, or a re-run on this host sees its holder gone

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
