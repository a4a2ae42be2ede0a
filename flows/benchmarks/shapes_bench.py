"""What the benchmarks that train the tiny model on the shapes corpus share (``t2v bench conditions``, ``t2v bench
masked``): held-out reference clips as the model sees clips, curate-then-train for a time budget with the real
jobs, the figures file and the command line."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from flows.demo import FRAMES, SIDE
from pipelines import logs, settings
from pipelines.curation.config import CurateConfig
from pipelines.shapes import CorpusConfig
from pipelines.training.config import TrainConfig


def reference_clip(
    colour: str, shape: str, direction: str, corpus: CorpusConfig, offset: float, fps: float
) -> tuple[np.ndarray, bytes]:
    """A held-out combination as the model sees clips: rendered at the corpus size, scaled to the model's and
    encoded as curation stores it -> (the decoded clip uint8 [f, h, w, 3], its mp4 bytes)."""
    from pipelines import media, shapes
    from pipelines.loader import resize_frames

    size = 0.4 * min(corpus.width, corpus.height)
    video = shapes.render_video(
        colour, shape, direction, corpus.width, corpus.height, FRAMES, size, corpus.travel, offset
    )
    mp4 = media.encode_mp4(resize_frames(video, SIDE, SIDE), fps)
    return media.decode_mp4(mp4), mp4


def curate_and_train(
    output: str,
    corpus: CorpusConfig,
    curate_cfg: CurateConfig,
    train_cfg: TrainConfig,
    minutes: float,
    seed: int,
    name: str,
) -> dict[str, Any]:
    """Corpus -> curated shards (reused when ``output`` has them) -> the real training job for ``minutes``.
    Returns the training job's result (``checkpoint``, ``ema_checkpoint``, ``steps``...)."""
    from pipelines import schema, shapes
    from pipelines.curation import job as curate
    from pipelines.training import job as train

    out = Path(output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    curated = out / "curated"
    if not schema.shard_urls(curated, "video_text"):
        manifest = shapes.generate(corpus, out / "corpus", progress=False)
        curate.run(curate_cfg, str(manifest), str(curated))
    print(f"[bench_{name}] data ready in {time.time() - t0:.0f}s: {curated}", flush=True)
    tcfg = settings.from_dict(
        TrainConfig,
        settings.merge(
            settings.to_dict(train_cfg),
            {
                "data": [str(curated)],
                "output": str(out / f"train-{minutes:g}min"),
                "time_limit_minutes": minutes,
                "seed": seed,
                "log_model": False,
                "mlflow": {"tracking_uri": f"sqlite:///{out / 'mlflow.db'}", "experiment": f"bench-{name}"},
            },
        ),
    )
    return train.run(tcfg)


def train_and_report(name: str, cfg: Any, evaluate: Callable, render: Callable) -> dict[str, Any]:
    """Curate and train with ``cfg`` (a bench config with output, corpus, curate, train, minutes, seed), score the
    EMA model with ``evaluate(checkpoint, cfg)``, write ``<output>/bench_<name>-<minutes>min.json`` and print the
    table ``render(rows, cfg, steps)``."""
    result = curate_and_train(cfg.output, cfg.corpus, cfg.curate, cfg.train, cfg.minutes, cfg.seed, name)
    rows = evaluate(result["ema_checkpoint"] or result["checkpoint"], cfg)
    report = {"config": settings.to_dict(cfg), "steps": result["steps"], "ways": rows}
    path = Path(cfg.output).resolve() / f"bench_{name}-{cfg.minutes:g}min.json"
    path.write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
    print()
    print(render(rows, cfg, int(result["steps"])))
    print(f"\n[bench_{name}] figures: {path}")
    return report


def main_for(name: str, doc: str, cls: type, run: Callable[[Any], Any], samples: str, argv: list[str] | None) -> int:
    """``t2v bench <name> [--minutes M] [--samples N] [--output DIR]`` plus ``--set``/``--config``/``--dry-run``."""
    parser = argparse.ArgumentParser(prog=f"t2v bench {name}", description=doc.split("\n\n")[1])
    settings.add_arguments(parser)
    parser.add_argument("--minutes", type=float, default=None, help="training minutes")
    parser.add_argument("--samples", type=int, default=None, help=samples)
    parser.add_argument("--output", default=None, help="output directory")
    args = parser.parse_args(argv)
    cfg = settings.resolve(parser, cls, args, {"minutes": args.minutes, "samples": args.samples, "output": args.output})
    if cfg is None:
        return 0
    logs.setup()
    run(cfg)
    return 0
