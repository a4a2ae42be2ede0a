"""t2v bench model [--set sizes=[tiny,small] --set batch=1 --set repeats=3 --set frames=4 --set device=auto]

Model benchmark (also ``t2v bench model``). Prints:
1. forward+backward time per sample and peak memory of the first training step (TF-T2V loss) for the timed sizes,
   with ratios against the first (baseline) size measured in the same run;
2. parameter counts (UNet total / temporal / spatial, frozen encoders) of every registered size, built on the
   meta device so the 1.7B model costs no memory;
3. the estimated per-GPU training memory of ``modelscope-1.7b`` under DeepSpeed ZeRO-1/2/3 on ``gpus`` GPUs at bf16;
4. each STUNet size of ``layouts`` (Lumiere, ``model/stunet.py``) against the ModelScope layout of the same width
   and clip shape: parameters, forward FLOPs (torch's FlopCounterMode, batch 1), the activations a training
   forward keeps for backward (saved-tensor bytes, the figure that does not depend on the allocator or on other
   processes) and the training step's time and peak memory.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` above the allocation before the step; on CPU, the
process's peak resident set (Linux VmHWM, reset through /proc/self/clear_refs before the step) above its resident
set before the step. Both include activations, gradients and temporaries, not the model weights already held.
On CPU, ``small`` (240M parameters, SD-VAE latents) takes minutes per step and several GiB: ``--set frames=2``.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field

from pipelines import logs, settings
from pipelines.settings import check

GIB = 1024**3


@dataclass
class ModelBenchConfig:
    sizes: list[str] = field(default_factory=lambda: ["tiny", "small"])  # timed; the first is the baseline
    batch: int = 1
    repeats: int = 3  # timed steps after one warm-up step
    device: str = "auto"  # auto | cpu | cuda
    big: str = "modelscope-1.7b"  # the size whose training memory is estimated
    gpus: int = 8  # data-parallel GPUs sharing the ZeRO partitions
    seed: int = 0
    frames: int | None = None  # override num_frames of the timed sizes (quicker CPU runs)
    layouts: list[str] = field(default_factory=lambda: ["tiny-stunet"])  # STUNet sizes vs the ModelScope layout

    def __post_init__(self) -> None:
        check(bool(self.sizes), "sizes is empty: name at least one registered size, e.g. --set sizes=[tiny]")
        check(self.batch >= 1, f"batch={self.batch}: must be >= 1")
        check(self.repeats >= 1, f"repeats={self.repeats}: must be >= 1")
        check(self.gpus >= 1, f"gpus={self.gpus}: must be >= 1")
        check(
            self.frames is None or self.frames >= 1, f"frames={self.frames}: must be >= 1 (or null for the size's own)"
        )
        check(isinstance(self.layouts, list), "layouts must be a list of STUNet sizes, e.g. [tiny-stunet] (or [])")
        check(
            self.device in ("auto", "cpu") or self.device.startswith("cuda"),
            f"device={self.device!r}: use auto, cpu or cuda",
        )


# ---------------------------------------------------------------------------------------------------------------
# Peak memory of one step


class PeakMemory:
    """Peak bytes above the starting point while the ``with`` block runs (see the module docstring)."""

    def __init__(self, device):
        import torch

        self.cuda = torch.device(device).type == "cuda"
        self.method = (
            "torch.cuda.max_memory_allocated above the pre-step allocation"
            if self.cuda
            else "peak RSS (VmHWM reset via /proc/self/clear_refs) above pre-step RSS"
        )
        self.peak = 0

    def __enter__(self):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            self.can_reset = _reset_hwm()
            if not self.can_reset:
                self.method = "peak RSS (ru_maxrss; cannot reset, so an upper bound) above pre-step RSS"
            self.start = _status_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.start
        else:
            self.peak = _status_kib("VmHWM") * 1024 - self.start
        return False


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux >= 4.0: reset the peak resident set size to the current one
        return True
    except OSError:
        return False


def _status_kib(key: str) -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


# ---------------------------------------------------------------------------------------------------------------
# Measurements


def latent_downsample(model_cfg) -> int:
    """Pixels per latent (without loading the VAE): 1 in pixel space, 8 for the Stable Diffusion VAE."""
    return 1 if model_cfg.encoders.first_stage == "identity" else 8


def time_train_step(model_cfg, batch: int, repeats: int, device: str, seed: int = 0) -> dict:
    """Seconds per sample of forward + TF-T2V loss + backward, and the step's peak memory."""
    import torch

    from model.diffusion import Schedule, sample_timesteps, training_losses
    from model.stunet import build_video_unet

    torch.manual_seed(seed)
    u, d = model_cfg.unet, latent_downsample(model_cfg)
    unet = build_video_unet(model_cfg).to(device).train()
    schedule = Schedule.from_config(model_cfg.diffusion)
    x0 = torch.randn(
        batch, u.in_channels, model_cfg.num_frames, model_cfg.height // d, model_cfg.width // d, device=device
    )  # [b, c, f, h, w]
    cond = {"context": torch.randn(batch, u.num_text_tokens, u.context_dim, device=device)}
    if u.image_embed_dim:
        cond["image_embedding"] = torch.randn(batch, u.image_embed_dim, device=device)

    cuda = torch.device(device).type == "cuda"

    def step() -> None:
        t = sample_timesteps(batch, schedule.num_timesteps, device=device)
        # On GPUs training runs in bf16 mixed precision, so time that; CPUs run fp32.
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            out = training_losses(unet, x0, t, model_cfg.diffusion, schedule=schedule, **cond)
        out["loss"].backward()
        unet.zero_grad(set_to_none=True)

    # Memory is measured on the first step: afterwards the allocator (glibc on CPU) keeps freed blocks resident,
    # so later steps would not raise the peak above the pre-step level. That step also warms up the timing.
    peak = PeakMemory(device)
    with peak:
        step()
    sync = torch.cuda.synchronize if peak.cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    sync()
    seconds = (time.perf_counter() - start) / repeats
    return {
        "sec_per_sample": seconds / batch,
        "peak_bytes": peak.peak,
        "memory_method": peak.method,
        "input": list(x0.shape),
        "precision": "bf16 autocast" if cuda else "fp32",
    }


def count_parameters(model_cfg) -> dict:
    """Parameter counts on the meta device (no memory): UNet total/temporal/spatial, CLIP text/vision, VAE."""
    from model.stunet import build_video_unet
    from pipelines.training.memory_plan import encoder_parameter_counts

    counts = dict(build_video_unet(model_cfg, "meta").parameter_counts())
    counts.update(encoder_parameter_counts(model_cfg))
    counts["all"] = counts["total"] + counts["clip_text"] + counts["clip_vision"] + counts["vae"]
    return counts


def forward_flops(model_cfg, device: str = "cpu") -> int:
    """FLOPs of one denoiser forward pass on one clip of the config's shape (torch's FlopCounterMode: convolutions,
    matrix products and attention; norms and activations are not counted)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from model.stunet import build_video_unet

    u, d = model_cfg.unet, latent_downsample(model_cfg)
    unet = build_video_unet(model_cfg).to(device).eval()
    x = torch.randn(1, u.in_channels, model_cfg.num_frames, model_cfg.height // d, model_cfg.width // d, device=device)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        unet(x, torch.tensor([500], device=device), torch.zeros(1, u.num_text_tokens, u.context_dim, device=device))
    return int(counter.get_total_flops())


def activation_bytes(model_cfg, device: str = "cpu") -> int:
    """Bytes autograd keeps for the backward pass of one training forward on one clip (each stored tensor once):
    the activation memory a training step holds at its peak, independent of the allocator and other processes."""
    import torch

    from model.stunet import build_video_unet

    u, d = model_cfg.unet, latent_downsample(model_cfg)
    unet = build_video_unet(model_cfg).to(device).train()
    x = torch.randn(1, u.in_channels, model_cfg.num_frames, model_cfg.height // d, model_cfg.width // d, device=device)
    seen: dict[tuple, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        seen[(storage.data_ptr(), t.device.type)] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        unet(x, torch.tensor([500], device=device), torch.zeros(1, u.num_text_tokens, u.context_dim, device=device))
    params = {p.untyped_storage().data_ptr() for p in unet.parameters()}
    return sum(n for (ptr, _), n in seen.items() if ptr not in params)


def compare_layouts(name: str, cfg: ModelBenchConfig, device: str) -> dict:
    """A STUNet size against the ModelScope layout of the same UNet widths and clip shape."""
    from model.registry import get_config

    frames = {"num_frames": cfg.frames} if cfg.frames else {}
    stunet = get_config(name, frames)
    check(stunet.stunet is not None, f"layouts: {name!r} is not a STUNet size (its config has no stunet section)")
    layouts = {"stunet": stunet, "modelscope": get_config(name, {**frames, "stunet": None})}
    out = {}
    for layout, model_cfg in layouts.items():
        step = time_train_step(model_cfg, cfg.batch, cfg.repeats, device, cfg.seed)
        out[layout] = {
            "params": count_parameters(model_cfg)["total"],
            "flops": forward_flops(model_cfg, device),
            "activation_bytes": activation_bytes(model_cfg, device),
            "sec_per_sample": step["sec_per_sample"],
            "peak_bytes": step["peak_bytes"],
            "input": step["input"],
        }
    return out


def zero_memory(trainable: int, frozen: int, gpus: int) -> dict[str, float]:
    """Per-GPU bytes of model states for bf16 mixed-precision AdamW (ZeRO paper, Rajbhandari et al. 2020, sec. 3.1).

    With P trainable parameters and N GPUs: bf16 weights 2P, bf16 gradients 2P, fp32 master weights 4P and
    two fp32 Adam moments 8P (K = 12 bytes of optimizer state per parameter).
        DDP (no ZeRO): 2P + 2P + 12P          = 16P
        ZeRO-1:        2P + 2P + 12P / N      (optimizer states partitioned)
        ZeRO-2:        2P + (2P + 12P) / N    (gradients partitioned too)
        ZeRO-3:        (2P + 2P + 12P) / N    (weights partitioned too)
    Frozen encoders add 2 bytes per parameter (bf16) on every GPU. Activations, temporary buffers, communication
    buckets and the allocator's fragmentation are not included: they depend on batch, frames and checkpointing.
    """
    p, n, f = float(trainable), float(gpus), 2.0 * frozen
    return {
        "ddp": 16 * p + f,
        "zero1": 4 * p + 12 * p / n + f,
        "zero2": 2 * p + 14 * p / n + f,
        "zero3": 16 * p / n + f,
    }


# ---------------------------------------------------------------------------------------------------------------


def _fmt_count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def run(cfg: ModelBenchConfig) -> dict:
    import torch

    from model.registry import MODEL_CONFIGS, get_config

    device = (
        "cuda"
        if cfg.device == "auto" and torch.cuda.is_available()
        else ("cpu" if cfg.device == "auto" else cfg.device)
    )
    results: dict = {"device": device, "timed": {}, "params": {}, "zero": {}}

    print(
        f"== forward+backward per sample (batch {cfg.batch}, {cfg.repeats} timed steps, device {device}, "
        f"torch threads {torch.get_num_threads()})"
    )
    base = None
    for name in cfg.sizes:
        overrides = {"num_frames": cfg.frames} if cfg.frames else None
        m = time_train_step(get_config(name, overrides), cfg.batch, cfg.repeats, device, cfg.seed)
        results["timed"][name] = m
        base = base or m
        print(
            f"{name:>16}: input {m['input']}  {m['sec_per_sample'] * 1e3:9.1f} ms/sample "
            f"({m['sec_per_sample'] / base['sec_per_sample']:6.2f}x {cfg.sizes[0]})  "
            f"peak {m['peak_bytes'] / 2**20:9.1f} MiB "
            f"({m['peak_bytes'] / max(base['peak_bytes'], 1):6.2f}x {cfg.sizes[0]})",
            flush=True,
        )
    print(f"   precision: {base['precision']}; memory method: {base['memory_method']}")

    print("== parameters (meta device; UNet trains, encoders are frozen)")
    first = None
    for name in MODEL_CONFIGS:
        c = count_parameters(get_config(name))
        results["params"][name] = c
        first = first or c
        print(
            f"{name:>16}: UNet {_fmt_count(c['total']):>8} (temporal {_fmt_count(c['temporal'])}, "
            f"{c['temporal'] / c['total']:.0%})  CLIP text {_fmt_count(c['clip_text'])}  "
            f"vision {_fmt_count(c['clip_vision'])}  VAE {_fmt_count(c['vae'])}  "
            f"all {_fmt_count(c['all'])}  ({c['total'] / first['total']:.0f}x {next(iter(MODEL_CONFIGS))} UNet)"
        )

    big = results["params"].get(cfg.big) or count_parameters(get_config(cfg.big))
    # The image tower is only needed to embed conditioning frames; it is frozen like the text tower and the VAE.
    frozen = big["clip_text"] + big["clip_vision"] + big["vae"]
    mem = zero_memory(big["total"], frozen, cfg.gpus)
    results["zero"] = mem
    print(
        f"== {cfg.big} model-state memory per GPU, bf16 + fp32 AdamW, {cfg.gpus} GPUs "
        f"(P = {_fmt_count(big['total'])} trainable, {_fmt_count(frozen)} frozen in bf16)"
    )
    print("   formula ZeRO-2: 2P (bf16 weights) + (2P bf16 grads + 4P fp32 master + 8P Adam moments) / N + 2 x frozen")
    for stage, label in (("ddp", "DDP, no ZeRO"), ("zero1", "ZeRO-1"), ("zero2", "ZeRO-2"), ("zero3", "ZeRO-3")):
        print(f"{label:>16}: {mem[stage] / GIB:7.1f} GiB  ({mem[stage] / mem['ddp']:.2f}x DDP)")
    print("   activations are extra: see the measured peaks above and enable unet.gradient_checkpointing")

    results["layouts"] = {}
    for name in cfg.layouts:
        r = compare_layouts(name, cfg, device)
        results["layouts"][name] = r
        st, ms = r["stunet"], r["modelscope"]
        print(f"== {name}: STUNet vs the ModelScope layout, same widths, input {st['input']} (batch {cfg.batch})")
        for layout, m in r.items():
            print(
                f"{layout:>16}: UNet {_fmt_count(m['params']):>8}  forward {m['flops'] / 1e9:8.3f} GFLOP/clip  "
                f"activations {m['activation_bytes'] / 2**20:8.1f} MiB/clip  "
                f"train step {m['sec_per_sample'] * 1e3:8.1f} ms/sample  peak {m['peak_bytes'] / 2**20:8.1f} MiB"
            )
        print(
            f"{'STUNet/ModelScope':>16}: params {st['params'] / ms['params']:.2f}x  "
            f"FLOPs {st['flops'] / ms['flops']:.2f}x  "
            f"time {st['sec_per_sample'] / ms['sec_per_sample']:.2f}x  "
            f"activations {st['activation_bytes'] / ms['activation_bytes']:.2f}x  "
            f"peak {st['peak_bytes'] / max(ms['peak_bytes'], 1):.2f}x"
        )
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="t2v bench model", description="TF-T2V model benchmark")
    settings.add_arguments(parser)
    cfg = settings.resolve(parser, ModelBenchConfig, parser.parse_args(argv))
    if cfg is not None:
        logs.setup()
        run(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
