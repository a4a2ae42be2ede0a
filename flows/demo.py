"""bash clusters/local/t2v demo   (= t2v demo [--state-dir runs/demo] [--set key=value ...] [--dry-run])

The main job: the re-training flow end to end on embedded defaults, sized for a 2-core CPU machine.

Each run is one cycle of the re-training flow (flows/retrain.py) with everything local: a generated "shapes"
corpus, local Ray, a SQLite MLflow store and Prefect without a server, all under ``runs/demo/``:

    runs/demo/corpus-<k>/   the corpus of cycle k (seed k: new videos every cycle)
    runs/demo/flow/         curated shards (one output for every cycle; the ledger skips what it has), cycles/
    runs/demo/mlflow.db     MLflow runs, the registered model and its aliases; artifacts in runs/demo/mlartifacts

The first run trains from scratch and registers the first model as @champion. Running it again generates the
next corpus, curates only it into the same output, fine-tunes the champion on everything, evaluates, registers
the new version as @challenger and shows whether it was promoted. An interrupted run resumes where it stopped.
At the end it prints the MLflow UI command, the registered model and aliases, the evaluation figures and the
paths of sample videos.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from flows import retrain
from flows.retrain import RetrainConfig
from pipelines import logs, settings, shapes
from pipelines.settings import ConfigError, check
from pipelines.shapes import CorpusConfig

log = logging.getLogger("t2v.demo")

# One cycle, Ray and Prefect start-up included, fits in 10 minutes on 2 CPU cores, and the tiny model learns the
# prompt's colour and motion direction in it. What makes that possible: 16x16 clips of 6 frames (a step costs a
# sixth of 32x32 at 8 frames), large shapes that cross the centre line (where a shape is in each frame then depends
# on its direction alone), a high learning rate with a short EMA, and training weighted towards noisy timesteps.
DEMO_CORPUS = {
    "num_videos": 160,
    "num_images": 96,
    "width": 32,
    "height": 32,
    "fps": 4.0,
    "seconds": 1.5,
    "text_free_fraction": 0.25,
    "shape_scale": (0.35, 0.45),
    "travel": 0.8,
    "path_offset": 0.0,
}
SIDE, FRAMES = 16, 6  # curated clips and the model: 16x16, 6 frames at 4 fps
DEMO_FLOW: dict[str, Any] = {
    "model_name": "t2v-shapes",
    "mlflow": {"experiment": "t2v-demo"},
    "metric": "shapes_accuracy",  # colour and direction both right, as the detector reads each video
    "retries": 1,
    "retry_delay_s": 5.0,
    "curate": {
        "clips": {"width": SIDE, "height": SIDE, "num_frames": FRAMES, "fps": 4.0},
        "quality": {"min_side": SIDE},
        "caption": {"filter": "text"},  # no CLIP weights can be had here to score captions with
        "num_cpus": 2,
    },
    "train": {
        "model": "tiny",
        "model_overrides": {
            "height": SIDE,
            "width": SIDE,
            "num_frames": FRAMES,
            "fps": 4.0,
            "diffusion.timestep_shift": 3.0,
        },
        "steps": 800,
        "image_batch_size": 8,
        "video_batch_size": 8,
        "text_free_fraction": 0.125,  # one text-free clip in each video batch of 8
        "lr": 2.0e-3,
        "warmup_steps": 20,
        "ema_decay": 0.99,
        "cpus_per_worker": 2,
        "zero_stage": 0,  # one worker has nothing to partition; stage 0 skips the bookkeeping (about 10% a step)
        "decode_cache_mb": 64.0,
        "checkpoint_every": 200,
        "sample_every": 0,
        "print_every": 50,
        "time_limit_minutes": 7.0,
        "sample_guidance": 7.0,
        "sample_fps": 4.0,
        "mlflow": {"system_metrics_s": 0.0},
    },
    "evaluate": {
        "prompts": "shapes",
        "num_prompts": 24,
        "steps": 25,
        "guidance": 7.0,
        "clip_model": "t2v-tiny-clip",
        "num_samples": 4,
        "batch_size": 24,
    },
}


@dataclasses.dataclass
class DemoConfig:
    state_dir: str = "runs/demo"
    corpus: CorpusConfig = dataclasses.field(default_factory=lambda: CorpusConfig(**DEMO_CORPUS))
    flow: RetrainConfig = dataclasses.field(default_factory=lambda: retrain.load_config(base=DEMO_FLOW))

    def __post_init__(self) -> None:
        check(bool(self.state_dir), "state_dir is empty: name a directory for the demo's state, e.g. runs/demo")
        default = RetrainConfig()
        for key, value, unset in (
            ("input", self.flow.input, default.input),
            ("state_dir", self.flow.state_dir, default.state_dir),
            ("mlflow.tracking_uri", self.flow.mlflow.tracking_uri, None),
        ):
            check(value == unset, f"flow.{key} is set by the demo; use --state-dir instead")


def flow_config(cfg: DemoConfig, manifest: Path) -> RetrainConfig:
    """The re-training flow's config for this demo cycle."""
    state = Path(cfg.state_dir).resolve()
    tracking = dataclasses.replace(cfg.flow.mlflow, tracking_uri=f"sqlite:///{state / 'mlflow.db'}")
    return dataclasses.replace(cfg.flow, input=str(manifest), state_dir=str(state / "flow"), mlflow=tracking)


def corpus_for_cycle(cfg: DemoConfig) -> Path:
    """The corpus this run curates: the unfinished cycle's (resume), else a new one generated with the next seed."""
    state = Path(cfg.state_dir).resolve()
    existing = retrain.cycles(state / "flow")
    if existing and not (existing[-1] / retrain.DONE_FILE).exists():
        info = json.loads((existing[-1] / "cycle.json").read_text(encoding="utf-8"))
        log.info(f"cycle {existing[-1].name} did not finish; resuming it on {info['input']}")
        return Path(info["input"])
    k = len(existing)
    corpus = dataclasses.replace(cfg.corpus, seed=cfg.corpus.seed + k)
    out = state / f"corpus-{k}"
    manifest = out / "manifest.csv"
    if manifest.is_file():
        return manifest
    log.info(
        f"generating corpus {k}: {corpus.num_videos} videos + {corpus.num_images} images, "
        f"{corpus.width}x{corpus.height}, seed {corpus.seed} -> {out}"
    )
    return shapes.generate(corpus, out, progress=False)


def report(summary: dict[str, Any], cfg: DemoConfig, seconds: float) -> str:
    from flows import registry

    state = Path(cfg.state_dir).resolve()
    uri = f"sqlite:///{state / 'mlflow.db'}"
    name = summary["model_name"]
    lines = [
        "",
        f"== t2v demo: cycle {summary['cycle']} {summary['status']} in {seconds / 60:.1f} min ==",
        f"MLflow UI         mlflow ui --backend-store-uri {uri} --host 127.0.0.1   (then open http://127.0.0.1:5000)",
    ]
    client = registry.client(uri)
    champion = registry.get_alias(client, name, registry.CHAMPION)
    challenger = registry.get_alias(client, name, registry.CHALLENGER)
    aliases = ", ".join(
        f"@{a} -> version {mv.version}"
        for a, mv in ((registry.CHAMPION, champion), (registry.CHALLENGER, challenger))
        if mv is not None
    )
    lines.append(f"Registered model  {name}: {aliases or 'none yet'}")
    if summary["status"] == "no-new-data":
        lines.append("This cycle found nothing new to curate, so nothing was trained.")
        return "\n".join(lines)

    d, version = summary["decision"], summary["registered"]["version"]
    verdict = "PROMOTED to @champion" if d["promote"] else "not promoted (stays @challenger)"
    start = (
        "champion version " + summary["champion_before"]["version"] if summary["train"].get("init_from") else "scratch"
    )
    lines.append(
        f"This cycle        version {version} trained from {start}"
        f" for {summary['train']['steps']} steps (final loss {summary['train'].get('final_loss') or float('nan'):.4f})"
    )
    lines.append(f"Promotion         {verdict}: {d['reason']}")
    evaluation = summary["evaluation"]
    lines.append(
        f"Evaluation        {evaluation['num_videos']} videos for held-out prompts "
        f"(metrics.json: {Path(summary['cycle_dir']) / 'eval' / 'metrics.json'})"
    )
    before = d.get("champion_metrics") or {}
    if before:
        lines.append(f"  {'':<20} {'version ' + str(version):>12} {'champion v' + str(d.get('champion_version')):>14}")
    for metric, value in evaluation["metrics"].items():
        old = f" {before[metric]:>14.4f}" if metric in before else ""
        mark = "  <- promotion metric" if metric == d.get("metric") else ""
        lines.append(f"  {metric:<20} {value:>12.4f}{old}{mark}")
    for metric, reason in evaluation.get("skipped", {}).items():
        lines.append(f"  {metric:<20} skipped: {reason}")
    lines.append(
        "  (CLIPSIM and frame consistency use a random tiny CLIP here, as no weights can be downloaded: "
        "they only compare runs; shapes accuracy is what the detector reads from each video)"
    )
    lines.append("Pictures")
    if evaluation.get("contact_sheet"):
        lines.append(f"  contact sheet     {evaluation['contact_sheet']}   (one row per held-out prompt)")
    if summary["train"].get("loss_curve"):
        lines.append(f"  loss curve        {summary['train']['loss_curve']}")
    lines.append("  (both are in the training run's MLflow artifacts too: eval/ and plots/)")
    lines.append("Sample videos")
    lines += [f"  {p}" for p in evaluation["samples"]]
    lines.append(
        "Load the champion "
        f'MLFLOW_TRACKING_URI={uri} .venv/bin/python -c "import mlflow; '
        "from pipelines.pyfunc import write_predictions; "
        f"m = mlflow.pyfunc.load_model('models:/{name}@champion'); "
        "print(write_predictions(m.predict({'prompt': ['a red circle moving left']}), "
        f"'{state / 'champion_samples'}'))\""
    )
    lines.append(
        "Next              run the same command again: a new corpus is generated and an incremental "
        "cycle fine-tunes the champion and decides on promotion"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="t2v demo", description=__doc__.split("\n\n")[1])
    parser.add_argument("--state-dir", default=None, help="where everything goes (default runs/demo)")
    settings.add_arguments(parser)
    args = parser.parse_args(argv)
    dry_run, args.dry_run = args.dry_run, False
    cfg = settings.resolve(parser, DemoConfig, args, {"state_dir": args.state_dir})
    if dry_run:  # the flow as this cycle runs it: the demo sets its input, state_dir and tracking URI
        manifest = Path(cfg.state_dir).resolve() / "corpus-<k>" / "manifest.csv"
        print(settings.dump({**settings.to_dict(cfg), "flow": settings.to_dict(flow_config(cfg, manifest))}), end="")
        return 0
    logs.setup()
    try:
        started = time.monotonic()
        state = Path(cfg.state_dir).resolve()
        state.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
        retrain.prefect_environment(state)
        manifest = corpus_for_cycle(cfg)
        summary = retrain.run_once(flow_config(cfg, manifest))
    except ConfigError as e:
        print(f"t2v demo: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # the flow logged the traceback; say how to go on
        print(
            f"t2v demo: the cycle stopped ({type(e).__name__}: {e}). Run the same command again: finished steps "
            "are kept and the cycle resumes from the first unfinished one.",
            file=sys.stderr,
        )
        return 1
    print(report(summary, cfg, time.monotonic() - started))
    return 0


if __name__ == "__main__":
    sys.exit(main())
