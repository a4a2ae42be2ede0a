"""The ModelScope-style 3D UNet that TF-T2V trains: a Stable Diffusion UNet grown with temporal layers.

Layout (ModelScopeT2V, arXiv 2308.06571; shared REFERENCE.md), with module names that match the released
ModelScope/TF-T2V state dicts so their checkpoints load unchanged (``model/checkpoint.py``):

    time_embed                 sinusoidal(t) -> Linear -> SiLU -> Linear (4 x model_channels)
    pre_image_condition        TF-T2V: pooled CLIP image embedding -> MLP -> num_image_tokens context tokens
    input_blocks.0             Conv2d(in [+ 2 coordinates] + extra -> C) [+ temporal transformer]
    input_blocks.N             ResBlock (+ its temporal conv block "temopral_conv" [sic]) [+ spatial transformer
                               + temporal transformer at attention levels], or a Downsample ("op")
    middle_block               ResBlock, spatial transformer, temporal transformer, ResBlock
    output_blocks.N            ResBlock on [x, skip] [+ spatial + temporal transformer] [+ Upsample ("conv")]
    out                        GroupNorm -> SiLU -> Conv2d (zero-initialised)

Three inputs the released layout lacks, off by default and on in the tiny config (which trains for minutes on CPU):
``pooled_text_embedding`` (``text_embed``) adds the mean text token to the timestep embedding, as Imagen does, so
every ResBlock sees the prompt, not only the attention levels; ``frame_embedding`` (``frame_embed``, a temporal
module that image batches skip) adds an embedding of each frame's index, with the pooled prompt when both are on,
since the released temporal layers carry no positional information; ``coordinate_channels`` appends each pixel's
x and y as two input planes (CoordConv), since convolutions and the released attention cannot tell where in the
frame they are. Both embeddings end in a zero-initialised layer, so a fresh video UNet still computes the
per-frame image UNet.

Inside the network activations are ``[(b f), c, h, w]``: every 2D layer treats frames as a batch of images and
only the temporal layers fold frames back out. Temporal layers are residual with a zero-initialised last
projection, so a new video UNet computes exactly the per-frame image UNet it grew from; with one frame
(``f == 1``, the TF-T2V content branch / image batches) they return their input untouched, so images train only
the spatial layers and temporal weights get no gradient at all.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from model.conditions import ConditionConfig, ConditionEncoder
from model.validation import ConfigError, check


@dataclass
class UNetConfig:
    """Architecture of ``UNet3D``. Defaults are the released ModelScopeT2V UNet (about 1.4B parameters)."""

    in_channels: int = 4  # latent channels (4 for the SD VAE; 3 in pixel space)
    out_channels: int = 4
    model_channels: int = 320  # base width C; level i has C * channel_mult[i] channels
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2  # residual blocks per level on the way down (one more on the way up)
    attention_levels: tuple[int, ...] = (0, 1, 2)  # levels with spatial + temporal transformers (middle always has)
    head_dim: int = 64  # spatial attention: width // head_dim heads of head_dim each
    context_dim: int = 1024  # text token width (OpenCLIP ViT-H/14: 1024)
    num_text_tokens: int = 77  # zero tokens used when forward() gets context=None
    image_embed_dim: int = 1024  # pooled CLIP image embedding width; 0 disables the image condition
    num_image_tokens: int = 4  # TF-T2V: image embedding -> 4 tokens appended to the text tokens (none without one)
    temporal_heads: int = 8  # heads of the temporal transformer after the input conv (8 x 64)
    temporal_head_dim: int = 64  # per-level temporal transformers: width // temporal_head_dim heads
    temporal_attention_after_input: bool = True  # the temporal transformer right after the input conv
    extra_in_channels: int = 0  # VideoComposer / Lumiere concat slots, zeros when unused
    dropout: float = 0.1
    num_groups: int = 32  # GroupNorm groups everywhere
    gradient_checkpointing: bool = False  # recompute block activations in backward (saves memory)
    pooled_text_embedding: bool = False  # add mean(text tokens) -> MLP to the timestep embedding (not released)
    frame_embedding: bool = False  # add a frame-index embedding per frame (not released)
    coordinate_channels: bool = False  # append (x, y) coordinate planes to the input (not released)
    use_fps_condition: bool = False  # VGen's: add an fps embedding (zero-initialised) to the timestep embedding
    # VideoComposer's structure conditions (model/conditions.py), encoded into the last extra input channels
    conditions: ConditionConfig = field(default_factory=ConditionConfig)

    def __post_init__(self) -> None:
        self.channel_mult = tuple(self.channel_mult)
        self.attention_levels = tuple(self.attention_levels)
        for name in (
            "in_channels",
            "out_channels",
            "model_channels",
            "num_res_blocks",
            "head_dim",
            "context_dim",
            "num_text_tokens",
            "num_image_tokens",
            "temporal_heads",
            "temporal_head_dim",
            "num_groups",
        ):
            value = getattr(self, name)
            check(
                isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                f"unet.{name}={value!r}: must be a positive integer",
            )
        for name in ("image_embed_dim", "extra_in_channels"):
            value = getattr(self, name)
            check(
                isinstance(value, int) and value >= 0,
                f"unet.{name}={value!r}: must be an integer >= 0 (0 turns it off)",
            )
        check(
            len(self.channel_mult) >= 1 and all(isinstance(m, int) and m >= 1 for m in self.channel_mult),
            f"unet.channel_mult={list(self.channel_mult)}: must be a non-empty list of positive integers, "
            "e.g. [1, 2, 4, 4]",
        )
        levels = range(len(self.channel_mult))
        check(
            all(level in levels for level in self.attention_levels),
            f"unet.attention_levels={list(self.attention_levels)}: levels must be in 0..{len(self.channel_mult) - 1} "
            f"(one per entry of channel_mult={list(self.channel_mult)})",
        )
        check(
            len(set(self.attention_levels)) == len(self.attention_levels),
            f"unet.attention_levels={list(self.attention_levels)}: list each level once",
        )
        check(
            self.model_channels % self.num_groups == 0,
            f"unet.model_channels={self.model_channels} must be divisible by unet.num_groups={self.num_groups} "
            "(GroupNorm); pick num_groups that divides it, e.g. 8 for small widths",
        )
        # The middle block always has attention, at the coarsest width.
        for level in sorted(set(self.attention_levels) | {len(self.channel_mult) - 1}):
            width = self.model_channels * self.channel_mult[level]
            where = "middle block" if level not in self.attention_levels else f"attention level {level}"
            check(
                width % self.head_dim == 0,
                f"unet.head_dim={self.head_dim} must divide the width {width} of the {where}; "
                "choose a head_dim that divides model_channels * channel_mult",
            )
            check(
                width % self.temporal_head_dim == 0,
                f"unet.temporal_head_dim={self.temporal_head_dim} must divide the width {width} of the {where}",
            )
        check(0.0 <= self.dropout < 1.0, f"unet.dropout={self.dropout}: must be in [0, 1)")
        if isinstance(self.conditions, dict):
            self.conditions = ConditionConfig(**self.conditions)
        check(
            not self.conditions.kinds or self.conditions.out_channels <= self.extra_in_channels,
            f"unet.conditions.out_channels={self.conditions.out_channels} needs as many extra input channels; "
            f"unet.extra_in_channels={self.extra_in_channels}",
        )

    @property
    def num_levels(self) -> int:
        return len(self.channel_mult)

    @property
    def downsample_factor(self) -> int:
        """Height and width of the input must be multiples of this."""
        return 2 ** (self.num_levels - 1)

    @property
    def num_context_tokens(self) -> int:
        """Tokens the cross-attention sees given ``num_text_tokens`` text tokens and an image (77 + 4 = 81 in
        TF-T2V); without an image only the text tokens, as the released network is called."""
        return self.num_text_tokens + (self.num_image_tokens if self.image_embed_dim else 0)


# ---------------------------------------------------------------------------------------------------------------
# Building blocks. Attribute names are the checkpoint's key names: do not rename them.


def timestep_embedding(timesteps: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding as ModelScope computes it: [cos | sin] of t * 10000^(-i/half). [b] -> [b, dim]."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, device=timesteps.device, dtype=torch.float32) / half)
    args = timesteps.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def _zero_(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class Attention(nn.Module):
    """Multi-head attention; self-attention when ``context`` is None. Projections carry no bias (as released)."""

    def __init__(self, query_dim: int, context_dim: int | None, heads: int, head_dim: int, dropout: float):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(dropout))

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        # x [B, n, query_dim], context [B, m, context_dim] -> [B, n, query_dim]
        context = x if context is None else context
        q, k, v = (self._split(t) for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
        out = F.scaled_dot_product_attention(q, k, v)  # [B, heads, n, head_dim]
        return self.to_out(out.transpose(1, 2).flatten(2))

    def _split(self, t: Tensor) -> Tensor:
        return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # [B, n, heads*d] -> [B, heads, n, d]


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: Tensor) -> Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, dropout: float, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(dropout), nn.Linear(dim * mult, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class TransformerBlock(nn.Module):
    """Pre-norm: self-attention, then attention to ``context`` (or a second self-attention), then GEGLU MLP."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int | None, dropout: float):
        super().__init__()
        self.attn1 = Attention(dim, None, heads, head_dim, dropout)
        self.ff = FeedForward(dim, dropout)
        self.attn2 = Attention(dim, context_dim, heads, head_dim, dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Per-frame attention over h*w positions plus cross-attention to the text (+ image) tokens."""

    def __init__(self, channels: int, heads: int, head_dim: int, context_dim: int, dropout: float, groups: int):
        super().__init__()
        inner = heads * head_dim
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner)
        self.transformer_blocks = nn.ModuleList([TransformerBlock(inner, heads, head_dim, context_dim, dropout)])
        self.proj_out = _zero_(nn.Linear(inner, channels))

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        # x [(b f), c, h, w], context [(b f), n, context_dim]
        n, c, h, w = x.shape
        y = self.proj_in(self.norm(x).flatten(2).transpose(1, 2))  # [(b f), h*w, inner]
        for block in self.transformer_blocks:
            y = block(y, context)
        y = self.proj_out(y).transpose(1, 2).reshape(n, c, h, w)
        return x + y


class TemporalTransformer(nn.Module):
    """Self-attention across frames at each spatial position (no positional encoding, as released).

    ``proj_in``/``proj_out`` are kernel-1 Conv1d layers only so that their weights keep the released
    checkpoint's ``[out, in, 1]`` shape; they are applied as linear layers on ``[(b h w), f, c]``.
    """

    def __init__(self, channels: int, heads: int, head_dim: int, dropout: float, groups: int):
        super().__init__()
        inner = heads * head_dim
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Conv1d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList([TransformerBlock(inner, heads, head_dim, None, dropout)])
        self.proj_out = _zero_(nn.Conv1d(inner, channels, 1))

    def forward(self, x: Tensor, num_frames: int) -> Tensor:
        if num_frames == 1:  # image mode: identity, no compute, no gradient to these weights
            return x
        n, c, h, w = x.shape  # [(b f), c, h, w]
        b, f = n // num_frames, num_frames
        # GroupNorm over [b, c, f, h, w]: statistics span all frames of a clip, as in the released model.
        y = self.norm(x.view(b, f, c, h, w).transpose(1, 2))  # [b, c, f, h, w]
        y = y.permute(0, 3, 4, 2, 1).reshape(b * h * w, f, c)  # [(b h w), f, c]
        y = F.linear(y, self.proj_in.weight.squeeze(-1), self.proj_in.bias)
        for block in self.transformer_blocks:
            y = block(y)
        y = F.linear(y, self.proj_out.weight.squeeze(-1), self.proj_out.bias)
        y = y.view(b, h, w, f, c).permute(0, 3, 4, 1, 2).reshape(n, c, h, w)  # back to [(b f), c, h, w]
        return x + y


class TemporalConvBlock(nn.Module):
    """Four (GroupNorm, SiLU, [Dropout], Conv3d (3,1,1)) layers mixing neighbouring frames; last conv zero-init."""

    def __init__(self, channels: int, dropout: float, groups: int):
        super().__init__()

        def layer(with_dropout: bool) -> nn.Sequential:
            mods: list[nn.Module] = [nn.GroupNorm(groups, channels), nn.SiLU()]
            if with_dropout:
                mods.append(nn.Dropout(dropout))
            mods.append(nn.Conv3d(channels, channels, (3, 1, 1), padding=(1, 0, 0)))
            return nn.Sequential(*mods)

        # Index layout (conv1.2 vs convN.3) follows the released keys: only conv2..4 carry a dropout.
        self.conv1 = layer(False)
        self.conv2 = layer(True)
        self.conv3 = layer(True)
        self.conv4 = layer(True)
        _zero_(self.conv4[-1])

    def forward(self, x: Tensor, num_frames: int) -> Tensor:
        if num_frames == 1:
            return x
        n, c, h, w = x.shape
        y = x.view(n // num_frames, num_frames, c, h * w).transpose(1, 2)  # [b, c, f, h*w]
        for layer in (self.conv1, self.conv2, self.conv3, self.conv4):
            y = self._run_layer(layer, y)
        return x + y.transpose(1, 2).reshape(n, c, h, w)

    @staticmethod
    def _run_layer(layer: nn.Sequential, y: Tensor) -> Tensor:
        # The (3, 1, 1) Conv3d run as a (3, 1) Conv2d over [b, c, f, h*w]: the same numbers, and several times
        # faster on CPU, where PyTorch has no fast Conv3d kernel. GroupNorm/SiLU/Dropout do not care about the
        # folded h*w axis.
        *pre, conv = layer
        for module in pre:
            y = module(y)
        return F.conv2d(y, conv.weight.squeeze(-1), conv.bias, padding=(1, 0))


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice with the time embedding added in between, then the temporal conv block."""

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, dropout: float, groups: int):
        super().__init__()
        self.in_layers = nn.Sequential(
            nn.GroupNorm(groups, in_channels), nn.SiLU(), nn.Conv2d(in_channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_channels))
        self.out_layers = nn.Sequential(
            nn.GroupNorm(groups, out_channels),
            nn.SiLU(),
            nn.Dropout(dropout),
            _zero_(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        self.skip_connection = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)
        self.temopral_conv = TemporalConvBlock(out_channels, dropout, groups)  # [sic]: the released key name

    def forward(self, x: Tensor, emb: Tensor, num_frames: int) -> Tensor:
        # x [(b f), c_in, h, w], emb [(b f), emb_dim] -> [(b f), c_out, h, w]
        h = self.in_layers(x)
        h = h + self.emb_layers(emb)[:, :, None, None]
        h = self.skip_connection(x) + self.out_layers(h)
        return self.temopral_conv(h, num_frames)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Block(nn.ModuleList):
    """One entry of input_blocks / output_blocks / middle_block: layers applied in order, each fed what it needs."""

    def forward(self, x: Tensor, emb: Tensor, context: Tensor, num_frames: int) -> Tensor:  # type: ignore[override]
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb, num_frames)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, TemporalTransformer):
                x = layer(x, num_frames)
            else:  # input conv, Upsample
                x = layer(x)
        return x


class FrameEmbedding(nn.Module):
    """[sinusoidal frame index | pooled prompt] -> MLP (last layer zero-initialised) -> [(b f), emb_dim].

    With ``text_dim`` > 0 the frame code is a function of the frame's place *and* the prompt together: where a
    frame's content sits ("frame 0 of 'moving right' is on the left") depends on both, a product that a sum of a
    frame embedding and a text embedding passed through one SiLU expresses poorly.
    """

    def __init__(self, channels: int, emb_dim: int, text_dim: int = 0):
        super().__init__()
        self.channels, self.text_dim = channels, text_dim
        self.net = nn.Sequential(
            nn.Linear(channels + text_dim, emb_dim),
            nn.SiLU(),
            nn.Linear(emb_dim, emb_dim),
            nn.SiLU(),
            _zero_(nn.Linear(emb_dim, emb_dim)),
        )

    def forward(self, batch: int, num_frames: int, pooled_text: Tensor | None, dtype: torch.dtype) -> Tensor:
        # pooled_text [b, text_dim] (None without text) -> [(b f), emb_dim], frames of a clip consecutive
        device = self.net[0].weight.device
        index = timestep_embedding(torch.arange(num_frames, device=device), self.channels).to(dtype)  # [f, C]
        if not self.text_dim:
            return self.net(index).repeat(batch, 1)
        inputs = torch.cat([index.repeat(batch, 1), pooled_text.to(dtype).repeat_interleave(num_frames, 0)], dim=1)
        return self.net(inputs)  # [(b f), E]


def coordinate_planes(b: int, f: int, h: int, w: int, like: Tensor) -> Tensor:
    """[b, 2, f, h, w]: x and y of each pixel centre in [-1, 1] (CoordConv, Liu et al. 2018, arXiv 1807.03247)."""
    ys = torch.linspace(-1, 1, h, device=like.device, dtype=like.dtype)
    xs = torch.linspace(-1, 1, w, device=like.device, dtype=like.dtype)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")  # [h, w] each
    return torch.stack([grid_x, grid_y])[None, :, None].expand(b, 2, f, h, w)


TEMPORAL_MODULES = (TemporalConvBlock, TemporalTransformer, FrameEmbedding)


# ---------------------------------------------------------------------------------------------------------------


class UNet3D(nn.Module):
    """``forward(x [b, c, f, h, w], timesteps [b], context, image_embedding, concat) -> [b, out, f, h, w]``."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        self.gradient_checkpointing = cfg.gradient_checkpointing
        C, emb_dim, drop, groups = cfg.model_channels, cfg.model_channels * 4, cfg.dropout, cfg.num_groups

        def attention(width: int) -> list[nn.Module]:
            return [
                SpatialTransformer(width, width // cfg.head_dim, cfg.head_dim, cfg.context_dim, drop, groups),
                TemporalTransformer(width, width // cfg.temporal_head_dim, cfg.temporal_head_dim, drop, groups),
            ]

        self._add_embeddings(cfg, C, emb_dim)

        # Encoder. skip_channels records every activation the decoder will concatenate, in order.
        coords = 2 if cfg.coordinate_channels else 0
        first: list[nn.Module] = [nn.Conv2d(cfg.in_channels + cfg.extra_in_channels + coords, C, 3, padding=1)]
        if cfg.temporal_attention_after_input:
            first.append(TemporalTransformer(C, cfg.temporal_heads, cfg.temporal_head_dim, drop, groups))
        self.input_blocks = nn.ModuleList([Block(first)])
        skip_channels, ch = [C], C
        for level, mult in enumerate(cfg.channel_mult):
            width = C * mult
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, width, emb_dim, drop, groups)]
                if level in cfg.attention_levels:
                    layers += attention(width)
                self.input_blocks.append(Block(layers))
                ch = width
                skip_channels.append(ch)
            if level != cfg.num_levels - 1:
                self.input_blocks.append(Downsample(ch))  # bare module: released key "input_blocks.N.op.weight"
                skip_channels.append(ch)

        self.middle_block = Block(
            [ResBlock(ch, ch, emb_dim, drop, groups), *attention(ch), ResBlock(ch, ch, emb_dim, drop, groups)]
        )

        # Decoder: one more ResBlock per level than the encoder, each eating one skip activation.
        self.output_blocks = nn.ModuleList()
        for level in reversed(range(cfg.num_levels)):
            width = C * cfg.channel_mult[level]
            for j in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), width, emb_dim, drop, groups)]
                if level in cfg.attention_levels:
                    layers += attention(width)
                ch = width
                if level != 0 and j == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(Block(layers))

        self.out = nn.Sequential(
            nn.GroupNorm(groups, ch), nn.SiLU(), _zero_(nn.Conv2d(ch, cfg.out_channels, 3, padding=1))
        )

    # -- parameters -----------------------------------------------------------------------------------------------

    def named_temporal_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Temporal conv blocks and temporal transformers: what image (f == 1) batches never touch."""
        for prefix, module in self.named_modules():
            if isinstance(module, TEMPORAL_MODULES):
                for name, p in module.named_parameters():
                    yield f"{prefix}.{name}", p

    def temporal_parameters(self) -> Iterator[nn.Parameter]:
        for _, p in self.named_temporal_parameters():
            yield p

    def spatial_parameters(self) -> Iterator[nn.Parameter]:
        """Everything else: the Stable-Diffusion-like image layers, time embedding and image-condition MLP."""
        temporal = {id(p) for p in self.temporal_parameters()}
        for p in self.parameters():
            if id(p) not in temporal:
                yield p

    def parameter_counts(self) -> dict[str, int]:
        temporal = sum(p.numel() for p in self.temporal_parameters())
        total = sum(p.numel() for p in self.parameters())
        return {"total": total, "temporal": temporal, "spatial": total - temporal}

    def _add_embeddings(self, cfg: UNetConfig, C: int, emb_dim: int) -> None:
        """The timestep embedding and the optional condition paths into it and into the context (shared with the
        STUNet, whose names and init must match for released and image weights to load)."""
        self.time_embed = nn.Sequential(nn.Linear(C, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.condition_encoder = ConditionEncoder(cfg.conditions) if cfg.conditions.kinds else None
        if cfg.image_embed_dim:
            self.pre_image_condition = nn.Sequential(
                nn.Linear(cfg.image_embed_dim, cfg.context_dim),
                nn.SiLU(),
                nn.Linear(cfg.context_dim, cfg.context_dim * cfg.num_image_tokens),
            )
        if cfg.pooled_text_embedding:
            self.text_embed = nn.Sequential(
                nn.Linear(cfg.context_dim, emb_dim), nn.SiLU(), _zero_(nn.Linear(emb_dim, emb_dim))
            )
        if cfg.frame_embedding:
            self.frame_embed = FrameEmbedding(C, emb_dim, cfg.context_dim if cfg.pooled_text_embedding else 0)
        if cfg.use_fps_condition:  # zero last layer: an added fps condition starts as a no-op on loaded weights
            self.fps_embedding = nn.Sequential(nn.Linear(C, emb_dim), nn.SiLU(), _zero_(nn.Linear(emb_dim, emb_dim)))

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
        """x [b, in, f, h, w]; timesteps [b] (or a scalar for all); context [b, n, context_dim] text tokens or None
        (zeros); image_embedding [b, image_embed_dim] or None (no image tokens at all, as the released TF-T2V
        network is called for text-to-video); image_keep [b] 0/1 multiplies each sample's image tokens (training's
        per-sample image dropout: a dropped sample sees zero tokens, as VGen's ``misc_dropout`` leaves it);
        concat [b, extra_in, f, h, w] or None (zeros); fps [b] or a scalar, the clip frame rate (needed with
        unet.use_fps_condition, refused without); conditions {kind: [b, c, f or 1, H, W]} (any subset of
        unet.conditions.kinds, see model/conditions.py) and condition_keep [b, kinds] 0/1 (training's dropout).
        Returns [b, out, f, h, w]. With f == 1 every temporal layer is skipped (image mode)."""
        b, _, f, h, w = self._check_x(x)
        t = self._check_timesteps(timesteps, b, x.device)
        inputs = [x]
        if self.cfg.coordinate_channels:
            inputs.append(coordinate_planes(b, f, h, w, x))  # [b, 2, f, h, w]
        if conditions:
            concat = self.condition_input(concat, conditions, condition_keep, x)
        if self.cfg.extra_in_channels:  # last, so pad_input_channels can append concat slots to a checkpoint
            inputs.append(self._check_concat(concat, x))  # [b, extra, f, h, w]
        elif concat is not None:
            raise ValueError(
                "UNet3D: got concat but this UNet has no extra input channels "
                "(unet.extra_in_channels=0); set extra_in_channels to the concat channel count"
            )
        x = torch.cat(inputs, dim=1) if len(inputs) > 1 else x  # [b, in (+ 2) (+ extra), f, h, w]
        n_text = context.shape[1] if context is not None else self.cfg.num_text_tokens
        context = self._build_context(context, image_embedding, image_keep, b, x)  # [b, n, context_dim]

        emb = self.time_embed(timestep_embedding(t, self.cfg.model_channels).to(self.time_embed[0].weight.dtype))
        pooled = context[:, :n_text].mean(dim=1)  # [b, context_dim] the text tokens only
        if self.cfg.pooled_text_embedding:
            emb = emb + self.text_embed(pooled)
        if self.cfg.use_fps_condition:
            if fps is None:
                raise ValueError(
                    "UNet3D: this UNet is fps-conditioned (unet.use_fps_condition); pass fps=[b] or a number"
                )
            fps_t = torch.as_tensor(fps, device=x.device, dtype=torch.float32)
            if fps_t.ndim == 0:
                fps_t = fps_t.expand(b)
            elif fps_t.shape != (b,):
                raise ValueError(f"UNet3D: fps must be [{b}] (one per sample) or a number, got {tuple(fps_t.shape)}")
            emb = emb + self.fps_embedding(timestep_embedding(fps_t, self.cfg.model_channels).to(emb.dtype))
        elif fps is not None:
            raise ValueError("UNet3D: got fps but unet.use_fps_condition is off; set it, or pass no fps")
        emb = emb.repeat_interleave(f, dim=0)  # [(b f), 4C]
        if self.cfg.frame_embedding and f > 1:
            emb = emb + self.frame_embed(b, f, pooled, emb.dtype)  # frame index (with the prompt)
        context = context.repeat_interleave(f, dim=0)  # [(b f), n, context_dim]
        x = x.transpose(1, 2).reshape(b * f, -1, h, w)  # [(b f), c, h, w]

        skips = []
        for block in self.input_blocks:
            x = self._run(block, x, emb, context, f)
            skips.append(x)
        x = self._run(self.middle_block, x, emb, context, f)
        for block in self.output_blocks:
            x = self._run(block, torch.cat([x, skips.pop()], dim=1), emb, context, f)
        x = self.out(x)  # [(b f), out, h, w]
        return x.reshape(b, f, -1, h, w).transpose(1, 2)  # [b, out, f, h, w]

    def _run(self, block: nn.Module, x: Tensor, emb: Tensor, context: Tensor, f: int) -> Tensor:
        if not isinstance(block, Block):
            return block(x)
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, emb, context, f, use_reentrant=False)
        return block(x, emb, context, f)

    # -- input checks: say what is wrong and what was expected ----------------------------------------------------

    def _check_x(self, x: Tensor) -> tuple[int, int, int, int, int]:
        cfg = self.cfg
        if not isinstance(x, Tensor) or x.ndim != 5:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"UNet3D: x must be a video tensor [b, c, f, h, w], got {shape}; "
                "pass images as 1-frame videos, e.g. images[:, :, None]"
            )
        b, c, f, h, w = x.shape
        if c != cfg.in_channels:
            raise ValueError(
                f"UNet3D: x has {c} channels but unet.in_channels={cfg.in_channels}; "
                "pass the conditioning channels separately as concat="
            )
        k = cfg.downsample_factor
        if h % k or w % k:
            raise ValueError(
                f"UNet3D: height and width must be multiples of {k} for {cfg.num_levels} levels, got {h}x{w}"
            )
        return b, c, f, h, w

    @staticmethod
    def _check_timesteps(timesteps: Tensor | float | int, b: int, device: torch.device) -> Tensor:
        t = torch.as_tensor(timesteps, device=device)
        if t.ndim == 0:
            return t.expand(b)
        if t.shape != (b,):
            raise ValueError(
                f"UNet3D: timesteps must have shape [{b}] (one per sample) or be a scalar, got {tuple(t.shape)}"
            )
        return t

    def condition_input(
        self, concat: Tensor | None, conditions: dict[str, Tensor], keep: Tensor | None, x: Tensor
    ) -> Tensor | None:
        """``concat`` (zeros when None) with the encoded conditions added into its last ``conditions.out_channels``
        slots, for an input shaped like ``x`` [b, in, f, h, w]. Sampling computes it once for all steps."""
        if self.condition_encoder is None:
            raise ValueError(
                f"UNet3D: got conditions {sorted(conditions)} but this model has no condition encoder "
                "(unet.conditions.kinds is empty); train a model with unet.conditions.kinds set"
            )
        features = self.condition_encoder(conditions, x.shape[2], keep)
        if features is None:
            return concat
        if features.shape[-2:] != x.shape[-2:]:
            d = self.cfg.conditions.downsample
            raise ValueError(
                f"UNet3D: conditions of {features.shape[-2] * d}x{features.shape[-1] * d} pixels give "
                f"{features.shape[-2]}x{features.shape[-1]} features for a {x.shape[-2]}x{x.shape[-1]} input; "
                f"give conditions of {x.shape[-2] * d}x{x.shape[-1] * d} pixels (unet.conditions.downsample={d})"
            )
        concat = self._check_concat(concat, x)
        n = features.shape[1]
        return torch.cat([concat[:, : concat.shape[1] - n], concat[:, concat.shape[1] - n :] + features.to(x.dtype)], 1)

    def _check_concat(self, concat: Tensor | None, x: Tensor) -> Tensor:
        b, _, f, h, w = x.shape
        want = (b, self.cfg.extra_in_channels, f, h, w)
        if concat is None:
            return x.new_zeros(want)
        if tuple(concat.shape) != want:
            raise ValueError(
                f"UNet3D: concat must have shape {list(want)} ([b, extra_in_channels, f, h, w]), "
                f"got {list(concat.shape)}"
            )
        return concat.to(x.dtype)

    def _build_context(
        self, context: Tensor | None, image_embedding: Tensor | None, image_keep: Tensor | None, b: int, x: Tensor
    ) -> Tensor:
        cfg = self.cfg
        if context is None:
            context = x.new_zeros(b, cfg.num_text_tokens, cfg.context_dim)
        elif context.ndim != 3 or context.shape[0] != b or context.shape[2] != cfg.context_dim:
            raise ValueError(
                f"UNet3D: context must be [b={b}, n_tokens, context_dim={cfg.context_dim}], "
                f"got {list(context.shape)}; check the text encoder width and batch size"
            )
        context = context.to(x.dtype)
        if not cfg.image_embed_dim:
            if image_embedding is not None:
                raise ValueError(
                    "UNet3D: got image_embedding but this UNet has no image condition "
                    "(unet.image_embed_dim=0); set image_embed_dim to the CLIP embedding width"
                )
            return context
        if image_embedding is None:
            if image_keep is not None:
                raise ValueError("UNet3D: image_keep without image_embedding; pass both or neither")
            return context  # no image tokens: what the released network sees for text-to-video
        if tuple(image_embedding.shape) != (b, cfg.image_embed_dim):
            raise ValueError(
                f"UNet3D: image_embedding must be [b={b}, image_embed_dim={cfg.image_embed_dim}], "
                f"got {list(image_embedding.shape)}"
            )
        tokens = self.pre_image_condition(image_embedding.to(x.dtype))
        tokens = tokens.view(b, cfg.num_image_tokens, cfg.context_dim)  # [b, 4, context_dim]
        if image_keep is not None:
            if tuple(image_keep.shape) != (b,):
                raise ValueError(f"UNet3D: image_keep must be [b={b}] (1 keeps, 0 drops), got {list(image_keep.shape)}")
            tokens = tokens * image_keep.to(tokens)[:, None, None]
        return torch.cat([context, tokens], dim=1)  # text tokens first, then image tokens


def build_unet(cfg: UNetConfig, device: str | torch.device | None = None) -> UNet3D:
    """``UNet3D(cfg)``, optionally straight on ``device`` ("meta" builds a shape-only model for counting)."""
    if not isinstance(cfg, UNetConfig):
        raise ConfigError(f"build_unet: expected a UNetConfig, got {type(cfg).__name__}")
    if device is None:
        return UNet3D(cfg)
    with torch.device(device):
        return UNet3D(cfg)


__all__ = ["UNetConfig", "UNet3D", "build_unet", "timestep_embedding", "TEMPORAL_MODULES"]
