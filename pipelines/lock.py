"""A lock with an expiry in the output folder, so that two builds (or reindex runs) on the same
output cannot interleave: the second refuses with a message naming the holder.

The lock file is created with O_EXCL (atomic on local and NFS v3+ filesystems). A lock whose
expiry has passed (its holder was killed) is taken over; a live holder renews it while it runs.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

from pipelines.errors import RayIndexError

LOCK_FILE = "LOCK"
DEFAULT_TTL_S = 600.0


class OutputLock:
    def __init__(self, output: str | Path, run_id: str, ttl_s: float = DEFAULT_TTL_S):
        self.path = Path(output) / LOCK_FILE
        self.run_id = run_id
        self.ttl_s = ttl_s
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def _content(self) -> bytes:
        return json.dumps({"run_id": self.run_id, "host": socket.gethostname(), "pid": os.getpid(),
                           "expires_at": time.time() + self.ttl_s}).encode()

    def acquire(self) -> None:
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder and holder.get("expires_at", 0) > time.time():
                    raise RayIndexError(
                        f"{self.path.parent} is locked by run {holder.get('run_id')} (host {holder.get('host')}, pid "
                        f"{holder.get('pid')}) until {time.strftime('%H:%M:%S', time.localtime(holder['expires_at']))}; "
                        f"wait for it to finish, or delete {self.path} if that run is gone"
                    ) from None
                self.path.unlink(missing_ok=True)  # expired: its holder died without releasing it
                continue
            with os.fdopen(fd, "wb") as fh:
                fh.write(self._content())
            self._renewer = threading.Thread(target=self._renew, daemon=True, name="rayindex-lock-renew")
            self._renewer.start()
            return
        raise RayIndexError(f"could not take {self.path}: another run took it at the same moment; try again")

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_bytes(self._content())
            os.replace(tmp, self.path)

    def release(self) -> None:
        self._stop.set()
        if self._renewer:
            self._renewer.join()
        holder = self._holder()
        if holder and holder.get("run_id") == self.run_id:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "OutputLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
