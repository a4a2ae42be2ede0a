"""An outage of the tracking store never stops training: ``BufferedTracker`` hands every tracker call to one
background thread, which makes them in order; while the store is unreachable it keeps them (bounded), warns once,
retries every ``retry_s`` seconds, and catches up when the store is back.

    tracker = BufferedTracker(lambda: MlflowTracker(uri, "t2v-train", run_id=run_id), run_id=run_id)
    tracker.log_metrics({"loss": 0.3}, step)      # returns at once, whatever the store is doing
    tracker.pause()                               # waits up to finish_wait_s for the calls still owed

The tracker itself is made in the background thread too (``factory``), so a store that is down when training
starts costs nothing either. A call the store refuses (a bad value, not an outage) is dropped with a warning, so
it cannot hold back the calls after it.
"""

from __future__ import annotations

import collections
import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# MLflow error codes that mean "the store answered and refused this call": retrying it cannot help.
_REFUSED = frozenset({"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST", "BAD_REQUEST"})


def _refused(error: BaseException) -> bool:
    return getattr(error, "error_code", None) in _REFUSED or isinstance(error, (FileNotFoundError, TypeError))


class BufferedTracker:
    """A ``Tracker`` (see ``pipelines/tracking.py``) whose calls never block or raise; see the module docstring."""

    def __init__(
        self,
        factory: Callable[[], Any],
        run_id: str | None = None,
        *,
        retry_s: float = 10.0,
        max_pending: int = 200_000,
        finish_wait_s: float = 120.0,
    ):
        self.run_id = run_id
        self.retry_s, self.max_pending, self.finish_wait_s = retry_s, max_pending, finish_wait_s
        self._factory, self._inner = factory, None
        self._pending: collections.deque = collections.deque()
        self._cv = threading.Condition()
        self._busy = False  # the thread is making a call (the queue may look empty meanwhile)
        self.down_since: float | None = None
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name="tracking-buffer", daemon=True)
        self._thread.start()

    # -- Tracker ------------------------------------------------------------------------------------------------

    def log_params(self, params: dict[str, Any]) -> None:
        self._submit("log_params", params)

    def set_tags(self, tags: dict[str, Any]) -> None:
        self._submit("set_tags", tags)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._submit("log_metrics", dict(metrics), step)

    def log_artifact(self, path, artifact_path: str | None = None) -> None:
        # a copy: the caller may delete the file (a temporary directory) before the call is made
        src, spool = Path(path), Path(tempfile.mkdtemp(prefix="t2v-tracking-"))
        try:
            (shutil.copytree if src.is_dir() else shutil.copy2)(src, spool / src.name)
        except OSError as e:
            shutil.rmtree(spool, ignore_errors=True)
            log.warning("tracking: cannot keep %s to log it: %s", src, e)
            return
        self._submit("log_artifact", spool / src.name, artifact_path, cleanup=spool)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._submit("log_text", text, artifact_file)

    def log_dataset(self, df: Any, name: str, source: str, digest: str | None = None, context: str = "training"):
        self._submit("log_dataset", df, name, source, digest, context)

    def finish(self, status: str = "FINISHED") -> None:
        self._submit("finish", status)
        self._drain()

    def pause(self) -> None:
        self._submit("pause")
        self._drain()

    # -- the background thread ----------------------------------------------------------------------------------

    def flush(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds until every call so far was made; True if they all were."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while (self._pending or self._busy) and time.monotonic() < deadline:
                self._cv.wait(timeout=min(0.2, max(0.0, deadline - time.monotonic())))
            return not (self._pending or self._busy)

    def _submit(self, name: str, *args: Any, cleanup: Path | None = None) -> None:
        with self._cv:
            self._pending.append((name, args, cleanup))
            if len(self._pending) > self.max_pending:
                _clean(self._pending.popleft())
                self.dropped += 1
                if self.dropped == 1:
                    log.warning("tracking: more than %d calls owed; the oldest are dropped", self.max_pending)
            self._cv.notify_all()

    def _drain(self) -> None:
        if not self.flush(self.finish_wait_s):
            with self._cv:
                owed = len(self._pending)
            log.warning(
                "tracking store still unreachable after %.0f s: %d tracking call(s) are lost (the training "
                "output itself is complete)",
                self.finish_wait_s,
                owed,
            )

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._pending:
                    self._cv.wait()
                name, args, _ = self._pending[0]
                self._busy = True
            try:
                if self._inner is None:
                    self._inner = self._factory()
                    self.run_id = self._inner.run_id
                getattr(self._inner, name)(*args)
            except Exception as e:
                if _refused(e):
                    log.warning("tracking: the store refused %s, dropped: %s", name, e)
                    self._done()
                    continue
                self._outage(e)
                continue
            self._done()
            if self.down_since is not None:
                log.warning(
                    "tracking store reachable again after %.0f s; caught up", time.monotonic() - self.down_since
                )
                self.down_since = None

    def _done(self) -> None:
        with self._cv:
            _clean(self._pending.popleft())
            self._busy = False
            self._cv.notify_all()

    def _outage(self, error: BaseException) -> None:
        with self._cv:
            self._busy = False
            owed = len(self._pending)
            self._cv.notify_all()
        if self.down_since is None:
            self.down_since = time.monotonic()
            log.warning(
                "tracking store unreachable (%s: %s); training goes on, %d call(s) kept and retried every %.0f s",
                type(error).__name__,
                str(error).splitlines()[0][:300] if str(error) else "",
                owed,
                self.retry_s,
            )
        time.sleep(self.retry_s)


def _clean(entry: tuple) -> None:
    if entry[2] is not None:
        shutil.rmtree(entry[2], ignore_errors=True)
