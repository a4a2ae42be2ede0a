"""t2v evaluate --checkpoint runs/train/model/model_ema.pt [--prompts prompts.txt] [--set key=value ...] [--dry-run]

Evaluates a text-to-video model on a prompt set and logs the figures to MLflow. Also
``t2v evaluate --model-uri models:/t2v-shapes@champion --prompts msrvtt_captions.txt`` (a registered model).

Generates ``videos_per_prompt`` videos for each prompt (DDIM, classifier-free guidance) and measures:
- ``clipsim``: mean CLIP text-to-frame similarity; ``frame_consistency``: mean CLIP similarity of adjacent frames
  (CLIP from ``clip_model`` + a local ``clip_pretrained`` file; a random CLIP is warned about: its figures only
  compare models evaluated with the same random CLIP);
- ``fvd``: Frechet video distance to ``fvd_reference`` real videos, with the TorchScript ``fvd_network``
  (skipped, with the reason in the output, when either is not given);
- ``colour_accuracy``, ``direction_accuracy``, ``shapes_accuracy``: for ``prompts: shapes`` (the held-out
  prompts of the synthetic shapes corpus), what ``pipelines.shapes.detect`` reads from each generated video.

Writes ``<output>/metrics.json``, ``<output>/eval.yaml`` and sample videos (mp4 + gif, as MLflow previews gifs)
under ``<output>/samples/``; logs metrics as ``eval/<name>`` to MLflow, into ``mlflow.run_id`` when given (the
training run of the model, as the re-training flow does) or into a new run of ``mlflow.experiment``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import logging
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from pipelines import logs, settings
from pipelines.settings import ConfigError, check, check_choice
from pipelines.tracking import TrackingConfig

log = logging.getLogger("t2v.evaluate")

METRICS_FILE = "metrics.json"
CONTACT_SHEET = "contact_sheet.png"
VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".gif")


@dataclasses.dataclass
class EvalConfig:
    checkpoint: str | None = None  # a TextToVideo model.pt (training's result.json "checkpoint")
    model_uri: str | None = None  # or an MLflow model URI: models:/NAME@champion, models:/NAME/3, runs:/ID/model
    prompts: str = "shapes"  # "shapes" (held-out shapes prompts, adds shapes accuracy) or a text file path
    num_prompts: int = 8  # first N prompts of the set (0 = all)
    videos_per_prompt: int = 1
    steps: int = 25  # DDIM steps
    guidance: float = 9.0
    eta: float = 0.0
    seed: int = 0
    batch_size: int = 4
    clip_model: str = "ViT-B-32"  # CLIPSIM network (open_clip name; project tiny names work too)
    clip_pretrained: str | None = None  # local open_clip weights file; None = random weights (warned)
    clip_seed: int = 0
    fvd_network: str | None = None  # local TorchScript video network (e.g. I3D); None = no FVD
    fvd_reference: str | None = None  # real videos: manifest.csv (kind=video rows), a folder, or a list file
    fvd_size: int | None = 224  # spatial size the network takes (None = keep the model's size)
    fvd_value_range: tuple[float, float] = (-1.0, 1.0)
    fvd_kwargs: dict = dataclasses.field(default_factory=dict)  # extra forward() arguments of the network
    max_reference: int = 256  # real videos read for FVD
    num_samples: int = 4  # generated videos written as mp4 + gif
    sheet_rows: int = 12  # prompts shown in contact_sheet.png (first video of each, frames across)
    output: str = "runs/eval"
    device: str = "cpu"
    mlflow: TrackingConfig = dataclasses.field(default_factory=lambda: TrackingConfig(experiment="t2v-eval"))

    def __post_init__(self) -> None:
        check(
            not (self.checkpoint and self.model_uri),
            "give one of checkpoint (a model.pt) or model_uri (models:/NAME@champion), not both",
        )
        check(self.num_prompts >= 0, "num_prompts must be >= 0 (0 = every prompt)")
        check(self.videos_per_prompt >= 1, "videos_per_prompt must be >= 1")
        check(self.steps >= 1, "steps must be >= 1 DDIM step")
        check(self.batch_size >= 1, "batch_size must be >= 1")
        check(self.guidance >= 0, "guidance must be >= 0 (1 = no guidance)")
        check(self.num_samples >= 0, "num_samples must be >= 0")
        check(self.sheet_rows >= 1, "sheet_rows must be >= 1 (prompts shown in the contact sheet)")
        check(self.max_reference >= 2, "max_reference must be >= 2 videos (FVD fits a Gaussian)")
        check(self.fvd_value_range[0] < self.fvd_value_range[1], "fvd_value_range must be (low, high) with low < high")
        check(bool(self.prompts), "prompts is empty: use 'shapes' or the path of a text file, one prompt per line")
        check_choice("device", self.device.split(":")[0], ["cpu", "cuda", "mps"])

    def signature(self) -> str:
        """A short hash of the settings that change the figures (not where the model or outputs are): two models
        evaluated with the same signature can be compared."""
        data = settings.to_dict(self)
        for key in ("checkpoint", "model_uri", "output", "num_samples", "sheet_rows", "device", "mlflow"):
            data.pop(key, None)
        if self.prompts != "shapes" and Path(self.prompts).is_file():  # same file name, other prompts: not comparable
            data["prompts_sha256"] = hashlib.sha256(Path(self.prompts).read_bytes()).hexdigest()
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------------------------
# Prompt sets and reference videos


def load_prompts(cfg: EvalConfig) -> tuple[list[str], list[tuple[str, str]] | None]:
    """Prompts and, for the shapes set, their (colour, direction) labels."""
    if cfg.prompts == "shapes":
        from pipelines.shapes import heldout_prompts

        rows = heldout_prompts(cfg.num_prompts or None)
        return [r[0] for r in rows], [(r[1], r[3]) for r in rows]
    path = Path(cfg.prompts)
    if not path.is_file():
        raise FileNotFoundError(
            f"prompt file {str(path)!r} not found: give a text file with one prompt per line "
            "(e.g. MSR-VTT test captions) or prompts=shapes"
        )
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise ValueError(f"prompt file {path} has no prompts (one per line; lines starting with # are ignored)")
    return (prompts[: cfg.num_prompts] if cfg.num_prompts else prompts), None


def reference_videos(source: str, limit: int) -> list[Path]:
    """Real video files for FVD from a manifest.csv (rows with kind=video), a folder, or a text file of paths."""
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES)
    elif path.suffix == ".csv" and path.is_file():
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        files = [
            Path(r["path"]) if Path(r["path"]).is_absolute() else path.parent / r["path"]
            for r in rows
            if r.get("kind", "video") == "video"
        ]
    elif path.is_file():
        files = [Path(line.strip()) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        raise FileNotFoundError(
            f"fvd_reference {source!r} not found: give a manifest.csv, a folder of videos or a "
            "text file with one video path per line"
        )
    if len(files) < 2:
        raise ValueError(f"fvd_reference {source!r} has {len(files)} videos; FVD needs at least 2 (more is better)")
    return files[:limit]


def read_reference(files: list[Path], num_frames: int, height: int, width: int, fps: float) -> np.ndarray:
    """Decode real videos to the generated videos' size and frame count: uint8 [n, f, h, w, 3].

    Videos shorter than ``num_frames`` repeat their last frame, so every clip has the same length.
    """
    from pipelines import media

    videos = []
    for path in files:
        frames = media.decode_video_file(path, width=width, height=height, fps=fps, max_frames=num_frames)
        if len(frames) < num_frames:
            frames = np.concatenate([frames, np.repeat(frames[-1:], num_frames - len(frames), axis=0)])
        videos.append(frames)
    return np.stack(videos)


# ---------------------------------------------------------------------------------------------------------------
# Evaluation


def load_model(cfg: EvalConfig):
    from model.text_to_video import TextToVideo

    if cfg.checkpoint:
        return TextToVideo.from_checkpoint(cfg.checkpoint, device=cfg.device)
    from flows import registry

    path = registry.download_checkpoint(cfg.model_uri, Path(cfg.output) / "model", tracking_uri(cfg))
    return TextToVideo.from_checkpoint(path, device=cfg.device)


def tracking_uri(cfg: EvalConfig) -> str:
    from pipelines.tracking import resolve_tracking_uri

    return resolve_tracking_uri(cfg.mlflow.tracking_uri)


def generate_videos(model, prompts: list[str], cfg: EvalConfig) -> tuple[list[np.ndarray], list[int]]:
    """Every prompt x videos_per_prompt -> list of uint8 [f, h, w, 3] and, per video, its prompt index."""
    jobs = [(i, k) for k in range(cfg.videos_per_prompt) for i in range(len(prompts))]
    videos: list[np.ndarray] = []
    index: list[int] = []
    start = time.monotonic()
    for b in range(0, len(jobs), cfg.batch_size):
        batch = jobs[b : b + cfg.batch_size]
        # Seed per batch (and per repetition via b): the same config always draws the same noise.
        out = model.generate(
            [prompts[i] for i, _ in batch], steps=cfg.steps, guidance=cfg.guidance, eta=cfg.eta, seed=cfg.seed + b
        )
        videos += list(out)
        index += [i for i, _ in batch]
        log.info(f"generated {len(videos)}/{len(jobs)} videos ({time.monotonic() - start:.0f}s)")
    return videos, index


def clip_scores(cfg: EvalConfig, videos: list[np.ndarray], prompts: list[str]) -> dict[str, float]:
    from flows.metrics import ClipScorer, clip_metrics
    from model.encoders import PROJECT_CLIP_CONFIGS, load_openclip

    if cfg.clip_pretrained is None and cfg.clip_model not in PROJECT_CLIP_CONFIGS:
        warnings.warn(
            f"CLIPSIM and frame consistency use a randomly initialised {cfg.clip_model}: the figures "
            "only compare models evaluated the same way. Pass clip_pretrained=PATH (a local open_clip "
            "checkpoint) for meaningful values.",
            stacklevel=2,
        )
    clip, _, tokenizer = load_openclip(cfg.clip_model, cfg.clip_pretrained, seed=cfg.clip_seed, device=cfg.device)
    size = getattr(clip.visual, "image_size", 224)  # open_clip keeps (h, w)
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    return clip_metrics(ClipScorer(clip, tokenizer, size), videos, prompts)


def fvd_score(cfg: EvalConfig, videos: list[np.ndarray], fps: float) -> float:
    from flows.metrics import VideoFeatureNet, fvd_from_features

    net = VideoFeatureNet(
        cfg.fvd_network,
        size=cfg.fvd_size,
        value_range=cfg.fvd_value_range,
        call_kwargs=cfg.fvd_kwargs,
        device=cfg.device,
    )
    fake = np.stack(videos)  # [n, f, h, w, 3]
    n, f, h, w, _ = fake.shape
    real = read_reference(reference_videos(cfg.fvd_reference, cfg.max_reference), f, h, w, fps)
    return fvd_from_features(net(real, cfg.batch_size), net(fake, cfg.batch_size))


def _slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "video"


def write_samples(
    videos: list[np.ndarray], prompts: list[str], index: list[int], out: Path, fps: float, limit: int
) -> list[str]:
    from pipelines import media

    paths = []
    for n, (video, i) in enumerate(zip(videos[:limit], index[:limit])):
        stem = out / f"{n:02d}_{_slug(prompts[i])}"
        media.write_mp4(video, stem.with_suffix(".mp4"), fps)
        media.write_gif(video, stem.with_suffix(".gif"), fps)
        paths.append(str(stem.with_suffix(".mp4")))
    return paths


def contact_sheet(videos: list[np.ndarray], prompts: list[str], index: list[int], path: Path, rows: int) -> Path:
    """The first video of each prompt (up to ``rows``), one row each with its prompt, frames across."""
    from pipelines import pictures

    first: dict[int, np.ndarray] = {}
    for video, i in zip(videos, index):
        first.setdefault(i, video)
    chosen = sorted(first)[:rows]
    return pictures.contact_sheet([first[i] for i in chosen], [prompts[i] for i in chosen], path)


def run(cfg: EvalConfig) -> dict[str, Any]:
    """Evaluate; returns ``{"metrics": {...}, "skipped": {...}, "samples": [...], "signature": ..., ...}``."""
    import torch

    check(
        bool(cfg.checkpoint or cfg.model_uri),
        "nothing to evaluate: give --checkpoint model.pt or --model-uri models:/NAME@champion",
    )
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.yaml").write_text(settings.dump(cfg), encoding="utf-8")
    prompts, labels = load_prompts(cfg)
    model = load_model(cfg)
    fps = float(model.config.fps)
    log.info(
        f"{len(prompts)} prompts x {cfg.videos_per_prompt} videos, {cfg.steps} DDIM steps, model "
        f"{cfg.checkpoint or cfg.model_uri} (step {model.step})"
    )
    with torch.inference_mode():
        videos, index = generate_videos(model, prompts, cfg)

    metrics: dict[str, float] = {}
    skipped: dict[str, str] = {}
    metrics.update(clip_scores(cfg, videos, [prompts[i] for i in index]))
    if labels is not None:
        from flows.metrics import shapes_metrics

        metrics.update(shapes_metrics(videos, [labels[i] for i in index]))
    if cfg.fvd_network and cfg.fvd_reference:
        metrics["fvd"] = fvd_score(cfg, videos, fps)
    else:
        skipped["fvd"] = "no fvd_network (TorchScript file) and fvd_reference (real videos) given"

    samples = write_samples(videos, prompts, index, out / "samples", fps, cfg.num_samples)
    sheet = contact_sheet(videos, prompts, index, out / CONTACT_SHEET, cfg.sheet_rows)
    result = {
        "metrics": metrics,
        "skipped": skipped,
        "samples": samples,
        "contact_sheet": str(sheet),
        "signature": cfg.signature(),
        "num_videos": len(videos),
        "model": cfg.checkpoint or cfg.model_uri,
        "model_step": model.step,
    }
    if cfg.mlflow.enabled:
        result["mlflow_run_id"] = log_to_mlflow(cfg, result, out)
    (out / METRICS_FILE).write_text(json.dumps(result, indent=2), encoding="utf-8")
    return result


def log_to_mlflow(cfg: EvalConfig, result: dict[str, Any], out: Path) -> str:
    """Metrics as ``eval/<name>``, settings as ``eval.*`` params (secrets redacted), samples and metrics.json as
    artifacts under ``eval/``; into ``mlflow.run_id`` when given, else a new run."""
    from pipelines.tracking import MlflowTracker

    tracker = MlflowTracker(
        tracking_uri(cfg),
        cfg.mlflow.experiment,
        run_id=cfg.mlflow.run_id,
        run_name="evaluate",
        tags=None if cfg.mlflow.run_id else {"t2v.kind": "evaluation"},
    )
    try:
        tracker.log_params({"eval": settings.to_dict(cfg)})
        tracker.log_metrics({f"eval/{k}": v for k, v in result["metrics"].items()}, step=int(result["model_step"]))
        tracker.set_tags({"eval.signature": result["signature"]})
        (out / METRICS_FILE).write_text(json.dumps(result, indent=2), encoding="utf-8")
        for name in (METRICS_FILE, "eval.yaml", CONTACT_SHEET):
            tracker.log_artifact(out / name, "eval")
        if (out / "samples").is_dir():
            tracker.log_artifact(out / "samples", "eval/samples")
    except BaseException:
        tracker.finish("FAILED")
        raise
    tracker.finish()
    return tracker.run_id


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="t2v evaluate", description=__doc__.split("\n\n")[1])
    parser.add_argument("--checkpoint", default=None, help="model.pt to evaluate (same as --set checkpoint=...)")
    parser.add_argument("--model-uri", default=None, help="MLflow model URI, e.g. models:/t2v-shapes@champion")
    parser.add_argument("--prompts", default=None, help="'shapes' or a text file with one prompt per line")
    parser.add_argument("--output", default=None, help="where metrics.json and samples/ go")
    settings.add_arguments(parser)
    args = parser.parse_args(argv)
    cfg = settings.resolve(
        parser,
        EvalConfig,
        args,
        {"checkpoint": args.checkpoint, "model_uri": args.model_uri, "prompts": args.prompts, "output": args.output},
    )
    if cfg is None:
        return 0
    logs.setup()
    try:
        result = run(cfg)
    except ConfigError as e:
        parser.error(str(e))
    for name, value in result["metrics"].items():
        print(f"{name:>20}: {value:.4f}")
    for name, reason in result["skipped"].items():
        print(f"{name:>20}: skipped ({reason})")
    print(f"metrics: {Path(cfg.output) / METRICS_FILE}")
    if result.get("mlflow_run_id"):
        print(f"mlflow run: {result['mlflow_run_id']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
