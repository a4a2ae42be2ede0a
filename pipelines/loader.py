"""Streaming, resumable training input from curated WebDataset shards (the format of ``pipelines/schema.py``).

    loader = TrainLoader(LoaderSpec(data=["runs/curated"], image_batch=8, video_batch=4, num_frames=8,
                                    height=32, width=32), rank=0, world_size=2)
    for batch in loader:            # endless: training bounds it by its step count
        batch.image, batch.video, batch.position

Each sample kind (``image``, ``video_text``, ``video``) is one endless stream per rank, read as a list of
stages; what holds after each:

    plan_epoch   this rank's shards of epoch e in a seeded order, and which of their samples are this rank's
                 (whole shards per rank when there are at least as many shards as ranks, else every
                 world_size-th sample of each shard) -> ranks read disjoint samples that cover the epoch
    read_shard   the raw samples (member name -> bytes) of one tar; a corrupt member is logged and skipped; a
                 shard that is gone (deleted, unreachable) is logged and counted (``DataHealth``)
    shuffle      this rank's samples of the shard, permuted in blocks of ``shuffle_block`` by a seeded RNG
    decode       ``Item``: frames uint8 [f, h, w, 3] at the model size (or pre-encoded latents), caption,
                 conditioning frame; any sample that cannot be used (undecodable media, a json field of the
                 wrong type, a missing member) is logged, counted and skipped
    batch        ``StepBatch``: one image batch and one video batch (text-free and captioned clips mixed
                 ``text_free_fraction`` : rest) plus the position of every stream after its last item

Resume is exact to the sample: a position is (epoch, shard in the epoch's plan, samples of that shard already
used), and replaying the seeded plan and shuffle reproduces the same order, so a resumed run sees exactly the
samples the interrupted one would have seen next (only raw bytes of the current shard are re-read, not
decoded). That holds while the shard set and the number of workers stay the same. When the number of workers
changed (a resharded resume) the data position carries over as a count (``samples_taken``, ``resharded_position``):
the samples all old ranks took together since the run started, which fixes the epoch and how much of it is used;
each new rank skips the same share of its own plan of that epoch, so the run finishes the epoch with as many
samples as the old ranks still had to read, not replaying it from its start (the samples skipped are the new
plan's, so an epoch cut by a reshard can repeat or miss a few samples). When the shard set changed the stream
restarts at the beginning of the saved epoch (a warning says so).

Bad data is counted, never silent: ``DataHealth`` counts skipped samples and missing shards (the training
loop logs them as metrics) and stops training with ``DataError`` once more than ``max_bad_fraction`` of the
samples read, or of the shards, were unusable.

Streams never end (epochs repeat), so ranks with uneven shares can never leave a collective waiting: the
training loop stops every rank at the same step count.

Shapes. ``shapes="model"`` (the default) resizes every sample to the model's size and frame count. With
``shapes="buckets"`` there is one stream per (kind, bucket) (``448x256_16f``: size and frames as curated, from
the shard indexes), each the seeded, resumable stream above restricted to that bucket's samples; ``BucketPlan``
draws each step's image and video bucket and its batch size, so a batch holds one bucket, unpadded, at its
stored size. The state is every stream's position plus the number of batches made, so resume stays exact.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipelines import media, schema

log = logging.getLogger(__name__)


class DataError(ValueError):
    """The training data cannot be used as configured; the message says what to change."""


class DataHealth:
    """Counts what the loader could not use (skipped samples, missing shards) and stops training, with a
    ``DataError`` naming the counts, once more than ``max_fraction`` of the samples read, or of the shards, were
    unusable. Thread-safe (decode threads share it)."""

    MIN_SAMPLES = 20  # judge the sample fraction only after this many, so one early bad sample is not a verdict

    def __init__(self, total_shards: int, max_fraction: float):
        self.total_shards, self.max_fraction = max(1, total_shards), max_fraction
        self.samples = self.skipped = 0
        self.missing: set[str] = set()
        self._lock = threading.Lock()

    def sample(self, ok: bool) -> None:
        with self._lock:
            self.samples += 1
            self.skipped += not ok
            n, bad = self.samples, self.skipped
        if n >= self.MIN_SAMPLES and bad / n > self.max_fraction:
            raise DataError(
                f"{bad} of the {n} samples read could not be used (more than max_bad_fraction="
                f"{self.max_fraction:g}); the warnings above name them. Re-curate the data, or raise "
                "max_bad_fraction to train on what is usable"
            )

    def shard_missing(self, url: str, error: BaseException) -> None:
        with self._lock:
            first = url not in self.missing
            self.missing.add(url)
            n = len(self.missing)
        if first:
            log.warning("shard %s cannot be read, its samples are left out: %s", url, error)
        if n / self.total_shards > self.max_fraction:
            raise DataError(
                f"{n} of {self.total_shards} shards cannot be read (more than max_bad_fraction="
                f"{self.max_fraction:g}), e.g. {url}: {error}. Restore them, or curate the data again"
            )

    def metrics(self) -> dict[str, float]:
        with self._lock:
            return {
                "data_skipped_samples": float(self.skipped),
                "data_missing_shards": float(len(self.missing)),
                "data_skipped_fraction": self.skipped / max(1, self.samples),
            }


# ---------------------------------------------------------------------------------------------------------------
# Shard discovery and lineage


@dataclasses.dataclass
class ShardSet:
    """The finished shards of one kind under one curation output directory."""

    root: str  # curation output directory
    kind: str
    urls: list[str]  # tar paths, sorted
    counts: list[int]  # samples per tar (from its parquet index)

    @property
    def num_samples(self) -> int:
        return sum(self.counts)

    @property
    def name(self) -> str:
        return f"{Path(self.root).name}/{self.kind}"

    def digest(self) -> str:
        """Changes when a shard is added, removed or rewritten (names, sizes and sample counts)."""
        h = hashlib.sha1()
        for url, n in zip(self.urls, self.counts):
            h.update(f"{Path(url).name}:{Path(url).stat().st_size}:{n};".encode())
        return h.hexdigest()[:16]

    def index(self):
        """All parquet index rows of the set as one pandas DataFrame (for lineage)."""
        import pandas as pd
        import pyarrow.parquet as pq

        frames = [pq.read_table(schema.index_path(u)).to_pandas() for u in self.urls]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def find_shard_sets(data: list[str]) -> list[ShardSet]:
    """Every non-empty shard set of every curation output directory in ``data``."""
    import pyarrow.parquet as pq

    if not data:
        raise DataError(
            "no training data given: set data to one or more curation output directories "
            "(t2v curate --output DIR), e.g. --set data=[runs/curated]"
        )
    sets = []
    for root in data:
        if not Path(root).is_dir():
            raise DataError(
                f"data directory {root!r} does not exist; pass a curation output directory "
                "(it holds shards/<kind>/*.tar)"
            )
        named = _ledger_shards(root)
        for kind in schema.KINDS:
            # every shard the output says it has (an index, or a ledger row), whether or not its tar is still
            # there: a tar that is gone is counted as missing when read, never silently left out
            d = schema.shard_dir(Path(root).resolve(), kind)
            indexed = {str(p.with_suffix(".tar")) for p in d.glob("*.parquet")} if d.is_dir() else set()
            urls = sorted(indexed | {u for u in named if Path(u).parent == d})
            if urls:
                counts = [pq.ParquetFile(schema.index_path(u)).metadata.num_rows if u in indexed else 0 for u in urls]
                sets.append(ShardSet(str(Path(root).resolve()), kind, urls, counts))
    if not sets:
        raise DataError(
            f"no finished shards under {data}: each directory needs shards/<kind>/*.tar with their "
            ".parquet index (written by t2v curate)"
        )
    return sets


def _ledger_shards(root: str) -> set[str]:
    """Shard tars a curation output's ledger names (absolute paths); empty when it has no ledger."""
    import pyarrow.parquet as pq

    parts = sorted((Path(root) / schema.LEDGER_FILE).glob("part-*.parquet"))
    out: set[str] = set()
    for part in parts:
        try:
            column = pq.read_table(part, columns=["shards"]).column("shards").to_pylist()
        except Exception as e:  # an unreadable part is curation's to repair; the indexes still list the shards
            log.warning("cannot read ledger part %s: %s", part, e)
            continue
        out.update(str(Path(root).resolve() / s) for lst in column for s in (lst or []))
    return out


def urls_by_kind(sets: list[ShardSet]) -> dict[str, tuple[list[str], list[int]]]:
    out: dict[str, tuple[list[str], list[int]]] = {}
    for s in sets:
        urls, counts = out.setdefault(s.kind, ([], []))
        urls.extend(s.urls)
        counts.extend(s.counts)
    return out


# ---------------------------------------------------------------------------------------------------------------
# One kind's endless, resumable stream of raw samples for one rank


@dataclasses.dataclass
class Position:
    """Where a stream is: the next sample is number ``offset`` (after shuffling) of shard ``shard`` of the
    epoch's plan. ``fingerprint`` identifies the shard set and world size the plan was made for."""

    epoch: int = 0
    shard: int = 0
    offset: int = 0
    fingerprint: str = ""


def _fingerprint(urls: list[str], counts: list[int], world_size: int) -> str:
    h = hashlib.sha1(f"{world_size};".encode())
    for u, n in zip(urls, counts):
        h.update(f"{Path(u).name}:{n};".encode())
    return h.hexdigest()[:16]


def plan_epoch(
    urls: list[str],
    counts: list[int],
    rank: int,
    world_size: int,
    seed: int,
    stream_id: int,
    epoch: int,
    members: list[list[int]] | None = None,
) -> list[tuple[str, list[int] | None]]:
    """This rank's (shard url, kept local sample indices or None for all) for one epoch, in read order.

    ``members``: per shard, the local indices of the stream's samples (a bucket's samples share tars with other
    buckets); None: all of them."""
    order = np.random.default_rng([seed, stream_id, epoch]).permutation(len(urls))
    if len(urls) >= world_size:
        return [(urls[i], None if members is None else members[i]) for i in order[rank::world_size]]
    # Fewer shards than ranks: every rank reads every shard and keeps every world_size-th sample of the
    # epoch (numbered across shards), so shares differ by at most one sample. A bucket with fewer samples than
    # ranks is shared round-robin instead, so no rank is ever without one.
    groups = world_size if members is None else max(1, min(world_size, sum(counts)))
    plan, first = [], 0
    for i in order:
        local = range(counts[i]) if members is None else members[i]
        keep = [j for n, j in enumerate(local) if (first + n) % groups == rank % groups]
        first += counts[i]
        plan.append((urls[i], keep))
    return plan


def plan_sizes(plan: list[tuple[str, list[int] | None]], urls: list[str], counts: list[int]) -> list[int]:
    """Samples of each entry of a ``plan_epoch`` plan."""
    n = dict(zip(urls, counts))
    return [n[url] if keep is None else len(keep) for url, keep in plan]


def samples_taken(position: Position, plan_of) -> int:
    """Samples a rank's stream took from the start of the run up to ``position``: its whole plans of the earlier
    epochs plus the used part of this epoch's. ``plan_of(epoch)``: that rank's plan sizes (``plan_sizes``)."""
    done = sum(sum(plan_of(e)) for e in range(position.epoch))
    return done + sum(plan_of(position.epoch)[: position.shard]) + position.offset


def resharded_position(taken: int, epoch_size: int, sizes_of, fingerprint: str) -> Position:
    """Where one rank of a new world size continues a stream whose old ranks took ``taken`` samples together
    (``samples_taken`` summed over them). The run is in epoch ``taken // epoch_size`` with ``taken % epoch_size``
    of its samples used; this rank skips that share of its plan of the epoch (``sizes_of(epoch)``, its plan sizes),
    rounded down, so the new ranks together read about what the old ones still had to read of the epoch."""
    epoch, used = divmod(taken, max(1, epoch_size))
    sizes = sizes_of(epoch)
    skip = used * sum(sizes) // max(1, epoch_size)
    shard = 0
    while shard < len(sizes) and skip >= sizes[shard]:
        skip -= sizes[shard]
        shard += 1
    return Position(epoch, shard, skip, fingerprint)


def _log_and_continue(exn: Exception) -> bool:
    log.warning("skipping a corrupt shard member: %s", exn)
    return True


def read_shard(url: str) -> Iterator[dict[str, Any]]:
    """Raw samples of one tar (``__key__`` plus member name -> bytes), corrupt members skipped."""
    from webdataset.tariterators import tarfile_samples

    yield from tarfile_samples([{"url": url}], handler=_log_and_continue)


class KindStream:
    """Endless, seeded, resumable stream of one kind's raw samples for one rank: yields (raw, position after)."""

    def __init__(
        self,
        kind: str,
        urls: list[str],
        counts: list[int],
        rank: int,
        world_size: int,
        seed: int,
        shuffle_block: int = 256,
        position: Position | None = None,
        health: DataHealth | None = None,
        shape: str | None = None,
        members: list[list[int]] | None = None,
        resharded_from: list[Position] | None = None,
    ):
        """``resharded_from``: every old rank's position, in rank order, when the checkpoint was written by another
        number of workers (``position`` is then ignored); see the module docstring."""
        self.kind, self.urls, self.counts = kind, urls, counts
        self.health = health or DataHealth(len(urls), 1.0)
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle_block = shuffle_block
        self.shape, self.members = shape, members  # one bucket's samples of the kind (None: all of them)
        self.stream_id = schema.KINDS.index(kind)
        if shape is not None:
            self.stream_id = int(hashlib.sha1(f"{kind}@{shape}".encode()).hexdigest()[:8], 16)
        self.fingerprint = _fingerprint(urls, counts, world_size)
        if resharded_from:
            position = self._resharded(resharded_from)
        self.start = position or Position(fingerprint=self.fingerprint)
        if self.start.fingerprint != self.fingerprint:
            log.warning(
                "%s shards or the number of workers changed since the checkpoint: the %s stream restarts "
                "at the beginning of epoch %d",
                kind,
                kind,
                self.start.epoch,
            )
            self.start = Position(epoch=self.start.epoch, fingerprint=self.fingerprint)

    def _sizes(self, rank: int, world_size: int, epoch: int) -> list[int]:
        plan = plan_epoch(self.urls, self.counts, rank, world_size, self.seed, self.stream_id, epoch, self.members)
        return plan_sizes(plan, self.urls, self.counts)

    def _resharded(self, old: list[Position]) -> Position:
        old_world = len(old)
        if any(p.fingerprint != _fingerprint(self.urls, self.counts, old_world) for p in old):
            return Position(epoch=min(p.epoch for p in old))  # the shard set changed too: the warning below
        taken = sum(samples_taken(p, lambda e, r=r: self._sizes(r, old_world, e)) for r, p in enumerate(old))
        epoch_size = sum(self.counts) if self.members is None else sum(len(m) for m in self.members)
        start = resharded_position(
            taken, epoch_size, lambda e: self._sizes(self.rank, self.world_size, e), self.fingerprint
        )
        log.info(
            "%s stream resharded from %d to %d workers: %d samples taken, rank %d continues at %s",
            self.kind,
            old_world,
            self.world_size,
            taken,
            self.rank,
            start,
        )
        return start

    def _shard_samples(self, url: str, keep: list[int] | None, epoch: int, shard: int) -> Iterator[dict]:
        """This rank's samples of one shard in their shuffled order (deterministic given epoch and shard)."""
        wanted = None if keep is None else set(keep)
        rng = np.random.default_rng([self.seed, self.stream_id, epoch, shard])
        block: list[dict] = []
        try:
            with open(url, "rb"):  # (webdataset would log a missing tar and go on, silently short of data)
                pass
        except OSError as e:
            self.health.shard_missing(url, e)
            return
        for j, raw in enumerate(read_shard(url)):
            if wanted is not None and j not in wanted:
                continue
            block.append(raw)
            if len(block) == self.shuffle_block:
                yield from (block[i] for i in rng.permutation(len(block)))
                block = []
        yield from (block[i] for i in rng.permutation(len(block)))

    def __iter__(self) -> Iterator[tuple[dict, Position]]:
        epoch, shard, offset = self.start.epoch, self.start.shard, self.start.offset
        while True:
            plan = plan_epoch(
                self.urls, self.counts, self.rank, self.world_size, self.seed, self.stream_id, epoch, self.members
            )
            produced = 0
            for s in range(shard, len(plan)):
                url, keep = plan[s]
                for k, raw in enumerate(self._shard_samples(url, keep, epoch, s)):
                    if s == shard and k < offset:
                        continue  # resuming: already used before the checkpoint
                    produced += 1
                    yield raw, Position(epoch, s, k + 1, self.fingerprint)
            if produced == 0 and shard == 0 and offset == 0:
                gone = f" ({len(self.health.missing)} shard(s) cannot be read)" if self.health.missing else ""
                raise DataError(
                    f"worker {self.rank} of {self.world_size} got no {self.kind} samples{gone}: the "
                    f"{self.kind} shards hold {sum(self.counts)} samples; add data or use fewer workers"
                )
            epoch, shard, offset = epoch + 1, 0, 0


# ---------------------------------------------------------------------------------------------------------------
# Decoding a raw sample into what the training step needs


@dataclasses.dataclass
class Item:
    """One decoded sample at the model's size."""

    key: str
    kind: str
    caption: str | None  # None for text-free clips
    frames: np.ndarray | None  # uint8 [f, h, w, 3]; None when pre-encoded latents replace it
    cond_frame: np.ndarray | None  # uint8 [h, w, 3]: the middle (or first) frame, the CLIP image condition
    latent_mean: np.ndarray | None = None  # float32 [c, f, h', w'] pre-encoded posterior mean (unscaled)
    latent_std: np.ndarray | None = None
    text_emb: np.ndarray | None = None  # float32 [n, d]
    image_emb: np.ndarray | None = None  # float32 [d]
    fps: float = 0.0  # the clip's frame rate (0 for images): the fps condition
    shape: str = ""  # the stored bucket and frames, e.g. 448x256_16f
    # structure conditions the model takes and the sample has: kind -> float32 [c, f, h, w] (model/conditions.py)
    conditions: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


def frame_indices(total: int, num_frames: int, stride: int, rng: np.random.Generator) -> np.ndarray:
    """Which of ``total`` frames form the clip. stride 0: ``num_frames`` spread evenly over the whole clip;
    stride k: every k-th frame from a random start. Short clips repeat their last frame."""
    if num_frames == 1:
        return np.array([total // 2])
    if stride == 0:
        return np.linspace(0, total - 1, num_frames).round().astype(int)
    span = (num_frames - 1) * stride + 1
    start = int(rng.integers(0, total - span + 1)) if total > span else 0
    return np.minimum(start + stride * np.arange(num_frames), total - 1)


def resize_frames(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 [f, h, w, 3] -> [f, height, width, 3]: scale the short side (antialiased), centre crop."""
    f, h, w, _ = frames.shape
    if (h, w) == (height, width):
        return frames
    scale = max(height / h, width / w)
    size = (max(height, round(h * scale)), max(width, round(w * scale)))
    x = torch.from_numpy(np.array(frames)).permute(0, 3, 1, 2).float()  # [f, 3, h, w] (a writable copy)
    x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    x = x[:, :, top : top + height, left : left + width]
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


class Decoder:
    """raw sample -> ``Item``. A callable stage: ``__init__`` takes the model geometry, ``__call__`` one sample.
    With ``num_frames``, ``height`` and ``width`` None (bucket batches) a clip keeps its stored size and frames,
    and pre-encoded latents are used when they are the stored size divided by ``latent_factor``.

    ``expected_encoders`` is the identity of the encoders training uses; pre-encoded arrays written by other
    encoders (a differing value under a shared key) are ignored and the sample is encoded on the fly.
    ``cache_mb`` keeps decoded, resized clips in memory (least recently used out), which pays off when a small
    corpus is read for many epochs.
    """

    def __init__(
        self,
        num_frames: int | None,
        height: int | None,
        width: int | None,
        frame_stride: int = 0,
        latent_hw: tuple[int, int] | None = None,
        expected_encoders: dict | None = None,
        seed: int = 0,
        cache_mb: float = 0.0,
        image_frame: str = "middle",
        health: DataHealth | None = None,
        latent_factor: int = 1,
        condition_kinds: tuple[str, ...] = (),
    ):
        self.num_frames, self.height, self.width = num_frames, height, width
        self.condition_kinds = tuple(condition_kinds)
        self.latent_factor = latent_factor
        self.image_frame = image_frame  # which clip frame is the CLIP image condition: middle or first
        self.health = health or DataHealth(1, 1.0)
        self.frame_stride = frame_stride
        self.latent_hw = latent_hw
        self.expected_encoders = expected_encoders or {}
        self.seed = seed
        self.cache_bytes = int(cache_mb * 2**20)
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cached = 0
        self._lock = threading.Lock()
        self.stats = {
            "decoded": 0,
            "skipped": 0,
            "pre_encoded": 0,
            "cache_hits": 0,
            "encoder_mismatch": 0,
            "condition_errors": 0,
        }

    def __call__(self, raw: dict, epoch: int = 0) -> Item | None:
        """None (logged and counted) when the sample cannot be used."""
        try:
            item = self._decode(raw, epoch)
        except Exception as e:  # any malformed sample (bad media, json of the wrong shape): skipped, counted
            self._count("skipped")
            log.warning("skipping sample %s: %s: %s", raw.get("__key__"), type(e).__name__, e)
            item = None
        self.health.sample(item is not None)
        return item

    def _decode(self, raw: dict, epoch: int) -> Item:
        sample = schema.decode_sample(raw)
        kind = sample.meta.kind
        frames_per_item = 1 if kind == "image" else (self.num_frames or sample.meta.num_frames)
        stride = self.frame_stride if self.num_frames else 0  # a bucket's clip: all of its frames
        rng = np.random.default_rng([self.seed, epoch, int(hashlib.sha1(sample.key.encode()).hexdigest()[:8], 16)])
        arrays = self._usable_arrays(sample)
        item = Item(sample.key, kind, sample.caption if kind != "video" else None, None, None)
        item.fps, item.shape = float(sample.meta.fps), sample.meta.shape
        if "text_emb" in arrays and item.caption:
            item.text_emb = arrays["text_emb"].astype(np.float32)
        if "image_emb" in arrays:
            item.image_emb = arrays["image_emb"].astype(np.float32)
        if "latent_mean" in arrays:
            mean = arrays["latent_mean"]  # [c, f, h', w']
            idx = frame_indices(mean.shape[1], frames_per_item, stride, rng)
            item.latent_mean = mean[:, idx].astype(np.float32)
            std = arrays.get("latent_std")
            item.latent_std = (std[:, idx] if std is not None else np.zeros_like(mean[:, idx])).astype(np.float32)
            self._count("pre_encoded")
            item.conditions = self._conditions(sample, idx)
            if item.image_emb is not None:
                return item  # nothing left to decode
        clip = self._clip(sample)  # [n, h, w, 3] at model size
        if item.latent_mean is None:
            idx = frame_indices(len(clip), frames_per_item, stride, rng)
            item.frames = clip[idx]
            item.conditions = self._conditions(sample, idx)
        item.cond_frame = clip[idx[0] if self.image_frame == "first" else idx[len(idx) // 2]]
        return item

    def _conditions(self, sample: schema.Sample, idx: np.ndarray) -> dict[str, np.ndarray]:
        """The sample's conditions at the item's frames and size, normalised for the encoder; one that does not
        fit (another frame count or kind) is left out and counted, the sample stays."""
        from model.conditions import normalise

        out = {}
        for kind in self.condition_kinds:
            array = sample.arrays.get(kind)  # [n, c, h, w]
            if array is None:
                continue
            if array.ndim != 4 or len(array) <= int(idx.max()):
                if self._count("condition_errors") == 1:
                    log.warning(
                        "condition %s of %s has shape %s for %d frames: left out",
                        kind,
                        sample.key,
                        array.shape,
                        sample.meta.num_frames,
                    )
                continue
            x = torch.from_numpy(np.ascontiguousarray(array[idx])).float()  # [f, c, h, w]
            if self.height is not None and tuple(x.shape[-2:]) != (self.height, self.width):
                mode = "nearest" if kind == "sketch" else "bilinear"
                x = F.interpolate(x, size=(self.height, self.width), mode=mode)
            out[kind] = normalise(kind, x.permute(1, 0, 2, 3)).numpy()  # [c, f, h, w]
        return out

    def _count(self, name: str) -> int:
        with self._lock:
            self.stats[name] += 1
            return self.stats[name]

    def _usable_arrays(self, sample: schema.Sample) -> dict[str, np.ndarray]:
        if not sample.arrays:
            return {}
        differ = schema.stamp_differences(sample.encoders, self.expected_encoders)
        if differ:
            if self._count("encoder_mismatch") == 1:
                log.warning(
                    "pre-encoded arrays of %s were made with other encoders (%s differ); encoding on the fly instead",
                    sample.key,
                    sorted(differ),
                )
            return {}
        arrays = dict(sample.arrays)
        mean = arrays.get("latent_mean")
        latent_hw = self.latent_hw
        if self.height is None:  # bucket batches: latents of the stored size
            f = self.latent_factor
            latent_hw = (sample.meta.height // f, sample.meta.width // f)
        if mean is not None and latent_hw is not None and tuple(mean.shape[-2:]) != tuple(latent_hw):
            if self._count("encoder_mismatch") == 1:
                log.warning(
                    "pre-encoded latents of %s are %s, the model needs %s; encoding on the fly instead",
                    sample.key,
                    tuple(mean.shape[-2:]),
                    tuple(latent_hw),
                )
            arrays.pop("latent_mean"), arrays.pop("latent_std", None)
        return arrays

    def _clip(self, sample: schema.Sample) -> np.ndarray:
        with self._lock:  # several decode threads share the cache
            cached = self._cache.get(sample.key)
            if cached is not None:
                self._cache.move_to_end(sample.key)
                self.stats["cache_hits"] += 1
                return cached
        if sample.meta.kind == "image":
            frames = media.decode_image(sample.media)[None]  # [1, h, w, 3]
        else:
            frames = media.decode_mp4(sample.media)  # [n, h, w, 3]
        clip = frames if self.height is None else resize_frames(frames, self.height, self.width)
        with self._lock:
            self.stats["decoded"] += 1
            if self.cache_bytes and clip.nbytes <= self.cache_bytes and sample.key not in self._cache:
                self._cache[sample.key] = clip
                self._cached += clip.nbytes
                while self._cached > self.cache_bytes:
                    _, old = self._cache.popitem(last=False)
                    self._cached -= old.nbytes
        return clip


# ---------------------------------------------------------------------------------------------------------------
# Step batches


@dataclasses.dataclass
class LoaderSpec:
    """What one training step consumes and how samples are shaped (built from TrainConfig by the worker)."""

    data: list[str]
    image_batch: int = 8  # image-text pairs per step and worker (0: no content branch)
    video_batch: int = 4  # clips per step and worker (0: no motion branch)
    text_free_fraction: float = 0.5  # share of the video batch taken from text-free clips (when both exist)
    num_frames: int = 8
    height: int = 32
    width: int = 32
    frame_stride: int = 0
    latent_hw: tuple[int, int] | None = None
    expected_encoders: dict | None = None
    seed: int = 0
    shuffle_block: int = 256
    prefetch: int = 4  # step batches decoded ahead in a background thread
    decode_workers: int = 2  # samples decoded in parallel (threads; PyAV decodes without the GIL)
    cache_mb: float = 0.0
    max_bad_fraction: float = 0.05  # stop when more than this share of samples or shards is unusable
    image_frame: str = "middle"  # the clip frame whose CLIP embedding conditions it (VGen's TF-T2V: first)
    # Shapes. "model": every sample resized to height x width and num_frames (one shape); "buckets": each batch
    # is one bucket of the data (size and frames as curated), see BucketPlan.
    shapes: str = "model"
    pixel_budget: int = 0  # buckets: pixels (w x h x frames) per video batch; 0: video_batch at the model's shape
    bucket_weights: dict[str, float] = dataclasses.field(default_factory=dict)  # shape or WxH -> weight
    frame_mixing: str = "per_step"  # buckets: per_step (all ranks one shape a step) | per_rank (VGen frame_lens)
    frame_lens: list[int] = dataclasses.field(default_factory=list)  # per_rank: rank r's frames (empty: the data's)
    size_multiple: int = 1  # buckets: the model takes heights and widths that are multiples of this (pixels)
    latent_factor: int = 1  # pixels per latent along height and width
    condition_kinds: tuple[str, ...] = ()  # structure conditions to deliver with each item (unet.conditions.kinds)


@dataclasses.dataclass
class StepBatch:
    image: list[Item]
    video: list[Item]
    position: dict[str, dict]  # kind -> Position as a dict, after this batch


def shard_shapes(url: str) -> list[str]:
    """The shape (``schema.shape_name``) of each sample of a tar, in tar order: from its parquet index, or from
    the samples' json when the index has no geometry columns."""
    import pyarrow.parquet as pq

    index = schema.index_path(url)
    columns = set(pq.ParquetFile(index).schema_arrow.names) if index.exists() else set()
    if {"width", "height", "num_frames"} <= columns:
        t = pq.read_table(index, columns=["width", "height", "num_frames"]).to_pydict()
        return [schema.shape_name(*v) for v in zip(t["width"], t["height"], t["num_frames"])]
    if not Path(url).exists():
        return []
    return [schema.SampleMeta.from_json(raw["json"]).shape for raw in read_shard(url)]


def bucket_inventory(sets: list[ShardSet]) -> dict[str, dict[str, tuple[list[str], list[int], list[list[int]]]]]:
    """kind -> shape -> (urls, sample counts, local indices per url) of the tars holding that shape."""
    out: dict[str, dict[str, tuple[list[str], list[int], list[list[int]]]]] = {}
    for s in sets:
        for url in s.urls:
            by_shape: dict[str, list[int]] = {}
            for j, shape in enumerate(shard_shapes(url)):
                by_shape.setdefault(shape, []).append(j)
            for shape, local in by_shape.items():
                urls, counts, members = out.setdefault(s.kind, {}).setdefault(shape, ([], [], []))
                urls.append(url)
                counts.append(len(local))
                members.append(local)
    return out


def _parse_shape(shape: str) -> tuple[int, int, int]:
    size, frames = shape.rsplit("_", 1)
    w, h = size.split("x")
    return int(w), int(h), int(frames[:-1])


class BucketPlan:
    """Which bucket each step's batches come from, and how many samples: the part of bucket batching that
    every rank computes alike from the inventory and the seed.

    Weights: ``bucket_weights`` names shapes (``448x256_16f``) or sizes (``448x256``, every length); in a branch
    (images, videos) where it names one, unnamed shapes are not sampled; elsewhere shapes are drawn in
    proportion to their samples. Batch size: ``pixel_budget // (w * h * frames)`` (at least 1), so memory per
    step stays about the same across buckets. ``per_step``: the step's shape is drawn with an RNG shared by the
    ranks (alike step times); ``per_rank``: rank r only trains on ``frame_lens[r % len]`` frames, as VGen's
    ``frame_lens`` does, the size drawn per step."""

    def __init__(self, spec: LoaderSpec, inventory: dict, rank: int):
        self.spec, self.rank = spec, rank
        counts = {
            kind: {shape: sum(v[1]) for shape, v in shapes.items()} for kind, shapes in inventory.items()
        }  # kind -> shape -> samples
        bad = sorted(
            {
                shape
                for shapes in counts.values()
                for shape in shapes
                if any(side % spec.size_multiple for side in _parse_shape(shape)[:2])
            }
        )
        if bad:
            raise DataError(
                f"bucket(s) {', '.join(bad)}: the model takes heights and widths that are multiples of "
                f"{spec.size_multiple} pixels (its UNet levels and autoencoder); curate without them, or leave them "
                "out with bucket_weights"
            )
        self.all_shapes = sorted({shape for shapes in counts.values() for shape in shapes})
        self.image = self._weights("image", counts.get("image", {})) if spec.image_batch else {}
        free, text = counts.get("video", {}), counts.get("video_text", {})
        self.free, self.text = free, text
        frac = spec.text_free_fraction
        video = {k: free.get(k, 0) * (frac > 0) + text.get(k, 0) * (frac < 1) for k in set(free) | set(text)}
        video = {k: n for k, n in video.items() if n}
        if spec.frame_mixing == "per_rank" and video:
            lens = spec.frame_lens or sorted({_parse_shape(k)[2] for k in video})
            mine = lens[rank % len(lens)]
            video = {k: n for k, n in video.items() if _parse_shape(k)[2] == mine}
            if not video:
                raise DataError(
                    f"frame_mixing=per_rank gives worker {rank} clips of {mine} frames (frame_lens={lens}), but the "
                    f"data has no such clips; its shapes are {self.all_shapes}"
                )
        self.video = self._weights("video", video) if spec.video_batch else {}
        if spec.image_batch and not self.image:
            raise DataError("image_batch > 0 but no image bucket can be sampled; curate images or set image_batch=0")
        if spec.video_batch and not self.video:
            raise DataError("video_batch > 0 but no video bucket can be sampled; curate videos or set video_batch=0")
        model_pixels = spec.height * spec.width
        self.video_budget = spec.pixel_budget or spec.video_batch * model_pixels * spec.num_frames
        self.image_budget = spec.image_batch * model_pixels

    def _weights(self, branch: str, counts: dict[str, int]) -> dict[str, float]:
        given = self.spec.bucket_weights
        unknown = [
            k for k in given if k not in self.all_shapes and not any(s.startswith(f"{k}_") for s in self.all_shapes)
        ]
        if unknown:
            raise DataError(
                f"bucket_weights names {unknown}, which the data does not have; its buckets are "
                f"{self.all_shapes} (a shape WxH_Nf, or a size WxH for every length)"
            )
        named = {k: given.get(k, given.get(k.rsplit("_", 1)[0])) for k in counts}
        if any(v is not None for v in named.values()):
            weights = {k: float(v or 0.0) for k, v in named.items()}
        else:
            weights = {k: float(n) for k, n in counts.items()}
        weights = {k: w for k, w in weights.items() if w > 0}
        if counts and not weights:
            raise DataError(f"bucket_weights leaves no {branch} bucket with a weight > 0; give one a positive weight")
        return dict(sorted(weights.items()))

    def draw(self, weights: dict[str, float], batch_index: int, salt: int) -> str:
        rng = np.random.default_rng([self.spec.seed, salt, batch_index])  # the same on every rank
        names = list(weights)
        p = np.array([weights[k] for k in names])
        return names[int(rng.choice(len(names), p=p / p.sum()))]

    def step(self, batch_index: int) -> dict[str, int]:
        """stream name (``kind@shape``) -> samples to take for batch number ``batch_index``."""
        out: dict[str, int] = {}
        if self.image:
            shape = self.draw(self.image, batch_index, 1)
            w, h, _ = _parse_shape(shape)
            out[f"image@{shape}"] = max(1, self.image_budget // (w * h))
        if self.video:
            shape = self.draw(self.video, batch_index, 2)
            w, h, f = _parse_shape(shape)
            n = max(1, self.video_budget // (w * h * f))
            frac = self.spec.text_free_fraction
            if shape in self.free and shape in self.text:
                free = round(n * frac)
            else:
                free = n if shape in self.free and frac > 0 else 0
            if free:
                out[f"video@{shape}"] = free
            if n - free:
                out[f"video_text@{shape}"] = n - free
        return out


class TrainLoader:
    """Endless iterator of ``StepBatch`` for one rank, decoded ahead in a background thread.

    ``state`` is a ``StepBatch.position`` from a checkpoint: the stream continues right after that batch.
    ``resharded_from`` replaces it when the checkpoint was written by another number of workers: every old rank's
    ``StepBatch.position``, in rank order; the streams continue from the samples they took together.
    """

    def __init__(
        self,
        spec: LoaderSpec,
        rank: int = 0,
        world_size: int = 1,
        state: dict | None = None,
        shard_sets: list[ShardSet] | None = None,
        resharded_from: list[dict] | None = None,
    ):
        self.spec = spec
        self.sets = shard_sets if shard_sets is not None else find_shard_sets(spec.data)
        self.seen: dict[str, int] = {}  # shape -> samples this rank delivered (the bucket histogram)
        self.batches = 0  # step batches produced (bucket mode: numbers the per-step bucket draws)
        old = resharded_from or []
        if spec.shapes == "buckets":
            self._init_buckets(rank, world_size, state or {}, old)
            return
        self.plan: BucketPlan | None = None
        by_kind = urls_by_kind(self.sets)
        state = state or {}
        if "streams" in state:
            log.warning("the saved data position is of shapes=buckets: the streams start at the beginning")
            state = {}
        self.composition = self._composition(by_kind)
        used = {k for k, n in self.composition.items() if n > 0}
        self.health = DataHealth(sum(len(by_kind[k][0]) for k in used if k in by_kind), spec.max_bad_fraction)
        self.streams = {
            kind: KindStream(
                kind,
                *by_kind[kind],
                rank,
                world_size,
                spec.seed,
                spec.shuffle_block,
                Position(**state[kind]) if kind in state else None,
                self.health,
                resharded_from=_old_positions(old, kind),
            )
            for kind in used
        }
        self.decoder = Decoder(
            spec.num_frames,
            spec.height,
            spec.width,
            spec.frame_stride,
            spec.latent_hw,
            spec.expected_encoders,
            spec.seed + 7919 * rank,
            spec.cache_mb,
            spec.image_frame,
            self.health,
            condition_kinds=spec.condition_kinds,
        )
        self._start_threads()

    def _init_buckets(self, rank: int, world_size: int, state: dict, old: list[dict]) -> None:
        """Bucket batches: one stream per (kind, shape), each its own seeded, resumable ``KindStream``; the state
        is every stream's position plus the number of batches made (which numbers the bucket draws)."""
        spec = self.spec
        inventory = bucket_inventory(self.sets)
        self.plan = BucketPlan(spec, inventory, rank)
        used = [*(f"image@{k}" for k in self.plan.image)]
        for shape in self.plan.video:
            used += [f"{kind}@{shape}" for kind in schema.VIDEO_KINDS if shape in inventory.get(kind, {})]
        if state and "streams" not in state:
            log.warning("the saved data position is of shapes=model: the bucket streams start at the beginning")
        positions = state.get("streams", {})
        self.batches = int(state.get("batches", 0))
        self._made: dict[str, int] = dict(state.get("seen", {}))
        if old and all("streams" in o for o in old):
            # the bucket draws are numbered alike on every rank; the histogram's totals are split over the new ranks
            self.batches = int(old[0].get("batches", 0))
            totals = {k: sum(o.get("seen", {}).get(k, 0) for o in old) for k in old[0].get("seen", {})}
            self._made = {k: n // world_size + (n % world_size if rank == 0 else 0) for k, n in totals.items()}
        self.seen = dict(self._made)
        urls = {u for name in used for u in inventory[name.split("@")[0]][name.split("@")[1]][0]}
        self.health = DataHealth(len(urls), spec.max_bad_fraction)
        self.streams = {}
        for name in used:
            kind, shape = name.split("@")
            found_urls, counts, members = inventory[kind][shape]
            self.streams[name] = KindStream(
                kind,
                found_urls,
                counts,
                rank,
                world_size,
                spec.seed,
                spec.shuffle_block,
                Position(**positions[name]) if name in positions else None,
                self.health,
                shape=shape,
                members=members,
                resharded_from=_old_positions([o.get("streams", {}) for o in old], name),
            )
        self.decoder = Decoder(
            None,
            None,
            None,
            0,
            None,
            spec.expected_encoders,
            spec.seed + 7919 * rank,
            spec.cache_mb,
            spec.image_frame,
            self.health,
            latent_factor=spec.latent_factor,
            condition_kinds=spec.condition_kinds,
        )
        self._start_threads()

    def _start_threads(self) -> None:
        self._pool = ThreadPoolExecutor(max(1, self.spec.decode_workers), thread_name_prefix="decode")
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, self.spec.prefetch))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.produce_time = 0.0  # seconds the background thread spent reading + decoding

    @property
    def shape_names(self) -> list[str]:
        """Bucket mode: every shape of the data, sorted, the same list on every rank (the histogram's keys)."""
        return list(self.plan.all_shapes) if self.plan is not None else sorted(self.seen)

    def _composition(self, by_kind: dict) -> dict[str, int]:
        """Samples per step from each kind."""
        s = self.spec
        if s.image_batch and "image" not in by_kind:
            raise DataError("image_batch > 0 but the data has no image shards; curate images or set image_batch=0")
        n_video = {k: sum(by_kind[k][1]) for k in schema.VIDEO_KINDS if k in by_kind}
        if s.video_batch and not n_video:
            raise DataError("video_batch > 0 but the data has no video shards; curate videos or set video_batch=0")
        if s.video_batch and "video" in n_video and "video_text" in n_video:
            free = round(s.video_batch * s.text_free_fraction)
        elif s.video_batch and "video" in n_video:
            if s.text_free_fraction == 0:
                raise DataError(
                    "text_free_fraction=0 but the data has only text-free videos; add captioned "
                    "videos or raise text_free_fraction"
                )
            free = s.video_batch
        else:
            free = 0
        return {"image": s.image_batch, "video": free, "video_text": s.video_batch - free}

    # -- producer -----------------------------------------------------------------------------------------------

    def _take(self, iterators: dict, kind: str, n: int, positions: dict) -> list[Item]:
        """n decoded items of ``kind`` (decoded ``decode_workers`` at a time: PyAV releases the GIL while FFmpeg
        decodes, so threads overlap); samples that fail to decode are replaced by the next ones."""
        items: list[Item] = []
        while len(items) < n:
            raws = [next(iterators[kind]) for _ in range(n - len(items))]
            decoded = self._pool.map(lambda rp: self.decoder(rp[0], rp[1].epoch), raws)
            items += [item for item in decoded if item is not None]
            positions[kind] = dataclasses.asdict(raws[-1][1])
        return items

    def _next_batch(self, iterators: dict, positions: dict) -> StepBatch:
        if self.plan is None:
            c = self.composition
            image = self._take(iterators, "image", c["image"], positions)
            video = self._take(iterators, "video", c["video"], positions)
            video += self._take(iterators, "video_text", c["video_text"], positions)
            state: dict = {k: dict(v) for k, v in positions.items()}
        else:
            image, video = [], []
            for name, n in self.plan.step(self.batches).items():
                (image if name.startswith("image@") else video).extend(self._take(iterators, name, n, positions))
            for item in image + video:
                self._made[item.shape] = self._made.get(item.shape, 0) + 1
            state = {
                "streams": {k: dict(v) for k, v in positions.items()},
                "batches": self.batches + 1,
                "seen": dict(self._made),  # the histogram carries over a resume
            }
        self.batches += 1
        return StepBatch(image, video, state)

    def _produce(self) -> None:
        try:
            iterators = {kind: iter(stream) for kind, stream in self.streams.items()}
            positions = {kind: dataclasses.asdict(stream.start) for kind, stream in self.streams.items()}
            while not self._stop.is_set():
                t0 = time.perf_counter()
                batch = self._next_batch(iterators, positions)
                self.produce_time += time.perf_counter() - t0
                while not self._stop.is_set():
                    try:
                        self._queue.put(batch, timeout=0.2)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # handed to the consumer, which re-raises it in the training loop
            self._queue.put(e)

    # -- consumer -----------------------------------------------------------------------------------------------

    def __iter__(self) -> TrainLoader:
        return self

    def __next__(self) -> StepBatch:
        if self._thread is None:
            self._thread = threading.Thread(target=self._produce, name="train-loader", daemon=True)
            self._thread.start()
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        if self.plan is not None:
            self.seen = dict(item.position["seen"])
        else:
            for it in item.image + item.video:  # counted when training takes the batch, not when it is prefetched
                self.seen[it.shape] = self.seen.get(it.shape, 0) + 1
        return item

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._pool.shutdown(wait=False, cancel_futures=True)


def _old_positions(old: list[dict], name: str) -> list[Position] | None:
    """Every old rank's position of one stream, or None when a rank has none (the stream then starts afresh)."""
    if not old or any(name not in o for o in old):
        return None
    return [Position(**o[name]) for o in old]


def collate_frames(items: list[Item]) -> torch.Tensor:
    """uint8 [b, f, h, w, 3] from items that all carry frames."""
    return torch.from_numpy(np.stack([it.frames for it in items]))
