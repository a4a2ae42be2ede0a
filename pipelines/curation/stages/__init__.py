"""The curation stages and the one contract they share.

Every stage is a callable class: ``__init__`` takes the stage's settings (and loads models, if any), and
``__call__(batch) -> pyarrow.Table`` maps a batch of rows to a batch of rows. The same object runs under
``ray.data.Dataset.map_batches`` (as tasks, or as an actor pool for the model stages) and in a plain test
without Ray. A batch is a ``pyarrow.Table`` (what Ray Data hands over with ``batch_format="pyarrow"``), a dict of
columns, or a list of row dicts.

Rows all have the columns of ``ROW_SCHEMA``. A row is either ``status == "ok"`` (still in the running),
``"rejected"`` with the ``stage`` and ``reason`` that rejected it, or ``"transient"``: a fault that is not the
input's (a full temp disk, an I/O error, an unreachable object store) outlasted the stage's retries; the driver
keeps such inputs out of the ledger, so the next run tries them again. Rejected and transient rows are passed
through untouched by every later stage, so every input reaches the driver (and, unless transient, the ledger):
nothing is dropped silently. Until the decode stage a row stands for one input; decode replaces it with one row
per clip, and ``input_rows`` tells the driver how many rows of an input to wait for.

Order of the pipeline (see ``pipelines/curation/job.py``)::

    probe -> quality.InputQuality -> decode -> quality.ClipQuality -> caption -> route [-> conditions]
    [-> encode] -> write
"""

from __future__ import annotations

import errno
import faulthandler
import json
import logging
import math
import os
import signal
import time
import traceback
from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow as pa

log = logging.getLogger(__name__)

OK = "ok"
REJECTED = "rejected"
TRANSIENT = "transient"  # not the input's fault: never final, retried by the next run

# OS errors that say the machine or the network had a problem, not the input (ENOSPC: a full temp disk).
TRANSIENT_ERRNOS = frozenset(
    getattr(errno, n)
    for n in (
        "ENOSPC",
        "EIO",
        "EAGAIN",
        "EINTR",
        "ENOMEM",
        "EDQUOT",
        "ETIMEDOUT",
        "ECONNRESET",
        "ECONNREFUSED",
        "ECONNABORTED",
        "EHOSTUNREACH",
        "ENETUNREACH",
        "ENETDOWN",
        "EPIPE",
        "ESTALE",
        "EMFILE",
        "ENFILE",
    )
    if hasattr(errno, n)
)

# Test hooks (only tests set them; read where the stage object is built, i.e. in the driver, and shipped to the
# workers with it): a comma-separated list of file names whose processing SIGKILLs the worker process, or
# hangs it (a stuck C call that no in-process time check sees).
KILL_ENV = "T2V_TEST_KILL_INPUTS"
HANG_ENV = "T2V_TEST_HANG_INPUTS"

# Stage names as they appear in the ledger and the summary, in pipeline order.
STAGES = ("input", "probe", "quality", "decode", "caption", "route", "conditions", "encode", "write")

ROW_SCHEMA = pa.schema(
    [
        # -- the input (set by pipelines/inputs.py) --
        ("source", pa.string()),  # resolved URI of the input: absolute local path, s3://..., tar#key
        ("given", pa.string()),  # the input exactly as the manifest / directory / tar named it
        ("occurrence", pa.int32()),  # 0 for the first row naming `source`, 1.. for later duplicates
        ("origin", pa.string()),  # manifest | dir | tar
        ("uri", pa.string()),  # the file to open (a tar for re-ingested samples)
        ("offset", pa.int64()),  # byte range inside `uri` (-1: the whole file)
        ("length", pa.int64()),
        ("caption", pa.string()),  # None: no caption given
        ("caption_error", pa.string()),  # set when the caption could not be read as UTF-8 text
        ("labels", pa.string()),  # JSON object: other manifest columns / sidecar keys (ground truth)
        ("data", pa.large_binary()),  # fetched bytes for inputs that are not plain local files
        # -- probe --
        ("media_type", pa.string()),  # video | image
        ("container", pa.string()),
        ("codec", pa.string()),
        ("duration", pa.float64()),  # seconds (nan: unknown)
        ("src_fps", pa.float64()),
        ("src_width", pa.int32()),
        ("src_height", pa.int32()),
        ("src_frames", pa.int64()),
        # -- bookkeeping for every row --
        ("status", pa.string()),  # ok | rejected
        ("stage", pa.string()),  # stage that rejected the row ("" while ok)
        ("reason", pa.string()),  # short code, e.g. missing_file, static, caption_too_long
        ("detail", pa.string()),  # human-readable explanation
        ("input_rows", pa.int32()),  # rows the driver receives for this input (clips, or 1)
        # -- decode: one row per clip --
        ("clip_index", pa.int32()),
        ("start_s", pa.float64()),
        ("num_frames", pa.int32()),
        ("fps", pa.float64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("media", pa.large_binary()),  # mp4 (video) or jpg (image) bytes of this clip, one clip per row
        ("keyframes", pa.large_binary()),  # npy uint8 [k, h, w, 3]: frames the caption filter scores
        ("motion", pa.float64()),
        # -- caption --
        ("caption_ok", pa.bool_()),
        ("caption_reason", pa.string()),
        ("clip_sim", pa.float64()),
        # -- route --
        ("kind", pa.string()),  # image | video_text | video
        ("key", pa.string()),  # schema.sample_key(source, clip_index)
        # -- encode (optional pre-encoding) --
        ("latent_mean", pa.large_binary()),
        ("latent_std", pa.large_binary()),
        ("text_emb", pa.large_binary()),
        ("image_emb", pa.large_binary()),
        ("encoders", pa.string()),  # JSON identity of the encoders
        # -- conditions (optional): npy bytes, see schema.CONDITIONS --
        ("cond_motion", pa.large_binary()),
        ("cond_sketch", pa.large_binary()),
        ("cond_depth", pa.large_binary()),
        # -- free-form notes (JSON object), copied into the sample's json `extra` --
        ("extra", pa.string()),
    ]
)

COLUMNS = tuple(ROW_SCHEMA.names)

_DEFAULTS: dict[str, Any] = {
    "occurrence": 0,
    "offset": -1,
    "length": -1,
    "labels": "{}",
    "duration": math.nan,
    "src_fps": math.nan,
    "src_width": 0,
    "src_height": 0,
    "src_frames": 0,
    "status": OK,
    "stage": "",
    "reason": "",
    "detail": "",
    "input_rows": 1,
    "clip_index": 0,
    "start_s": 0.0,
    "num_frames": 0,
    "fps": 0.0,
    "width": 0,
    "height": 0,
    "motion": math.nan,
    "clip_sim": math.nan,
    "extra": "{}",
}


def new_row(**values: Any) -> dict[str, Any]:
    """A row with every column present (defaults for the ones not given)."""
    unknown = set(values) - set(COLUMNS)
    if unknown:
        raise KeyError(f"unknown row column(s) {sorted(unknown)}; see pipelines.curation.stages.ROW_SCHEMA")
    row = {name: _DEFAULTS.get(name) for name in COLUMNS}
    row.update(values)
    return row


def to_rows(batch: Any) -> list[dict[str, Any]]:
    """A batch (pyarrow Table, dict of columns, pandas DataFrame or list of rows) -> list of complete row dicts."""
    if isinstance(batch, list):
        rows = batch
    elif isinstance(batch, pa.Table):
        rows = batch.to_pylist()
    elif isinstance(batch, dict):
        columns = {k: (v.tolist() if isinstance(v, np.ndarray) else list(v)) for k, v in batch.items()}
        n = len(next(iter(columns.values()))) if columns else 0
        rows = [{k: columns[k][i] for k in columns} for i in range(n)]
    elif hasattr(batch, "to_dict"):  # pandas
        rows = batch.to_dict("records")
    else:
        raise TypeError(f"a batch must be a pyarrow Table, dict of columns or list of rows, got {type(batch).__name__}")
    return [new_row(**{k: v for k, v in r.items() if k in _COLUMN_SET}) for r in rows]


_COLUMN_SET = frozenset(COLUMNS)


def to_table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=ROW_SCHEMA)


class TransientFault(Exception):
    """A fault of the machine or the network while processing an input (``reason`` names it); the stage retries
    the input, then passes it on as ``transient``."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def is_transient(error: BaseException) -> bool:
    """An OSError whose errno says the machine or the network failed (see ``TRANSIENT_ERRNOS``)."""
    return isinstance(error, OSError) and error.errno in TRANSIENT_ERRNOS


def transient(row: dict[str, Any], stage: str, reason: str, detail: str = "") -> dict[str, Any]:
    """Mark ``row`` as failed by a transient fault (kept out of the ledger: the next run retries it)."""
    return dict(reject(row, stage, reason, detail), status=TRANSIENT)


def reject(row: dict[str, Any], stage: str, reason: str, detail: str = "") -> dict[str, Any]:
    """Mark ``row`` rejected (media dropped: a rejected row carries only what the ledger needs)."""
    row = dict(row)
    row.update(status=REJECTED, stage=stage, reason=reason, detail=detail[:2000], media=None, keyframes=None, data=None)
    return row


def loads(text: str | None) -> dict[str, Any]:
    return json.loads(text) if text else {}


def add_extra(row: dict[str, Any], **values: Any) -> None:
    extra = loads(row.get("extra"))
    extra.update(values)
    row["extra"] = json.dumps(extra, sort_keys=True)


class Stage:
    """Base for the per-row stages: ok rows go through ``process_rows``; rejected rows pass through untouched.

    A bug or an unexpected failure on one row rejects that row (reason ``internal_error``) instead of failing the
    Ray task, which would fail the run.
    """

    name = "stage"
    transient_retries = 2  # tries after the first when a TransientFault is raised (stages set it from the config)
    transient_backoff_s = 1.0  # first pause; doubles each time
    hard_limit_s: float | None = None  # per input: past it the worker process exits (stages that run FFmpeg)
    test_kill: frozenset = frozenset()  # see KILL_ENV / HANG_ENV
    test_hang: frozenset = frozenset()

    def setup_guards(self, transient_retries: int, hard_limit_s: float | None) -> None:
        """Retries for transient faults, the per-input hard time limit, and the test hooks (read here, in the
        driver that builds the stage)."""
        self.transient_retries, self.hard_limit_s = transient_retries, hard_limit_s
        self.test_kill = frozenset(filter(None, os.environ.get(KILL_ENV, "").split(",")))
        self.test_hang = frozenset(filter(None, os.environ.get(HANG_ENV, "").split(",")))

    def __call__(self, batch: Any) -> pa.Table:
        rows = to_rows(batch)
        live = [r for r in rows if r["status"] == OK]
        out = [r for r in rows if r["status"] != OK]
        if live:
            out.extend(self.process_rows(live))
        return to_table(out)

    def process_rows(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for row in rows:
            with hard_limit(self.hard_limit_s, row["source"]):
                out.extend(self._process_retrying(row))
        return out

    def _process_retrying(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        name = os.path.basename(str(row["source"]))
        if name in self.test_kill:
            os.kill(os.getpid(), signal.SIGKILL)
        if name in self.test_hang:
            while True:
                time.sleep(3600)
        for attempt in range(self.transient_retries + 1):
            try:
                return list(self.process(row))
            except TransientFault as e:
                fault = e
            except MemoryError:  # an allocation this input asked for failed; the worker lives on
                return [reject(row, self.name, "out_of_memory", "the input needed more memory than was left")]
            except Exception as e:  # one bad input must never take the run down
                if not is_transient(e):
                    return [internal_error(row, self.name, e)]
                fault = TransientFault(errno.errorcode.get(e.errno, "os_error").lower(), f"{type(e).__name__}: {e}")
            if attempt < self.transient_retries:
                pause = self.transient_backoff_s * 2**attempt
                log.warning("%s: %s on %s; trying again in %.0f s", self.name, fault, row["source"], pause)
                time.sleep(pause)
        return [transient(row, self.name, fault.reason, str(fault))]

    def process(self, row: dict[str, Any]) -> Iterable[dict[str, Any]]:
        raise NotImplementedError


class hard_limit:
    """Ends the worker process if one input takes longer than ``seconds``: the last resort against a call that
    hangs inside FFmpeg, where no time check of ours runs. faulthandler's watchdog is a C thread that needs no GIL,
    so it fires even while the hung call holds it; it writes the stack to stderr (the worker's log) and exits.
    The driver sees a crashed task, retries it a bounded number of times, then runs the input alone and rejects
    it (see ``pipelines/curation/isolate.py``)."""

    def __init__(self, seconds: float | None, source: str):
        self.seconds, self.source = seconds, source

    def __enter__(self) -> hard_limit:
        if self.seconds:
            faulthandler.dump_traceback_later(self.seconds, exit=True)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.seconds:
            faulthandler.cancel_dump_traceback_later()


def internal_error(row: dict[str, Any], stage: str, error: BaseException) -> dict[str, Any]:
    where = traceback.extract_tb(error.__traceback__)[-1] if error.__traceback__ else None
    at = f" at {where.filename.rsplit('/', 1)[-1]}:{where.lineno}" if where else ""
    return reject(row, stage, "internal_error", f"{type(error).__name__}: {error}{at}")
