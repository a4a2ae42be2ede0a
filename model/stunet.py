"""Lumiere's Space-Time U-Net (STUNet, arXiv 2401.12945; shared REFERENCE.md): a video UNet that downsamples in
time as well as in space, so the whole clip is generated in one pass at a coarse space-time resolution.

    cfg = get_config("tiny-stunet")                 # model/registry.py: ModelConfig with a ``stunet`` section
    unet = build_video_unet(cfg)                    # STUNet here, UNet3D for the ModelScope layout
    out = unet(x, t, context)                       # the UNet3D call: x [b, c, f, h, w] -> [b, c, f, h, w]

Layout against ``model/unet.py`` (same widths, levels and module names for every spatial layer):

    every level but the coarsest   ResBlock with its factorised temporal conv [+ spatial transformer]
    the coarsest level + middle    ResBlock without temporal conv [+ spatial transformer] + temporal transformer
    after each spatial Downsample  TemporalDownsample (frames / 2), at the levels ``temporal_levels`` names
    after each spatial Upsample    TemporalUpsample (frames x 2), mirroring the encoder

Temporal down/up-sampling are (3, 1, 1) convolutions initialised to nearest neighbour: a fresh downsample keeps
frames 0, 2, 4, ... and a fresh upsample repeats each frame twice. Spatial layers carry the ModelScope layout's
key names (an ``nn.Identity`` holds the place of a temporal transformer the STUNet drops), so an image UNet's
weights, or a video UNet's spatial ones, load into it unchanged (``inflate_from_image``). With
``trainable="temporal"`` the spatial weights are frozen: only the new temporal parameters train.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.unet import (
    TEMPORAL_MODULES,
    Block,
    Downsample,
    ResBlock,
    SpatialTransformer,
    TemporalTransformer,
    UNet3D,
    UNetConfig,
    Upsample,
    _zero_,
    coordinate_planes,
    timestep_embedding,
)
from model.validation import check


@dataclass
class STUNetConfig:
    """What turns a ``UNetConfig`` into a STUNet (``ModelConfig.stunet``; None keeps the ModelScope layout)."""

    # Levels whose spatial downsample also halves the frame count (level i -> i + 1); None: every one.
    temporal_levels: tuple[int, ...] | None = None
    # "all" trains every weight (from scratch); "temporal" freezes the spatial (image) weights after inflation.
    trainable: Literal["all", "temporal"] = "all"

    def __post_init__(self) -> None:
        if self.temporal_levels is not None:
            self.temporal_levels = tuple(self.temporal_levels)
            check(
                len(set(self.temporal_levels)) == len(self.temporal_levels),
                f"stunet.temporal_levels={list(self.temporal_levels)}: list each level once",
            )
        check(
            self.trainable in ("all", "temporal"),
            f"stunet.trainable={self.trainable!r}: use all (train every weight) or temporal (freeze spatial weights)",
        )

    def levels(self, unet: UNetConfig) -> tuple[int, ...]:
        """The checked temporal downsampling levels for ``unet`` (every spatial downsample when unset)."""
        last = unet.num_levels - 1
        levels = tuple(range(last)) if self.temporal_levels is None else tuple(sorted(self.temporal_levels))
        check(
            all(0 <= level < last for level in levels),
            f"stunet.temporal_levels={list(levels)}: levels must be in 0..{last - 1} (a level with a spatial "
            f"downsample after it; unet.channel_mult has {unet.num_levels} levels)",
        )
        return levels

    def frame_multiple(self, unet: UNetConfig) -> int:
        """Clips must have a multiple of this many frames (each temporal downsampling halves them)."""
        return 2 ** len(self.levels(unet))


def check_frames(num_frames: int, multiple: int, levels: tuple[int, ...]) -> str | None:
    """The message for a frame count the temporal downsampling cannot take, or None when it fits."""
    if num_frames == 1 or num_frames % multiple == 0:
        return None
    fits = ", ".join(str(multiple * k) for k in range(1, 4))
    return (
        f"STUNet: {num_frames} frames cannot be halved {len(levels)} time(s) by the temporal downsampling after "
        f"level(s) {list(levels)}; use a multiple of {multiple} frames (e.g. {fits}) or set stunet.temporal_levels "
        "to fewer levels"
    )


class TemporalDownsample(nn.Module):
    """Halves the frames: (3, 1, 1) conv with stride 2 over time, initialised to keep frames 0, 2, 4, ..."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv3d(channels, channels, (3, 1, 1), stride=(2, 1, 1), padding=(1, 0, 0))
        _nearest_(self.conv)

    def forward(self, x: Tensor, num_frames: int) -> Tensor:
        # [(b f), c, h, w] -> [(b f/2), c, h, w]
        y = _conv_time(self.conv, _to_time(x, num_frames), stride=2)
        return _from_time(y, x.shape)


class TemporalUpsample(nn.Module):
    """Doubles the frames: nearest-neighbour repeat, then a (3, 1, 1) conv initialised to the identity."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv3d(channels, channels, (3, 1, 1), padding=(1, 0, 0))
        _nearest_(self.conv)

    def forward(self, x: Tensor, num_frames: int) -> Tensor:
        # [(b f), c, h, w] -> [(b 2f), c, h, w]
        y = _to_time(x, num_frames).repeat_interleave(2, dim=2)  # [b, c, 2f, h*w]
        return _from_time(_conv_time(self.conv, y, stride=1), x.shape)


def _nearest_(conv: nn.Conv3d) -> None:
    # The centre tap passes each channel through unchanged, the side taps start at zero.
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[:, :, 1, 0, 0] = torch.eye(conv.weight.shape[0])
        conv.bias.zero_()


def _to_time(x: Tensor, num_frames: int) -> Tensor:
    n, c, h, w = x.shape  # [(b f), c, h, w] -> [b, c, f, h*w]
    return x.view(n // num_frames, num_frames, c, h * w).transpose(1, 2)


def _from_time(y: Tensor, like: torch.Size) -> Tensor:
    b, c, f, _ = y.shape  # [b, c, f, h*w] -> [(b f), c, h, w]
    return y.transpose(1, 2).reshape(b * f, c, like[2], like[3])


def _conv_time(conv: nn.Conv3d, y: Tensor, stride: int) -> Tensor:
    # The (3, 1, 1) Conv3d as a (3, 1) Conv2d over [b, c, f, h*w]: same numbers, much faster on CPU.
    return F.conv2d(y, conv.weight.squeeze(-1), conv.bias, stride=(stride, 1), padding=(1, 0))


class _NoTemporalConv(nn.Module):
    """Takes the place of a ResBlock's temporal conv at the coarsest level, where temporal attention mixes time."""

    def forward(self, x: Tensor, num_frames: int) -> Tensor:
        return x


STUNET_TEMPORAL_MODULES = (*TEMPORAL_MODULES, TemporalDownsample, TemporalUpsample)


class STUNet(UNet3D):
    """``forward(x [b, c, f, h, w], timesteps [b], context, image_embedding, concat) -> [b, out, f, h, w]``, the
    ``UNet3D`` call; ``f`` must be a multiple of ``stunet.frame_multiple`` (or 1: image mode, no temporal layers).

    Shares UNet3D's input checks, context building and parameter helpers; only the block layout and the walk
    through it differ."""

    def __init__(self, cfg: UNetConfig, st: STUNetConfig):
        nn.Module.__init__(self)
        self.cfg, self.st = cfg, st
        self.gradient_checkpointing = cfg.gradient_checkpointing
        self.temporal_levels = st.levels(cfg)
        self.frame_multiple = st.frame_multiple(cfg)
        C, emb_dim, drop, groups = cfg.model_channels, cfg.model_channels * 4, cfg.dropout, cfg.num_groups
        last = cfg.num_levels - 1

        self._add_embeddings(cfg, C, emb_dim)

        def layers_at(level: int, in_ch: int, width: int) -> list[nn.Module]:
            res = ResBlock(in_ch, width, emb_dim, drop, groups)
            if level == last:  # attention inflation block: no temporal conv, temporal attention instead
                res.temopral_conv = _NoTemporalConv()
            layers: list[nn.Module] = [res]
            if level in cfg.attention_levels:
                layers.append(
                    SpatialTransformer(width, width // cfg.head_dim, cfg.head_dim, cfg.context_dim, drop, groups)
                )
            if level == last:
                heads = width // cfg.temporal_head_dim
                layers.append(TemporalTransformer(width, heads, cfg.temporal_head_dim, drop, groups))
            elif level in cfg.attention_levels:
                layers.append(nn.Identity())  # keeps the ModelScope layout's index of the next layer
            return layers

        coords = 2 if cfg.coordinate_channels else 0
        self.input_blocks = nn.ModuleList(
            [Block([nn.Conv2d(cfg.in_channels + cfg.extra_in_channels + coords, C, 3, padding=1)])]
        )
        self.temporal_down = nn.ModuleDict()
        self._down_after: dict[int, str] = {}  # input block index -> temporal_down key
        skip_channels, ch = [C], C
        for level, mult in enumerate(cfg.channel_mult):
            width = C * mult
            for _ in range(cfg.num_res_blocks):
                self.input_blocks.append(Block(layers_at(level, ch, width)))
                ch = width
                skip_channels.append(ch)
            if level != last:
                self.input_blocks.append(Downsample(ch))
                skip_channels.append(ch)
                if level in self.temporal_levels:
                    self.temporal_down[str(level)] = TemporalDownsample(ch)
                    self._down_after[len(self.input_blocks) - 1] = str(level)

        heads = ch // cfg.temporal_head_dim
        self.middle_block = Block(
            [
                _without_temporal_conv(ResBlock(ch, ch, emb_dim, drop, groups)),
                SpatialTransformer(ch, ch // cfg.head_dim, cfg.head_dim, cfg.context_dim, drop, groups),
                TemporalTransformer(ch, heads, cfg.temporal_head_dim, drop, groups),
                _without_temporal_conv(ResBlock(ch, ch, emb_dim, drop, groups)),
            ]
        )

        self.output_blocks = nn.ModuleList()
        self.temporal_up = nn.ModuleDict()
        self._up_after: dict[int, str] = {}  # output block index -> temporal_up key
        for level in reversed(range(cfg.num_levels)):
            width = C * cfg.channel_mult[level]
            for j in range(cfg.num_res_blocks + 1):
                layers = layers_at(level, ch + skip_channels.pop(), width)
                ch = width
                if level != 0 and j == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                    if level - 1 in self.temporal_levels:
                        self.temporal_up[str(level - 1)] = TemporalUpsample(ch)
                        self._up_after[len(self.output_blocks)] = str(level - 1)
                self.output_blocks.append(Block(layers))

        self.out = nn.Sequential(
            nn.GroupNorm(groups, ch), nn.SiLU(), _zero_(nn.Conv2d(ch, cfg.out_channels, 3, padding=1))
        )
        if st.trainable == "temporal":
            for _, p in self.named_spatial_parameters():
                p.requires_grad_(False)

    # -- parameters -----------------------------------------------------------------------------------------------

    def named_temporal_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """The layers an image model lacks: temporal convs and attention, temporal resizing, frame embedding."""
        for prefix, module in self.named_modules():
            if isinstance(module, STUNET_TEMPORAL_MODULES):
                for name, p in module.named_parameters():
                    yield f"{prefix}.{name}", p

    def named_spatial_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        temporal = {name for name, _ in self.named_temporal_parameters()}
        for name, p in self.named_parameters():
            if name not in temporal:
                yield name, p

    def spatial_parameters(self) -> Iterator[nn.Parameter]:
        """The spatial weights the optimizer updates: none when ``stunet.trainable="temporal"`` froze them."""
        for _, p in self.named_spatial_parameters():
            if p.requires_grad:
                yield p

    def parameter_counts(self) -> dict[str, int]:
        counts = super().parameter_counts()
        counts["spatial"] = sum(p.numel() for _, p in self.named_spatial_parameters())
        counts["trainable"] = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return counts

    # -- forward --------------------------------------------------------------------------------------------------

    def forward(
        self,
        x: Tensor,
        timesteps: Tensor | float | int,
        context: Tensor | None = None,
        image_embedding: Tensor | None = None,
        concat: Tensor | None = None,
        image_keep: Tensor | None = None,
        fps: Tensor | float | None = None,
        conditions: dict[str, Tensor] | None = None,
        condition_keep: Tensor | None = None,
    ) -> Tensor:
        """As ``UNet3D.forward``. Frames halve after each temporal downsampling and double back on the way up."""
        b, _, f, h, w = self._check_x(x)
        problem = check_frames(f, self.frame_multiple, self.temporal_levels)
        if problem:
            raise ValueError(problem)
        t = self._check_timesteps(timesteps, b, x.device)
        inputs = [x]
        if self.cfg.coordinate_channels:
            inputs.append(coordinate_planes(b, f, h, w, x))  # [b, 2, f, h, w]
        if conditions:  # structure conditions (model/conditions.py), encoded into the last extra channels
            concat = self.condition_input(concat, conditions, condition_keep, x)
        if self.cfg.extra_in_channels:
            inputs.append(self._check_concat(concat, x))  # [b, extra, f, h, w]
        elif concat is not None:
            raise ValueError(
                "STUNet: got concat but this UNet has no extra input channels "
                "(unet.extra_in_channels=0); set extra_in_channels to the concat channel count"
            )
        x = torch.cat(inputs, dim=1) if len(inputs) > 1 else x
        n_text = context.shape[1] if context is not None else self.cfg.num_text_tokens
        context = self._build_context(context, image_embedding, image_keep, b, x)  # [b, n, context_dim]

        emb = self.time_embed(timestep_embedding(t, self.cfg.model_channels).to(self.time_embed[0].weight.dtype))
        pooled = context[:, :n_text].mean(dim=1)
        if self.cfg.pooled_text_embedding:
            emb = emb + self.text_embed(pooled)
        if self.cfg.use_fps_condition:
            if fps is None:
                raise ValueError(
                    "STUNet: this UNet is fps-conditioned (unet.use_fps_condition); pass fps=[b] or a number"
                )
            fps_t = torch.as_tensor(fps, device=x.device, dtype=torch.float32)
            fps_t = fps_t.expand(b) if fps_t.ndim == 0 else fps_t
            if fps_t.shape != (b,):
                raise ValueError(f"STUNet: fps must be [{b}] (one per sample) or a number, got {tuple(fps_t.shape)}")
            emb = emb + self.fps_embedding(timestep_embedding(fps_t, self.cfg.model_channels).to(emb.dtype))
        elif fps is not None:
            raise ValueError("STUNet: got fps but unet.use_fps_condition is off; set it, or pass no fps")
        emb = emb[:, None].expand(b, f, emb.shape[-1])  # [b, f, 4C]
        if self.cfg.frame_embedding and f > 1:
            emb = emb + self.frame_embed(b, f, pooled, emb.dtype).view(b, f, -1)
        x = x.transpose(1, 2).reshape(b * f, -1, h, w)  # [(b f), c, h, w]

        # At temporal stride s the clip holds frames 0, s, 2s, ... (what nearest-neighbour downsampling keeps).
        def at(stride: int) -> tuple[Tensor, Tensor]:
            frames_emb = emb[:, ::stride].reshape(-1, emb.shape[-1])  # [(b f/s), 4C]
            return frames_emb, context.repeat_interleave(f // stride, dim=0)  # [(b f/s), n, context_dim]

        video = f > 1  # one frame (image mode): no temporal layer runs, frames never resize
        stride = 1
        e, c = at(stride)
        skips = []
        for i, block in enumerate(self.input_blocks):
            x = self._run(block, x, e, c, f // stride)
            if video and i in self._down_after:
                x = self.temporal_down[self._down_after[i]](x, f // stride)
                stride *= 2
                e, c = at(stride)
            skips.append(x)
        x = self._run(self.middle_block, x, e, c, f // stride)
        for i, block in enumerate(self.output_blocks):
            x = self._run(block, torch.cat([x, skips.pop()], dim=1), e, c, f // stride)
            if video and i in self._up_after:
                x = self.temporal_up[self._up_after[i]](x, f // stride)
                stride //= 2
                e, c = at(stride)
        x = self.out(x)  # [(b f), out, h, w]
        return x.reshape(b, f, -1, h, w).transpose(1, 2)  # [b, out, f, h, w]


def _without_temporal_conv(res: ResBlock) -> ResBlock:
    res.temopral_conv = _NoTemporalConv()
    return res


def build_video_unet(model_config, device: str | torch.device | None = None) -> UNet3D:
    """The denoiser a ``ModelConfig`` names: a STUNet when it has a ``stunet`` section, else the ModelScope UNet3D.
    ``device`` "meta" builds a shape-only model for counting."""
    st = getattr(model_config, "stunet", None)

    def build() -> UNet3D:
        return UNet3D(model_config.unet) if st is None else STUNet(model_config.unet, st)

    if device is None:
        return build()
    with torch.device(device):
        return build()


def inflate_from_image(unet: STUNet, source: Mapping[str, Tensor] | str) -> list[str]:
    """Load every spatial layer of ``unet`` from an image (or video) UNet's weights in our key names (a state dict,
    or a model.pt / UNet file); temporal layers keep their initialisation. Returns the keys left at their init.

    Every spatial key must be present with its shape; the source's temporal keys, if any, are ignored."""
    from model.checkpoint import load_unet_weights, state_dict_of

    state, _, _ = state_dict_of(source)
    spatial = {name for name, _ in unet.named_spatial_parameters()}
    picked = {k: v for k, v in state.items() if k in spatial}
    temporal = tuple(name for name, _ in unet.named_temporal_parameters())
    report = load_unet_weights(unet, picked, allow_missing=temporal, pad_input_channels=True)
    return report.missing_allowed


__all__ = [
    "STUNetConfig",
    "STUNet",
    "TemporalDownsample",
    "TemporalUpsample",
    "build_video_unet",
    "check_frames",
    "inflate_from_image",
]
