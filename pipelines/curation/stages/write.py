"""Stage 6, write: accepted rows -> WebDataset shards (one shard set per kind) with a parquet index per shard.

Layout and sample format are ``pipelines/schema.py``'s. Shard names carry the run id
(``<kind>-<run>-000000.tar``) so a later run never writes into, or over, an earlier run's shards.

The sink runs in the driver, fed by ``Dataset.iter_batches``. Its unit of durability is a *commit*:
``commit(kinds)`` closes the open tars of those kinds (all by default), writes each one's parquet index, and
returns their names; the caller then records in the ledger the inputs whose every tar is indexed
(``unindexed()`` names the others). A shard is finished only once its index exists (``schema.shard_urls``), so a
run killed between commits leaves tars that no ledger row names: the next run deletes them
(``ledger.remove_uncommitted``) and redoes those inputs. With ``roll=False`` a full tar (``full()``) stays open
until the caller commits it, so the caller decides where a tar ends (the curation driver: between two inputs).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds

from pipelines import durable, schema
from pipelines.curation.stages import loads

ARRAY_COLUMNS = ("latent_mean", "latent_std", "text_emb", "image_emb")
CONDITION_NAMES = tuple(m.removesuffix(".npy") for m in schema.CONDITIONS)  # row column cond_<name>

INDEX_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("kind", pa.string()),
        ("source", pa.string()),
        ("clip_index", pa.int32()),
        ("start_s", pa.float64()),
        ("num_frames", pa.int32()),
        ("fps", pa.float64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("bucket", pa.string()),
        ("caption", pa.string()),
        ("motion", pa.float64()),
        ("clip_sim", pa.float64()),
        ("media_bytes", pa.int64()),
        ("sample_bytes", pa.int64()),
        ("pre_encoded", pa.bool_()),
        ("json", pa.string()),
    ]
)


def _score(value: float | None) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def sample_meta(row: dict[str, Any]) -> schema.SampleMeta:
    """The sample's json, from a routed row: geometry, scores computed for it, labels, provenance."""
    scores = {
        name: v
        for name, v in (("motion", _score(row["motion"])), ("clip_sim", _score(row["clip_sim"])))
        if v is not None
    }
    extra = loads(row["extra"])
    extra.update(
        {
            k: v
            for k, v in {
                "source_width": row["src_width"],
                "source_height": row["src_height"],
                "source_fps": _score(row["src_fps"]),
                "source_duration": _score(row["duration"]),
                "codec": row["codec"],
                "given": row["given"],
            }.items()
            if v not in (None, "")
        }
    )
    return schema.SampleMeta(
        source=row["source"],
        kind=row["kind"],
        num_frames=row["num_frames"],
        fps=float(row["fps"]),
        width=row["width"],
        height=row["height"],
        clip_index=row["clip_index"],
        start_s=float(row["start_s"]),
        caption=row["caption"] if row["kind"] != "video" else None,
        scores=scores,
        labels=loads(row["labels"]),
        extra=extra,
    )


def sample_from_row(row: dict[str, Any]) -> dict[str, Any]:
    """The dict ``TarWriter.write`` takes (``schema.encode_sample``), pre-encoded members included if present."""
    arrays = {name: schema.load_npy(row[name]) for name in ARRAY_COLUMNS if row.get(name) is not None}
    arrays |= {name: schema.load_npy(row[f"cond_{name}"]) for name in CONDITION_NAMES if row.get(f"cond_{name}")}
    encoders = json.loads(row["encoders"]) if row.get("encoders") else None
    return schema.encode_sample(row["key"], sample_meta(row), row["media"], arrays=arrays or None, encoders=encoders)


class _KindWriter:
    """Rolling tar writer for one kind: a new tar after ``maxcount`` samples or ``maxsize`` bytes (unless ``roll``
    is off: then the caller closes a full tar, between two inputs)."""

    def __init__(self, root: Path, kind: str, run: str, maxcount: int, maxsize: int, roll: bool = True):
        self.dir = schema.shard_dir(root, kind)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.pattern = Path(schema.shard_pattern(root, kind, run)).name
        self.maxcount, self.maxsize, self.roll = maxcount, maxsize, roll
        self.next_number = 0
        self.writer: wds.TarWriter | None = None
        self.path: Path | None = None
        self.count = self.size = 0
        self.index_rows: dict[Path, list[dict]] = {}

    def _open(self) -> None:
        self.path = self.dir / (self.pattern % self.next_number)
        self.next_number += 1
        self.writer = wds.TarWriter(str(self.path), encoder=False, mtime=0)
        self.count = self.size = 0
        self.index_rows[self.path] = []

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    @property
    def full(self) -> bool:
        return self.writer is not None and (self.count >= self.maxcount or self.size >= self.maxsize)

    def write(self, row: dict[str, Any], sample: dict[str, Any]) -> Path:
        if self.roll and self.full:
            self.close()
        if self.writer is None:
            self._open()
        nbytes = self.writer.write(sample)
        self.count += 1
        self.size += nbytes
        meta = json.loads(sample["json"])
        self.index_rows[self.path].append(
            {
                "key": row["key"],
                "kind": row["kind"],
                "source": row["source"],
                "clip_index": row["clip_index"],
                "start_s": row["start_s"],
                "num_frames": row["num_frames"],
                "fps": row["fps"],
                "width": row["width"],
                "height": row["height"],
                "bucket": meta["bucket"],
                "caption": meta["caption"],
                "motion": _score(row["motion"]),
                "clip_sim": _score(row["clip_sim"]),
                "media_bytes": len(row["media"]),
                "sample_bytes": nbytes,
                "pre_encoded": any(m in sample for m in schema.PRE_ENCODED),
                "json": sample["json"].decode("utf-8"),
            }
        )
        return self.path


class ShardSink:
    """Writes accepted rows into per-kind shard sets under ``output`` for run ``run``."""

    def __init__(
        self,
        output: str | os.PathLike,
        run: str,
        maxcount: int = 1000,
        maxsize: int = 1_000_000_000,
        roll: bool = True,
    ):
        self.root = Path(output)
        self.run = run
        self.writers = {kind: _KindWriter(self.root, kind, run, maxcount, maxsize, roll) for kind in schema.KINDS}
        self.samples = {kind: 0 for kind in schema.KINDS}
        self.bytes_written = 0

    def write(self, row: dict[str, Any]) -> str:
        """Write one accepted, routed row; returns its tar's path relative to the output directory."""
        sample = sample_from_row(row)
        path = self.writers[row["kind"]].write(row, sample)
        self.samples[row["kind"]] += 1
        self.bytes_written += sum(len(v) for k, v in sample.items() if k != "__key__")
        return path.relative_to(self.root).as_posix()

    def full(self) -> list[str]:
        """The kinds whose open tar has reached ``maxcount`` samples or ``maxsize`` bytes."""
        return [kind for kind, writer in self.writers.items() if writer.full]

    def unindexed(self) -> set[str]:
        """Tars written to but not indexed yet (relative paths): no ledger row may name them."""
        return {p.relative_to(self.root).as_posix() for w in self.writers.values() for p in w.index_rows}

    def commit(self, kinds: list[str] | None = None) -> list[str]:
        """Close the open tars of ``kinds`` (all by default) and write the parquet index of each of their tars
        written since the last commit."""
        finished = []
        for kind, writer in self.writers.items():
            if kinds is not None and kind not in kinds:
                continue
            writer.close()
            for tar, rows in writer.index_rows.items():
                durable.fsync_file(tar)  # the samples on disk before the index and the ledger say they exist
                with durable.atomic_path(schema.index_path(tar)) as tmp:  # a reader never sees half an index
                    pq.write_table(pa.Table.from_pylist(rows, schema=INDEX_SCHEMA), tmp)
                finished.append(tar.relative_to(self.root).as_posix())
            writer.index_rows = {}
        return finished

    def abort(self) -> None:
        """Close files without indexing them (what a crash leaves; the next run removes them)."""
        for writer in self.writers.values():
            writer.close()
