"""python -m flows.benchmarks.learn [--minutes 30] [--ablations full,no_coherence,no_text_free] [--samples 64]

Does training really learn? Generates the synthetic shapes corpus, curates it (``t2v curate``), trains the tiny
model on CPU with the real training job (Ray Train + DeepSpeed, one worker) for a time budget, and scores EMA
snapshots taken along the way: for held-out prompts (colour/shape/direction combinations never seen as captions,
``shapes.heldout_prompts``) it generates videos and measures them with the shapes detector (dominant colour,
centroid trajectory). Chance is 0.25 for both colour and direction. Target on a 2-core machine within 30 minutes of
training: colour >= 0.9, direction >= 0.7 on at least 64 samples.

Ablations (TF-T2V's): ``no_coherence`` trains without the temporal coherence loss (coherence_weight 0),
``no_text_free`` without the text-free videos (the video batch takes only captioned clips). Each ablation gets the
same time budget. Prints the learning curve (minutes, step, colour and direction accuracy) of every run and writes
it to ``<output>/bench_learn-<minutes>min.json``. The corpus and curated shards are made once per output directory
and reused, so shorter ablation runs can follow a long one:

    t2v bench learn --minutes 30
    t2v bench learn --minutes 10 --ablations full,no_coherence,no_text_free
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipelines import logs, settings
from pipelines.settings import check

ABLATIONS = {
    "full": {},
    "no_coherence": {"model_overrides": {"diffusion.coherence_weight": 0.0}},
    "no_text_free": {"text_free_fraction": 0.0},
}


@dataclass
class LearnBenchConfig:
    output: str = "runs/bench_learn"
    minutes: float = 30.0  # training time budget per run (start-up excluded)
    ablations: list[str] = field(default_factory=lambda: ["full"])
    samples: int = 64  # generated videos per evaluation (held-out prompts, cycled)
    evaluations: int = 6  # EMA snapshots scored along the way
    # corpus (pipelines/shapes.py) and curation
    num_videos: int = 480
    num_images: int = 480
    text_free_share: float = 0.25  # of the corpus videos
    # shapes a third of the frame across: at 16x16 that is 5-7 px, enough for the detector to see colour and motion
    shape_scale: tuple[float, float] = (0.35, 0.45)
    # model and training
    model: str = "tiny"
    # 16x16 clips: a much cheaper step than 32x32 on CPU, so many more steps fit in the budget; the detector still
    # resolves colour and motion at this size.
    model_overrides: dict[str, Any] = field(default_factory=lambda: {"height": 16, "width": 16})
    threads: int = 2  # torch threads of the (single) worker
    train: dict[str, Any] = field(
        default_factory=lambda: {
            "image_batch_size": 8,
            "video_batch_size": 8,
            "text_free_fraction": 0.25,
            "lr": 2e-3,
            "warmup_steps": 50,
            "ema_decay": 0.995,
            "cfg_dropout": 0.1,
            "image_condition_prob": 0.25,
            "video_image_condition_prob": 0.25,
            "zero_stage": 0,
            "decode_cache_mb": 256.0,
            "checkpoint_every": 500,
        }
    )
    steps_per_second: float = 0.0  # 0: measure it with a short calibration run first
    # sampling for evaluation
    sample_steps: int = 25
    guidance: float = 7.0  # colour follows the prompt more with stronger guidance
    seed: int = 0

    def __post_init__(self) -> None:
        check(self.minutes > 0, "minutes must be > 0")
        for name in self.ablations:
            check(name in ABLATIONS, f"ablation {name!r} is not one of {list(ABLATIONS)}")
        check(self.samples >= 1 and self.evaluations >= 1, "samples and evaluations must be >= 1")


def prepare_data(cfg: LearnBenchConfig, work: Path, size: int) -> str:
    """Corpus -> curated shards (reused when the output directory already has them)."""
    from pipelines import schema, shapes
    from pipelines.curation import job as curate

    curated = work / "curated"
    if schema.shard_urls(curated, "video_text"):
        return str(curated)
    manifest = shapes.generate(
        shapes.CorpusConfig(
            num_videos=cfg.num_videos,
            num_images=cfg.num_images,
            text_free_fraction=cfg.text_free_share,
            shape_scale=tuple(cfg.shape_scale),
            seed=cfg.seed,
        ),
        work / "corpus",
    )
    # Pre-encoded shards (the clips as arrays and the CLIP text/image embeddings, stamped with the encoders'
    # identity): training then spends its time on the UNet instead of decoding mp4s and running CLIP every step.
    ccfg = settings.from_dict(
        curate.CurateConfig,
        {
            "clips": {"width": size, "height": size, "num_frames": 8, "fps": 4.0},  # 8 frames over the 2 s clip
            "caption": {"filter": "text"},
            "encode": {
                "mode": "latents+clip",
                "model": cfg.model,
                "model_overrides": dict(cfg.model_overrides),
                "batch_size": 64,
            },
        },
    )
    curate.run(ccfg, str(manifest), str(curated))
    return str(curated)


def train_config(cfg: LearnBenchConfig, data: str, out: Path, ablation: str, steps: int):
    from pipelines.training.config import TrainConfig

    base: dict[str, Any] = {
        "data": [data],
        "output": str(out),
        "model": cfg.model,
        "model_overrides": dict(cfg.model_overrides),
        # The time limit ends the run and drives the LR decay (training.worker.lr_factor); the step count is the
        # calibrated estimate with head-room, so a machine faster than the calibration still uses its minutes.
        "steps": int(steps * 1.5),
        "num_workers": 1,
        "cpus_per_worker": cfg.threads,
        "seed": cfg.seed,
        "time_limit_minutes": cfg.minutes,
        "snapshot_every": max(1, steps // cfg.evaluations),
        "sample_every": 0,
        "print_every": max(1, steps // 30),
        "sample_guidance": cfg.guidance,
        "mlflow": {
            "tracking_uri": f"sqlite:///{Path(cfg.output).resolve() / 'mlflow.db'}",
            "experiment": "bench-learn",
            "run_name": f"{ablation}-{cfg.minutes:g}min",
            "system_metrics_s": 30.0,
        },
        **cfg.train,
    }
    extra = ABLATIONS[ablation]
    base["model_overrides"].update(extra.get("model_overrides", {}))
    base.update({k: v for k, v in extra.items() if k != "model_overrides"})
    return settings.from_dict(TrainConfig, base)


def calibrate(cfg: LearnBenchConfig, data: str, work: Path) -> float:
    """Steps per second of the plain loop: an estimate for sizing the run (`t2v bench train` compares it with the
    Ray/DeepSpeed step); the time limit ends the real run."""
    from flows.benchmarks.train import plain_loop

    tcfg = train_config(cfg, data, work / "calibrate", "full", steps=12)
    times, _ = plain_loop(tcfg, 12)
    return 1.0 / float(np.median(times[4:]))


def evaluate(checkpoint: str | Path, cfg: LearnBenchConfig) -> dict[str, float]:
    """Colour and direction accuracy of videos generated for held-out prompts, measured by the shapes detector."""
    from model.text_to_video import TextToVideo
    from pipelines import shapes

    model = TextToVideo.from_checkpoint(checkpoint)
    prompts = shapes.heldout_prompts(cfg.samples)
    colour_ok = direction_ok = 0
    for start in range(0, len(prompts), 32):
        chunk = prompts[start : start + 32]
        videos = model.generate(
            [p for p, *_ in chunk], steps=cfg.sample_steps, guidance=cfg.guidance, seed=cfg.seed + start
        )
        for (_, colour, _, direction), video in zip(chunk, videos):
            found = shapes.detect(video)
            colour_ok += found.colour == colour
            direction_ok += found.direction == direction
    return {"colour": colour_ok / len(prompts), "direction": direction_ok / len(prompts), "step": model.step}


def run_ablation(cfg: LearnBenchConfig, data: str, ablation: str, steps: int) -> dict[str, Any]:
    import ray

    from pipelines.training import job as train

    out = Path(cfg.output).resolve() / f"{ablation}-{cfg.minutes:g}min"  # budgets do not share an output
    tcfg = train_config(cfg, data, out, ablation, steps)
    started = not ray.is_initialized()
    if started:
        # with the dashboard on 127.0.0.1, as `t2v train` starts Ray: Ray Train's placement-group cleaner polls its
        # State API and, without it, logs a warning every second of the run
        ray.init(num_cpus=cfg.threads, dashboard_host="127.0.0.1")
    try:
        result = train.run(tcfg)
    finally:
        if started:
            ray.shutdown()
    seconds_per_step = _seconds_per_step(tcfg, result)
    curve = []
    snapshots = sorted((out / "model" / "snapshots").glob("model_ema_*.pt"))
    for snap in snapshots + [Path(result["ema_checkpoint"])]:
        scores = evaluate(snap, cfg)
        scores["minutes"] = round(scores["step"] * seconds_per_step / 60, 1)
        if not curve or curve[-1]["step"] != scores["step"]:
            curve.append(scores)
            print(
                f"[bench_learn] {ablation:13s} {scores['minutes']:5.1f} min  step {scores['step']:5d}  "
                f"colour {scores['colour']:.2f}  direction {scores['direction']:.2f}",
                flush=True,
            )
    return {
        "ablation": ablation,
        "steps": result["steps"],
        "seconds_per_step": seconds_per_step,
        "curve": curve,
        "final": curve[-1],
        "run_id": result["run_id"],
    }


def _seconds_per_step(tcfg, result: dict) -> float:
    from mlflow import MlflowClient

    client = MlflowClient(tcfg.mlflow.tracking_uri)
    times = [m.value for m in client.get_metric_history(result["run_id"], "step_time_s")]
    return float(np.mean(times)) if times else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="t2v bench learn", description=__doc__.split("\n\n")[0])
    settings.add_arguments(parser)
    parser.add_argument("--minutes", type=float, default=None, help="training minutes per run")
    parser.add_argument("--ablations", default=None, help="comma-separated: " + ",".join(ABLATIONS))
    parser.add_argument("--samples", type=int, default=None, help="generated videos per evaluation")
    parser.add_argument("--output", default=None, help="output directory")
    args = parser.parse_args(argv)
    cfg = settings.resolve(
        parser,
        LearnBenchConfig,
        args,
        {
            "minutes": args.minutes,
            "ablations": args.ablations.split(",") if args.ablations else None,
            "samples": args.samples,
            "output": args.output,
        },
    )
    if cfg is None:
        return 0
    logs.setup()
    import torch

    from model.registry import get_config

    out = Path(cfg.output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    size = get_config(cfg.model, cfg.model_overrides).height
    t0 = time.time()
    data = prepare_data(cfg, out, size)
    print(f"[bench_learn] data ready in {time.time() - t0:.0f}s: {data}", flush=True)
    torch.set_num_threads(cfg.threads)
    rate = cfg.steps_per_second or calibrate(cfg, data, out)
    steps = max(10, int(cfg.minutes * 60 * rate))
    print(f"[bench_learn] {rate:.2f} steps/s -> about {steps} steps in {cfg.minutes} min per run", flush=True)
    results = [run_ablation(cfg, data, name, steps) for name in cfg.ablations]
    report = {"config": settings.to_dict(cfg), "chance": 0.25, "runs": results}
    (out / f"bench_learn-{cfg.minutes:g}min.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    print()
    print(f"held-out prompts: {cfg.samples} samples, chance 0.25; target colour >= 0.9, direction >= 0.7")
    for r in results:
        f = r["final"]
        print(
            f"  {r['ablation']:13s} step {f['step']:5d} ({f['minutes']:.1f} min)  colour {f['colour']:.2f}  "
            f"direction {f['direction']:.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
