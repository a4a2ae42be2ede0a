"""Structure conditions (VideoComposer's, as TF-T2V uses them): depth, sketch and motion vectors, encoded into the
UNet's extra input channels (``UNetConfig.extra_in_channels``, the ``concat`` argument of ``UNet3D.forward``).

    encoder = ConditionEncoder(ConditionConfig(kinds=("sketch", "motion"), out_channels=8))
    concat = encoder({"sketch": sketch, "motion": motion}, num_frames=16)     # [b, 8, f, h, w], zeros at start
    noise_pred = unet(x, t, context, concat=concat)

Inputs are ``[b, channels, f, H, W]`` at pixel resolution (``H = h * downsample`` for a latent UNet): ``depth`` 1
channel (near = 1, far = -1), ``sketch`` 1 channel (edges 1, else -1), ``motion`` 2 channels (dx, dy: the forward
displacement per frame as a fraction of the frame's width and height). An image condition is a clip of one frame,
repeated over the video's frames. Any subset of the configured kinds may be given; a missing one contributes
nothing, which is also what a dropped one does in training (``keep_masks``).

The encoder is the STC-encoder's form: per condition a small convolutional encoder on each frame (strided down to
the UNet's resolution), their sum, a temporal transformer over frames at each position, and a 1x1 output layer
that starts at zero, so a model with an encoder added computes what it did without one until it learns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import Tensor, nn

from model.validation import check

CHANNELS = {"depth": 1, "sketch": 1, "motion": 2}


@dataclass(frozen=True)
class ConditionConfig:
    kinds: tuple[str, ...] = ()  # which conditions the encoder takes: any of CHANNELS
    out_channels: int = 8  # the UNet's extra_in_channels
    hidden: int = 64
    downsample: int = 1  # pixel-to-UNet factor: 1 in pixel space, 8 for SD-VAE latents
    temporal_layers: int = 1
    heads: int = 4
    # VideoComposer's training dropout: all conditions dropped with p_all_zero, all kept with p_all_keep, else
    # each dropped on its own with p_each; so any subset, and none, works at sampling time.
    p_all_zero: float = 0.1
    p_all_keep: float = 0.1
    p_each: float = 0.5

    def __post_init__(self) -> None:
        object.__setattr__(self, "kinds", tuple(self.kinds))
        unknown = [k for k in self.kinds if k not in CHANNELS]
        check(not unknown, f"unet.conditions.kinds: unknown {unknown}; accepted are {sorted(CHANNELS)}")
        check(len(set(self.kinds)) == len(self.kinds), f"unet.conditions.kinds={list(self.kinds)} repeats a kind")
        check(
            self.downsample >= 1 and not self.downsample & (self.downsample - 1),
            f"unet.conditions.downsample={self.downsample}: must be a power of two (1: pixels, 8: SD latents)",
        )
        check(
            self.hidden >= 1 and self.heads >= 1 and self.hidden % self.heads == 0,
            f"unet.conditions.hidden={self.hidden} must be a positive multiple of heads={self.heads}",
        )
        check(self.out_channels >= 1, f"unet.conditions.out_channels={self.out_channels}: must be >= 1")
        for name in ("p_all_zero", "p_all_keep", "p_each"):
            value = getattr(self, name)
            check(0.0 <= value <= 1.0, f"unet.conditions.{name}={value}: must be a probability within [0, 1]")
        check(self.p_all_zero + self.p_all_keep <= 1.0, "unet.conditions: p_all_zero + p_all_keep must not exceed 1")


def _frame_encoder(in_channels: int, hidden: int, downsample: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(in_channels, hidden, 3, padding=1), nn.SiLU()]
    for _ in range(int(math.log2(downsample))):
        layers += [nn.Conv2d(hidden, hidden, 3, stride=2, padding=1), nn.SiLU()]
    layers.append(nn.Conv2d(hidden, hidden, 3, padding=1))
    return nn.Sequential(*layers)


class ConditionEncoder(nn.Module):
    """``forward({kind: [b, c, f, H, W]}, num_frames, keep=None) -> [b, out_channels, f, H/d, W/d]``."""

    def __init__(self, cfg: ConditionConfig):
        super().__init__()
        if not cfg.kinds:
            raise ValueError("a condition encoder needs at least one condition kind (ConditionConfig.kinds)")
        self.cfg = cfg
        self.encoders = nn.ModuleDict({k: _frame_encoder(CHANNELS[k], cfg.hidden, cfg.downsample) for k in cfg.kinds})
        layer = nn.TransformerEncoderLayer(
            cfg.hidden, cfg.heads, dim_feedforward=2 * cfg.hidden, dropout=0.0, batch_first=True, norm_first=True
        )
        self.temporal = nn.TransformerEncoder(layer, cfg.temporal_layers, enable_nested_tensor=False)
        self.frame_position = nn.Parameter(torch.zeros(1, 64, cfg.hidden))  # up to 64 frames
        self.out = nn.Conv2d(cfg.hidden, cfg.out_channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def check(self, conditions: dict[str, Tensor], num_frames: int) -> tuple[int, int, int]:
        """(batch, height, width) at pixel resolution; a ValueError that says what is expected otherwise."""
        unknown = sorted(set(conditions) - set(self.cfg.kinds))
        if unknown:
            raise ValueError(f"condition(s) {unknown} not among this model's conditions {list(self.cfg.kinds)}")
        if num_frames > self.frame_position.shape[1]:
            raise ValueError(f"{num_frames} frames: the condition encoder takes at most {self.frame_position.shape[1]}")
        shapes = set()
        for kind, x in conditions.items():
            want = f"[batch, {CHANNELS[kind]}, {num_frames} or 1 frames, height, width]"
            if x.ndim != 5 or x.shape[1] != CHANNELS[kind] or x.shape[2] not in (1, num_frames):
                raise ValueError(f"condition {kind!r} has shape {tuple(x.shape)}; expected {want}")
            shapes.add((x.shape[0], x.shape[3], x.shape[4]))
        if len(shapes) > 1:
            raise ValueError(f"conditions differ in batch or size: {sorted(shapes)}; give them all one size")
        b, h, w = shapes.pop()
        d = self.cfg.downsample
        if h % d or w % d:
            raise ValueError(f"condition size {h}x{w} is not divisible by the encoder's downsample factor {d}")
        return b, h, w

    def forward(self, conditions: dict[str, Tensor], num_frames: int, keep: Tensor | None = None) -> Tensor | None:
        """``keep`` [b, len(kinds)] (0/1, per configured kind) drops conditions per sample; returns None when no
        condition is given (the UNet then sees zeros)."""
        conditions = {k: v for k, v in conditions.items() if v is not None}
        if not conditions:
            return None
        b, h, w = self.check(conditions, num_frames)
        features = None
        for kind, x in conditions.items():
            x = x.to(self.out.weight.dtype)
            if x.shape[2] == 1:
                x = x.expand(-1, -1, num_frames, -1, -1)
            y = self.encoders[kind](rearrange(x, "b c f h w -> (b f) c h w"))
            y = rearrange(y, "(b f) c h w -> b f c h w", b=b)
            if keep is not None:
                y = y * keep[:, self.cfg.kinds.index(kind)].to(y.dtype).view(b, 1, 1, 1, 1)
            features = y if features is None else features + y
        _, f, c, hh, ww = features.shape
        tokens = rearrange(features, "b f c h w -> (b h w) f c") + self.frame_position[:, :f]
        tokens = self.temporal(tokens)
        out = self.out(rearrange(tokens, "(b h w) f c -> (b f) c h w", b=b, h=hh, w=ww))
        return rearrange(out, "(b f) c h w -> b c f h w", b=b)


MOTION_GAIN = 10.0  # motion vectors are a small fraction of the frame per frame: 0.1 of it per frame -> 1


def normalise(kind: str, x: Tensor) -> Tensor:
    """A stored condition (schema.CONDITIONS: sketch 0/1, depth in [0, 1], motion as a fraction of the frame per
    frame) as the encoder takes it: values within [-1, 1]."""
    x = x.float()
    if kind == "motion":
        return (x * MOTION_GAIN).clamp(-1.0, 1.0)
    return x * 2.0 - 1.0


def keep_masks(batch: int, cfg: ConditionConfig, generator: torch.Generator | None = None) -> Tensor:
    """[batch, len(kinds)] of 0/1 for training: all 0 with ``p_all_zero``, all 1 with ``p_all_keep``, else each
    kind kept with ``1 - p_each``."""
    n = len(cfg.kinds)
    u = torch.rand(batch, generator=generator)
    each = (torch.rand(batch, n, generator=generator) >= cfg.p_each).float()
    all_zero = (u < cfg.p_all_zero).float().unsqueeze(1)
    all_keep = ((u >= cfg.p_all_zero) & (u < cfg.p_all_zero + cfg.p_all_keep)).float().unsqueeze(1)
    return all_keep + (1 - all_keep - all_zero) * each
