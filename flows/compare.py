"""t2v compare RUN_ID [RUN_ID ...] | --experiment NAME [--tracking-uri URI] [--metric KEY ...] [--output DIR]

Compares MLflow runs side by side: the settings that differ between them, then for each metric its final and best
value (and the step of the best) per run, and writes one plot per metric against step and against training minutes
(``<output>/<metric>-step.png``, ``-minutes.png``) and the tables as ``<output>/comparison.md``.

Without ``--metric`` it compares the evaluation metrics the runs have (``val/*`` from evaluation during training,
``eval/*`` from ``t2v evaluate``) and ``loss``. ``--experiment NAME`` takes every run of that experiment (children of
a sweep or an ablation included; ``--parent RUN_ID`` takes the children of one parent run). Works against any
tracking URI (``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///runs/mlflow.db``). An unknown run,
a metric a run lacks or a store that cannot be reached stops with a message saying so (exit status 2).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

from pipelines import logs, settings
from pipelines.metrics import HIGHER_IS_BETTER
from pipelines.settings import check

log = logging.getLogger("t2v.compare")

EVAL_PREFIXES = ("val/", "eval/")
TIME_KEY = "val/train_minutes"  # training minutes without evaluation time, logged by each periodic evaluation
# settings that differ between any two runs and say nothing about the experiment
NOT_SETTINGS = ("train.output", "train.mlflow.run_name", "derived.deepspeed")


class CompareError(Exception):
    """Bad input for a comparison: the message says what is wrong and how to go on."""


@dataclasses.dataclass
class CompareConfig:
    runs: list[str] = dataclasses.field(default_factory=list)  # run ids
    experiment: str | None = None  # or every run of this experiment
    parent: str | None = None  # or the child runs of this parent run (a sweep, an ablation)
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///runs/mlflow.db
    metrics: list[str] = dataclasses.field(default_factory=list)  # empty: val/*, eval/* and loss
    output: str = "runs/compare"  # plots and comparison.md

    def __post_init__(self) -> None:
        given = sum([bool(self.runs), self.experiment is not None, self.parent is not None])
        check(given == 1, "name the runs to compare: RUN_ID [RUN_ID ...], or --experiment NAME, or --parent RUN_ID")
        check(bool(self.output), "output is empty: name a directory for the plots")


# ---------------------------------------------------------------------------------------------------------------
# Reading runs


def store_uri(uri: str | None) -> str:
    """The tracking URI to read; a SQLite file must exist (MLflow would create an empty store and find nothing)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'runs' / 'mlflow.db'}"
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
        if not path.is_file():
            raise CompareError(
                f"no MLflow store at {path}: pass --tracking-uri sqlite:///PATH/mlflow.db or an http(s) URI"
            )
    return uri


def client_for(uri: str):
    """An MlflowClient that fails fast: one try, a short timeout (MLflow's default retries for minutes)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    try:
        client.search_experiments(max_results=1)
    except Exception as e:
        raise CompareError(
            f"cannot reach the MLflow store at {settings.redact_uri(uri)} ({_reason(e)}); start the server or "
            "pass the right --tracking-uri (or MLFLOW_TRACKING_URI)"
        ) from None
    return client


def _reason(e: Exception) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text[:200]


def find_runs(client, cfg: CompareConfig) -> list:
    from mlflow.exceptions import MlflowException

    if cfg.runs:
        runs = []
        for run_id in cfg.runs:
            try:
                runs.append(client.get_run(run_id))
            except MlflowException:
                raise CompareError(
                    f"no run {run_id!r} in this store; find run ids with `t2v compare --experiment NAME` or in the "
                    "MLflow UI (the run's page shows its id)"
                ) from None
        return runs
    if cfg.parent is not None:
        try:
            parent = client.get_run(cfg.parent)
        except MlflowException:
            raise CompareError(f"no parent run {cfg.parent!r} in this store") from None
        runs = client.search_runs(
            [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{cfg.parent}'", order_by=["start_time ASC"]
        )
        if not runs:
            raise CompareError(f"run {cfg.parent!r} has no child runs; compare run ids instead")
        return list(runs)
    exp = client.get_experiment_by_name(cfg.experiment)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments())
        raise CompareError(f"no experiment {cfg.experiment!r} in this store; experiments there: {', '.join(names)}")
    # parent runs of sweeps hold no training of their own: compare what they group
    runs = [
        r
        for r in client.search_runs([exp.experiment_id], order_by=["start_time ASC"], max_results=1000)
        if r.data.tags.get("t2v.kind") != "parent"
    ]
    if not runs:
        raise CompareError(f"experiment {cfg.experiment!r} has no runs to compare")
    return runs


def label(run) -> str:
    return run.info.run_name or run.info.run_id[:8]


def differing_settings(runs: list) -> dict[str, list[str | None]]:
    """Params whose values are not the same on every run (a param a run lacks counts as different)."""
    keys = sorted({k for r in runs for k in r.data.params})
    out = {}
    for key in keys:
        if key in NOT_SETTINGS or key.startswith(("changed_param.", "train.mlflow.tags.")):
            continue
        values = [r.data.params.get(key) for r in runs]
        if len(set(values)) > 1:
            out[key] = values
    return out


def metric_keys(runs: list, asked: list[str]) -> list[str]:
    """The metrics to compare: those asked for (each run must have them), else every val/* and eval/* one + loss."""
    if asked:
        for key in asked:
            for r in runs:
                if key not in r.data.metrics:
                    have = sorted(k for k in r.data.metrics if k.startswith(EVAL_PREFIXES)) or sorted(r.data.metrics)
                    raise CompareError(
                        f"run {label(r)} ({r.info.run_id}) has no metric {key!r}; it has: "
                        f"{', '.join(have[:20]) or 'no metrics'}"
                    )
        return list(asked)
    found = sorted({k for r in runs for k in r.data.metrics if k.startswith(EVAL_PREFIXES)})
    found = [k for k in found if k.split("/", 1)[1] in HIGHER_IS_BETTER]  # not val/time_s, val/share, ...
    if any("loss" in r.data.metrics for r in runs):
        found.append("loss")
    if not found:
        raise CompareError("the runs have no evaluation metrics and no loss; pass --metric KEY")
    return found


def higher_is_better(key: str) -> bool:
    name = key.split("/", 1)[-1]
    return HIGHER_IS_BETTER.get(name, "loss" not in name)


def curve(client, run, key: str) -> dict[str, list[float]]:
    """``{"step", "value", "minutes"}`` of one metric; minutes of training from the periodic evaluation's clock
    when it logged at these steps, else wall time since the run's first point."""
    points = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: (m.step, m.timestamp))
    clock = {m.step: m.value for m in client.get_metric_history(run.info.run_id, TIME_KEY)} if points else {}
    t0 = run.info.start_time or (points[0].timestamp if points else 0)
    minutes = [clock.get(m.step, (m.timestamp - t0) / 60000) for m in points]
    return {"step": [m.step for m in points], "value": [m.value for m in points], "minutes": minutes}


def summarise(client, runs: list, keys: list[str]) -> dict[str, dict[str, Any]]:
    """``{key: {run_id: {"final", "best", "best_step", "curve"}}}``."""
    table: dict[str, dict[str, Any]] = {}
    for key in keys:
        table[key] = {}
        for r in runs:
            c = curve(client, r, key)
            if not c["value"]:
                table[key][r.info.run_id] = None
                continue
            pick = max if higher_is_better(key) else min
            i = pick(range(len(c["value"])), key=lambda j: c["value"][j])
            table[key][r.info.run_id] = {
                "final": c["value"][-1],
                "best": c["value"][i],
                "best_step": c["step"][i],
                "curve": c,
            }
    return table


# ---------------------------------------------------------------------------------------------------------------
# Output


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def render(runs: list, settings_: dict[str, list], table: dict[str, dict[str, Any]]) -> str:
    """The comparison as aligned text columns, one per run (also valid Markdown tables)."""
    names = [label(r) for r in runs]
    rows: list[list[str]] = [["setting", *names]]
    rows += [[key, *(_cell(v) for v in values)] for key, values in settings_.items()]
    if len(rows) == 1:
        rows.append(["(no setting differs)", *("" for _ in names)])
    metric_rows: list[list[str]] = [["metric (final / best @ step)", *names]]
    for key, per_run in table.items():
        cells = []
        for r in runs:
            s = per_run.get(r.info.run_id)
            cells.append("-" if s is None else f"{_cell(s['final'])} / {_cell(s['best'])} @ {s['best_step']}")
        metric_rows.append([key + (" (higher is better)" if higher_is_better(key) else " (lower is better)"), *cells])
    facts = [["run", *names], ["run id", *(r.info.run_id for r in runs)]]
    for tag in ("t2v.model_config", "t2v.device", "t2v.device_count", "t2v.data_digest", "mlflow.source.git.commit"):
        facts.append([tag, *(r.data.tags.get(tag, "-")[:16] for r in runs)])
    for tag in ("t2v.throughput_samples_per_s", "t2v.mfu"):
        if any(tag in r.data.tags for r in runs):
            facts.append([tag, *(r.data.tags.get(tag, "-") for r in runs)])
    return "\n\n".join(markdown_table(t) for t in (facts, rows, metric_rows))


def markdown_table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "| " + " | ".join("-" * w for w in widths) + " |")
    return "\n".join(lines)


def write_plots(runs: list, table: dict[str, dict[str, Any]], out: Path) -> list[Path]:
    """Per metric: one PNG against step, one against training minutes, a line per run."""
    from pipelines.pictures import line_plot

    paths = []
    for key, per_run in table.items():
        safe = key.replace("/", "_")
        for axis, xlabel in (("step", "step"), ("minutes", "training minutes")):
            series = {
                label(r): (per_run[r.info.run_id]["curve"][axis], per_run[r.info.run_id]["curve"]["value"])
                for r in runs
                if per_run.get(r.info.run_id)
            }
            if series:
                paths.append(line_plot(series, out / f"{safe}-{axis}.png", key, xlabel=xlabel, ylabel=key))
    return paths


def compare(client, runs: list, metrics: list[str], out: Path) -> tuple[str, list[Path]]:
    """The comparison text (also written to ``<out>/comparison.md``) and the plots."""
    keys = metric_keys(runs, metrics)
    table = summarise(client, runs, keys)
    text = render(runs, differing_settings(runs), table)
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.md").write_text(text + "\n", encoding="utf-8")
    return text, write_plots(runs, table, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="t2v compare", description=__doc__.split("\n\n")[1])
    parser.add_argument("run_ids", nargs="*", metavar="RUN_ID", help="runs to compare (same as --set runs=[...])")
    parser.add_argument("--experiment", default=None, help="compare every run of this experiment")
    parser.add_argument("--parent", default=None, help="compare the child runs of this parent run")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default $MLFLOW_TRACKING_URI)")
    parser.add_argument("--metric", action="append", default=None, help="metric to compare (repeatable)")
    parser.add_argument("--output", default=None, help="where plots and comparison.md go (default runs/compare)")
    settings.add_arguments(parser)
    args = parser.parse_args(argv)
    cfg = settings.resolve(
        parser,
        CompareConfig,
        args,
        {
            "runs": args.run_ids or None,
            "experiment": args.experiment,
            "parent": args.parent,
            "tracking_uri": args.tracking_uri,
            "metrics": args.metric,
            "output": args.output,
        },
    )
    if cfg is None:
        return 0
    logs.setup()
    try:
        uri = store_uri(cfg.tracking_uri)
        client = client_for(uri)
        runs = find_runs(client, cfg)
        text, plots = compare(client, runs, cfg.metrics, Path(cfg.output))
    except CompareError as e:
        print(f"t2v compare: {e}", file=sys.stderr)
        return 2
    print(text)
    print(f"\nplots: {', '.join(str(p) for p in plots)}" if plots else "\nno metric curves to plot")
    print(f"table: {Path(cfg.output) / 'comparison.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
