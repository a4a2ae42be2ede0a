"""Spatial super-resolution over overlapping temporal windows, blended by MultiDiffusion (Bar-Tal et al. 2023,
arXiv 2302.08113; Lumiere, arXiv 2401.12945, sec. 3.2; shared REFERENCE.md).

An SSR model (``ModelConfig.ssr``) is a video UNet that sees the low-resolution video, upsampled to its own size,
as extra input channels (``unet.extra_in_channels = in_channels``). A clip longer than the model's window is
denoised window by window: at every DDIM step each overlapping window of frames is predicted on its own and the
step uses, per frame, the average of the predictions of the windows that hold it. DDIM's update is linear in the
prediction, so this equals averaging the windows' own denoised steps: the least-squares blend MultiDiffusion
solves, which keeps window borders from showing as seams.

    frames = super_resolve(ssr_model, low_res_frames, "a red circle moving left", window=8, stride=4)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from model.ddim import ddim_sample, guided, make_generator
from model.diffusion import initial_noise
from model.validation import check

WindowFn = Callable[[Tensor, Tensor, int, int], Tensor]  # (x window, t, first frame, end frame) -> prediction


@dataclass
class SSRConfig:
    """A spatial super-resolution model: ``scale`` x the low-resolution video's height and width."""

    scale: int = 2
    window: int = 0  # frames per temporal window when sampling (0: the model's num_frames)
    stride: int = 0  # frames between window starts (0: half a window, so windows overlap by half)

    def __post_init__(self) -> None:
        check(isinstance(self.scale, int) and self.scale >= 1, f"ssr.scale={self.scale!r}: must be an integer >= 1")
        check(self.window >= 0 and self.stride >= 0, "ssr.window and ssr.stride must be >= 0 (0: the default)")


def temporal_windows(num_frames: int, window: int, stride: int) -> list[tuple[int, int]]:
    """[start, end) of overlapping windows covering ``num_frames``; the last one ends at the clip's end."""
    if window > num_frames:
        raise ValueError(
            f"the window of {window} frames is longer than the clip ({num_frames} frames); "
            f"use a window of at most {num_frames} frames or a longer clip"
        )
    if not 1 <= stride <= window:
        raise ValueError(
            f"stride={stride}: must be between 1 and the window ({window} frames) so windows cover the clip"
        )
    starts = list(range(0, num_frames - window + 1, stride))
    if starts[-1] + window < num_frames:
        starts.append(num_frames - window)
    return [(s, s + window) for s in starts]


def multidiffusion(
    window_fn: WindowFn, num_frames: int, window: int, stride: int
) -> Callable[[Tensor, Tensor], Tensor]:
    """A ``model_fn(x, t)`` over the whole clip from per-window predictions, averaged where windows overlap."""
    windows = temporal_windows(num_frames, window, stride)
    count = torch.zeros(num_frames)
    for s, e in windows:
        count[s:e] += 1

    def model_fn(x: Tensor, t: Tensor) -> Tensor:
        total = torch.zeros_like(x)  # [b, c, f, h, w]
        for s, e in windows:
            total[:, :, s:e] += window_fn(x[:, :, s:e], t, s, e)
        return total / count.to(x).view(1, 1, -1, 1, 1)

    return model_fn


def upsample_condition(low: Tensor, height: int, width: int) -> Tensor:
    """[b, c, f, h, w] low-resolution video -> [b, c, f, height, width] (bilinear per frame), the SSR concat."""
    b, c, f, h, w = low.shape
    frames = low.transpose(1, 2).reshape(b * f, c, h, w)
    up = F.interpolate(frames, size=(height, width), mode="bilinear", align_corners=False)
    return up.reshape(b, f, c, height, width).transpose(1, 2)


def training_condition(x0: Tensor, scale: int) -> Tensor:
    """x0 [b, c, f, h, w] -> the SSR concat: x0 downsampled by ``scale`` (area) and upsampled back."""
    b, c, f, h, w = x0.shape
    frames = x0.transpose(1, 2).reshape(b * f, c, h, w)
    low = F.interpolate(frames, size=(h // scale, w // scale), mode="area")
    return upsample_condition(low.reshape(b, f, c, h // scale, w // scale).transpose(1, 2), h, w)


@torch.no_grad()
def super_resolve(
    model,
    low_res: np.ndarray,
    prompt: str,
    *,
    window: int | None = None,
    stride: int | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    seed: int = 0,
) -> np.ndarray:
    """uint8 [f, h, w, 3] low-resolution video (any length >= the window) -> uint8 [f, h x s, w x s, 3].

    ``model`` is a TextToVideo with an ``ssr`` config; window and stride default to its ``ssr`` settings."""
    cfg = model.config
    if cfg.ssr is None:
        raise ValueError(f"model {cfg.name!r} is not a super-resolution model (its config has ssr: null)")
    low_res = np.asarray(low_res)
    f, h, w = low_res.shape[:3]
    s = cfg.ssr.scale
    if (h * s, w * s) != (cfg.height, cfg.width):
        raise ValueError(
            f"the low-resolution video is {w}x{h}; this x{s} model makes {cfg.width}x{cfg.height}: "
            f"give a {cfg.width // s}x{cfg.height // s} video"
        )
    window = window or cfg.ssr.window or cfg.num_frames
    stride = stride or cfg.ssr.stride or max(1, window // 2)
    sampling = cfg.sampling
    steps = steps or sampling.steps
    guidance = sampling.guidance if guidance is None else guidance

    dtype = next(model.unet.parameters()).dtype
    low = model.encode_video(low_res[None]).to(dtype)  # [1, c, f, h/d, w/d]
    d = model.first_stage.downsample
    concat = upsample_condition(low, cfg.height // d, cfg.width // d)  # [1, c, f, H/d, W/d]
    cond = {"context": model.encode_text([prompt + sampling.positive_prompt]).to(dtype)}
    uncond = {"context": model.text_encoder.null(1, sampling.negative_prompt).to(dtype)}

    def window_fn(x: Tensor, t: Tensor, start: int, end: int) -> Tensor:
        c = concat[:, :, start:end]
        return guided(model.unet, {**cond, "concat": c}, {**uncond, "concat": c}, guidance)(x, t)

    model_fn = multidiffusion(window_fn, f, window, stride)
    generator = make_generator(seed)
    shape = (1, model.first_stage.latent_channels, f, cfg.height // d, cfg.width // d)
    x_T = initial_noise(shape, cfg.diffusion, generator, device="cpu").to(device=model.device, dtype=dtype)
    was_training = model.unet.training
    model.unet.eval()
    try:
        latents = ddim_sample(
            model_fn, x_T, model.schedule, steps, sampling.eta, generator, False, sampling.timestep_spacing
        )
    finally:
        model.unet.train(was_training)
    return model.decode(latents)[0]


__all__ = [
    "SSRConfig",
    "temporal_windows",
    "multidiffusion",
    "upsample_condition",
    "training_condition",
    "super_resolve",
]
