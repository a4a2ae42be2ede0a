"""t2v bench train [--data DIR] [--steps 30] [--threads 2] [--zero-stage 2] [--set rounds=2] [--dry-run]

Also ``python -m flows.benchmarks.train``. Measures the training machinery against baselines run in the same
process, and prints the figures:

1. step time of Ray Train + DeepSpeed (one worker) against a plain single-process PyTorch loop with the same model,
   batches, threads, optimizer and step (``pipelines.training.worker.joint_step``), as a ratio of median step
   times after ``warmup`` steps (target <= 1.10). The contenders alternate, ``rounds`` Ray jobs each between two
   plain loops, and the ratio is of their means: the machine's speed drifts over minutes when it is shared;
2. the CPU that Ray's other processes (raylet, GCS, dashboard, Ray Train's controller and helper actors) use while
   the Ray job's measured steps run, in cores: where the training threads take every core, that is time they wait
   for, and it bounds the ratio above; ``--threads`` below the machine's cores leaves them room;
3. loader throughput (samples/s, ``TrainLoader`` alone) against the rate training consumes samples, and the share
   of step time training spent waiting for data (the loader must not be the bottleneck).

Without ``--data`` a small shapes corpus is generated and curated (``t2v corpus`` + ``t2v curate``) into a
temporary directory first.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pipelines import local_ray, logs, settings


@dataclass
class TrainBenchConfig:
    data: str | None = None  # curation output directory; None: generate + curate a shapes corpus
    model: str = "tiny"
    model_overrides: dict = None  # type: ignore[assignment]
    steps: int = 30  # measured steps per contender (after warm-up)
    warmup: int = 5
    threads: int = 2  # torch threads of the plain loop = cpus_per_worker of the Ray worker
    zero_stage: int = 2
    image_batch_size: int = 4
    video_batch_size: int = 4
    loader_batches: int = 30
    rounds: int = 2  # Ray jobs, each between two plain loops (plain, Ray, plain, Ray, plain)
    decode_cache_mb: float = 0.0

    def __post_init__(self) -> None:
        self.model_overrides = self.model_overrides or {}
        settings.check(self.steps >= 3 and self.warmup >= 0, "steps must be >= 3 and warmup >= 0")
        settings.check(self.threads >= 1, "threads must be >= 1")
        settings.check(self.rounds >= 1, "rounds must be >= 1")


def prepare_data(work: Path, num_videos: int = 24, num_images: int = 24, height: int = 32) -> str:
    """A small shapes corpus, curated into shards with the real curation job."""
    from pipelines import shapes
    from pipelines.curation import job as curate

    manifest = shapes.generate(
        shapes.CorpusConfig(num_videos=num_videos, num_images=num_images, seed=1), work / "corpus", progress=False
    )
    cfg = settings.from_dict(
        curate.CurateConfig,
        {
            "clips": {"width": height, "height": height, "num_frames": 8, "fps": 4.0},
            "caption": {"filter": "text"},
            "progress": False,
        },
    )
    curate.run(cfg, str(manifest), str(work / "curated"))
    return str(work / "curated")


def train_config(b: TrainBenchConfig, data: str, out: Path, steps: int) -> TrainConfig:  # noqa: F821
    from pipelines.training.config import TrainConfig

    return settings.from_dict(
        TrainConfig,
        {
            "data": [data],
            "output": str(out),
            "model": b.model,
            "model_overrides": b.model_overrides,
            "steps": steps,
            "num_workers": 1,
            "cpus_per_worker": b.threads,
            "zero_stage": b.zero_stage,
            "image_batch_size": b.image_batch_size,
            "video_batch_size": b.video_batch_size,
            "warmup_steps": 2,
            "checkpoint_every": steps,
            "sample_every": 0,
            "decode_cache_mb": b.decode_cache_mb,
            "mlflow": {
                "tracking_uri": f"sqlite:///{out / 'mlflow.db'}",
                "experiment": "bench-train",
                "system_metrics_s": 0.0,
            },
            "log_model": False,
        },
    )


def plain_loop(cfg, steps: int) -> tuple[list[float], list[float]]:
    """The baseline: one process, the same model, data, optimizer and joint step, no Ray and no DeepSpeed."""
    from pipelines import loader
    from pipelines.training.worker import Conditioner, build_model, joint_step, loader_spec, lr_factor, param_groups

    torch.set_num_threads(cfg.cpus_per_worker)
    model = build_model(cfg, torch.device("cpu"))
    model.unet.train()
    opt = torch.optim.AdamW(param_groups(model.unet, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    data = loader.TrainLoader(loader_spec(cfg, model))
    cond = Conditioner(model, cfg, torch.device("cpu"))
    branches = int(cfg.image_batch_size > 0) + int(cfg.video_batch_size > 0)
    ema = [p.detach().clone() for p in model.unet.parameters()]
    times, waits = [], []
    try:
        for step in range(1, steps + 1):
            t0 = time.perf_counter()
            batch = next(data)
            waits.append(time.perf_counter() - t0)
            joint_step(
                model.unet, model, cond, batch, cfg, step, 0, lambda loss: (loss / branches).backward(), lambda: None
            )
            torch.nn.utils.clip_grad_norm_(model.unet.parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            with torch.no_grad():
                for e, p in zip(ema, model.unet.parameters()):
                    e.lerp_(p, 1 - cfg.ema_decay)
            times.append(time.perf_counter() - t0)
    finally:
        data.close()
    return times, waits


class RayCpu:
    """Samples, every ``every`` seconds while a Ray job runs, the CPU seconds used so far by this process's
    descendants (Ray's services and workers) other than the training worker; ``cores(t0, t1)`` is their rate between
    two wall-clock times. This process is left out: the sampler runs in it."""

    def __init__(self, every: float = 2.0) -> None:
        self.every = every
        self.samples: list[tuple[float, dict[int, float]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ray-cpu", daemon=True)

    def __enter__(self) -> RayCpu:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import psutil

        while not self._stop.wait(self.every):
            used = {}
            for p in psutil.Process(os.getpid()).children(recursive=True):
                try:
                    if "RayTrainWorker" not in p.name() + " ".join(p.cmdline()):
                        used[p.pid] = sum(p.cpu_times()[:2])
                except psutil.Error:  # gone since the listing
                    pass
            self.samples.append((time.time(), used))

    def cores(self, t0: float, t1: float) -> float | None:
        """Mean cores used between the first sample after ``t0`` and the last before ``t1`` (None: too few)."""
        inside = [(t, used) for t, used in self.samples if t0 <= t <= t1]
        if len(inside) < 2:
            return None
        (ta, a), (tb, b) = inside[0], inside[-1]
        return sum(cpu - a.get(pid, 0.0) for pid, cpu in b.items()) / (tb - ta)


def ray_deepspeed(cfg, warmup: int) -> tuple[list[float], list[float], float, float | None]:
    """(step times, data wait times, wall seconds of train.run, cores Ray's other processes used during the steps
    after ``warmup``) of the real training job with one worker."""
    from mlflow import MlflowClient

    from pipelines.training import job as train

    t0 = time.perf_counter()
    with RayCpu() as ray_cpu:
        result = train.run(cfg)
    wall = time.perf_counter() - t0
    client = MlflowClient(cfg.mlflow.tracking_uri)
    history = lambda key: sorted(client.get_metric_history(result["run_id"], key), key=lambda m: m.step)  # noqa: E731
    steps = history("step_time_s")
    waits = [m.value for m in history("data_wait_s")]
    # metric timestamps (ms) are taken as each step is logged: the window is the end of warm-up to the last step
    others = ray_cpu.cores(steps[warmup - 1].timestamp / 1000 if warmup else 0.0, steps[-1].timestamp / 1000)
    return [m.value for m in steps], waits, wall, others


def loader_rate(cfg, batches: int) -> float:
    """Samples/s the loader delivers alone (decode included), after its first batch."""
    from model.registry import get_config
    from model.text_to_video import TextToVideo
    from pipelines import loader
    from pipelines.training.worker import loader_spec

    model = TextToVideo.build(get_config(cfg.model, cfg.model_overrides or None))
    data = loader.TrainLoader(loader_spec(cfg, model))
    next(data)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(data)
    seconds = time.perf_counter() - t0
    data.close()
    return batches * (cfg.image_batch_size + cfg.video_batch_size) / seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="t2v bench train", description=__doc__.split("\n\n")[0])
    settings.add_arguments(parser)
    parser.add_argument("--data", default=None, help="curation output directory (default: generate + curate)")
    parser.add_argument("--steps", type=int, default=None, help="measured steps per contender")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for both contenders")
    parser.add_argument("--zero-stage", type=int, default=None, help="DeepSpeed ZeRO stage of the Ray run")
    args = parser.parse_args(argv)
    b = settings.resolve(
        parser,
        TrainBenchConfig,
        args,
        {name: getattr(args, name) for name in ("data", "steps", "threads", "zero_stage")},
    )
    if b is None:
        return 0
    logs.setup()
    import ray

    with tempfile.TemporaryDirectory(prefix="t2v-bench-train-") as tmp:
        work = Path(tmp)
        data = b.data or prepare_data(work)
        ray.shutdown()  # curation leaves its local Ray running; the training run gets one sized to the threads
        total = b.warmup + b.steps
        cfg = train_config(b, data, work / "run", total)
        # Plain loops and Ray jobs alternate (plain, Ray, plain, ..., plain): on a shared machine the speed drifts
        # by several percent over minutes, and alternating spreads that drift over both contenders instead of
        # silently skewing the ratio one way.
        plain, ds, ds_waits, walls, others = [], [], [], [], []
        for r in range(b.rounds):
            print(
                f"[bench] round {r + 1}/{b.rounds}: plain PyTorch loop, {total} steps, {b.threads} threads", flush=True
            )
            plain.append(plain_loop(cfg, total))
            print(
                f"[bench] round {r + 1}/{b.rounds}: Ray Train + DeepSpeed ZeRO-{b.zero_stage}, 1 worker, "
                f"{b.threads} CPUs",
                flush=True,
            )
            # with the dashboard, as the training job starts it: Ray Train polls its state API
            local_ray.start(num_cpus=max(b.threads, 1), logging_level=logging.WARNING)
            try:
                times, waits, wall, cores = ray_deepspeed(train_config(b, data, work / f"run{r}", total), b.warmup)
            finally:
                ray.shutdown()
            ds.append(times)
            ds_waits.append(waits)
            walls.append(wall)
            others.append(cores)
        print("[bench] plain PyTorch loop, last", flush=True)
        plain.append(plain_loop(cfg, total))
        print("[bench] loader alone", flush=True)
        rate = loader_rate(cfg, b.loader_batches)

    w = b.warmup
    compute = lambda times, waits: statistics.median(t - d for t, d in zip(times[w:], waits[w:]))  # noqa: E731
    plain_total = [statistics.median(times[w:]) for times, _ in plain]
    plain_compute = [compute(times, waits) for times, waits in plain]
    ds_total = [statistics.median(times[w:]) for times in ds]
    ds_compute = [compute(times, waits) for times, waits in zip(ds, ds_waits)]
    ratio = statistics.mean(ds_total) / statistics.mean(plain_total)
    ratio_compute = statistics.mean(ds_compute) / statistics.mean(plain_compute)
    per_step = b.image_batch_size + b.video_batch_size
    consume = per_step / statistics.mean(ds_total)
    ms = lambda values: " / ".join(f"{v * 1000:.0f}" for v in values)  # noqa: E731
    all_waits = [d for waits in ds_waits for d in waits[w:]]
    all_times = [t for times in ds for t in times[w:]]
    print()
    print(
        f"model {b.model} {b.model_overrides or ''}  batch image {b.image_batch_size} + video {b.video_batch_size}"
        f"  threads {b.threads}  steps {b.steps} (+{w} warm-up) per contender and round, medians"
    )
    print(
        f"  plain PyTorch step, in run order         {ms(plain_total)} ms   (without data wait {ms(plain_compute)} ms)"
    )
    print(
        f"  Ray Train + DeepSpeed ZeRO-{b.zero_stage} step          {ms(ds_total)} ms   (without data wait "
        f"{ms(ds_compute)} ms)"
    )
    pairs = "  ".join(f"{d / ((plain_total[i] + plain_total[i + 1]) / 2):.3f}" for i, d in enumerate(ds_total))
    print(
        f"  ratio DeepSpeed / plain                  {ratio:8.3f}   (without data wait {ratio_compute:.3f}; "
        f"target <= 1.10; per round, against the plain loops either side: {pairs})"
    )
    print(f"  Ray job wall time incl. start-up         {' / '.join(f'{x:.1f}' for x in walls)} s")
    print(
        f"  Ray's other processes during the steps   {' / '.join('-' if c is None else f'{c:.3f}' for c in others)}"
        f" cores of {os.cpu_count()}   (the plain loop has none; threads {b.threads})"
    )
    print(f"  loader alone                             {rate:8.1f} samples/s")
    print(
        f"  training consumes                        {consume:8.1f} samples/s   loader / training = "
        f"{rate / consume:.1f}x"
    )
    print(f"  training time waiting for data           {sum(all_waits) / sum(all_times):8.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
