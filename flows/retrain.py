"""t2v flow run-once --input runs/incoming/manifest.csv [--config flow.yaml] [--set key=value ...] [--dry-run]

The re-training flow (Prefect): curate what is new, train, evaluate, register, promote. On a schedule:
``t2v flow serve --input runs/incoming/manifest.csv --cron "0 3 * * *"`` (serves until Ctrl-C).

One cycle, one call per step, in order:
  1. curate    new inputs of ``input`` into ``<state_dir>/curated`` (the curation ledger skips what it has seen);
               when nothing new was accepted since the last trained cycle, the cycle ends here;
  2. champion  note the current ``models:/<model_name>@champion`` (and fetch its checkpoint);
  3. train     from the champion's weights (``init: champion``) or from scratch, on everything curated;
  4. evaluate  the new model on the prompt set (flows/evaluate.py), logged into its training run;
  5. register  it in the MLflow registry under the alias ``challenger``;
  6. promote   it to ``champion`` when it beats the champion on ``metric`` (both evaluated with the same
               settings; the champion is re-evaluated when its figures came from other settings). The first
               model becomes champion.

Each step writes ``<state_dir>/cycles/<n>/<step>.json`` when it finishes and is skipped when that file exists,
so a failed step retries (Prefect task retries) and running the command again resumes the unfinished cycle.
Steps run in this process on local Ray, or, with ``cluster.address``, curate/train/evaluate run as Ray jobs on
that cluster (flows/jobs.py) with this project as the job's working directory; paths must then be on storage
the cluster shares (NFS or the like) and the MLflow tracking URI must be reachable from it.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, ClassVar, Literal

from flows import jobs, registry
from flows.evaluate import METRICS_FILE, EvalConfig
from flows.jobs import ClusterConfig
from pipelines import durable, logs, settings
from pipelines.curation.config import CurateConfig
from pipelines.lease import Lease
from pipelines.metrics import HIGHER_IS_BETTER
from pipelines.settings import ConfigError, check, check_choice
from pipelines.tracking import TrackingConfig, ensure_experiment, resolve_tracking_uri
from pipelines.training.config import TrainConfig

STEPS = ("curate", "champion", "train", "evaluate", "register", "promote")
DONE_FILE = "done.json"


@dataclasses.dataclass
class RetrainConfig:
    input: str | None = None  # where new data lands: manifest, media folder or tars (curate's --input)
    state_dir: str = "runs/flow"  # curated data, cycles and their step records
    model_name: str = "t2v"  # registered model name
    init: Literal["champion", "scratch"] = "champion"  # what training starts from
    metric: str = "shapes_accuracy"  # promotion metric (pipelines.metrics.HIGHER_IS_BETTER says which way is better)
    min_delta: float = 0.0  # the challenger must beat the champion by more than this
    on_no_new_data: Literal["skip", "train"] = "skip"  # a cycle with nothing new: end early, or train anyway
    curate: CurateConfig = dataclasses.field(default_factory=CurateConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)  # data, output, init_from: set per cycle
    train_base: str | None = None  # a train config YAML under `train`, e.g. clusters/deepspeed/h100x1.yaml
    evaluate: EvalConfig = dataclasses.field(default_factory=EvalConfig)  # checkpoint, output: set per cycle
    cluster: ClusterConfig = dataclasses.field(default_factory=ClusterConfig)
    mlflow: TrackingConfig = dataclasses.field(default_factory=lambda: TrackingConfig(experiment="t2v-retrain"))
    retries: int = 2  # per step
    retry_delay_s: float = 10.0
    cron: str = "0 3 * * *"  # schedule for `serve`
    deployment: str = "t2v-retrain"  # deployment name for `serve`

    MOVED_SETTINGS: ClassVar[dict[str, str]] = {
        "tracking_uri": "set mlflow.tracking_uri instead",
        "experiment": "set mlflow.experiment instead",
    }

    def __post_init__(self) -> None:
        check_choice("init", self.init, ["champion", "scratch"])
        check(self.metric in HIGHER_IS_BETTER, f"metric={self.metric!r}: choose one of {sorted(HIGHER_IS_BETTER)}")
        check(
            bool(self.model_name) and "/" not in self.model_name and "@" not in self.model_name,
            f"model_name={self.model_name!r}: use a plain name such as t2v-shapes",
        )
        check(self.retries >= 0 and self.retry_delay_s >= 0, "retries and retry_delay_s must be >= 0")
        check(len(self.cron.split()) == 5, f"cron={self.cron!r}: give five cron fields, e.g. '0 3 * * *' (03:00 daily)")
        check(
            self.train_base is None or Path(self.train_base).is_file(),
            f"train_base={self.train_base!r} is not a file: give a train config YAML such as "
            "clusters/deepspeed/h100x8-zero2.yaml, or leave it unset",
        )
        fixed = {
            "train.data": (self.train.data, []),
            "train.output": (self.train.output, TrainConfig.output),
            "train.init_from": (self.train.init_from, None),
            "evaluate.checkpoint": (self.evaluate.checkpoint, None),
            "evaluate.model_uri": (self.evaluate.model_uri, None),
            "evaluate.output": (self.evaluate.output, EvalConfig.output),
            "evaluate.mlflow.run_id": (self.evaluate.mlflow.run_id, None),
        }
        for key, (value, default) in fixed.items():
            check(value == default, f"{key} is set by the flow for every cycle; remove it from the flow config")

    # -- resolved paths ------------------------------------------------------------------------------------------

    @property
    def state(self) -> Path:
        return Path(self.state_dir).resolve()

    @property
    def curated(self) -> Path:
        return self.state / "curated"

    def resolved_tracking_uri(self) -> str:
        return resolve_tracking_uri(self.mlflow.tracking_uri)  # SQLite paths absolute: jobs run in other directories

    def step_tracking_uri(self) -> str:
        """MLflow as the steps see it: on a cluster it may have another address than from this machine."""
        if self.cluster.address is not None and self.cluster.tracking_uri:
            return self.cluster.tracking_uri
        return self.resolved_tracking_uri()


def with_train_base(given: dict[str, Any]) -> dict[str, Any]:
    """The settings given, with the ``train_base`` file's settings under those given for ``train``."""
    if not given.get("train_base"):
        return given
    return {**given, "train": settings.merge(settings.read_yaml(given["train_base"]), given.get("train") or {})}


def load_config(path: str | None = None, overrides: list[str] = (), base: dict | None = None) -> RetrainConfig:
    return settings.load(RetrainConfig, path, overrides, base=base, prepare=with_train_base)


# ---------------------------------------------------------------------------------------------------------------
# Step configs: the flow's sections with what each cycle sets (invalid settings failed when the flow config loaded)


def _step_tracking(cfg: RetrainConfig, section: TrackingConfig, run_id: str | None = None) -> TrackingConfig:
    return dataclasses.replace(
        section, tracking_uri=cfg.step_tracking_uri(), experiment=cfg.mlflow.experiment, run_id=run_id
    )


def train_config(cfg: RetrainConfig, cycle: Path, init_from: str | None) -> TrainConfig:
    return dataclasses.replace(
        cfg.train,
        data=[str(cfg.curated)],
        output=str(cycle / "train"),
        init_from=init_from,
        mlflow=_step_tracking(cfg, cfg.train.mlflow),
    )


def eval_config(cfg: RetrainConfig, checkpoint: str, output: Path, run_id: str | None) -> EvalConfig:
    return dataclasses.replace(
        cfg.evaluate,
        checkpoint=str(checkpoint),
        output=str(output),
        mlflow=_step_tracking(cfg, cfg.evaluate.mlflow, run_id),
    )


def validate(cfg: RetrainConfig) -> None:
    """What a cycle needs beyond valid settings, checked before anything runs."""
    check(bool(cfg.input), "input is not set: give --input (a manifest, media folder or tars with the new data)")
    check(
        cfg.train.mlflow.enabled and cfg.train.log_model,
        "the flow registers the model training logs to MLflow: keep train.mlflow.enabled and train.log_model true",
    )
    # the config becomes Prefect parameters and Ray job command lines, both stored and shown: no credentials
    found = settings.credentials_in(settings.to_dict(cfg))
    if settings.credentials_in(cfg.step_tracking_uri()):
        found.append("the tracking URI (MLFLOW_TRACKING_URI)")
    check(
        not found,
        f"{', '.join(found)}: the flow's config is stored by Prefect and shown on Ray job command lines, so it "
        "cannot carry credentials. Give them as environment variables instead (MLFLOW_TRACKING_USERNAME and "
        "MLFLOW_TRACKING_PASSWORD for an MLflow server, AWS_* or GOOGLE_* for object stores; on a cluster via "
        "cluster.env_vars or its secret store)",
    )


# ---------------------------------------------------------------------------------------------------------------
# Cycle bookkeeping


def _say(step: str, text: str) -> None:
    logging.getLogger(f"t2v.{step}").info(text)


def _read(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _write(path: Path, data: dict[str, Any]) -> None:
    durable.write_text(path, json.dumps(data, indent=2, default=str))  # a step is done or it is not, also after a crash


def cycles(state: Path) -> list[Path]:
    return sorted(p for p in (state / "cycles").glob("[0-9]*") if p.is_dir())


def open_cycle(cfg: RetrainConfig) -> Path:
    """Resume the last cycle if it is unfinished and was started for the same input; else start the next one."""
    existing = cycles(cfg.state)
    if existing and not (existing[-1] / DONE_FILE).exists():
        last = existing[-1]
        info = _read(last / "cycle.json") or {}
        if info.get("input") == cfg.input:
            _say(
                "flow",
                f"resuming unfinished cycle {last.name} (steps done: "
                f"{', '.join(s for s in STEPS if (last / f'{s}.json').exists()) or 'none'})",
            )
            return last
        # A new input supersedes a cycle that never finished; its curated data is in the ledger already.
        _write(last / DONE_FILE, {"status": "superseded", "by_input": cfg.input, "at": time.time()})
    number = int(existing[-1].name) + 1 if existing else 1
    cycle = cfg.state / "cycles" / f"{number:04d}"
    cycle.mkdir(parents=True, exist_ok=True)
    _write(
        cycle / "cycle.json",
        {"input": cfg.input, "started": time.time(), "config": settings.redact(settings.to_dict(cfg))},
    )
    _say("flow", f"starting cycle {cycle.name} on {cfg.input}")
    return cycle


def last_trained_total(cfg: RetrainConfig, current: Path) -> int:
    """Accepted inputs in the ledger when the latest earlier cycle trained (0 if none did)."""
    for cycle in reversed(cycles(cfg.state)):
        if cycle == current or not (cycle / "train.json").exists():
            continue
        record = _read(cycle / "curate.json") or {}
        return int(record.get("accepted_total", 0))
    return 0


def job_id(cfg: RetrainConfig, cycle: Path, step: str) -> str:
    """Stable Ray submission id for a step: a re-run re-attaches to it (state dir hashed in: flows sharing a
    cluster do not collide)."""
    digest = hashlib.sha256(str(cfg.state).encode()).hexdigest()[:8]
    return f"t2v-{cfg.model_name}-{digest}-c{cycle.name}-{step}"


def job_env(cfg: RetrainConfig) -> dict[str, str]:
    # MLflow's own credential variables travel as environment (never on the job's command line)
    passed = {
        k: os.environ[k]
        for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
        if os.environ.get(k)
    }
    return {"MLFLOW_TRACKING_URI": cfg.step_tracking_uri(), **passed}


def _once(cycle: Path, step: str, fn) -> dict[str, Any]:
    """Run ``fn`` unless this cycle already recorded ``step``; record its result."""
    path = cycle / f"{step}.json"
    done = _read(path)
    if done is not None:
        _say(step, f"already done in this cycle ({path}); skipping")
        return done
    started = time.monotonic()
    _say(step, "started")
    result = fn()
    result["seconds"] = round(time.monotonic() - started, 1)
    _write(path, result)
    _say(step, f"finished in {result['seconds']:.0f}s")
    return result


# ---------------------------------------------------------------------------------------------------------------
# Steps. Each takes the flow config and the cycle folder (plus earlier steps' records) and returns a JSON record.


def curate_step(cfg: RetrainConfig, cycle: Path) -> dict[str, Any]:
    def work():
        out = cfg.curated
        if cfg.cluster.address is None:
            from pipelines.curation import job as curate

            summary = curate.run(cfg.curate, cfg.input, out)
        else:
            args = ["--input", cfg.input, "--output", str(out), *jobs.set_arguments(settings.to_dict(cfg.curate))]
            jobs.run_cli_step(cfg.cluster, "curate", args, job_id(cfg, cycle, "curate"), job_env(cfg))
            summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
        total = int(summary["totals"]["accepted"])
        return {
            "run": summary["run"],
            "processed": summary["processed"],
            "accepted": summary["accepted"],
            "accepted_total": total,
            "new_since_last_training": total - last_trained_total(cfg, cycle),
            "samples_total": summary["totals"]["samples"],
            "output": str(out),
        }

    return _once(cycle, "curate", work)


def champion_step(cfg: RetrainConfig, cycle: Path) -> dict[str, Any]:
    """Snapshot the champion at the start of the cycle (what training starts from and what must be beaten)."""

    def work():
        uri = cfg.resolved_tracking_uri()
        mv = registry.get_alias(registry.client(uri), cfg.model_name, registry.CHAMPION)
        if mv is None:
            _say("champion", f"no {cfg.model_name}@champion yet")
            return {"version": None, "checkpoint": None, "run_id": None}
        checkpoint = registry.download_checkpoint(f"models:/{cfg.model_name}/{mv.version}", cycle / "champion", uri)
        _say("champion", f"{cfg.model_name} version {mv.version} (run {mv.run_id})")
        return {"version": str(mv.version), "checkpoint": str(checkpoint), "run_id": mv.run_id}

    return _once(cycle, "champion", work)


def train_step(cfg: RetrainConfig, cycle: Path, champion: dict[str, Any]) -> dict[str, Any]:
    def work():
        init_from = champion["checkpoint"] if cfg.init == "champion" else None
        _say("train", f"starting from {'champion version ' + champion['version'] if init_from else 'scratch'}")
        if cfg.cluster.address is None:
            from pipelines.training import job as train

            train.run(train_config(cfg, cycle, init_from))
        else:
            args = jobs.set_arguments(settings.to_dict(train_config(cfg, cycle, init_from)))
            jobs.run_cli_step(cfg.cluster, "train", args, job_id(cfg, cycle, "train"), job_env(cfg))
        result = _read(cycle / "train" / "result.json")
        if result is None:
            raise RuntimeError(f"training finished without {cycle / 'train' / 'result.json'}; see its log above")
        return {**result, "init_from": init_from}

    return _once(cycle, "train", work)


def _evaluate(
    cfg: RetrainConfig, cycle: Path, step: str, checkpoint: str, output: Path, run_id: str | None
) -> dict[str, Any]:
    if cfg.cluster.address is None:
        from flows import evaluate

        return evaluate.run(eval_config(cfg, checkpoint, output, run_id))
    args = jobs.set_arguments(settings.to_dict(eval_config(cfg, checkpoint, output, run_id)))
    jobs.run_cli_step(cfg.cluster, "evaluate", args, job_id(cfg, cycle, step), job_env(cfg))
    return json.loads((output / METRICS_FILE).read_text(encoding="utf-8"))


def served_checkpoint(cfg: RetrainConfig, trained: dict[str, Any]) -> str:
    """The weights the registered model serves (training logs the EMA weights by default): what is evaluated."""
    weights = cfg.train.logged_model_weights
    return (
        trained.get("ema_checkpoint") if weights == "ema" and trained.get("ema_checkpoint") else trained["checkpoint"]
    )


def evaluate_step(cfg: RetrainConfig, cycle: Path, trained: dict[str, Any]) -> dict[str, Any]:
    return _once(
        cycle,
        "evaluate",
        lambda: _evaluate(
            cfg, cycle, "evaluate", served_checkpoint(cfg, trained), cycle / "eval", trained.get("run_id")
        ),
    )


def register_step(
    cfg: RetrainConfig, cycle: Path, trained: dict[str, Any], evaluation: dict[str, Any]
) -> dict[str, Any]:
    def work():
        c = registry.client(cfg.resolved_tracking_uri())
        mv = registry.register(
            c,
            cfg.model_name,
            trained["model_uri"],
            trained["run_id"],
            tags={"t2v.cycle": cycle.name, "t2v.init_from": trained.get("init_from") or "scratch"},
        )
        registry.record_evaluation(c, cfg.model_name, mv.version, evaluation["metrics"], evaluation["signature"])
        registry.set_alias(c, cfg.model_name, registry.CHALLENGER, mv.version)
        _say("register", f"{cfg.model_name} version {mv.version} -> @{registry.CHALLENGER}")
        return {"version": str(mv.version), "model_uri": trained["model_uri"], "run_id": trained["run_id"]}

    return _once(cycle, "register", work)


def champion_metrics(
    cfg: RetrainConfig, cycle: Path, champion: dict[str, Any], signature: str
) -> dict[str, float] | None:
    """The champion's figures under this cycle's evaluation settings: recorded ones, or a fresh evaluation."""
    if champion["version"] is None:
        return None
    c = registry.client(cfg.resolved_tracking_uri())
    mv = c.get_model_version(cfg.model_name, champion["version"])
    recorded = registry.recorded_evaluation(mv, signature)
    if recorded is not None:
        return recorded
    _say(
        "promote",
        f"champion version {champion['version']} has no figures for these evaluation settings; evaluating it now",
    )
    result = _evaluate(
        cfg, cycle, "evaluate-champion", champion["checkpoint"], cycle / "champion_eval", champion.get("run_id")
    )
    registry.record_evaluation(c, cfg.model_name, champion["version"], result["metrics"], result["signature"])
    return result["metrics"]


def promote_step(
    cfg: RetrainConfig, cycle: Path, champion: dict[str, Any], registered: dict[str, Any], evaluation: dict[str, Any]
) -> dict[str, Any]:
    def work():
        old = champion_metrics(cfg, cycle, champion, evaluation["signature"])
        decision = registry.decide(cfg.metric, evaluation["metrics"], old, cfg.min_delta, champion["version"])
        registry.apply_decision(
            registry.client(cfg.resolved_tracking_uri()), cfg.model_name, registered["version"], decision
        )
        verdict = "promoted to @champion" if decision.promote else f"stays @{registry.CHALLENGER}"
        _say("promote", f"version {registered['version']} {verdict}: {decision.reason}")
        return {**decision.as_dict(), "version": registered["version"], "champion_metrics": old}

    return _once(cycle, "promote", work)


# ---------------------------------------------------------------------------------------------------------------
# The flow


def run_cycle(cfg: RetrainConfig, task=None) -> dict[str, Any]:
    """One cycle of the steps above. ``task`` wraps each step (Prefect tasks in the flow; plain calls otherwise)."""
    call = task or (lambda name, fn, *args: fn(*args))
    validate(cfg)
    ensure_experiment(cfg.resolved_tracking_uri(), cfg.mlflow.experiment)
    cycle = open_cycle(cfg)
    ray_was_up = _ray_initialized()
    try:
        return _steps(cfg, cycle, call)
    finally:
        if not ray_was_up and _ray_initialized():  # in-process steps started a local Ray: do not leave it behind
            import ray

            ray.shutdown()


def _ray_initialized() -> bool:
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


def _steps(cfg: RetrainConfig, cycle: Path, call) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "cycle": cycle.name,
        "cycle_dir": str(cycle),
        "model_name": cfg.model_name,
        "tracking_uri": settings.redact_uri(cfg.resolved_tracking_uri()),
        "input": cfg.input,
    }
    curated = call("curate", curate_step, cfg, cycle)
    summary["curate"] = curated
    if curated["new_since_last_training"] <= 0 and cfg.on_no_new_data == "skip":
        summary["status"] = "no-new-data"
        _say(
            "flow",
            f"nothing new accepted since the last trained cycle ({curated['processed']} inputs processed); "
            "no training this cycle",
        )
        _write(cycle / DONE_FILE, summary)
        return summary
    champion = call("champion", champion_step, cfg, cycle)
    trained = call("train", train_step, cfg, cycle, champion)
    evaluation = call("evaluate", evaluate_step, cfg, cycle, trained)
    registered = call("register", register_step, cfg, cycle, trained, evaluation)
    decision = call("promote", promote_step, cfg, cycle, champion, registered, evaluation)
    summary.update(
        status="done",
        champion_before=champion,
        train=trained,
        evaluation=evaluation,
        registered=registered,
        decision=decision,
    )
    _write(cycle / DONE_FILE, summary)
    return summary


FLOW_LEASE = ".flow.lease"


def _prefect_flow():
    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE

    @flow(name="t2v-retrain", log_prints=True)
    def retrain(config: dict) -> dict:
        """Curate new data, train, evaluate, register @challenger, promote to @champion if better."""
        cfg = settings.from_dict(RetrainConfig, config)
        logs.setup()  # Prefect configured logging on import and at flow start: the project's lines again

        def as_task(name, fn, *args):
            # Results are the step records on disk; Prefect's own caching stays off so a re-run asks the records.
            t = task(fn, name=name, cache_policy=NO_CACHE, retries=cfg.retries, retry_delay_seconds=cfg.retry_delay_s)
            return t(*args)

        # one cycle at a time per state directory, from any host (the records under it are the flow's state)
        with Lease(Path(cfg.state) / FLOW_LEASE, what="re-training flow run"):
            return run_cycle(cfg, as_task)

    return retrain


def retrain_flow():
    """The Prefect flow object (built on first use so importing this module does not import Prefect)."""
    global _FLOW
    if _FLOW is None:
        _FLOW = _prefect_flow()
    return _FLOW


_FLOW = None


def prefect_environment(state: Path) -> None:
    """Defaults for running Prefect without a server: its database under the state dir, no telemetry, and time
    for the temporary API server to start on a busy machine. Anything the user set wins."""
    os.environ.setdefault("PREFECT_HOME", str(state / "prefect"))
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)  # Prefect does not create parents
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_UI_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_API_HOST", "127.0.0.1")


def run_once(cfg: RetrainConfig) -> dict[str, Any]:
    """Run the flow now (Prefect starts a temporary local API server unless PREFECT_API_URL names one)."""
    validate(cfg)  # before Prefect starts: a bad setting fails in a second, not after the server is up
    prefect_environment(cfg.state)
    return retrain_flow()(settings.to_dict(cfg))


def deployment(cfg: RetrainConfig):
    """The scheduled deployment: the flow with this config as its parameter, on ``cfg.cron``."""
    return retrain_flow().to_deployment(
        name=cfg.deployment,
        cron=cfg.cron,
        parameters={"config": settings.to_dict(cfg)},
        concurrency_limit=1,  # a scheduled run that comes while one is running waits for it
        description=f"t2v re-training of {cfg.model_name} on {cfg.input}",
    )


def serve(cfg: RetrainConfig) -> None:
    """Serve the flow on ``cfg.cron`` until interrupted (Prefect pauses the schedule on shutdown)."""
    validate(cfg)
    prefect_environment(cfg.state)
    from prefect import serve as prefect_serve

    _say("flow", f"serving deployment {cfg.deployment!r} on cron {cfg.cron!r} for input {cfg.input}; Ctrl-C stops")
    prefect_serve(deployment(cfg))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="t2v flow", description=__doc__.split("\n\n")[1])
    parser.add_argument("mode", choices=["run-once", "serve"], help="run a cycle now, or serve it on the cron schedule")
    parser.add_argument("--input", default=None, help="where new data lands (same as --set input=...)")
    parser.add_argument("--cron", default=None, help="schedule for serve, e.g. '0 3 * * *' (same as --set cron=...)")
    settings.add_arguments(parser)
    args = parser.parse_args(argv)
    cfg = settings.resolve(
        parser, RetrainConfig, args, {"input": args.input, "cron": args.cron}, prepare=with_train_base
    )
    if cfg is None:
        return 0
    logs.setup()
    try:
        if args.mode == "serve":
            serve(cfg)
            return 0
        summary = run_once(cfg)
    except ConfigError as e:
        print(f"t2v flow: {e}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    return 0


def format_summary(s: dict[str, Any]) -> str:
    lines = [f"cycle {s['cycle']}: {s['status']}  ({s['cycle_dir']})"]
    if s["status"] != "done":
        return "\n".join(lines)
    d, reg = s["decision"], s["registered"]
    lines.append(
        f"  model     {s['model_name']} version {reg['version']} (@challenger); "
        + ("promoted to @champion" if d["promote"] else "not promoted")
    )
    lines.append(f"  decision  {d['reason']}")
    for name, value in s["evaluation"]["metrics"].items():
        lines.append(f"  {name:<20} {value:.4f}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
