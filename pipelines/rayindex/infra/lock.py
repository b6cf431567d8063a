"""A lock with an expiry in the output store, so that two builds (or reindex runs) on the same
output cannot interleave: the second refuses with a message naming the holder.

The lock object is created only if absent (O_EXCL on a local/NFS folder, a conditional PUT
`If-None-Match: *` on S3). Its holder renews the expiry while it runs (a conditional `If-Match`
replace on S3, so a holder that lost the lock finds out). A lock past its expiry, or held by a
process of this host that no longer exists (a killed driver), is taken over, again conditionally,
so that of two runs taking over at once only one wins.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time

from rayindex.errors import RayIndexError
from rayindex.infra.storage import Store
from rayindex.layout import LOCK_FILE

DEFAULT_TTL_S = 600.0
_held_here: set[str] = set()  # run ids whose lock this process holds now


def holder_is_gone(holder: dict) -> bool:
    """Expired, or its process on this very host has exited (or is this process, which no longer holds
    it: a run that failed while the store was down could not delete its lock)."""
    if holder.get("expires_at", 0) <= time.time():
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
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self.lost: str | None = None  # why the lock is no longer ours, if it was taken away

    def _content(self) -> str:
        return json.dumps({"run_id": self.run_id, "host": socket.gethostname(), "pid": os.getpid(),
                           "expires_at": time.time() + self.ttl_s})

    def acquire(self) -> None:
        for _ in range(3):
            try:
                self.store.create_exclusive(LOCK_FILE, self._content())
                break
            except FileExistsError:
                pass
            current = self.store.read_tagged(LOCK_FILE)
            if current is None:
                continue  # released in between: try to create it again
            text, tag = current
            try:
                holder = json.loads(text)
            except ValueError:
                holder = {}
            if not holder_is_gone(holder):
                raise RayIndexError(
                    f"{self.store.url(LOCK_FILE)}: the output is locked by run {holder.get('run_id')} (host {holder.get('host')}, "
                    f"pid {holder.get('pid')}) until {time.strftime('%H:%M:%S', time.localtime(holder['expires_at']))}; "
                    f"wait for it to finish, or delete {self.store.url(LOCK_FILE)} if that run is gone"
                ) from None
            try:
                self.store.replace_if(LOCK_FILE, self._content(), tag)  # its holder died without releasing it
                break
            except FileExistsError:
                continue  # another run took it over first; look again
        else:
            raise RayIndexError(f"could not take {self.store.url(LOCK_FILE)}: other runs are taking it at the same moment; try again")
        _held_here.add(self.run_id)
        self._renewer = threading.Thread(target=self._renew, daemon=True, name="rayindex-lock-renew")
        self._renewer.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                current = self.store.read_tagged(LOCK_FILE)
                if current is None or json.loads(current[0]).get("run_id") != self.run_id:
                    self.lost = f"{self.store.url(LOCK_FILE)} was taken over by another run"
                    return
                self.store.replace_if(LOCK_FILE, self._content(), current[1])
            except FileExistsError:
                self.lost = f"{self.store.url(LOCK_FILE)} changed while renewing it"
                return
            except RayIndexError:
                continue  # the store is down: try again; if another run takes the lock meanwhile, the next look says so

    def check_held(self) -> None:
        """Refuse to publish after losing the lock (e.g. expired during a long outage and taken over)."""
        if self.lost:
            raise RayIndexError(f"lost the output lock ({self.lost}); not publishing. Re-run the build")

    def release(self) -> None:
        self._stop.set()
        if self._renewer:
            self._renewer.join()
        _held_here.discard(self.run_id)
        try:
            current = self.store.read_tagged(LOCK_FILE)
            if current and json.loads(current[0]).get("run_id") == self.run_id:
                self.store.delete(LOCK_FILE)
        except RayIndexError:
            pass  # the store is down: the lock expires, or a re-run on this host sees its holder gone

    def __enter__(self) -> "OutputLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
