"""t2v bench gpu [--set models=[small,modelscope-1.7b] --set steps=8 --set warmup=3] [--dry-run]

Also ``python -m flows.benchmarks.gpu``. One command for one GPU, at most about 8 minutes: for each model size it
trains a few steps with the real job (Ray Train, one worker, DeepSpeed ZeRO-2, bf16, 16 frames at 256x256) on
generated pre-encoded shards (random latents and CLIP embeddings, so no encoder runs per step), then the same model,
data and joint step in a plain PyTorch loop (bf16 autocast, fused AdamW) on the same GPU, and prints per size:
clips/s, achieved TFLOP/s and MFU (model FLOPs counted by ``pipelines.training.efficiency``, peak from the device
table or ``--set peak_tflops=``), peak GPU memory, and the step-time ratio Ray Train + DeepSpeed / plain loop.

The encoders are random (the SD VAE architecture saved to a temporary folder, CLIP from its seed): the arrays are
pre-encoded, so only the UNet's speed is measured. No checkpoint or model is written (``save_final=false``).
On a machine without a CUDA GPU it stops at once with the reason (exit code 2).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipelines import logs, settings
from pipelines.settings import check


@dataclass
class GpuBenchConfig:
    models: list[str] = field(default_factory=lambda: ["small", "modelscope-1.7b"])
    steps: int = 8  # measured steps per contender, after warm-up
    warmup: int = 3
    num_frames: int = 16
    height: int = 256
    width: int = 256
    # per-step batches per size: [image batch, video batch]
    batches: dict[str, list[int]] = field(
        default_factory=lambda: {"small": [16, 8], "modelscope-1.7b": [8, 4], "tf-t2v": [8, 4]}
    )
    samples: int = 32  # generated samples per kind
    cpus: int = 8
    zero_stage: int = 2
    peak_tflops: float = 0.0  # the GPU's peak; 0: run_facts.PEAK_BF16_FLOPS by device name

    def __post_init__(self) -> None:
        check(bool(self.models), "models is empty: name registered sizes, e.g. --set models=[small]")
        check(self.steps >= 2 and self.warmup >= 1, "steps must be >= 2 and warmup >= 1")
        missing = [m for m in self.models if m not in self.batches]
        check(not missing, f"no batch sizes for {missing}: --set batches.<model>=[image,video]")
        check(self.samples >= 1 and self.cpus >= 1, "samples and cpus must be >= 1")


def cuda_missing() -> str | None:
    """Why this machine cannot run the benchmark, or None."""
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU here (torch.cuda.is_available() is False); run it on a GPU machine"
    return None


def random_vae(folder: Path) -> str:
    """Stable Diffusion's KL-f8 autoencoder architecture with random weights, saved as a diffusers folder."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
    ).save_pretrained(folder)
    return str(folder)


def write_pre_encoded(model_config, out: Path, samples: int) -> Path:
    """Shards of image and captioned-video samples whose latents and embeddings are random arrays, stamped with
    the identity of ``model_config``'s encoders so training uses them as they are."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import webdataset as wds

    from model.encoders import FirstStage, build_clip_encoders
    from pipelines import media, schema

    enc = model_config.encoders
    text, image = build_clip_encoders(enc, "cpu")
    first = FirstStage.from_config(enc, "cpu")
    stamp = schema.encoder_stamp(enc, text, image, first, model_config.name)
    c, d = model_config.unet.in_channels, first.downsample
    h, w, f = model_config.height // d, model_config.width // d, model_config.num_frames
    tokens, width, embed = enc.text_len, model_config.unet.context_dim, model_config.unet.image_embed_dim
    rng = np.random.default_rng(0)
    placeholder = media.encode_mp4(np.zeros((f, 32, 32, 3), np.uint8), 8)  # never decoded: every array is given
    for kind, frames in (("image", 1), ("video_text", f)):
        rows = []
        for i in range(samples):
            arrays = {
                "latent_mean": rng.standard_normal((c, frames, h, w), dtype=np.float32).astype(np.float16),
                "latent_std": np.zeros((c, frames, h, w), np.float16),
                "text_emb": rng.standard_normal((tokens, width), dtype=np.float32).astype(np.float16),
            }
            if embed:
                arrays["image_emb"] = rng.standard_normal(embed, dtype=np.float32).astype(np.float16)
            meta = schema.SampleMeta(
                source=f"generated/{kind}/{i}",
                kind=kind,
                num_frames=frames,
                fps=8.0,
                width=model_config.width,
                height=model_config.height,
                caption=f"generated sample {i}",
            )
            data = media.encode_jpg(np.zeros((32, 32, 3), np.uint8)) if kind == "image" else placeholder
            rows.append(schema.encode_sample(schema.sample_key(meta.source), meta, data, arrays, stamp))
        schema.shard_dir(out, kind).mkdir(parents=True, exist_ok=True)
        with wds.ShardWriter(schema.shard_pattern(out, kind), maxcount=samples, verbose=0) as sink:
            for row in rows:
                sink.write(row)
        for tar in sorted(schema.shard_dir(out, kind).glob("*.tar")):
            pq.write_table(
                pa.table({"key": [r["__key__"] for r in rows], "kind": [kind] * len(rows)}), schema.index_path(tar)
            )
    return out


def train_config(b: GpuBenchConfig, name: str, vae: str, data: Path, out: Path):
    from pipelines.training.config import TrainConfig

    image, video = b.batches[name]
    return settings.from_dict(
        TrainConfig,
        {
            "data": [str(data)],
            "output": str(out),
            "model": name,
            "model_overrides": {
                "num_frames": b.num_frames,
                "height": b.height,
                "width": b.width,
                "encoders": {"vae_path": vae},
            },
            "steps": b.warmup + b.steps,
            "num_workers": 1,
            "use_gpu": True,
            "cpus_per_worker": b.cpus,
            "zero_stage": b.zero_stage,
            "precision": "bf16",
            "image_batch_size": image,
            "video_batch_size": video,
            "warmup_steps": 1,
            "checkpoint_every": 10**6,
            "save_final": False,
            "ema_device": "device",  # as the plain loop keeps it: both contenders do the same EMA work per step
            "log_model": False,
            "sample_every": 0,
            "device_peak_tflops": b.peak_tflops,
            "mlflow": {
                "tracking_uri": f"sqlite:///{out / 'mlflow.db'}",
                "experiment": "bench-gpu",
                "system_metrics_s": 0.0,
            },
        },
    )


def ray_run(cfg) -> dict[str, list[float]]:
    """The real training job; its per-step metrics read back from MLflow."""
    from mlflow import MlflowClient

    from pipelines.training import job as train

    result = train.run(cfg)
    client = MlflowClient(cfg.mlflow.tracking_uri)
    keys = ("step_time_s", "data_wait_s", "eff/mfu", "eff/tflops_per_device", "eff/clips_per_s", "eff/peak_memory_gib")
    return {
        k: [m.value for m in sorted(client.get_metric_history(result["run_id"], k), key=lambda m: m.step)] for k in keys
    }


def plain_loop(cfg, steps: int) -> dict[str, float | list[float]]:
    """The baseline on the same GPU: one process, the same model, data and joint step; bf16 autocast over fp32
    weights, torch's fused AdamW, EMA on the device. No Ray, no DeepSpeed."""
    import torch

    from pipelines import loader
    from pipelines.training.worker import Conditioner, build_model, joint_step, loader_spec, param_groups

    device = torch.device("cuda")
    torch.cuda.reset_peak_memory_stats()
    model = build_model(cfg, device)
    model.unet.train()
    opt = torch.optim.AdamW(param_groups(model.unet, cfg), lr=cfg.lr, fused=True)
    data = loader.TrainLoader(loader_spec(cfg, model))
    cond = Conditioner(model, cfg, device)
    branches = int(cfg.image_batch_size > 0) + int(cfg.video_batch_size > 0)
    ema = [p.detach().clone() for p in model.unet.parameters()]
    times = []
    try:
        for step in range(1, steps + 1):
            t0 = time.perf_counter()
            batch = next(data)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                joint_step(
                    model.unet,
                    model,
                    cond,
                    batch,
                    cfg,
                    step,
                    0,
                    lambda loss: (loss / branches).backward(),
                    lambda: None,
                )
            torch.nn.utils.clip_grad_norm_(model.unet.parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                torch._foreach_lerp_(ema, list(model.unet.parameters()), 1 - cfg.ema_decay)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    finally:
        data.close()
    peak = torch.cuda.max_memory_allocated() / 1024**3
    del model, opt, ema, cond
    torch.cuda.empty_cache()
    return {"times": times, "peak_gib": peak}


def run(b: GpuBenchConfig) -> dict:
    import ray
    import torch

    from model.registry import get_config
    from pipelines import run_facts
    from pipelines.training import efficiency

    device = torch.device("cuda")
    name_of_device = run_facts.device_kind(device)
    peak = run_facts.peak_flops(device, True, b.peak_tflops)
    results: dict = {"device": name_of_device, "models": {}}
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="t2v-bench-gpu-") as tmp:
        work = Path(tmp)
        vae = random_vae(work / "vae")
        started = not ray.is_initialized()  # a test session's Ray is used as it is
        if started:
            ray.init(num_cpus=b.cpus, num_gpus=1)  # with the dashboard: Ray Train polls its state API
        try:
            for name in b.models:
                cfg = train_config(b, name, vae, work / name / "data", work / name / "run")
                mc = get_config(name, cfg.model_overrides)
                print(f"[bench] {name}: writing {b.samples} pre-encoded samples per kind", flush=True)
                write_pre_encoded(mc, work / name / "data", b.samples)
                flops = efficiency.step_flops(mc, cfg.image_batch_size, cfg.video_batch_size)
                print(f"[bench] {name}: Ray Train + DeepSpeed ZeRO-{b.zero_stage}, bf16, 1 worker", flush=True)
                ds = ray_run(cfg)
                print(f"[bench] {name}: plain PyTorch loop", flush=True)
                plain = plain_loop(cfg, b.warmup + b.steps)
                w = b.warmup
                ds_step = statistics.median(ds["step_time_s"][w:])
                plain_step = statistics.median(plain["times"][w:])
                results["models"][name] = {
                    "image_batch": cfg.image_batch_size,
                    "video_batch": cfg.video_batch_size,
                    "tflop_per_step": flops.step / 1e12,
                    "ds_step_s": ds_step,
                    "plain_step_s": plain_step,
                    "ratio": ds_step / plain_step,
                    "clips_per_s": cfg.video_batch_size / ds_step,
                    "tflops": flops.step / ds_step / 1e12,
                    "mfu": flops.step / ds_step / peak if peak else None,
                    "plain_mfu": flops.step / plain_step / peak if peak else None,
                    "ds_peak_gib": max(ds["eff/peak_memory_gib"]),
                    "plain_peak_gib": plain["peak_gib"],
                    "data_wait": sum(ds["data_wait_s"][w:]) / sum(ds["step_time_s"][w:]),
                }
        finally:
            if started:
                ray.shutdown()
    results["minutes"] = (time.perf_counter() - t_start) / 60
    print()
    print(
        f"{name_of_device}, peak {peak / 1e12:.0f} TFLOP/s bf16" if peak else f"{name_of_device}, no known peak",
        f"| {b.num_frames} frames at {b.width}x{b.height}, ZeRO-{b.zero_stage}, bf16, 1 worker, medians of "
        f"{b.steps} steps after {b.warmup} | {results['minutes']:.1f} min",
    )
    for name, r in results["models"].items():
        mfu = f"MFU {100 * r['mfu']:.1f}% (plain {100 * r['plain_mfu']:.1f}%)" if r["mfu"] is not None else "MFU -"
        print(
            f"  {name:>16}: batch {r['image_batch']}+{r['video_batch']}  {r['clips_per_s']:.2f} clips/s  "
            f"{r['tflops']:.0f} TFLOP/s  {mfu}  peak {r['ds_peak_gib']:.1f} GiB (plain {r['plain_peak_gib']:.1f})"
            f"  step {r['ds_step_s'] * 1e3:.0f} ms / plain {r['plain_step_s'] * 1e3:.0f} ms = {r['ratio']:.3f}"
            f" (target <= 1.05)  data wait {r['data_wait']:.1%}"
        )
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="t2v bench gpu", description=__doc__.split("\n\n")[1].split(".")[0])
    settings.add_arguments(parser)
    b = settings.resolve(parser, GpuBenchConfig, parser.parse_args(argv))
    if b is None:
        return 0
    reason = cuda_missing()
    if reason:
        print(f"t2v bench gpu: {reason}", file=sys.stderr)
        return 2
    logs.setup()
    run(b)
    return 0


if __name__ == "__main__":
    sys.exit(main())
