"""The ledger: one row per input, saying how it ended (accepted | rejected), where, why, and what it produced.

``<output>/ledger.parquet`` is a parquet *dataset directory*: one part file per commit
(``part-<run>-<commit>.parquet``), written to a hidden temporary name and renamed into place, so a part is either
complete or absent. ``pyarrow.parquet.read_table``, ``pandas.read_parquet`` and ``ray.data.read_parquet`` all read
the directory as one table (they skip hidden files). Use ``read_ledger(output)``.

The ledger is the record of finished work, and the only one:

- an input (``source``, ``occurrence``) that has a ledger row is done; a re-run skips it;
- a shard tar is kept only if a ledger row names it (``shards``); tars that none names come from a run killed
  between two commits and are deleted by ``remove_uncommitted`` before the next run writes anything.

Columns: ``source`` (resolved URI), ``given`` (as the input named it), ``occurrence`` (0, or n for the n-th
duplicate row of the same source), ``status`` (accepted | rejected), ``stage`` and ``reason`` (where and why it
was rejected, by its most common reason when several clips were; "write" and "" when accepted), ``detail``,
``keys`` and ``kinds`` (samples produced), ``shards`` (tars holding them), ``clips_rejected`` (JSON
``{reason: count}``), ``media_type``, ``origin``, ``run``, ``commit``, ``finished_at`` (unix seconds).
"""

from __future__ import annotations

import collections
import json
import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines import durable, schema
from pipelines.curation.stages import OK

log = logging.getLogger(__name__)

ACCEPTED = "accepted"
REJECTED = "rejected"

LEDGER_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("given", pa.string()),
        ("occurrence", pa.int32()),
        ("status", pa.string()),
        ("stage", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("keys", pa.list_(pa.string())),
        ("kinds", pa.list_(pa.string())),
        ("shards", pa.list_(pa.string())),
        ("clips_rejected", pa.string()),
        ("media_type", pa.string()),
        ("origin", pa.string()),
        ("run", pa.string()),
        ("commit", pa.int32()),
        ("finished_at", pa.float64()),
    ]
)


def ledger_dir(output: str | os.PathLike) -> Path:
    return Path(output) / schema.LEDGER_FILE


def summarize_ledger(output: str | os.PathLike) -> dict[str, Any]:
    """``summarize`` of a whole ledger, a part at a time, so its cost does not grow with the corpus."""
    columns = ["status", "stage", "reason", "kinds"]
    parts = [p for p in sorted(ledger_dir(output).glob("part-*.parquet"))] if ledger_dir(output).is_dir() else []
    total = summarize(LEDGER_SCHEMA.empty_table().select(columns))
    for p in parts:
        try:
            part = summarize(pq.read_table(p, schema=LEDGER_SCHEMA, columns=columns))
        except Exception as e:  # as read_ledger: an unreadable part is left out, the next run redoes it
            log.warning("ledger part %s cannot be read (%s); it is left out", p, f"{type(e).__name__}: {e}")
            continue
        for key in ("inputs", "accepted", "rejected"):
            total[key] += part[key]
        for key in ("samples", "rejected_by_reason"):
            for name, n in part[key].items():
                total[key][name] = total[key].get(name, 0) + n
    total["rejected_by_reason"] = dict(sorted(total["rejected_by_reason"].items()))
    return total


QUARANTINE_DIR = ".quarantine"  # hidden: parquet readers of the ledger directory skip it


def _read_parts(
    output: str | os.PathLike, columns: list[str] | None = None
) -> tuple[list[pa.Table], list[tuple[Path, str]]]:
    """(tables of the readable parts, [(unreadable part, why)])."""
    d = ledger_dir(output)
    tables, bad = [], []
    for p in sorted(d.glob("part-*.parquet")) if d.is_dir() else []:
        try:
            tables.append(pq.read_table(p, schema=LEDGER_SCHEMA, columns=columns))
        except Exception as e:  # empty, truncated or foreign: pyarrow raises several types
            bad.append((p, f"{type(e).__name__}: {e}"))
    return tables, bad


def read_ledger(output: str | os.PathLike, columns: list[str] | None = None) -> pa.Table:
    """Every committed ledger row of a curation output (an empty table if there are none yet), optionally only
    ``columns``. An unreadable part is left out with a warning (the next run quarantines it and redoes its
    inputs)."""
    tables, bad = _read_parts(output, columns)
    for p, why in bad:
        log.warning("ledger part %s cannot be read (%s); it is left out", p, why)
    if tables:
        return pa.concat_tables(tables)
    empty = LEDGER_SCHEMA.empty_table()
    return empty.select(columns) if columns else empty


def quarantine_unreadable(output: str | os.PathLike) -> list[str]:
    """Move unreadable ledger parts into ``ledger.parquet/.quarantine/``: their inputs then count as not done and
    are redone, and their shards, which no readable row names any more, are removed as uncommitted. One bad
    part never makes the whole output unreadable. Returns the quarantined parts' names."""
    _, bad = _read_parts(output)
    moved = []
    for p, why in bad:
        q = p.parent / QUARANTINE_DIR
        q.mkdir(exist_ok=True)
        os.replace(p, q / p.name)
        durable.fsync_dir(p.parent)
        log.warning("ledger part %s cannot be read (%s): moved to %s; its inputs will be redone", p.name, why, q)
        moved.append(p.name)
    return moved


def input_result(rows: list[dict[str, Any]], shard_of: dict[str, str]) -> dict[str, Any]:
    """All final rows of one input (accepted clips and rejected ones) -> its ledger row (without run/commit).

    ``shard_of`` maps each written sample key to its tar. Accepted when at least one sample was written.
    """
    first = rows[0]
    accepted = [r for r in rows if r["status"] == OK]
    rejected = [r for r in rows if r["status"] != OK]
    counts = collections.Counter(r["reason"] for r in rejected)
    row = {
        "source": first["source"],
        "given": first["given"],
        "occurrence": first["occurrence"],
        "keys": [r["key"] for r in accepted],
        "kinds": [r["kind"] for r in accepted],
        "shards": sorted({shard_of[r["key"]] for r in accepted}),
        "clips_rejected": json.dumps(dict(counts), sort_keys=True) if accepted or len(rejected) > 1 else "{}",
        "media_type": first["media_type"] or "",
        "origin": first["origin"] or "",
    }
    if accepted:  # clips it lost, if any, are counted in clips_rejected
        row.update(status=ACCEPTED, stage="write", reason="", detail="")
    else:
        common = counts.most_common(1)[0][0]
        worst = next(r for r in rejected if r["reason"] == common)
        row.update(status=REJECTED, stage=worst["stage"], reason=worst["reason"], detail=worst["detail"] or "")
    return row


def _input_ids(table: pa.Table) -> pa.Array:
    """One string per (source, occurrence), computed by Arrow: a million of them as Python tuples would cost the
    driver hundreds of MB."""
    occurrence = pc.cast(table.column("occurrence"), pa.string())
    return pc.binary_join_element_wise(table.column("source"), occurrence, "\x00")


def _key_digests(keys: Iterable[str]) -> np.ndarray:
    """The source digests of sample keys (``schema.sample_key``: 16 hex digits of the source's hash, then the clip
    index), as sorted unique 64-bit integers: 8 bytes per accepted input."""
    return np.unique(np.array([int(k[:16], 16) for k in keys], dtype=np.uint64))


class Ledger:
    """The ledger of one output directory: what is done, which shards are committed, and appending commits.

    Its memory does not grow with the rows: which inputs are done is read from the parts when asked
    (``not_done``), and sample keys are kept as 8-byte source digests."""

    def __init__(self, output: str | os.PathLike):
        self.output = Path(output)
        self.dir = ledger_dir(output)
        table = read_ledger(output, ["keys", "shards"])
        shards = pc.unique(pc.list_flatten(table.column("shards"))) if table.num_rows else pa.array([], pa.string())
        self.shards: set[str] = set(shards.to_pylist())
        keys = pc.list_flatten(table.column("keys")) if table.num_rows else pa.array([], pa.string())
        self.digests = _key_digests(keys.to_pylist())
        self.rows = table.num_rows

    @property
    def done(self) -> set[tuple[str, int]]:
        """Every committed (source, occurrence), as a set (for small ledgers; see ``not_done``)."""
        t = read_ledger(self.output, ["source", "occurrence"])
        return set(zip(t.column("source").to_pylist(), t.column("occurrence").to_pylist()))

    def done_ids(self) -> pa.Array:
        """Every committed input, one Arrow string per (source, occurrence): what ``not_done`` filters by."""
        return _input_ids(read_ledger(self.output, ["source", "occurrence"]))

    def not_done(self, tables: list[pa.Table], done: pa.Array | None = None) -> list[pa.Table]:
        """The rows of ``tables`` (input rows) that have no ledger row yet; ``done`` (``done_ids``) saves reading
        the ledger again for each call."""
        done = self.done_ids() if done is None else done
        return [t.filter(pc.invert(pc.is_in(_input_ids(t), value_set=done))) for t in tables]

    def append(self, rows: list[dict[str, Any]], run: str, commit: int) -> Path | None:
        """Write one commit's rows as a new part file (atomically). Duplicate keys are refused: a sample key may
        appear once in the whole output."""
        if not rows:
            return None
        new_keys = [k for r in rows for k in r["keys"]]
        # keys are made from the source's digest, so a key already in the output means its source was committed
        # before: checked per source, against the digests of every committed key
        new = _key_digests(new_keys)
        committed = self._committed(new)
        clash = {k for k in new_keys if int(k[:16], 16) in committed}
        clash |= {k for k, n in collections.Counter(new_keys).items() if n > 1}
        if clash:
            raise RuntimeError(
                f"refusing to commit duplicate sample keys {sorted(clash)[:3]}: the output "
                f"{self.output} would hold the same sample twice (this is a bug; please report it)"
            )
        now = time.time()
        full = [dict(r, run=run, commit=commit, finished_at=now) for r in rows]
        self.dir.mkdir(parents=True, exist_ok=True)
        part = self.dir / f"part-{run}-{commit:06d}.parquet"
        with durable.atomic_path(part) as tmp:
            pq.write_table(pa.Table.from_pylist(full, schema=LEDGER_SCHEMA), tmp)
        self.shards.update(s for r in rows for s in r["shards"])
        self.digests = np.union1d(self.digests, new)
        self.rows += len(rows)
        return part

    def _committed(self, digests: np.ndarray) -> set[int]:
        return set(digests[np.isin(digests, self.digests, assume_unique=True)].tolist())


def remove_uncommitted(output: str | os.PathLike, committed: Iterable[str]) -> list[str]:
    """Delete shard tars (and their indexes) that no ledger row names, and stale temporary files: the leftovers
    of a run killed between commits. Returns what was removed (paths relative to ``output``)."""
    root = Path(output)
    committed = set(committed)
    removed = []
    for kind in schema.KINDS:
        d = schema.shard_dir(root, kind)
        if not d.is_dir():
            continue
        for path in sorted(d.iterdir()):
            rel = path.relative_to(root).as_posix()
            if path.suffix == ".tar" and rel not in committed:
                removed.append(rel)
                path.unlink()
            elif path.suffix == ".parquet" and path.with_suffix(".tar").relative_to(root).as_posix() not in committed:
                removed.append(rel)
                path.unlink()
            elif path.name.startswith(".") and path.name.endswith(".tmp"):
                path.unlink()
    d = ledger_dir(root)
    if d.is_dir():
        for path in d.glob(".*.tmp"):
            path.unlink()
    if removed:
        log.warning("removed %d uncommitted shard file(s) left by an interrupted run", len(removed))
    return removed


def summarize(table: pa.Table) -> dict[str, Any]:
    """Totals over a whole ledger: inputs, accepted, rejected, samples per kind, rejections per reason. Needs the
    columns status, stage, reason and kinds; computed by Arrow, so a million rows cost no Python objects."""

    def counts(values: pa.Array) -> dict[str, int]:
        return {v["values"]: v["counts"] for v in pc.value_counts(values).to_pylist()}

    rejected = table.filter(pc.equal(table.column("status"), REJECTED))
    by_reason = counts(pc.binary_join_element_wise(rejected.column("stage"), rejected.column("reason"), ":"))
    kinds = counts(pc.list_flatten(table.column("kinds"))) if table.num_rows else {}
    return {
        "inputs": table.num_rows,
        "accepted": table.num_rows - rejected.num_rows,
        "rejected": rejected.num_rows,
        "samples": {k: kinds.get(k, 0) for k in schema.KINDS},
        "rejected_by_reason": dict(sorted(by_reason.items())),
    }
