"""The shard format: the one place that says what a curated sample looks like on disk.

Curation writes it, training and evaluation read it; both import this module and nothing else knows the
member names. Layout of a curation output directory::

    <out>/shards/<kind>/<kind>-<run>-000000.tar      WebDataset tar, one per ~``maxcount`` samples / ``maxsize`` bytes
    <out>/shards/<kind>/<kind>-<run>-000000.parquet  index of that tar: one row per sample (key + metadata columns)
    <out>/ledger.parquet/                       parquet dataset (part files): one row per input, accepted | rejected,
                                                stage, reason, keys (read with pipelines.curation.ledger.read_ledger)
    <out>/summary.json                          counts per stage / kind / rejection reason, throughput
    <out>/curate_config.yaml, .curate.lease     the resolved curation config; the lease of the run writing it

Shard file names carry the curation run id (``<kind>-<run>-000000.tar``), so an incremental run adds shards
without touching earlier ones.

A sample (members of the tar, grouped by ``__key__``)::

    __key__           stable id: <16 hex of sha1(source)>_<clip index 3 digits>; never contains a dot
    mp4 | jpg         the clip (H.264) for video kinds, the picture for ``image``
    txt               UTF-8 caption (``image`` and ``video_text`` only)
    json              SampleMeta as JSON: geometry (width, height, bucket "WxH", num_frames, fps), provenance, scores
    latent.npy ...    optional pre-encoded tensors (see PRE_ENCODED), written by the pre-encode stage

Kinds: ``image`` (image-text, TF-T2V content branch), ``video_text`` (captioned clip) and ``video``
(text-free clip); both video kinds feed the motion branch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

KINDS = ("image", "video_text", "video")
VIDEO_KINDS = ("video_text", "video")
SHARDS_DIR = "shards"
LEDGER_FILE = "ledger.parquet"
SUMMARY_FILE = "summary.json"

# Pre-encoded members (optional). Latent moments are stored raw (mean and std of the autoencoder posterior,
# unscaled); the training loader samples and scales at load time so one shard set serves any scale factor.
PRE_ENCODED = {
    "latent_mean.npy": "autoencoder posterior mean, float16 [c, f, h, w] (unscaled)",
    "latent_std.npy": "autoencoder posterior std, float16 [c, f, h, w]",
    "text_emb.npy": "text encoder token states, float16 [77, d] (captioned kinds only)",
    "image_emb.npy": "CLIP pooled image embedding of the conditioning frame, float16 [d]",
    "encoders.json": "identity of the encoders that produced the arrays above",
}


@dataclasses.dataclass
class SampleMeta:
    """What every sample's ``json`` member holds (extra keys are allowed and kept in ``extra``)."""

    source: str  # the input as given (path or URI)
    kind: str  # one of KINDS
    num_frames: int  # 1 for images
    fps: float  # 0 for images
    width: int
    height: int
    clip_index: int = 0
    start_s: float = 0.0  # clip start in the source video, seconds
    caption: str | None = None  # duplicate of txt for convenience in indexes (None when text-free)
    scores: dict[str, float] = dataclasses.field(default_factory=dict)  # motion, clip_sim, ...
    labels: dict[str, Any] = dataclasses.field(default_factory=dict)  # ground truth when known (shapes corpus)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    # the bucket "WxH" the clip was resized into (pipelines/buckets.py); shards written before buckets existed
    # have none, and read as the bucket of their stored size
    bucket: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind={self.kind!r} is not one of {KINDS}")
        if self.num_frames < 1 or self.width < 1 or self.height < 1:
            raise ValueError(f"num_frames/width/height must be >= 1, got {self.num_frames}/{self.width}/{self.height}")
        size = f"{self.width}x{self.height}"
        if not self.bucket:
            self.bucket = size
        elif self.bucket != size:
            raise ValueError(f"bucket={self.bucket!r} but the clip is {size}: a clip's bucket is its stored size")

    @property
    def frames(self) -> int:
        """Frames per clip (1 for images): with ``bucket``, the sample's loader shape."""
        return self.num_frames

    @property
    def shape(self) -> str:
        """The loader bucket, size and frames: ``448x256_16f`` (images ``_1f``)."""
        return shape_name(self.width, self.height, self.num_frames)

    def to_json(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), sort_keys=True).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes | str | dict) -> SampleMeta:
        d = json.loads(data) if isinstance(data, (bytes, str)) else dict(data)
        names = {f.name for f in dataclasses.fields(cls)}
        extra = {k: d.pop(k) for k in list(d) if k not in names}
        meta = cls(**d)
        meta.extra.update(extra)
        return meta


# Condition members (optional; model/conditions.py says what each one means to the model).
CONDITIONS = {
    "motion.npy": "motion vectors of the clip's H.264 stream, float16 [f, 2, h, w]: dx / width, dy / height per frame",
    "sketch.npy": "edge map, uint8 [f, 1, h, w]: 1 on an edge",
    "depth.npy": "relative inverse depth, float16 [f, 1, h, w] in [0, 1]: 1 is nearest",
}


def shape_name(width: int, height: int, frames: int) -> str:
    """A loader bucket: size and frame count, e.g. ``448x256_16f`` (a valid MLflow metric name)."""
    return f"{width}x{height}_{int(frames)}f"


def sample_key(source: str, clip_index: int = 0) -> str:
    """Stable key from the source URI and clip index: the same input always gives the same key."""
    digest = hashlib.sha1(source.encode("utf-8")).hexdigest()[:16]
    return f"{digest}_{clip_index:03d}"


def media_member(kind: str) -> str:
    return "jpg" if kind == "image" else "mp4"


def encode_sample(
    key: str, meta: SampleMeta, media: bytes, arrays: dict[str, np.ndarray] | None = None, encoders: dict | None = None
) -> dict[str, Any]:
    """Build the dict that ``webdataset.ShardWriter.write`` takes."""
    if "." in key:
        raise ValueError(f"sample key {key!r} contains a dot; readers split member names at the first dot")
    sample: dict[str, Any] = {"__key__": key, media_member(meta.kind): media, "json": meta.to_json()}
    if meta.kind != "video":
        if not meta.caption:
            raise ValueError(f"{meta.kind} sample {key} needs a caption")
        sample["txt"] = meta.caption.encode("utf-8")
    for name, array in (arrays or {}).items():
        member = f"{name}.npy"
        if member not in PRE_ENCODED and member not in CONDITIONS:
            raise ValueError(f"unknown array member {member!r}; known: {sorted(PRE_ENCODED) + sorted(CONDITIONS)}")
        sample[member] = npy_bytes(array)
    if encoders is not None:
        sample["encoders.json"] = json.dumps(encoders, sort_keys=True).encode("utf-8")
    return sample


@dataclasses.dataclass
class Sample:
    """A decoded sample as the training and evaluation side sees it."""

    key: str
    meta: SampleMeta
    media: bytes  # mp4 or jpg bytes, still encoded
    caption: str | None
    arrays: dict[str, np.ndarray]
    encoders: dict | None


def decode_sample(raw: dict[str, Any]) -> Sample:
    """Inverse of ``encode_sample`` for a dict from ``webdataset.WebDataset`` (bytes values) or
    ``ray.data.read_webdataset`` (already-decoded values are accepted too)."""
    key = raw["__key__"]
    meta_raw = raw["json"]
    meta = SampleMeta.from_json(meta_raw)
    media = raw.get(media_member(meta.kind))
    if media is None:
        raise KeyError(f"sample {key} has no {media_member(meta.kind)} member")
    if not isinstance(media, (bytes, bytearray, memoryview)):
        raise TypeError(
            f"sample {key}: the {media_member(meta.kind)} member was already decoded ({type(media).__name__}); "
            "read shards with raw bytes, e.g. ray.data.read_webdataset(paths, decoder=None)"
        )
    caption = raw.get("txt")
    if isinstance(caption, bytes):
        caption = caption.decode("utf-8")
    arrays = {}
    for member in (*PRE_ENCODED, *CONDITIONS):
        if member.endswith(".npy") and member in raw:
            value = raw[member]
            arrays[member[: -len(".npy")]] = value if isinstance(value, np.ndarray) else load_npy(value)
    enc = raw.get("encoders.json")
    encoders = json.loads(enc) if isinstance(enc, (bytes, str)) else enc
    return Sample(key=key, meta=meta, media=bytes(media), caption=caption or None, arrays=arrays, encoders=encoders)


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(array), allow_pickle=False)
    return buf.getvalue()


def load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def shard_dir(root: str | Path, kind: str) -> Path:
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not one of {KINDS}")
    return Path(root) / SHARDS_DIR / kind


def shard_pattern(root: str | Path, kind: str, prefix: str | None = None) -> str:
    """``ShardWriter`` pattern for a kind. ``prefix`` separates shard sets written by different runs."""
    name = f"{kind}-{prefix}-%06d.tar" if prefix else f"{kind}-%06d.tar"
    return str(shard_dir(root, kind) / name)


def shard_urls(root: str | Path, kind: str) -> list[str]:
    """All finished tars of a kind, sorted (a tar is finished once its parquet index exists)."""
    d = shard_dir(root, kind)
    if not d.is_dir():
        return []
    return sorted(str(t) for t in d.glob("*.tar") if t.with_suffix(".parquet").exists())


def index_path(tar_path: str | Path) -> Path:
    return Path(tar_path).with_suffix(".parquet")


# ---------------------------------------------------------------------------------------------------------------
# The encoder stamp (``encoders.json``): which frozen encoders made a sample's pre-encoded arrays

# Identity fields added after shards were first stamped, with the value every older stamp implies.
STAMP_DEFAULTS = {"word_code_gain": 0.0}


def encoder_stamp(encoders_cfg, text_encoder, image_encoder, first_stage, model: str) -> dict[str, Any]:
    """What produced the pre-encoded arrays: settings plus a fingerprint of the weights (sha1 of every tensor),
    so a random-init CLIP from another seed or another VAE file can never be mixed up with this one."""
    import torch  # only the stamping side needs torch; readers compare plain dicts

    digest = hashlib.sha1()
    for module in (text_encoder, image_encoder, first_stage):
        for name, tensor in sorted(module.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    # The EncoderConfig fields verbatim (training compares these keys with its own model's), then extras.
    return {
        "first_stage": encoders_cfg.first_stage,
        "vae_path": encoders_cfg.vae_path,
        "latent_scale": encoders_cfg.latent_scale,
        "clip_model": encoders_cfg.clip_model,
        "clip_pretrained": encoders_cfg.clip_pretrained,
        "text_len": encoders_cfg.text_len,
        "clip_image_size": encoders_cfg.clip_image_size,
        "seed": encoders_cfg.seed,
        "word_code_gain": encoders_cfg.word_code_gain,
        "model": model,
        "latents": "raw posterior mean/std, unscaled, float16 [c, f, h, w]",
        "weights_sha1": digest.hexdigest(),
    }


# Stamp keys that describe the arrays rather than identify the encoders: never compared.
STAMP_DESCRIPTIVE = ("model", "latents")


def stamp_differences(stamp: dict[str, Any] | None, expected: dict[str, Any]) -> set[str]:
    """Keys on which a sample's stamp and the reader's encoders disagree (empty: the arrays can be used)."""
    found = {**STAMP_DEFAULTS, **(stamp or {})}  # a stamp older than a field means that field's default
    keys = (found.keys() & expected.keys()) - set(STAMP_DESCRIPTIVE)
    return {k for k in keys if found[k] != expected[k]}
