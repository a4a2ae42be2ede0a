"""How well a training run uses its devices, live: model FLOPs per sample counted on the real UNet at the run's
shapes, clips/s, achieved TFLOP/s, MFU against the device's peak, the share of step time spent waiting for data,
and peak device memory. The worker puts them into every progress line and into MLflow (``eff/*``).

FLOPs are counted once, before training, by ``torch.utils.flop_counter`` on a forward + backward of the UNet built
on the meta device (no memory, no compute) with the real batch, frame and latent shapes: matmuls, convolutions and
attention (as the matmuls of the math kernel), as MFU counts them (PaLM, Chowdhery et al. 2022, appendix B).
Encoders, the loss, activation checkpointing's and fused attention kernels' recomputation are not model FLOPs.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass

import torch

GIB = 1024**3


@dataclass(frozen=True)
class StepFlops:
    """Model FLOPs (forward + backward) of one rank's step and of one sample of each branch."""

    image_sample: float  # one image as a 1-frame video (content branch)
    video_sample: float  # one clip (motion branch)
    image_batch: int
    video_batch: int

    @property
    def step(self) -> float:
        return self.image_sample * self.image_batch + self.video_sample * self.video_batch

    @property
    def per_sample(self) -> float:
        return self.step / max(1, self.image_batch + self.video_batch)


def unet_sample_flops(model_config, frames: int, image_condition: bool = True) -> float:
    """Forward + backward FLOPs of one sample of ``frames`` frames through ``model_config.unet`` at the model's
    latent size, counted on the meta device. ``image_condition`` adds the CLIP image tokens (the larger case)."""
    from torch.utils.flop_counter import FlopCounterMode

    from model.conditions import CHANNELS
    from model.stunet import build_video_unet

    u = model_config.unet
    down = 1 if model_config.encoders.first_stage == "identity" else 8  # SD VAE: 8 pixels per latent
    net = build_video_unet(model_config, "meta").train()
    with torch.device("meta"):
        x = torch.empty(1, u.in_channels, frames, model_config.height // down, model_config.width // down)
        context = torch.empty(1, u.num_text_tokens, u.context_dim)
        image = torch.empty(1, u.image_embed_dim) if (u.image_embed_dim and image_condition) else None
        t = torch.zeros(1, dtype=torch.long)
        extra = {}
        if u.use_fps_condition:
            extra["fps"] = torch.ones(1)
        if u.conditions.kinds:  # training always runs the condition encoder (model/conditions.py)
            size = (frames, model_config.height, model_config.width)
            extra["conditions"] = {k: torch.empty(1, CHANNELS[k], *size) for k in u.conditions.kinds}
    counter = FlopCounterMode(display=False)
    with counter:
        out = net(x, t, context=context, image_embedding=image, **extra)  # [1, c, f, h, w]
        out.float().square().mean().backward()
    return float(counter.get_total_flops())


def step_flops(model_config, image_batch: int, video_batch: int) -> StepFlops:
    """FLOPs of one joint step of one rank: ``image_batch`` 1-frame samples and ``video_batch`` clips."""
    image = unet_sample_flops(model_config, 1) if image_batch else 0.0
    video = unet_sample_flops(model_config, model_config.num_frames) if video_batch else 0.0
    return StepFlops(image, video, image_batch, video_batch)


def peak_memory_bytes(device) -> int:
    """Peak memory of this process's device so far: allocated CUDA memory, or on CPU the peak resident set."""
    if getattr(device, "type", str(device)) == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


class Efficiency:
    """Per-step efficiency figures of a run whose ranks each do ``flops`` per step."""

    def __init__(self, flops: StepFlops, world_size: int, peak_flops: float | None, device):
        self.flops, self.world_size, self.peak, self.device = flops, world_size, peak_flops, device

    def figures(self, step_time: float, data_wait: float) -> dict[str, float]:
        """``step_time`` and ``data_wait`` in seconds (one step, this rank or the ranks' mean)."""
        achieved = self.flops.step / step_time  # per device: every rank does the same work
        out = {
            "eff/clips_per_s": self.flops.video_batch * self.world_size / step_time,
            "eff/images_per_s": self.flops.image_batch * self.world_size / step_time,
            "eff/tflops_per_device": achieved / 1e12,
            "eff/data_wait_fraction": min(1.0, data_wait / step_time),
            "eff/peak_memory_gib": peak_memory_bytes(self.device) / GIB,
        }
        if self.peak:
            out["eff/mfu"] = achieved / self.peak
        return out

    def describe(self) -> str:
        """One line for the start of a run: what a step costs and what MFU is measured against."""
        peak = f"{self.peak / 1e12:.0f} TFLOP/s peak" if self.peak else "no known peak (no MFU; set device_peak_tflops)"
        return (
            f"model FLOPs {self.flops.per_sample / 1e12:.3g} TFLOP/sample "
            f"({self.flops.step / 1e12:.3g} TFLOP/step per device), {peak}"
        )

    @staticmethod
    def progress(fig: dict[str, float]) -> str:
        """The figures as a progress-line fragment."""
        mfu = f" MFU {100 * fig['eff/mfu']:.1f}%" if "eff/mfu" in fig else ""
        return (
            f"{fig['eff/clips_per_s']:.2f} clips/s {fig['eff/tflops_per_device']:.3g} TFLOP/s{mfu} "
            f"peak mem {fig['eff/peak_memory_gib']:.1f} GiB"
        )
