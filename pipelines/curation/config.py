"""What ``t2v curate`` can be told: ``CurateConfig`` and its sections, one per stage family.

    cfg = settings.load(CurateConfig, "curate.yaml", ["clips.width=448"])   # or t2v curate --set ...

The stages take their section (``cfg.clips``, ``cfg.caption``, ...) from here, and so does the job.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Literal

from pipelines import buckets
from pipelines.settings import check, check_choice

CONFIG_FILE = "curate_config.yaml"


@dataclass
class InputConfig:
    path_column: str = "path"  # manifest column with the media path / URI
    caption_column: str = "caption"  # manifest column with the caption (optional column)
    label_columns: list[str] | None = None  # manifest columns kept as labels (None: all the others)
    media_root: str | None = None  # relative manifest paths resolve here (default: manifest folder)
    max_inputs: int | None = None  # curate only the first N inputs (a trial run)
    max_bytes: int = 8_000_000_000  # inputs larger than this are rejected (too_big) before a byte is read

    def __post_init__(self) -> None:
        check(bool(self.path_column), "inputs.path_column is empty: name the manifest column holding media paths")
        check(self.max_bytes >= 1, f"inputs.max_bytes={self.max_bytes}: must be >= 1 (bytes)")
        check(self.max_inputs is None or self.max_inputs >= 1, "inputs.max_inputs must be >= 1 (or null for all)")


@dataclass
class ClipConfig:
    width: int = 256  # output clip/image size (resize to cover, centre crop)
    height: int = 256
    num_frames: int = 16  # frames per clip
    fps: float = 8.0  # clip frame rate (frame stride = source fps / fps)
    policy: Literal["all", "first", "max_n"] = "all"  # which clips of a video to keep
    max_clips: int = 4  # with policy max_n: at most this many clips per video
    scene_threshold: float = 0.4  # colour-histogram change between frames that is a cut (>1: off)
    crf: int = 20  # H.264 quality (lower = better, bigger)
    preset: str = "veryfast"  # x264 speed preset
    threads: int = 1  # FFmpeg threads per decoder / encoder (Ray runs tasks side by side)
    jpg_quality: int = 95
    timeout_s: float = 600.0  # probe/ffmpeg time limit per input
    probe: Literal["pyav", "ffprobe"] = "pyav"  # stage 1 reads headers in-process (PyAV) or with an ffprobe process
    decoder: Literal["pyav", "ffmpeg"] = "pyav"  # stage 2 decodes + encodes in-process (PyAV) or in an ffmpeg process
    # Shapes (pipelines/buckets.py). Unset, every clip is width x height and num_frames long, as one size.
    buckets: list[str] | None = None  # WxH sizes; each source goes to the one nearest its aspect (least crop)
    image_buckets: list[str] | None = None  # WxH sizes for images (None: the same as buckets)
    lengths: list[int] | None = None  # frames per clip, clips of every length from each video (None: num_frames)
    # A source smaller than every bucket: reject or upscale; auto rejects with buckets, upscales a single size.
    small_source: Literal["auto", "reject", "upscale"] = "auto"
    max_crop: float | None = None  # reject sources losing more (aspect); None: 0.5 with buckets, no limit without

    def __post_init__(self) -> None:
        for key in ("buckets", "image_buckets"):
            if getattr(self, key) is not None:
                buckets.parse_buckets(getattr(self, key), f"clips.{key}")
        check(
            self.lengths is None
            or (
                isinstance(self.lengths, list)
                and self.lengths
                and all(isinstance(n, int) and n >= 1 for n in self.lengths)
                and len(set(self.lengths)) == len(self.lengths)
            ),
            f"clips.lengths={self.lengths!r}: must be a list of distinct frame counts >= 1, e.g. [16, 32]",
        )
        check_choice("clips.small_source", self.small_source, ["auto", "reject", "upscale"])
        check(
            self.max_crop is None or 0 <= self.max_crop < 1,
            f"clips.max_crop={self.max_crop}: must be within [0, 1) (share of the source's pixels) or null",
        )
        check(
            16 <= self.width <= 4096 and 16 <= self.height <= 4096 and self.width % 2 == 0 and self.height % 2 == 0,
            f"clips.width/height={self.width}x{self.height}: must be even numbers within 16..4096 (H.264 4:2:0)",
        )
        check(self.num_frames >= 1, f"clips.num_frames={self.num_frames}: must be >= 1")
        check(0 < self.fps <= 120, f"clips.fps={self.fps}: must be within (0, 120]")
        check_choice("clips.policy", self.policy, ["all", "first", "max_n"])
        check_choice("clips.probe", self.probe, ["pyav", "ffprobe"])
        check_choice("clips.decoder", self.decoder, ["pyav", "ffmpeg"])
        check(self.max_clips >= 1, f"clips.max_clips={self.max_clips}: must be >= 1")
        check(self.scene_threshold > 0, "clips.scene_threshold must be > 0 (use 2 to disable scene cuts)")
        check(0 <= self.crf <= 51, f"clips.crf={self.crf}: must be within 0..51")
        check(self.threads >= 1, "clips.threads must be >= 1")
        check(1 <= self.jpg_quality <= 100, "clips.jpg_quality must be within 1..100")
        check(self.timeout_s > 0, "clips.timeout_s must be > 0")

    @property
    def video_sizes(self) -> list[tuple[int, int]]:
        if self.buckets is None:
            return [(self.width, self.height)]
        return buckets.parse_buckets(self.buckets, "clips.buckets")

    @property
    def image_sizes(self) -> list[tuple[int, int]]:
        if self.image_buckets is None:
            return self.video_sizes
        return buckets.parse_buckets(self.image_buckets, "clips.image_buckets")

    @property
    def clip_lengths(self) -> list[int]:
        return list(self.lengths) if self.lengths is not None else [self.num_frames]

    @property
    def upscale(self) -> bool:
        bucketed = self.buckets is not None or self.image_buckets is not None
        return self.small_source == "upscale" or (self.small_source == "auto" and not bucketed)

    @property
    def crop_limit(self) -> float | None:
        if self.max_crop is not None:
            return self.max_crop
        return 0.5 if self.buckets is not None or self.image_buckets is not None else None


@dataclass
class QualityConfig:
    min_side: int = 64  # reject sources whose short side is smaller (pixels)
    max_pixels: int = 36_000_000  # reject sources with more pixels (about 8K; guards huge headers)
    min_duration_s: float | None = None  # reject shorter videos (None: one clip, num_frames / fps)
    max_duration_s: float = 3600.0  # reject longer videos
    motion_min: float = 0.002  # drop clips with less motion (static)
    motion_max: float = 0.2  # drop clips with more motion (flashes, noise, missed cuts)
    on_decode_error: Literal["reject", "keep"] = "reject"  # truncated/corrupt video: reject, or keep what decoded
    content_mismatch: Literal["reject", "by_content"] = "reject"  # a still image behind a video name

    def __post_init__(self) -> None:
        check(self.min_side >= 1, "quality.min_side must be >= 1")
        check(self.max_pixels >= 1, "quality.max_pixels must be >= 1")
        check(self.max_duration_s > 0, "quality.max_duration_s must be > 0")
        check(0 <= self.motion_min <= self.motion_max, "quality.motion_min must be within 0..motion_max")
        check_choice("quality.on_decode_error", self.on_decode_error, ["reject", "keep"])
        check_choice("quality.content_mismatch", self.content_mismatch, ["reject", "by_content"])

    def resolved_min_duration(self, clips: ClipConfig) -> float:
        # a little slack: containers round durations, and ffmpeg's fps filter picks the nearest frames
        shortest = min(clips.clip_lengths)
        return self.min_duration_s if self.min_duration_s is not None else 0.95 * shortest / clips.fps


@dataclass
class CaptionConfig:
    # "clip": text rules + CLIP similarity; "text": text rules only; "auto": clip when weights are given, else text.
    # (Not on/off: YAML reads those as booleans.)
    filter: Literal["auto", "clip", "text"] = "auto"
    model: str = "ViT-B-32"  # open_clip architecture (or t2v-tiny-clip for tests)
    pretrained: str | None = None  # local open_clip weights file; none here -> filter off (auto)
    threshold: float = 0.28  # min cosine similarity (LAION-2B-en used 0.28 with ViT-B/32)
    frames: list[str] = field(default_factory=lambda: ["first", "middle", "last"])  # frames scored per clip
    reduce: Literal["mean", "min", "max"] = "mean"  # how per-frame similarities combine
    min_chars: int = 5
    max_chars: int = 1000
    text_free: Literal["keep", "drop"] = "keep"  # videos without a usable caption: keep as text-free, or drop
    batch_size: int = 32  # rows per CLIP forward pass
    actors: int = 1  # CLIP actor pool size
    actor_cpus: float = 1.0  # CPUs each CLIP actor reserves when it runs on CPU
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: a GPU when the cluster has one
    seed: int = 0  # random init seed when no weights are given (tests)

    def __post_init__(self) -> None:
        check_choice("caption.filter", self.filter, ["auto", "clip", "text"])
        check(
            bool(self.frames) and all(f in ("first", "middle", "last") for f in self.frames),
            f"caption.frames={self.frames}: list some of first, middle, last",
        )
        check_choice("caption.reduce", self.reduce, ["mean", "min", "max"])
        check(0 <= self.min_chars <= self.max_chars, "caption.min_chars must be within 0..max_chars")
        check_choice("caption.text_free", self.text_free, ["keep", "drop"])
        check(self.batch_size >= 1 and self.actors >= 1, "caption.batch_size and caption.actors must be >= 1")
        check(self.actor_cpus > 0, "caption.actor_cpus must be > 0")
        check_choice("caption.device", self.device, ["auto", "cpu", "cuda"])
        check(
            self.pretrained is None or os.path.isfile(self.pretrained),
            f"caption.pretrained={self.pretrained!r} is not a file: pass a local open_clip weights file, or "
            "leave it unset",
        )


@dataclass
class ShardConfig:
    maxcount: int = 1000  # samples per tar
    maxsize: int = 1_000_000_000  # bytes per tar
    commit_every: int = 500  # inputs per ledger part (an accepted input waits until its tar closes)

    def __post_init__(self) -> None:
        check(self.maxcount >= 1 and self.maxsize >= 1, "shards.maxcount and shards.maxsize must be >= 1")
        check(self.commit_every >= 1, "shards.commit_every must be >= 1")


@dataclass
class EncodeConfig:
    """Optional pre-encoding (stages/encode.py): latent moments + CLIP embeddings in the shards."""

    mode: Literal["none", "latents+clip"] = "none"  # latents+clip: latent moments + CLIP text/image embeddings
    model: str = "tiny"  # model config (model.registry) whose encoders to use
    model_overrides: dict[str, Any] = field(default_factory=dict)  # e.g. {"encoders": {"vae_path": ...}}
    checkpoint: str | None = None  # or: a TextToVideo checkpoint (its stored encoders)
    condition_frame: Literal["first", "middle"] = "middle"  # frame whose CLIP image embedding is stored
    batch_size: int = 8
    actors: int = 1
    actor_cpus: float = 1.0  # CPUs each encoder actor reserves when it runs on CPU
    device: Literal["auto", "cpu", "cuda"] = "auto"

    def __post_init__(self) -> None:
        check(self.actor_cpus > 0, "encode.actor_cpus must be > 0")
        check_choice("encode.mode", self.mode, ["none", "latents+clip"])
        check_choice("encode.condition_frame", self.condition_frame, ["first", "middle"])
        check(self.batch_size >= 1 and self.actors >= 1, "encode.batch_size and encode.actors must be >= 1")
        check_choice("encode.device", self.device, ["auto", "cpu", "cuda"])
        check(
            self.checkpoint is None or os.path.isfile(self.checkpoint),
            f"encode.checkpoint={self.checkpoint!r} is not a file",
        )


@dataclass
class ConditionsConfig:
    """Structure conditions stored with each clip (stages/conditions.py) for compositional training. A condition
    that cannot be extracted from a clip is recorded in its json (``extra.condition_errors``); the clip is kept."""

    kinds: list[str] = field(default_factory=list)  # any of: motion, sketch, depth
    depth_model: str | None = None  # local .pt2 (torch.export) or TorchScript depth network: needed for depth
    depth_size: int = 256  # the depth network's input side
    edge_threshold: float = 0.25  # sketch: edges above this share of the clip's strongest gradient

    def __post_init__(self) -> None:
        from model.conditions import CHANNELS

        unknown = [k for k in self.kinds if k not in CHANNELS]
        check(not unknown, f"conditions.kinds: unknown {unknown}; accepted are {sorted(CHANNELS)}")
        check(
            "depth" not in self.kinds or (self.depth_model is not None and os.path.isfile(self.depth_model)),
            f"conditions.depth_model={self.depth_model!r}: depth needs a local network file (.pt2 or TorchScript)",
        )
        check(16 <= self.depth_size <= 2048, f"conditions.depth_size={self.depth_size}: must be within 16..2048")
        check(0 < self.edge_threshold < 1, f"conditions.edge_threshold={self.edge_threshold}: must be within (0, 1)")


@dataclass
class CurateConfig:
    inputs: InputConfig = field(default_factory=InputConfig)
    clips: ClipConfig = field(default_factory=ClipConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    caption: CaptionConfig = field(default_factory=CaptionConfig)
    shards: ShardConfig = field(default_factory=ShardConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    conditions: ConditionsConfig = field(default_factory=ConditionsConfig)
    num_cpus: int | None = None  # local Ray only: CPUs to use (None: all)
    inputs_per_task: int | None = None  # inputs per decode task (None: see build_dataset)
    task_cpus: float = 0.5  # CPUs a decode task asks Ray for (see build_dataset)
    progress: bool = True  # Ray Data progress bars and periodic log lines
    # Poison inputs and transient faults (pipelines/RELIABILITY.md):
    task_retries: int = 2  # a task whose worker died is run again this often, then its inputs are run alone
    transient_retries: int = 2  # an input that met a transient fault (full disk, I/O, network) is tried again
    input_limit_s: float | None = None  # hard limit per input, worker ended past it (None: 2 x clips.timeout_s + 60)
    window_inputs: int = 20_000  # inputs per Ray Data run: the driver's memory is sized by this, not the corpus

    def __post_init__(self) -> None:
        check(self.num_cpus is None or self.num_cpus >= 1, "num_cpus must be >= 1 (or null for all)")
        check(0 <= self.task_retries <= 10, f"task_retries={self.task_retries}: must be within 0..10")
        check(0 <= self.transient_retries <= 10, f"transient_retries={self.transient_retries}: must be within 0..10")
        check(
            self.input_limit_s is None or self.input_limit_s > 0,
            f"input_limit_s={self.input_limit_s}: must be > 0 seconds (or null for 2 x clips.timeout_s + 60)",
        )
        check(self.inputs_per_task is None or self.inputs_per_task >= 1, "inputs_per_task must be >= 1 (or null)")
        check(0 < self.task_cpus <= 64, "task_cpus must be in (0, 64]")
        check(self.window_inputs >= 1, f"window_inputs={self.window_inputs}: must be >= 1")

    @property
    def hard_limit_s(self) -> float:
        return self.input_limit_s if self.input_limit_s is not None else 2 * self.clips.timeout_s + 60


# Settings that shape the samples: every run into one output must agree on them, or training would read a mix.
SHAPING = (
    "clips.width",
    "clips.height",
    "clips.num_frames",
    "clips.fps",
    "clips.buckets",
    "clips.image_buckets",
    "clips.lengths",
    "encode.mode",
)
