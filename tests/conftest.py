"""Fixtures both tiers share (a tiny generated corpus, shards made from it, a tiny checkpoint, bad input files, free
ports, an MLflow store) and guards that keep one test's leftovers out of the next test and out of the repository.

tests/unit: no Ray, no DeepSpeed, no servers; tests/integration: everything that starts them or runs a job end to end.
"""

from __future__ import annotations

import csv
import logging
import os
import socket
from pathlib import Path

import numpy as np
import pytest

# Keep the 2-core CI machine responsive: one intra-op thread per process unless a test asks for more.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
# Ray Train sees a run start and end at its controller's next poll (2 s by default); the suite's runs are short
# enough for the wait to matter, long runs are not
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")

ROOT = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(items):
    """Unit tier first (it fails fast), also when pytest is given tests/ rather than the testpaths."""
    integration = ROOT / "tests" / "integration"
    items.sort(key=lambda item: integration in item.path.parents)  # stable: modules stay in order


# ---------------------------------------------------------------------------------------------------------------
# Guards


@pytest.fixture(autouse=True)
def _root_logger_restored():
    """Entry points' ``main`` calls ``logs.setup()``, which binds handlers to the sys.stdout/sys.stderr of the
    moment; under capsys those streams are closed after the test, and a later test's logging (Prefect's flow run
    logs) would fail writing to them. Remove what a test added to the root logger."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in root.handlers[:]:
        if handler not in handlers and not type(handler).__module__.startswith("_pytest"):
            root.removeHandler(handler)
    root.setLevel(level)


_MLRUNS = ROOT / "mlruns"
_MLRUNS_AT_START = _MLRUNS.exists()


@pytest.fixture(autouse=True)
def _no_mlruns_in_the_repository():
    yield
    if not _MLRUNS_AT_START and _MLRUNS.exists():
        pytest.fail(
            f"this test left {_MLRUNS}: MLflow stored artifacts under the working directory; "
            "use the mlflow_uri fixture (it runs the test in its temp dir)"
        )


# ---------------------------------------------------------------------------------------------------------------
# Data


@pytest.fixture(scope="session")
def shapes_corpus(tmp_path_factory):
    """A tiny generated corpus: 8 videos (2 text-free) + 6 images at 32x32, 12 fps, 2 s. Returns the manifest path."""
    from pipelines import shapes

    cfg = shapes.CorpusConfig(
        num_videos=8, num_images=6, width=32, height=32, fps=12, seconds=2.0, text_free_fraction=0.25, seed=7
    )
    return shapes.generate(cfg, tmp_path_factory.mktemp("shapes"), progress=False)


def _write_shards(manifest: Path, out: Path, per_shard: int = 3, pre_encode: dict | None = None) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import webdataset as wds

    from pipelines import media, schema

    rows = list(csv.DictReader(open(manifest, encoding="utf-8")))
    by_kind: dict[str, list] = {k: [] for k in schema.KINDS}
    for row in rows:
        kind = "image" if row["kind"] == "image" else ("video_text" if row["caption"] else "video")
        data = Path(row["path"]).read_bytes()
        if kind == "image":
            image = media.decode_image(data)
            data, (h, w), n, fps = media.encode_jpg(image), image.shape[:2], 1, 0.0
        else:
            frames = media.decode_video_file(row["path"])
            (n, h, w), fps = frames.shape[:3], 12.0
        meta = schema.SampleMeta(
            source=row["path"],
            kind=kind,
            num_frames=n,
            fps=fps,
            width=w,
            height=h,
            caption=row["caption"] or None,
            labels={k: row[k] for k in ("colour", "shape", "direction")},
        )
        arrays, encoders = None, None
        if pre_encode is not None and kind != "image":
            frames = media.decode_mp4(data)
            pixels = frames.transpose(3, 0, 1, 2).astype(np.float32) / 127.5 - 1  # [3, f, h, w]
            arrays = {"latent_mean": pixels.astype(np.float16), "latent_std": np.zeros_like(pixels, np.float16)}
            encoders = pre_encode
        by_kind[kind].append(schema.encode_sample(schema.sample_key(row["path"]), meta, data, arrays, encoders))
    for kind, samples in by_kind.items():
        if not samples:
            continue
        schema.shard_dir(out, kind).mkdir(parents=True, exist_ok=True)
        with wds.ShardWriter(schema.shard_pattern(out, kind), maxcount=per_shard, verbose=0) as sink:
            for s in samples:
                sink.write(s)
        tars = sorted(schema.shard_dir(out, kind).glob("*.tar"))
        for i, tar in enumerate(tars):
            keys = [s["__key__"] for s in samples[i * per_shard : (i + 1) * per_shard]]
            pq.write_table(pa.table({"key": keys, "kind": [kind] * len(keys)}), schema.index_path(tar))
    return out


@pytest.fixture(scope="session")
def write_shards():
    """``write_shards(manifest, out, per_shard=3, pre_encode=None) -> out``: a curation-output-like directory from a
    shapes manifest, shards/<kind>/*.tar (+ .parquet index), one sample per manifest row; ``pre_encode`` (an encoder
    identity) adds identity-first-stage latents to the videos. Stands in for ``t2v curate``, which needs Ray."""
    return _write_shards


@pytest.fixture(scope="session")
def shards(shapes_corpus, write_shards, tmp_path_factory):
    """The shapes corpus as shards, written once; tests only read them."""
    return write_shards(shapes_corpus, tmp_path_factory.mktemp("shards"))


def _png(width: int, height: int) -> bytes:
    import io

    from PIL import Image

    from pipelines import shapes

    buf = io.BytesIO()
    Image.fromarray(shapes.render_image("blue", "square", width, height)).save(buf, format="PNG")
    return buf.getvalue()


def _make_bad_inputs(root: Path) -> dict[str, tuple[str, str]]:
    from pipelines import media, shapes

    root.mkdir(parents=True, exist_ok=True)
    (root / "empty.mp4").write_bytes(b"")
    noise = np.random.default_rng(1).integers(0, 256, (24, 48, 48, 3), dtype=np.uint8)
    full = media.encode_mp4(noise, 12)
    (root / "truncated.mp4").write_bytes(full[: len(full) // 2])
    (root / "text.mp4").write_text("this is not a video\n" * 20)
    (root / "image.mp4").write_bytes(_png(48, 48))
    media.write_mp4(shapes.render_video("red", "circle", "left", 48, 48, 3), root / "short.mp4", 12)
    # a raw-video header declaring 12000 x 12000 frames (a decompression bomb) over a few bytes of data
    (root / "huge.y4m").write_bytes(b"YUV4MPEG2 W12000 H12000 F24:1 Ip A1:1 C420jpeg\nFRAME\n" + b"\x00" * 1000)
    return {
        "empty.mp4": ("probe", "empty_file"),
        "truncated.mp4": ("decode", "decode_error"),
        "text.mp4": ("probe", "unreadable"),
        "image.mp4": ("probe", "image_in_video_file"),
        "short.mp4": ("quality", "too_short"),
        "huge.y4m": ("quality", "too_large"),
        "missing.mp4": ("probe", "missing_file"),
    }


@pytest.fixture(scope="session")
def make_bad_inputs():
    """``make_bad_inputs(root) -> {file name: (stage, reason)}``: writes the bad inputs curation must reject (empty,
    truncated, not a video, an image named .mp4, too short, a decompression bomb) and returns the rejection
    expected for each, ``missing.mp4`` (not written) included."""
    return _make_bad_inputs


# Sources of four aspects for the bucket tests, as (width, height) -> the bucket of BUCKETS they belong in.
BUCKETS = ["32x16", "16x32", "24x16", "16x16"]
ASPECTS = {(64, 32): "32x16", (32, 64): "16x32", (48, 36): "24x16", (40, 40): "16x16"}


def _aspect_corpus(root: Path) -> Path:
    from pipelines import media, shapes

    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, ((w, h), bucket) in enumerate(ASPECTS.items()):
        colour = ("red", "green", "blue", "yellow")[i]
        for j, (seconds, direction) in enumerate(((1.0, "right"), (2.0, "left"))):  # 8 and 16 frames at 8 fps
            frames = shapes.render_video(colour, "square", direction, w, h, int(8 * seconds))
            path = media.write_mp4(frames, root / f"v{w}x{h}_{j}.mp4", 8)
            caption = f"a {colour} square moving {direction}" if j == 0 else ""
            rows.append({"path": str(path), "caption": caption, "bucket": bucket})
        image = root / f"i{w}x{h}.jpg"
        image.write_bytes(media.encode_jpg(shapes.render_image(colour, "circle", w, h)))
        rows.append({"path": str(image), "caption": f"a {colour} circle", "bucket": bucket})
    manifest = root / "manifest.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "caption", "bucket"])
        writer.writeheader()
        writer.writerows(rows)
    return manifest


@pytest.fixture(scope="session")
def aspect_corpus(tmp_path_factory):
    """Videos and images of four aspects (2:1, 1:2, 4:3, 1:1; ``ASPECTS``), each video at two durations (8 and 16
    frames at 8 fps), one captioned and one text-free. Returns the manifest (path, caption, bucket: the bucket of
    ``BUCKETS`` each belongs in)."""
    return _aspect_corpus(tmp_path_factory.mktemp("aspects"))


def _curate_buckets(manifest: Path, out: Path, lengths: tuple[int, ...] = (4, 8), encode: bool = False) -> Path:
    """Curates ``manifest`` into ``BUCKETS`` with clips of ``lengths`` frames through the real stages, in this
    process (curation's Ray job runs the same stages), into shards under ``out``; ``encode`` pre-encodes them with
    the tiny model's encoders."""
    from pipelines import settings
    from pipelines.curation import inputs
    from pipelines.curation.config import CurateConfig
    from pipelines.curation.stages.caption import CaptionFilter
    from pipelines.curation.stages.decode import ClipDecoder
    from pipelines.curation.stages.probe import Probe
    from pipelines.curation.stages.quality import ClipQuality, InputQuality
    from pipelines.curation.stages.route import Route
    from pipelines.curation.stages.write import ShardSink

    cfg = settings.load(
        CurateConfig,
        None,
        [
            f"clips.buckets=[{','.join(BUCKETS)}]",
            f"clips.lengths=[{','.join(map(str, lengths))}]",
            "clips.fps=8",
            "quality.min_side=16",
            "quality.motion_max=1",
            *(["encode.mode=latents+clip", "encode.model=tiny"] if encode else []),
        ],
    )
    table = inputs.resolve(str(manifest), cfg.inputs)
    stages = [Probe(cfg), InputQuality(cfg), ClipDecoder(cfg), ClipQuality(cfg), CaptionFilter(cfg), Route(cfg)]
    if encode:
        from pipelines.curation.stages.encode import PreEncoder

        stages.append(PreEncoder(cfg, device="cpu"))
    for stage in stages:
        table = stage(table)
    sink = ShardSink(out, "rbuckets", maxcount=4)
    for row in table.to_pylist():
        if row["status"] == "ok":
            sink.write(row)
    sink.commit()
    return out


@pytest.fixture(scope="session")
def bucket_shards(aspect_corpus, tmp_path_factory):
    """The aspect corpus curated into ``BUCKETS`` with clips of 4 and 8 frames (shards of at most 4 samples)."""
    return _curate_buckets(aspect_corpus, tmp_path_factory.mktemp("bucket-shards"))


@pytest.fixture(scope="session")
def curate_buckets():
    """``curate_buckets(manifest, out, lengths=(4, 8), encode=False) -> out``: what ``bucket_shards`` holds, with
    other clip lengths or pre-encoded."""
    return _curate_buckets


@pytest.fixture(scope="session")
def bucket_names() -> list[str]:
    return list(BUCKETS)


# ---------------------------------------------------------------------------------------------------------------
# Models, training settings, ports, MLflow

# The registry's tiny model shrunk further (8 channels, 4 frames of 16x16): a training step takes well under a second.
SMALL_MODEL = {"unet.model_channels": 8, "unet.num_groups": 4, "num_frames": 4, "height": 16, "width": 16}


@pytest.fixture
def small_model() -> dict:
    """Overrides of the tiny model (``get_config("tiny", small_model)``) that training and pyfunc tests use."""
    return dict(SMALL_MODEL)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """The registry's tiny model (random weights, seed 0) saved as a TextToVideo checkpoint. Returns its path."""
    import torch

    from model.registry import get_config
    from model.text_to_video import TextToVideo

    torch.manual_seed(0)
    return TextToVideo.build(get_config("tiny")).save(tmp_path_factory.mktemp("model") / "model.pt")


def _train_config(shards: Path, out: Path, tracking_uri: str | None, **settings_):
    from pipelines import settings
    from pipelines.training.config import TrainConfig

    base = dict(
        data=[str(shards)],
        output=str(out),
        model="tiny",
        model_overrides=SMALL_MODEL,
        steps=4,
        num_workers=2,
        image_batch_size=2,
        video_batch_size=2,
        warmup_steps=2,
        lr=1e-3,
        checkpoint_every=2,
        keep_checkpoints=2,
        sample_every=0,
        log_every=1,
        seed=0,
        mlflow={
            "enabled": tracking_uri is not None,
            "tracking_uri": tracking_uri,
            "experiment": "test-train",
            "system_metrics_s": 1.0,
        },
    )
    base.update(settings_)
    return settings.from_dict(TrainConfig, base)


@pytest.fixture(scope="session")
def train_config():
    """``train_config(shards, out, tracking_uri, **settings) -> TrainConfig``: a few steps of the small model on 2
    workers, a checkpoint every 2 steps; MLflow off when ``tracking_uri`` is None. ``settings`` replace the defaults."""
    return _train_config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def free_port():
    """``free_port() -> int``: a TCP port on 127.0.0.1 that was free a moment ago (call it once per port)."""
    return _free_port


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch):
    """A SQLite tracking URI in the test's temp dir, with the test running in that dir: MLflow stores the artifacts
    of experiments created without an artifact location, and logged models (which go to experiment 0), under
    ./mlruns of the working directory."""
    monkeypatch.chdir(tmp_path)
    return f"sqlite:///{tmp_path / 'mlflow.db'}"
