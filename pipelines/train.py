"""t2v train --config train.yaml [--set key=value ...] [--address ray://head:10001] [--dry-run]

Also ``python -m pipelines.train ...`` (the Ray job entrypoint), same arguments. Trains the TF-T2V UNet on curated
shards with Ray Train (``TorchTrainer``, N workers: gloo on CPU, NCCL on GPU) and DeepSpeed ZeRO 0-3, tracked in
MLflow. Every optimizer step is joint, as TF-T2V trains: an image-text batch (content branch, 1 frame, temporal
layers bypassed) and a video batch (motion branch: text-free and captioned clips) — see
``pipelines/train_worker.py`` for the step itself.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from model import configuration
from model.configuration import ConfigError, check, check_choice

log = logging.getLogger("pipelines.train")

CONFIG_FILE = "train_config.yaml"
RESULT_FILE = "result.json"
RUN_FILE = "mlflow_run.json"          # the MLflow run this output directory logs to (reused on resume)
EXPORT_DIR = "model"
RAY_DIR = "ray"
RAY_RUN_NAME = "train"
# Settings a checkpoint depends on (architecture, and how ZeRO partitioned the optimizer state across ranks):
# resuming with another value is refused. Everything else (steps, lr, batch sizes, data) may change on resume.
RESUME_FIXED = ("model", "model_overrides", "init_from", "num_workers", "zero_stage")


@dataclass
class MlflowConfig:
    """Where and how training is tracked (rank 0 only)."""

    enabled: bool = True
    tracking_uri: str | None = None       # None: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/runs/mlflow.db
    experiment: str = "t2v-train"
    run_name: str | None = None
    tags: dict[str, Any] = field(default_factory=dict)
    system_metrics_s: float = 10.0        # system metrics sampling interval; 0 turns them off
    log_model: bool = True                # log the final model as an MLflow pyfunc generation model
    model_name: str = "model"             # name of the logged model
    model_weights: Literal["ema", "raw"] = "ema"   # which exported weights the logged model serves

    def __post_init__(self) -> None:
        check(bool(self.experiment), "mlflow.experiment is empty: name an MLflow experiment, e.g. t2v-train")
        check(self.system_metrics_s >= 0, "mlflow.system_metrics_s must be >= 0 seconds (0 turns it off)")
        check_choice("mlflow.model_weights", self.model_weights, ["ema", "raw"])


@dataclass
class TrainConfig:
    """Everything one training run needs. ``t2v train --dry-run`` prints it resolved."""

    data: list[str] = field(default_factory=list)     # curation output directories (t2v curate --output)
    output: str = "runs/train"
    # model
    model: str = "tiny"                               # model.configs registry name
    model_overrides: dict[str, Any] = field(default_factory=dict)   # e.g. {"encoders": {"vae_path": ...}}
    init_from: str | None = None          # TextToVideo model.pt, ModelScope/TF-T2V UNet file, or diffusers UNet folder
    # optimisation
    steps: int = 1000
    image_batch_size: int = 8             # per worker and step (content branch); 0: no image batches
    video_batch_size: int = 4             # per worker and step (motion branch); 0: no video batches
    text_free_fraction: float = 0.5       # share of the video batch from text-free clips (when both kinds exist)
    image_loss_weight: float = 1.0        # weight of the content-branch loss against the motion-branch loss
    lr: float = 1e-4
    spatial_lr_mult: float = 1.0          # TF-T2V trains pretrained spatial weights at 0.5
    weight_decay: float = 0.0
    warmup_steps: int = 100               # linear warm-up, then cosine decay to min_lr_ratio * lr
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0                # 0 turns clipping off
    ema_decay: float = 0.999              # EMA weights; the effective decay ramps up as (1 + n) / (10 + n)
    # conditioning (TF-T2V)
    cfg_dropout: float = 0.1              # per sample: text -> negative-prompt embedding
    negative_prompt: str = ""             # also the unconditional input of sampling
    image_condition_prob: float = 0.5     # content branch: share of image batches conditioned on the image
    video_image_condition_prob: float = 0.5   # motion branch: share of video batches given the middle-frame image
    # data
    frame_stride: int = 0                 # 0: clip frames spread over the whole clip; k: every k-th frame
    shuffle_block: int = 256
    prefetch: int = 4                     # step batches prepared ahead (background thread)
    decode_workers: int = 2               # samples decoded in parallel (threads, in-process PyAV)
    decode_cache_mb: float = 0.0          # keep decoded clips in memory (small corpora read for many epochs)
    # distribution
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: int = 1
    threads_per_worker: int = 0           # torch threads per worker; 0: cpus_per_worker
    zero_stage: int = 2
    offload_optimizer: bool = False       # ZeRO optimizer state and step on the CPU (DeepSpeedCPUAdam)
    precision: Literal["auto", "bf16", "fp32"] = "auto"   # auto: bf16 on GPU, fp32 on CPU
    deepspeed: dict[str, Any] = field(default_factory=dict)   # merged over the generated DeepSpeed config
    address: str | None = None            # Ray cluster address; None: $RAY_ADDRESS or a local Ray
    # checkpoints, faults
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    max_failures: int = 3                 # worker-group restarts from the last checkpoint before giving up
    snapshot_every: int = 0               # also export model_ema.pt to model/snapshots/ every N steps (0: off)
    # samples and logging
    sample_every: int = 500               # sample videos for sample_prompts every N steps (0: off)
    sample_prompts: list[str] = field(default_factory=lambda: ["a red circle moving right", "a blue square moving up"])
    sample_steps: int = 25
    sample_guidance: float = 9.0
    sample_fps: float = 8.0
    log_every: int = 1                    # MLflow metrics every N steps
    print_every: int = 0                  # progress line every N steps; 0: about 20 lines per run
    time_limit_minutes: float = 0.0       # stop (checkpoint + export) after this long, LR decayed; 0: no limit
    seed: int = 0
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    debug_fail_at_step: int = 0           # tests: the last rank exits once at this step (fault-tolerance check)

    def __post_init__(self) -> None:
        check(isinstance(self.data, list), "data must be a list of curation output directories")
        check(bool(self.output), "output is empty: name a directory for checkpoints and the exported model")
        check(self.steps >= 1, f"steps={self.steps}: must be >= 1")
        check(self.image_batch_size >= 0 and self.video_batch_size >= 0, "batch sizes must be >= 0")
        check(self.image_batch_size + self.video_batch_size > 0,
              "image_batch_size and video_batch_size are both 0: at least one branch must train")
        for name in ("text_free_fraction", "cfg_dropout", "image_condition_prob", "video_image_condition_prob",
                     "min_lr_ratio"):
            value = getattr(self, name)
            check(0.0 <= value <= 1.0, f"{name}={value}: must be within [0, 1]")
        check(self.lr > 0, f"lr={self.lr}: must be > 0")
        check(self.spatial_lr_mult >= 0, "spatial_lr_mult must be >= 0 (0 freezes the spatial layers' updates)")
        check(self.weight_decay >= 0 and self.grad_clip >= 0 and self.image_loss_weight >= 0,
              "weight_decay, grad_clip and image_loss_weight must be >= 0")
        check(self.warmup_steps >= 0, "warmup_steps must be >= 0")
        check(0.0 <= self.ema_decay < 1.0, f"ema_decay={self.ema_decay}: must be within [0, 1)")
        check(self.frame_stride >= 0, "frame_stride must be >= 0 (0 spreads the frames over the whole clip)")
        check(self.shuffle_block >= 1 and self.prefetch >= 1 and self.decode_workers >= 1,
              "shuffle_block, prefetch and decode_workers must be >= 1")
        check(self.num_workers >= 1 and self.cpus_per_worker >= 1, "num_workers and cpus_per_worker must be >= 1")
        check(self.threads_per_worker >= 0, "threads_per_worker must be >= 0 (0: cpus_per_worker)")
        check_choice("zero_stage", self.zero_stage, [0, 1, 2, 3])
        check(not (self.offload_optimizer and self.zero_stage == 0),
              "offload_optimizer needs zero_stage >= 1 (DeepSpeed offloads ZeRO optimizer partitions)")
        check_choice("precision", self.precision, ["auto", "bf16", "fp32"])
        check(not (self.precision == "bf16" and not self.use_gpu),
              "precision=bf16 needs use_gpu=true; CPU training runs in fp32 (precision=auto)")
        check(self.checkpoint_every >= 1, "checkpoint_every must be >= 1 step")
        check(self.keep_checkpoints >= 1, "keep_checkpoints must be >= 1 (resume needs the latest checkpoint)")
        check(self.max_failures >= 0, "max_failures must be >= 0")
        for name in ("snapshot_every", "sample_every", "print_every", "debug_fail_at_step"):
            check(getattr(self, name) >= 0, f"{name} must be >= 0 (0 turns it off)")
        check(self.log_every >= 1, "log_every must be >= 1")
        check(self.sample_steps >= 1, "sample_steps must be >= 1")
        check(not (self.sample_every and not self.sample_prompts),
              "sample_every > 0 needs sample_prompts (a list of prompts), or set sample_every=0")
        check(self.time_limit_minutes >= 0, "time_limit_minutes must be >= 0 (0: no limit)")

    @property
    def bf16(self) -> bool:
        return self.use_gpu and self.precision in ("auto", "bf16")


# ---------------------------------------------------------------------------------------------------------------
# Driver: prepares the run, starts the TorchTrainer, logs the result


def run(cfg: TrainConfig) -> dict[str, Any]:
    """Train (or resume) per ``cfg``; returns the result dict also written to ``<output>/result.json``."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipelines import loader
    from pipelines.train_worker import train_loop_per_worker

    cfg = _absolute_paths(cfg)              # workers run in other working directories
    out = Path(cfg.output)
    done = _finished_result(cfg, out)
    if done is not None:
        print(f"[train] {out} already reached step {done['steps']}; nothing to do (raise steps to train longer)")
        return done
    shard_sets = loader.find_shard_sets(cfg.data)           # fail early, before Ray starts, on missing data
    _check_resume(cfg, out)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(configuration.dump(cfg), encoding="utf-8")

    tracker, run_id, tracking_uri = _start_tracking(cfg, out, shard_sets)
    started_ray = False
    if not ray.is_initialized():
        ray.init(address=cfg.address or os.environ.get("RAY_ADDRESS"), log_to_driver=True)
        started_ray = True
    t0 = time.time()
    status = "FAILED"
    try:
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"cfg": configuration.to_dict(cfg), "run_id": run_id, "tracking_uri": tracking_uri},
            # use_gpu adds one GPU per worker to these resources
            scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                         resources_per_worker={"CPU": cfg.cpus_per_worker}),
            run_config=RunConfig(
                name=RAY_RUN_NAME, storage_path=str(out / RAY_DIR),
                checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
                failure_config=FailureConfig(max_failures=cfg.max_failures),
                # Ray Train's print patch sends each print to its logger and, because MLflow wraps stdout in
                # the worker, to stdout as well: every progress line reached the console twice
                worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}}),
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


def _absolute_paths(cfg: TrainConfig) -> TrainConfig:
    def absolute(path: str | None) -> str | None:
        return str(Path(path).expanduser().resolve()) if path and "://" not in path else path

    return dataclasses.replace(cfg, data=[absolute(d) for d in cfg.data], output=absolute(cfg.output),
                               init_from=absolute(cfg.init_from))


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
    now = configuration.redact(configuration.to_dict(cfg))
    changed = [k for k in RESUME_FIXED if before.get(k) != now.get(k)]
    if changed:
        raise ConfigError(f"{out} holds checkpoints of a run with other {', '.join(changed)} "
                          f"({', '.join(f'{k}={before.get(k)!r}' for k in changed)}); resume with the same values or "
                          "choose a new output directory")


def _start_tracking(cfg: TrainConfig, out: Path, shard_sets) -> tuple[Any, str | None, str | None]:
    """The driver's tracker: creates (or reopens, on resume) the run and logs config and data lineage once."""
    from pipelines import tracking

    if not cfg.mlflow.enabled:
        return tracking.NullTracker(), None, None
    uri = tracking.resolve_tracking_uri(cfg.mlflow.tracking_uri)
    run_file = out / RUN_FILE
    previous = json.loads(run_file.read_text(encoding="utf-8")) if run_file.is_file() else {}
    tags = {"t2v.output": str(out), "t2v.model": cfg.model, **cfg.mlflow.tags}
    run_id = previous.get("run_id") if previous.get("tracking_uri") == uri else None
    try:
        tracker = tracking.MlflowTracker(uri, cfg.mlflow.experiment, run_id=run_id, run_name=cfg.mlflow.run_name,
                                         tags=tags)
    except Exception as e:
        if run_id is None:
            raise
        log.warning("cannot continue MLflow run %s (%s); starting a new run", run_id, e)
        tracker = tracking.MlflowTracker(uri, cfg.mlflow.experiment, run_name=cfg.mlflow.run_name, tags=tags)
    if tracker.run_id != run_id:
        run_file.write_text(json.dumps({"run_id": tracker.run_id, "tracking_uri": uri}), encoding="utf-8")
        _log_lineage(tracker, shard_sets)
    tracker.log_params({"train": configuration.to_dict(cfg), "model_config": _model_config_dict(cfg)})
    tracker.log_artifact(out / CONFIG_FILE, "config")
    return tracker, tracker.run_id, uri


def _model_config_dict(cfg: TrainConfig) -> dict:
    from pipelines.train_worker import resolve_model_config

    return configuration.to_dict(resolve_model_config(cfg))


def _log_lineage(tracker, shard_sets) -> None:
    """Each shard set as an MLflow dataset input (its parquet index as the data profile) + curation summaries."""
    from pipelines import schema

    roots = []
    for s in shard_sets:
        tracker.log_dataset(s.index(), name=s.name, source=str(Path(s.root) / schema.SHARDS_DIR / s.kind),
                            digest=s.digest())
        if s.root not in roots:
            roots.append(s.root)
    for i, root in enumerate(roots):
        summary = Path(root) / schema.SUMMARY_FILE
        if summary.is_file():
            tracker.log_artifact(summary, f"data/{i}_{Path(root).name}")
    tracker.set_tags({"t2v.data": ",".join(roots),
                      "t2v.data_samples": json.dumps({s.name: s.num_samples for s in shard_sets})})


def _finish(cfg: TrainConfig, out: Path, tracker, run_id: str | None, tracking_uri: str | None,
            seconds: float) -> dict[str, Any]:
    """After fit: read what rank 0 exported, log the generation model, write result.json."""
    export_dir = out / EXPORT_DIR
    exported = json.loads((export_dir / "export.json").read_text(encoding="utf-8"))
    progress = json.loads((export_dir / "final_metrics.json").read_text(encoding="utf-8"))
    weights = exported.get("ema_checkpoint") if cfg.mlflow.model_weights == "ema" else exported["checkpoint"]
    model_uri = None
    if run_id is not None and cfg.mlflow.log_model:
        from pipelines import pyfunc

        model_uri = pyfunc.log_generation_model(
            weights or exported["checkpoint"], run_id=run_id, tracking_uri=tracking_uri, name=cfg.mlflow.model_name,
            defaults={"steps": cfg.sample_steps, "guidance": cfg.sample_guidance, "fps": cfg.sample_fps,
                      "negative_prompt": cfg.negative_prompt},
            config_file=out / CONFIG_FILE)
    result = {
        "run_id": run_id,
        "model_uri": model_uri,
        "tracking_uri": configuration.redact_uri(tracking_uri) if tracking_uri else None,
        "checkpoint": exported["checkpoint"],
        "ema_checkpoint": exported.get("ema_checkpoint"),
        "diffusers": exported.get("diffusers"),
        "steps": int(exported["step"]),
        "final_loss": progress.get("loss"),
        "metrics": progress,
        "output": str(out),
        "seconds": round(seconds, 1),
    }
    (out / RESULT_FILE).write_text(json.dumps(result, indent=2), encoding="utf-8")
    tracker.log_artifact(out / RESULT_FILE, "result")
    print(f"[train] done: {result['steps']} steps, final loss {result['final_loss']}, model {result['checkpoint']}"
          + (f", logged as {model_uri}" if model_uri else ""))
    return result


# ---------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="t2v train", description=__doc__.split("\n\n")[0])
    configuration.add_arguments(parser)
    parser.add_argument("--address", default=None, help="Ray cluster address (ray://head:10001 or auto); default: "
                        "$RAY_ADDRESS or a local Ray")
    parser.add_argument("--data", action="append", default=None, metavar="DIR",
                        help="curation output directory (repeatable); same as --set data=[DIR, ...]")
    parser.add_argument("--output", default=None, help="output directory; same as --set output=DIR")
    args = parser.parse_args(argv)
    cfg = configuration.resolve(parser, TrainConfig, args,
                                {"data": args.data, "output": args.output, "address": args.address})
    if cfg is None:
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    result = run(cfg)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
