"""t2v train --config train.yaml [--set key=value ...] [--address ray://head:10001] [--dry-run]

Also ``python -m pipelines.training.job ...`` (the Ray job entrypoint), same arguments. Trains the TF-T2V UNet on
curated shards with Ray Train (``TorchTrainer``, N workers: gloo on CPU, NCCL on GPU) and DeepSpeed ZeRO 0-3, tracked in
MLflow. Every optimizer step is joint, as TF-T2V trains: an image-text batch (content branch, 1 frame, temporal
layers bypassed) and a video batch (motion branch: text-free and captioned clips) — see
``pipelines/training/worker.py`` for the step itself.

Outputs under ``output``:

    ray/train/step_XXXXXXXX/   DeepSpeed checkpoints (per-rank shards, EMA, data position), last ``keep_checkpoints``
    model/model.pt             exported TextToVideo checkpoint (raw weights), model_ema.pt (EMA weights),
    model/diffusers/unet/      and the EMA UNet in diffusers format (when the architecture has one)
    train_config.yaml          the resolved config
    result.json                {"run_id", "model_uri", "checkpoint", "ema_checkpoint", "steps", "final_loss", ...}

Running the same command again resumes from the latest checkpoint (same step, optimizer state and data position)
and continues the same MLflow run; when the run already reached ``steps`` it only prints the existing result.
A worker that dies mid-run is replaced and training continues from the last checkpoint (``max_failures``).
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

from pipelines import durable, local_ray, logs, settings, tracking
from pipelines.settings import ConfigError
from pipelines.training.config import (
    CONFIG_FILE,
    EXPORT_DIR,
    RAY_DIR,
    RAY_RUN_NAME,
    RESULT_FILE,
    RESUME_FIXED,
    RUN_FILE,
    TrainConfig,
)

log = logging.getLogger("t2v.train")

# ---------------------------------------------------------------------------------------------------------------
# Driver: prepares the run, starts the TorchTrainer, logs the result


def run(cfg: TrainConfig) -> dict[str, Any]:
    """Train (or resume) per ``cfg``; returns the result dict also written to ``<output>/result.json``."""
    if local_ray.is_local(cfg.address):
        local_ray.prepare()
    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipelines import loader
    from pipelines.training.worker import train_loop_per_worker

    cfg = _absolute_paths(cfg)  # workers run in other working directories
    out = Path(cfg.output)
    done = _finished_result(cfg, out)
    if done is not None:
        log.info("%s already reached step %d; nothing to do (raise steps to train longer)", out, done["steps"])
        return done
    shard_sets = loader.find_shard_sets(cfg.data)  # fail early, before Ray starts, on missing data
    _check_resume(cfg, out)
    out.mkdir(parents=True, exist_ok=True)
    durable.write_text(out / CONFIG_FILE, settings.dump(cfg))

    tracker, run_id, tracking_uri = _start_tracking(cfg, out, shard_sets)
    started_ray = False
    if not ray.is_initialized():
        if local_ray.is_local(cfg.address):
            local_ray.start(log_to_driver=True, logging_level=logging.WARNING)  # every port on 127.0.0.1
        else:
            ray.init(
                address=cfg.address or os.environ.get("RAY_ADDRESS"), log_to_driver=True, logging_level=logging.WARNING
            )
        started_ray = True
    t0 = time.time()
    status = "FAILED"
    try:
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"cfg": settings.to_dict(cfg), "run_id": run_id, "tracking_uri": tracking_uri},
            # use_gpu adds one GPU per worker to these resources
            scaling_config=ScalingConfig(
                num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker={"CPU": cfg.cpus_per_worker}
            ),
            run_config=RunConfig(
                name=RAY_RUN_NAME,
                storage_path=str(out / RAY_DIR),
                checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
                failure_config=FailureConfig(max_failures=cfg.max_failures),
                worker_runtime_env={"env_vars": _worker_env(cfg)},
                # its worker-group start-up lines say nothing a user acts on; warnings and errors still show
                logging_config=LoggingConfig(log_level="WARNING"),
            ),
        )
        fit = trainer.fit()
        if fit.error is not None:
            raise fit.error
        result = _finish(cfg, out, tracker, run_id, tracking_uri, time.time() - t0)
        status = "FINISHED"
        return result
    finally:
        tracker.finish(status)
        if started_ray:
            ray.shutdown()


def _worker_env(cfg: TrainConfig) -> dict[str, str]:
    # Ray Train's print patch sends each print to its logger and, because MLflow wraps stdout in the worker, to
    # stdout as well: every progress line reached the console twice
    env = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    if not cfg.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed otherwise probes for a GPU and warns that it found none
    return env


def _absolute_paths(cfg: TrainConfig) -> TrainConfig:
    def absolute(path: str | None) -> str | None:
        return str(Path(path).expanduser().resolve()) if path and "://" not in path else path

    return dataclasses.replace(
        cfg, data=[absolute(d) for d in cfg.data], output=absolute(cfg.output), init_from=absolute(cfg.init_from)
    )


def _finished_result(cfg: TrainConfig, out: Path) -> dict | None:
    path = out / RESULT_FILE
    if not path.is_file():
        return None
    result = json.loads(path.read_text(encoding="utf-8"))
    if result.get("steps", 0) >= cfg.steps and Path(result.get("checkpoint", "")).is_file():
        return result
    return None


def _check_resume(cfg: TrainConfig, out: Path) -> None:
    """Refuse to resume a checkpoint with settings that would make it meaningless (say what to do instead)."""
    saved = out / CONFIG_FILE
    if not saved.is_file() or not (out / RAY_DIR).is_dir():
        return
    import yaml

    before = yaml.safe_load(saved.read_text(encoding="utf-8")) or {}
    now = settings.redact(settings.to_dict(cfg))
    changed = [k for k in RESUME_FIXED if before.get(k) != now.get(k)]
    if changed:
        raise ConfigError(
            f"{out} holds checkpoints of a run with other {', '.join(changed)} "
            f"({', '.join(f'{k}={before.get(k)!r}' for k in changed)}); resume with the same values or "
            "choose a new output directory"
        )


def _start_tracking(cfg: TrainConfig, out: Path, shard_sets) -> tuple[Any, str | None, str | None]:
    """The driver's tracker: creates (or reopens, on resume) the run and logs config and data lineage once."""
    if not cfg.mlflow.enabled:
        return tracking.NullTracker(), None, None
    uri = tracking.resolve_tracking_uri(cfg.mlflow.tracking_uri)
    run_file = out / RUN_FILE
    previous = json.loads(run_file.read_text(encoding="utf-8")) if run_file.is_file() else {}
    from pipelines import run_facts

    tags = {
        "t2v.output": str(out),
        "t2v.model": cfg.model,
        "t2v.model_config": resolve_model_config_name(cfg),
        **run_facts.code_version(),
        **cfg.mlflow.tags,
    }
    run_id = previous.get("run_id") if previous.get("tracking_uri") == uri else None
    try:
        tracker = tracking.MlflowTracker(
            uri, cfg.mlflow.experiment, run_id=run_id, run_name=cfg.mlflow.run_name, tags=tags
        )
    except Exception as e:
        if run_id is None:
            raise
        log.warning("cannot continue MLflow run %s (%s); starting a new run", run_id, e)
        tracker = tracking.MlflowTracker(uri, cfg.mlflow.experiment, run_name=cfg.mlflow.run_name, tags=tags)
    if tracker.run_id != run_id:
        durable.write_text(run_file, json.dumps({"run_id": tracker.run_id, "tracking_uri": uri}))
        _log_lineage(tracker, shard_sets)
    tracker.log_params({"train": settings.to_dict(cfg), "model_config": _model_config_dict(cfg)})
    tracker.log_artifact(out / CONFIG_FILE, "config")
    return tracker, tracker.run_id, uri


def resolve_model_config_name(cfg: TrainConfig) -> str:
    from pipelines.training.worker import resolve_model_config

    return resolve_model_config(cfg).name


def _model_config_dict(cfg: TrainConfig) -> dict:
    from pipelines.training.worker import resolve_model_config

    return settings.to_dict(resolve_model_config(cfg))


def _log_lineage(tracker, shard_sets) -> None:
    """Each shard set as an MLflow dataset input (its parquet index as the data profile) + curation summaries."""
    from pipelines import schema

    roots = []
    for s in shard_sets:
        tracker.log_dataset(
            s.index(), name=s.name, source=str(Path(s.root) / schema.SHARDS_DIR / s.kind), digest=s.digest()
        )
        if s.root not in roots:
            roots.append(s.root)
    for i, root in enumerate(roots):
        summary = Path(root) / schema.SUMMARY_FILE
        if summary.is_file():
            tracker.log_artifact(summary, f"data/{i}_{Path(root).name}")
    from pipelines import run_facts

    digests = {s.name: s.digest() for s in shard_sets}
    tracker.set_tags(
        {
            "t2v.data": ",".join(roots),
            "t2v.data_samples": json.dumps({s.name: s.num_samples for s in shard_sets}),
            "t2v.data_digest": run_facts.data_digest(digests),
            "t2v.data_digests": json.dumps(digests),
        }
    )


def _finish(
    cfg: TrainConfig, out: Path, tracker, run_id: str | None, tracking_uri: str | None, seconds: float
) -> dict[str, Any]:
    """After fit: read what rank 0 exported, log the generation model, write result.json."""
    export_dir = out / EXPORT_DIR
    exported = json.loads((export_dir / "export.json").read_text(encoding="utf-8"))
    progress = json.loads((export_dir / "final_metrics.json").read_text(encoding="utf-8"))
    weights = exported.get("ema_checkpoint") if cfg.logged_model_weights == "ema" else exported["checkpoint"]
    model_uri = None
    if run_id is not None and cfg.log_model:
        from pipelines import pyfunc

        model_uri = pyfunc.log_generation_model(
            weights or exported["checkpoint"],
            run_id=run_id,
            tracking_uri=tracking_uri,
            name=cfg.logged_model_name,
            defaults={
                "steps": cfg.sample_steps,
                "guidance": cfg.sample_guidance,
                "fps": cfg.sample_fps,
                "negative_prompt": cfg.negative_prompt,
            },
            config_file=out / CONFIG_FILE,
        )
    loss_curve = _plot_losses(tracker, tracking_uri, run_id, out) if run_id is not None else None
    result = {
        "run_id": run_id,
        "model_uri": model_uri,
        "loss_curve": str(loss_curve) if loss_curve else None,
        "tracking_uri": settings.redact_uri(tracking_uri) if tracking_uri else None,
        "checkpoint": exported["checkpoint"],
        "ema_checkpoint": exported.get("ema_checkpoint"),
        "diffusers": exported.get("diffusers"),
        "steps": int(exported["step"]),
        "final_loss": progress.get("loss"),
        "metrics": progress,
        "output": str(out),
        "seconds": round(seconds, 1),
    }
    durable.write_text(out / RESULT_FILE, json.dumps(result, indent=2))
    tracker.log_artifact(out / RESULT_FILE, "result")
    log.info(
        "done: %d steps, final loss %s, model %s%s",
        result["steps"],
        "-" if result["final_loss"] is None else f"{result['final_loss']:.4f}",
        result["checkpoint"],
        f", logged as {model_uri}" if model_uri else "",
    )
    return result


LOSS_CURVES = ("loss", "loss_image", "loss_video")


def _plot_losses(tracker, tracking_uri: str, run_id: str, out: Path, window: int = 25) -> Path | None:
    """The run's losses (moving average over ``window`` steps) as ``plots/loss.png``, also logged to the run."""
    import numpy as np

    from pipelines import pictures

    history = tracking.metric_history(tracking_uri, run_id, list(LOSS_CURVES))
    if not history:
        return None
    series = {}
    for key, (steps, values) in history.items():
        k = min(window, len(values))
        smooth = np.convolve(values, np.ones(k) / k, mode="valid")
        series[key] = (steps[k - 1 :], smooth.tolist())
    path = pictures.line_plot(series, out / "plots" / "loss.png", f"training loss ({window}-step average)", "step")
    tracker.log_artifact(path, "plots")
    return path


# ---------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="t2v train", description=__doc__.split("\n\n")[0])
    settings.add_arguments(parser)
    parser.add_argument(
        "--address",
        default=None,
        help="Ray cluster address (ray://head:10001 or auto); default: $RAY_ADDRESS or a local Ray",
    )
    parser.add_argument(
        "--data",
        action="append",
        default=None,
        metavar="DIR",
        help="curation output directory (repeatable); same as --set data=[DIR, ...]",
    )
    parser.add_argument("--output", default=None, help="output directory; same as --set output=DIR")
    args = parser.parse_args(argv)
    cfg = settings.resolve(
        parser, TrainConfig, args, {"data": args.data, "output": args.output, "address": args.address}
    )
    if cfg is None:
        return 0
    logs.setup()
    result = run(cfg)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
