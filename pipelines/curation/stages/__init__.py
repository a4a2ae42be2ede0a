"""The curation stages and the one contract they share.

Every stage is a callable class: ``__init__`` takes the stage's settings (and loads models, if any), and
``__call__(batch) -> pyarrow.Table`` maps a batch of rows to a batch of rows. The same object runs under
``ray.data.Dataset.map_batches`` (as tasks, or as an actor pool for the model stages) and in a plain test
without Ray. A batch is a ``pyarrow.Table`` (what Ray Data hands over with ``batch_format="pyarrow"``), a dict of
columns, or a list of row dicts.

Rows all have the columns of ``ROW_SCHEMA``. A row is either ``status == "ok"`` (still in the running) or
``"rejected"`` with the ``stage`` and ``reason`` that rejected it. Rejected rows are passed through untouched by
every later stage, so every input reaches the driver and ends in the ledger: nothing is dropped silently. Until
the decode stage a row stands for one input; decode replaces it with one row per clip, and ``input_rows`` tells
the driver how many rows of an input to wait for.

Order of the pipeline (see ``pipelines/curation/job.py``)::

    probe -> quality.InputQuality -> decode -> quality.ClipQuality -> caption -> route [-> encode] -> write
"""

from __future__ import annotations

import json
import math
import traceback
from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow as pa

OK = "ok"
REJECTED = "rejected"

# Stage names as they appear in the ledger and the summary, in pipeline order.
STAGES = ("input", "probe", "quality", "decode", "caption", "route", "encode", "write")

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
            try:
                out.extend(self.process(row))
            except Exception as e:  # one bad input must never take the run down
                out.append(internal_error(row, self.name, e))
        return out

    def process(self, row: dict[str, Any]) -> Iterable[dict[str, Any]]:
        raise NotImplementedError


def internal_error(row: dict[str, Any], stage: str, error: BaseException) -> dict[str, Any]:
    where = traceback.extract_tb(error.__traceback__)[-1] if error.__traceback__ else None
    at = f" at {where.filename.rsplit('/', 1)[-1]}:{where.lineno}" if where else ""
    return reject(row, stage, "internal_error", f"{type(error).__name__}: {error}{at}")
