"""t2v bench learn [--minutes 30] [--ablations full,no_coherence,no_text_free] [--seeds 0,1,2]

Does training really learn, and how soon? Generates the shapes corpus and curates it (``t2v curate``) with the main
job's recipe (``flows.demo``: ``DEMO_CORPUS``, ``DEMO_FLOW["curate"]``, ``DEMO_FLOW["train"]``, so the benchmark
follows whatever the demo trains with), then trains each ablation once per seed with the real training job (Ray
Train + DeepSpeed) for a time budget, evaluating during training (``periodic_eval``): videos for held-out prompts
(colour/shape/direction combinations never seen as captions) read by the shapes detector. Chance is 0.25 for both
colour and direction. Target on a 2-core machine within 30 minutes of training: colour >= 0.9, direction >= 0.7.

Ablations (TF-T2V's): ``no_coherence`` trains without the temporal coherence loss, ``no_text_free`` without the
text-free videos; ``stunet`` trains Lumiere's space-time UNet (``model/stunet.py``) of the same widths instead of the
ModelScope layout, so ``--ablations full,stunet`` compares the two layouts after the same training time.
In MLflow (``<output>/mlflow.db``, experiment ``bench-learn``) the benchmark is one parent run with
a child run per ablation and seed, each with its ``val/*`` curves; the parent holds the comparison table and plots
(``t2v compare --parent``). Prints, per ablation, the median over seeds of the minutes and steps until colour >= 0.9
and until direction >= 0.7, beside the figures at the end of the budget, and writes them to
``<output>/bench_learn-<minutes>min.json``. The corpus and curated shards are made once per output directory.

    t2v bench learn --minutes 30
    t2v bench learn --minutes 10 --ablations full,no_coherence
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flows.demo import DEMO_CORPUS, DEMO_FLOW
from pipelines import logs, settings
from pipelines.curation.config import CurateConfig
from pipelines.settings import check
from pipelines.shapes import CorpusConfig
from pipelines.training.config import TrainConfig

ABLATIONS: dict[str, dict[str, Any]] = {
    "full": {},
    "no_coherence": {"model_overrides": {"diffusion.coherence_weight": 0.0}},
    "no_text_free": {"text_free_fraction": 0.0},
    # Lumiere's STUNet at the same widths and clip shape; the demo's 6 frames halve once in time (6 -> 3).
    "stunet": {"model": "tiny-stunet", "model_overrides": {"stunet.temporal_levels": [0]}},
}
EXPERIMENT = "bench-learn"


def _demo_train() -> TrainConfig:
    """The demo's training recipe, with the bench's time budget (not its step count) ending each run."""
    return settings.from_dict(TrainConfig, settings.merge(DEMO_FLOW["train"], {"steps": 10**6}))


@dataclass
class LearnBenchConfig:
    output: str = "runs/bench_learn"
    minutes: float = 30.0  # training time budget per run (start-up and evaluations excluded)
    ablations: list[str] = field(default_factory=lambda: ["full"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # figures are medians over these
    samples: int = 64  # generated videos per evaluation (held-out prompts, cycled)
    evaluations: int = 10  # evaluations spread over the budget
    eval_share: float = 0.3  # evaluations may take at most this share of the wall time
    colour_target: float = 0.9
    direction_target: float = 0.7
    corpus: CorpusConfig = field(default_factory=lambda: CorpusConfig(**DEMO_CORPUS))
    curate: CurateConfig = field(default_factory=lambda: settings.from_dict(CurateConfig, DEMO_FLOW["curate"]))
    train: TrainConfig = field(default_factory=_demo_train)  # data, output, seed, time limit: set per run

    def __post_init__(self) -> None:
        check(self.minutes > 0, "minutes must be > 0")
        check(bool(self.ablations), f"ablations is empty: choose from {list(ABLATIONS)}")
        for name in self.ablations:
            check(name in ABLATIONS, f"ablation {name!r} is not one of {list(ABLATIONS)}")
        check(bool(self.seeds), "seeds is empty: give at least one, e.g. [0, 1, 2]")
        check(self.samples >= 1 and self.evaluations >= 1, "samples and evaluations must be >= 1")
        check(0 < self.eval_share <= 1, "eval_share must be within (0, 1]")


def prepare_data(cfg: LearnBenchConfig, work: Path) -> str:
    """Corpus -> curated shards (reused when the output directory already has them)."""
    from pipelines import schema, shapes
    from pipelines.curation import job as curate

    curated = work / "curated"
    if schema.shard_urls(curated, "video_text"):
        return str(curated)
    manifest = shapes.generate(cfg.corpus, work / "corpus", progress=False)
    curate.run(cfg.curate, str(manifest), str(curated))
    return str(curated)


def train_config(cfg: LearnBenchConfig, data: str, out: Path, ablation: str, seed: int) -> TrainConfig:
    """One run: the recipe, the ablation's change, the seed, the time budget and evaluation during training."""
    base = settings.to_dict(cfg.train)
    extra = ABLATIONS[ablation]
    base["model_overrides"] = {**base["model_overrides"], **extra.get("model_overrides", {})}
    base.update({k: v for k, v in extra.items() if k != "model_overrides"})
    evaluate = DEMO_FLOW["evaluate"]
    base.update(
        data=[data],
        output=str(out),
        seed=seed,
        time_limit_minutes=cfg.minutes,
        log_model=False,  # the figures come from the curves; no serving model is needed
        periodic_eval={
            **base["periodic_eval"],
            "every_minutes": cfg.minutes / cfg.evaluations,
            "num_prompts": cfg.samples,
            "sample_steps": evaluate["steps"],
            "guidance": evaluate["guidance"],
            "clip_model": evaluate["clip_model"],
            "max_share": cfg.eval_share,
            "final": True,
        },
        mlflow={
            **base["mlflow"],
            "tracking_uri": f"sqlite:///{Path(cfg.output).resolve() / 'mlflow.db'}",
            "experiment": EXPERIMENT,
        },
    )
    return settings.from_dict(TrainConfig, base)


# ---------------------------------------------------------------------------------------------------------------
# Figures


def reached(curve: dict[str, list[float]], target: float) -> tuple[float, int] | None:
    """(training minutes, step) of the first evaluation at or above ``target``; None if never."""
    for minutes, step, value in zip(curve["minutes"], curve["step"], curve["value"]):
        if value >= target:
            return minutes, int(step)
    return None


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def figures(client, runs_by_ablation: dict[str, list], cfg: LearnBenchConfig) -> dict[str, dict[str, Any]]:
    """Per ablation, medians over seeds: the end-of-budget figures and the time and steps to each target (a seed
    that never reached it counts as never; the median is then given only when most seeds reached it)."""
    from flows.compare import curve

    out: dict[str, dict[str, Any]] = {}
    for ablation, runs in runs_by_ablation.items():
        row: dict[str, Any] = {"seeds": len(runs)}
        for name, key, target in (
            ("colour", "val/colour_accuracy", cfg.colour_target),
            ("direction", "val/direction_accuracy", cfg.direction_target),
        ):
            curves = [curve(client, r, key) for r in runs]
            curves = [c for c in curves if c["value"]]
            row[f"{name}_end"] = _median([c["value"][-1] for c in curves])
            hits = [reached(c, target) for c in curves]
            got = [h for h in hits if h is not None]
            row[f"{name}_reached"] = f"{len(got)}/{len(runs)}"
            majority = len(got) * 2 > len(runs)
            inf = float("inf")
            minutes = sorted(h[0] for h in got) + [inf] * (len(runs) - len(got))
            steps = sorted(h[1] for h in got) + [inf] * (len(runs) - len(got))
            row[f"{name}_minutes"] = statistics.median(minutes) if majority else None
            row[f"{name}_steps"] = statistics.median(steps) if majority else None
        ends = [c["step"][-1] for c in (curve(client, r, "val/colour_accuracy") for r in runs) if c["step"]]
        row["steps_end"] = _median(ends)
        out[ablation] = row
    return out


def render(rows: dict[str, dict[str, Any]], cfg: LearnBenchConfig) -> str:
    from flows.compare import markdown_table

    def f(value: Any, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    header = [
        "ablation",
        f"colour at {cfg.minutes:g} min",
        f"direction at {cfg.minutes:g} min",
        "steps",
        f"colour >= {cfg.colour_target:g}: min / step (seeds)",
        f"direction >= {cfg.direction_target:g}: min / step (seeds)",
    ]
    table = [header]
    for ablation, r in rows.items():
        table.append(
            [
                ablation,
                f(r["colour_end"], ".2f"),
                f(r["direction_end"], ".2f"),
                f(r["steps_end"], ".0f"),
                f"{f(r['colour_minutes'], '.1f')} / {f(r['colour_steps'], '.0f')} ({r['colour_reached']})",
                f"{f(r['direction_minutes'], '.1f')} / {f(r['direction_steps'], '.0f')} ({r['direction_reached']})",
            ]
        )
    intro = f"held-out prompts: {cfg.samples} videos per evaluation, chance 0.25; medians over seeds {cfg.seeds}"
    return intro + "\n" + markdown_table(table)


# ---------------------------------------------------------------------------------------------------------------


def run(cfg: LearnBenchConfig) -> dict[str, Any]:
    from flows import sweep
    from pipelines import tracking

    out = Path(cfg.output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    data = prepare_data(cfg, out)
    print(f"[bench_learn] data ready in {time.time() - t0:.0f}s: {data}", flush=True)
    uri = tracking.resolve_tracking_uri(f"sqlite:///{out / 'mlflow.db'}")
    parent = sweep.open_parent(
        out / f"parent-{cfg.minutes:g}min",
        uri,
        EXPERIMENT,
        f"bench learn {cfg.minutes:g} min",
        {"bench": {k: v for k, v in settings.to_dict(cfg).items() if k not in ("train", "curate", "corpus")}},
        {"t2v.bench": "learn"},
    )
    children = []
    for ablation in cfg.ablations:
        for seed in cfg.seeds:
            name = f"{ablation}-seed{seed}"
            tcfg = train_config(cfg, data, out / f"{ablation}-{cfg.minutes:g}min-seed{seed}", ablation, seed)
            children.append((name, sweep.child_config(tcfg, parent.run_id, name, Path(tcfg.output))))
    metrics = ["val/colour_accuracy", "val/direction_accuracy", "val/shapes_accuracy"]
    results = sweep.run_children(parent, children, metrics)
    client = parent.client
    by_ablation: dict[str, list] = {}
    for r in results:
        by_ablation.setdefault(r["variant"].rsplit("-seed", 1)[0], []).append(client.get_run(r["run_id"]))
    rows = figures(client, by_ablation, cfg)
    text = render(rows, cfg)
    report = {"config": settings.to_dict(cfg), "chance": 0.25, "parent_run_id": parent.run_id, "ablations": rows}
    path = out / f"bench_learn-{cfg.minutes:g}min.json"
    path.write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "bench_learn.md").write_text(text + "\n", encoding="utf-8")
        (Path(d) / path.name).write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
        parent.log_artifact(d, "bench")
    parent_metrics = {
        f"{ablation}/{k}": v for ablation, r in rows.items() for k, v in r.items() if isinstance(v, (int, float))
    }
    parent.log_metrics(parent_metrics, 0)
    print()
    print(text)
    print(f"\nparent run {parent.run_id}: t2v compare --parent {parent.run_id} --tracking-uri {uri}")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="t2v bench learn", description=__doc__.split("\n\n")[1])
    settings.add_arguments(parser)
    parser.add_argument("--minutes", type=float, default=None, help="training minutes per run")
    parser.add_argument("--ablations", default=None, help="comma-separated: " + ",".join(ABLATIONS))
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1,2)")
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
            "seeds": [int(s) for s in args.seeds.split(",")] if args.seeds else None,
            "samples": args.samples,
            "output": args.output,
        },
    )
    if cfg is None:
        return 0
    logs.setup()
    run(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
