"""One logging set-up for every entry point: the project's lines as ``[tag] message``, libraries kept quiet.

    log = logging.getLogger("t2v.curate")    # entry points log under t2v.<command>; library modules __name__
    logs.setup()                             # once, in main(): INFO lines to stdout, warnings and errors to stderr
    logs.setup(rank=rank)                    # in a training worker: INFO from rank 0 only, warnings from every rank

The tag is the last part of the logger's name (``t2v.curate`` -> ``[curate]``, ``pipelines.loader`` ->
``[loader]``). Third-party libraries log at WARNING and above only; their INFO lines (Ray's start-up, open_clip's
model loading, MLflow's store migrations) say nothing a user can act on. Errors are never filtered. Credentials
in URIs (user info, signed query parameters) are redacted from every line.
"""

from __future__ import annotations

import logging
import os
import sys

from pipelines.settings import redact_uri

# Loggers of libraries whose INFO output is routine; WARNING and above still show.
QUIET_LIBRARIES = (
    "ray",
    "ray.data",
    "ray.train",
    "ray.tune",
    "mlflow",
    "alembic",
    "open_clip",
    "DeepSpeed",
    "deepspeed",
    "torch.distributed",
    "prefect",
    "httpx",
    "urllib3",
    "filelock",
    "fsspec",
    "asyncio",
    "diffusers",
    "numexpr",
    "compilers",  # setuptools' distutils logs each compiler command DeepSpeed's op builders try
)
# Libraries that configure their own loggers when imported (after setup) read their level from these.
LIBRARY_LEVEL_VARIABLES = ("MLFLOW_LOGGING_LEVEL", "RAY_DATA_LOG_LEVEL", "PREFECT_LOGGING_LEVEL")

# Libraries with loggers that the levels above do not reach (open_clip logs through the root logger, parts of Ray
# Train through loggers named by file path): their routine lines are recognised by the file that logged them.
FILE_QUIET_LIBRARIES = ("open_clip", "ray")

_MARK = "_t2v_handler"


class _TagFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        tag = record.name.rsplit(".", 1)[-1]
        level = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
        text = f"[{tag}] {level}{record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return redact_uri(text)  # a URI with a password or a signed query never reaches a log line


class _CurrentStream(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` / ``sys.stderr`` is at the time of each record, so a caller that swaps
    them (pytest's capture, a notebook) never leaves the handler holding a closed stream."""

    def __init__(self, name: str):
        super().__init__()
        self._name = name

    @property
    def stream(self):  # type: ignore[override]
        return getattr(sys, self._name)

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; the property decides
        pass


class _Below(logging.Filter):
    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < self.level


class _QuietLibraryFiles(logging.Filter):
    """INFO lines logged from the files of a library in FILE_QUIET_LIBRARIES are dropped."""

    _parts = tuple(f"{os.sep}{name}{os.sep}" for name in FILE_QUIET_LIBRARIES)

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not any(part in record.pathname for part in self._parts)


class _RankZero(logging.Filter):
    """Other ranks keep their warnings and errors; their INFO lines would repeat rank 0's."""

    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        return self.rank == 0 or record.levelno >= logging.WARNING


def _writes_to_console(handler: logging.Handler) -> bool:
    return isinstance(handler, logging.StreamHandler) and getattr(handler, "stream", None) in (sys.stdout, sys.stderr)


def setup(level: int | str | None = None, rank: int = 0) -> None:
    """Configure the root logger (idempotent). ``level`` defaults to ``$T2V_LOG_LEVEL`` or INFO."""
    level = level or os.environ.get("T2V_LOG_LEVEL", "INFO")
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, _MARK, False) or _writes_to_console(h)]:
        root.removeHandler(handler)  # ours from an earlier call, or a library's (Prefect installs one at import)
    formatter = _TagFormatter()
    out = _CurrentStream("stdout")
    out.addFilter(_Below(logging.WARNING))
    err = _CurrentStream("stderr")
    err.setLevel(logging.WARNING)
    for handler in (out, err):
        handler.setFormatter(formatter)
        handler.addFilter(_RankZero(rank))
        handler.addFilter(_QuietLibraryFiles())
        setattr(handler, _MARK, True)
        root.addHandler(handler)
    root.setLevel(level)
    for variable in LIBRARY_LEVEL_VARIABLES:
        os.environ.setdefault(variable, "WARNING")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per model load, to stderr
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger(name).level))
