"""Lumiere's masked conditioning (arXiv 2401.12945, sec. 4; shared REFERENCE.md): a conditioning video C and its
mask M are concatenated to the UNet input (``concat``, ``unet.extra_in_channels = channels + 1``), so one model does
text-to-video, image-to-video, inpainting and cinemagraphs.

    M = 1 where C holds given content, 0 where the model generates; C = the given content x M.

    image-to-video   the first frame given, every later frame blank          M = 1 on frame 0
    inpainting       a video given outside a region (training: random boxes)  M = 0 inside the region
    cinemagraph      one image repeated, its region animated after frame 0   M = 0 inside the region, frames >= 1
    text-to-video    nothing given                                            M = 0

Training draws the task per sample at the rates of ``MaskedConfig`` (``training_condition``); for cinemagraphs the
target outside the region is the first frame held still, so the model learns to keep it still. Sampling builds the
same condition from the user's inputs (``image_to_video``, ``inpaint``, ``cinemagraph``), guides only where the
model generates (``guidance_map``) and pastes the given content back over the result (``composite``), so given
pixels come back exactly in pixel space.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from model.validation import check

TASKS = ("image_to_video", "inpaint", "cinemagraph", "text_to_video")


@dataclass
class MaskedConfig:
    """Per-sample task rates in training (text-to-video takes the rest) and the inpainting boxes' size range."""

    image_to_video: float = 0.3
    inpaint: float = 0.2
    cinemagraph: float = 0.2
    box_min: float = 0.25  # box side as a share of the frame side
    box_max: float = 0.6

    def __post_init__(self) -> None:
        rates = (self.image_to_video, self.inpaint, self.cinemagraph)
        check(
            all(0.0 <= r <= 1.0 for r in rates) and sum(rates) <= 1.0 + 1e-9,
            f"masked rates image_to_video={self.image_to_video}, inpaint={self.inpaint}, "
            f"cinemagraph={self.cinemagraph}: each within [0, 1] and together at most 1 (text-to-video takes the rest)",
        )
        check(
            0.0 < self.box_min <= self.box_max <= 1.0,
            f"masked.box_min={self.box_min}, box_max={self.box_max}: need 0 < box_min <= box_max <= 1",
        )

    def probabilities(self) -> Tensor:
        rates = [self.image_to_video, self.inpaint, self.cinemagraph]
        return torch.tensor([*rates, max(0.0, 1.0 - sum(rates))])  # in the order of TASKS


def condition(given: Tensor, mask: Tensor) -> Tensor:
    """The concat input: [b, c, f, h, w] content and [b, 1, f, h, w] mask -> [b, c + 1, f, h, w] = [given x M, M]."""
    return torch.cat([given * mask, mask], dim=1)


def composite(x: Tensor, concat: Tensor) -> Tensor:
    """Put the given content of ``concat`` back over ``x`` (both [b, c, f, h, w] / [b, c + 1, f, h, w])."""
    given, mask = concat[:, :-1], concat[:, -1:]
    return mask * given + (1 - mask) * x


def guidance_map(concat: Tensor, guidance: float) -> Tensor | float:
    """Classifier-free guidance per position: ``guidance`` where the model generates (M = 0), none (1) where the
    content is given, since the text has nothing to add there and amplifying the two passes' small disagreement
    there moves the given content. [b, c + 1, f, h, w] concat -> [b, 1, f, h, w]."""
    if guidance == 1.0:
        return guidance
    return 1.0 + (guidance - 1.0) * (1.0 - concat[:, -1:])


def draw_tasks(b: int, cfg: MaskedConfig, gen: torch.Generator | None = None) -> list[str]:
    """One task per sample at the configured rates."""
    picks = torch.multinomial(cfg.probabilities(), b, replacement=True, generator=gen)
    return [TASKS[i] for i in picks.tolist()]


def random_box(h: int, w: int, cfg: MaskedConfig, gen: torch.Generator | None = None) -> Tensor:
    """[h, w] float mask: 1 inside a random axis-aligned box with sides within [box_min, box_max] of the frame."""
    u = torch.rand(4, generator=gen).tolist()
    bh = max(1, round(h * (cfg.box_min + u[0] * (cfg.box_max - cfg.box_min))))
    bw = max(1, round(w * (cfg.box_min + u[1] * (cfg.box_max - cfg.box_min))))
    top, left = int(u[2] * (h - bh + 1)), int(u[3] * (w - bw + 1))
    region = torch.zeros(h, w)
    region[top : top + bh, left : left + bw] = 1.0
    return region


def training_condition(
    x0: Tensor, cfg: MaskedConfig, gen: torch.Generator | None = None, tasks: list[str] | None = None
) -> tuple[Tensor, Tensor, list[str]]:
    """x0 [b, c, f, h, w] -> (target [b, c, f, h, w], concat [b, c + 1, f, h, w], the task of each sample)."""
    b, _, f, h, w = x0.shape
    tasks = tasks or draw_tasks(b, cfg, gen)
    target, mask = x0.clone(), x0.new_zeros(b, 1, f, h, w)
    given = x0.clone()
    for i, task in enumerate(tasks):
        if task == "image_to_video":
            mask[i, :, 0] = 1
        elif task == "inpaint":
            mask[i] = 1 - random_box(h, w, cfg, gen).to(x0)  # all frames, blank inside the box
        elif task == "cinemagraph":
            region = random_box(h, w, cfg, gen).to(x0)  # [h, w] the animated part
            still = x0[i, :, :1].expand(-1, f, -1, -1)  # [c, f, h, w] the first frame held
            target[i] = region * x0[i] + (1 - region) * still
            given[i] = still
            mask[i] = 1 - region
            mask[i, :, 0] = 1
    return target, condition(given, mask), tasks


# ---------------------------------------------------------------------------------------------------------------
# Conditions from user inputs (sampling). Videos and images are in the UNet's input space: [c, f, h, w] / [c, h, w].


def image_to_video(image: Tensor, num_frames: int) -> Tensor:
    """[c, h, w] first frame -> concat [1, c + 1, f, h, w]."""
    c, h, w = image.shape
    given = image[None, :, None].expand(1, c, num_frames, h, w)
    mask = image.new_zeros(1, 1, num_frames, h, w)
    mask[:, :, 0] = 1
    return condition(given, mask)


def inpaint(video: Tensor, region: Tensor) -> Tensor:
    """[c, f, h, w] video, region [h, w] or [f, h, w] (1 = generate there) -> concat [1, c + 1, f, h, w]."""
    c, f, h, w = video.shape
    _check_region(region, f, h, w)
    region = region.to(video).expand(f, h, w) if region.ndim == 2 else region.to(video)
    return condition(video[None], (1 - region)[None, None])


def cinemagraph(image: Tensor, region: Tensor, num_frames: int) -> Tensor:
    """[c, h, w] image, region [h, w] (1 = animate there) -> concat [1, c + 1, f, h, w]."""
    c, h, w = image.shape
    _check_region(region, num_frames, h, w, video=False)
    mask = (1 - region.to(image))[None, None, None].repeat(1, 1, num_frames, 1, 1)
    mask[:, :, 0] = 1
    return condition(image[None, :, None].expand(1, c, num_frames, h, w), mask)


def _check_region(region: Tensor, f: int, h: int, w: int, video: bool = True) -> None:
    shape = tuple(region.shape)
    if region.ndim == 2 and shape == (h, w):
        return
    if video and region.ndim == 3 and shape == (f, h, w):
        return
    frames = f" or {f} frames of {w}x{h} (a mask video)" if video else ""
    got = f"{shape[-1]}x{shape[-2]}" + (f" with {shape[0]} frames" if region.ndim == 3 else "")
    raise ValueError(f"the mask is {got}; expected a {w}x{h} image{frames}, the size of the model's frames")


__all__ = [
    "MaskedConfig",
    "TASKS",
    "condition",
    "composite",
    "guidance_map",
    "draw_tasks",
    "training_condition",
    "image_to_video",
    "inpaint",
    "cinemagraph",
]
