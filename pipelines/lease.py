"""One writer at a time for a directory shared by runs on any hosts: a lease file with an owner, a heartbeat and
stale take-over.

    with Lease(out / ".curate.lease", what="curate run"):
        ...                       # lease.check() before anything that must not happen twice (a commit)

The lease is created with O_EXCL (atomic on local file systems and NFS). Its holder rewrites its heartbeat every
``heartbeat_s`` seconds from a background thread. Another run refuses to start while the heartbeat is fresh,
whatever host holds it; it takes the lease over when the heartbeat is older than ``stale_s`` (the holder died or
lost the disk) or when the holder is a dead process on this host. A holder whose lease was taken over notices on
its next heartbeat or ``check()`` and stops (``LeaseLost``) before it writes anything more, so two runs never
commit into one output. Clocks of the hosts sharing the directory are assumed to agree within ``stale_s``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from pipelines import durable
from pipelines.settings import ConfigError

log = logging.getLogger(__name__)


class LeaseLost(RuntimeError):
    """Another run took this run's lease over (its heartbeat looked stale): stop before writing more."""


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Lease:
    def __init__(self, path: str | os.PathLike, what: str = "run", heartbeat_s: float = 10.0, stale_s: float = 60.0):
        self.path, self.what = Path(path), what
        self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
        self.owner = uuid.uuid4().hex
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> dict[str, Any]:
        now = time.time()
        return {"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(), "heartbeat": now}

    def read(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # half-written by a holder that died mid-write (only possible without atomic writes): stale

    def _stale(self, held: dict[str, Any]) -> bool:
        if not held:
            return True
        if held.get("host") == socket.gethostname() and not _alive(int(held.get("pid", -1))):
            return True
        return time.time() - float(held.get("heartbeat", 0)) > self.stale_s

    def acquire(self) -> Lease:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                held = self.read()
                if held is None:
                    continue  # released meanwhile: try again
                if not self._stale(held):
                    age = time.time() - float(held.get("heartbeat", 0))
                    raise ConfigError(
                        f"another {self.what} (host {held.get('host')}, pid {held.get('pid')}, heartbeat {age:.0f} s "
                        f"ago) holds {self.path}; wait for it to finish. Its lease is taken over once its heartbeat "
                        f"is {self.stale_s:.0f} s old"
                    ) from None
                log.warning(
                    "taking over the lease %s from %s (host %s, pid %s): its holder stopped",
                    self.path,
                    self.what,
                    held.get("host"),
                    held.get("pid"),
                )
                durable.write_text(self.path, json.dumps(self._record()))
                time.sleep(min(1.0, self.heartbeat_s / 4))  # another taker that raced us wrote after us: it wins
                if (self.read() or {}).get("owner") != self.owner:
                    continue
                break
            else:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.write(json.dumps(self._record()))
                    f.flush()
                    os.fsync(f.fileno())
                durable.fsync_dir(self.path.parent)
                break
        else:
            raise ConfigError(f"could not take the lease {self.path}: other runs keep taking it; try again")
        self._thread = threading.Thread(target=self._beat, name="lease-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            if (self.read() or {}).get("owner") != self.owner:
                self.lost = True
                log.error("the lease %s was taken over by another %s; this one stops", self.path, self.what)
                return
            with contextlib.suppress(OSError):  # a full disk for a moment: the next beat tries again
                durable.write_text(self.path, json.dumps(self._record()))

    def check(self) -> None:
        """Raise ``LeaseLost`` if another run holds the lease now."""
        if self.lost or (self.read() or {}).get("owner") != self.owner:
            self.lost = True
            raise LeaseLost(f"another {self.what} took over {self.path}; stopping before writing more")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if (self.read() or {}).get("owner") == self.owner:
            with contextlib.suppress(OSError):
                self.path.unlink()

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
