"""Convert UNet weights between the ModelScope key names (ours) and diffusers' ``UNet3DConditionModel``.

The two are the same network (diffusers ported ModelScopeT2V) under different names:

    ModelScope (ours)                        diffusers
    time_embed.0 / .2                        time_embedding.linear_1 / linear_2
    input_blocks.0.0 / input_blocks.0.1      conv_in / transformer_in
    input_blocks.N.0 (.temopral_conv)        down_blocks.L.resnets.J (down_blocks.L.temp_convs.J)
    input_blocks.N.1 / input_blocks.N.2      down_blocks.L.attentions.J / down_blocks.L.temp_attentions.J
    input_blocks.N.op                        down_blocks.L.downsamplers.0.conv
    middle_block.0 / 1 / 2 / 3               mid_block.resnets.0 / attentions.0 / temp_attentions.0 / resnets.1
    output_blocks.N.0 / .1 / .2              up_blocks.U.resnets.J / attentions.J / temp_attentions.J
    output_blocks.N.K.conv (K = 3 or 1)      up_blocks.U.upsamplers.0.conv
    out.0 / out.2                            conv_norm_out / conv_out

Inside a ResBlock ``in_layers.0/2, emb_layers.1, out_layers.0/3, skip_connection`` are ``norm1, conv1,
time_emb_proj, norm2, conv2, conv_shortcut``; temporal transformers store ``proj_in/proj_out`` as Conv1d
weights ``[out, in, 1]`` where diffusers has Linear ``[out, in]``. Everything else keeps its name. The table is
generated from a ``UNetConfig`` (which levels have attention, how many blocks), so any size converts.

diffusers has no TF-T2V image-condition MLP: a UNet with ``image_embed_dim > 0`` converts only with
``drop_image_condition=True``, and a UNet built from diffusers weights has ``image_embed_dim=0``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from model.unet import UNet3D, UNetConfig

RESNET_RENAMES = {  # ours -> diffusers, inside one ResBlock
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_RESNET_BACK = {v: k for k, v in RESNET_RENAMES.items()}
_CONV1D = ("proj_in.weight", "proj_out.weight")


class ConversionError(ValueError):
    """Weights or config that cannot be expressed in the other format; the message says why."""


def key_table(cfg: UNetConfig) -> list[tuple[str, str, str]]:
    """(our prefix, diffusers prefix, kind) for every module; kind is "same", "resnet" or "temporal"."""
    table = [
        ("time_embed.0", "time_embedding.linear_1", "same"),
        ("time_embed.2", "time_embedding.linear_2", "same"),
        ("input_blocks.0.0", "conv_in", "same"),
    ]
    if cfg.temporal_attention_after_input:
        table.append(("input_blocks.0.1", "transformer_in", "temporal"))

    def resnet(ours: str, theirs: str, temp_conv: str) -> None:
        table.extend([(ours, theirs, "resnet"), (f"{ours}.temopral_conv", temp_conv, "same")])

    def attention(ours: str, block: str, j: int) -> None:
        table.extend(
            [
                (f"{ours}.1", f"{block}.attentions.{j}", "same"),
                (f"{ours}.2", f"{block}.temp_attentions.{j}", "temporal"),
            ]
        )

    n = 1
    for level in range(cfg.num_levels):
        block = f"down_blocks.{level}"
        for j in range(cfg.num_res_blocks):
            resnet(f"input_blocks.{n}.0", f"{block}.resnets.{j}", f"{block}.temp_convs.{j}")
            if level in cfg.attention_levels:
                attention(f"input_blocks.{n}", block, j)
            n += 1
        if level != cfg.num_levels - 1:
            table.append((f"input_blocks.{n}.op", f"{block}.downsamplers.0.conv", "same"))
            n += 1

    resnet("middle_block.0", "mid_block.resnets.0", "mid_block.temp_convs.0")
    table.extend(
        [
            ("middle_block.1", "mid_block.attentions.0", "same"),
            ("middle_block.2", "mid_block.temp_attentions.0", "temporal"),
        ]
    )
    resnet("middle_block.3", "mid_block.resnets.1", "mid_block.temp_convs.1")

    n = 0
    for u, level in enumerate(reversed(range(cfg.num_levels))):
        block = f"up_blocks.{u}"
        for j in range(cfg.num_res_blocks + 1):
            resnet(f"output_blocks.{n}.0", f"{block}.resnets.{j}", f"{block}.temp_convs.{j}")
            upsample_index = 1
            if level in cfg.attention_levels:
                attention(f"output_blocks.{n}", block, j)
                upsample_index = 3
            if level != 0 and j == cfg.num_res_blocks:
                table.append((f"output_blocks.{n}.{upsample_index}.conv", f"{block}.upsamplers.0.conv", "same"))
            n += 1

    table.extend([("out.0", "conv_norm_out", "same"), ("out.2", "conv_out", "same")])
    return table


def modelscope_to_diffusers(
    state: Mapping[str, Tensor], cfg: UNetConfig, *, drop_image_condition: bool = False
) -> dict[str, Tensor]:
    """Our (ModelScope-named) UNet state dict -> a ``UNet3DConditionModel`` state dict."""
    image_keys = sorted(k for k in state if k.startswith("pre_image_condition."))
    if image_keys and not drop_image_condition:
        raise ConversionError(
            "diffusers' UNet3DConditionModel has no TF-T2V image-condition MLP "
            f"({', '.join(image_keys)}); pass drop_image_condition=True to leave it out"
        )
    table = {ours: (theirs, kind) for ours, theirs, kind in key_table(cfg)}
    out: dict[str, Tensor] = {}
    unmapped = []
    for key, value in state.items():
        if key in image_keys:
            continue
        hit = _lookup(key, table)
        if hit is None:
            unmapped.append(key)
            continue
        _, (theirs, kind), suffix = hit
        if kind == "resnet":
            suffix = _rename(suffix, RESNET_RENAMES)
        elif kind == "temporal" and suffix in _CONV1D:
            value = value.squeeze(-1)  # Conv1d [out, in, 1] -> Linear [out, in]
        out[f"{theirs}.{suffix}"] = value
    if unmapped:
        raise ConversionError(
            f"{len(unmapped)} key(s) do not belong to a UNet built from this config: "
            f"{', '.join(unmapped[:12])}; pass the UNetConfig the weights were trained with"
        )
    return out


def diffusers_to_modelscope(state: Mapping[str, Tensor], cfg: UNetConfig) -> dict[str, Tensor]:
    """A ``UNet3DConditionModel`` state dict -> our (ModelScope-named) UNet state dict."""
    table = {theirs: (ours, kind) for ours, theirs, kind in key_table(cfg)}
    out: dict[str, Tensor] = {}
    unmapped = []
    for key, value in state.items():
        hit = _lookup(key, table)
        if hit is None:
            unmapped.append(key)
            continue
        _, (ours, kind), suffix = hit
        if kind == "resnet":
            suffix = _rename(suffix, _RESNET_BACK)
        elif kind == "temporal" and suffix in _CONV1D:
            value = value.unsqueeze(-1)  # Linear [out, in] -> Conv1d [out, in, 1]
        out[f"{ours}.{suffix}"] = value
    if unmapped:
        raise ConversionError(
            f"{len(unmapped)} diffusers key(s) have no counterpart under this UNetConfig: "
            f"{', '.join(unmapped[:12])}; build the config with unet_config_from_diffusers()"
        )
    return out


def diffusers_config(cfg: UNetConfig) -> dict[str, Any]:
    """``UNet3DConditionModel(**diffusers_config(cfg))`` builds the same network (when diffusers can express it)."""
    problems = []
    if not cfg.temporal_attention_after_input:
        problems.append("temporal_attention_after_input must be True (diffusers always has transformer_in)")
    if cfg.temporal_heads != 8:
        problems.append(f"temporal_heads must be 8 (diffusers' transformer_in has 8 heads), got {cfg.temporal_heads}")
    if cfg.pooled_text_embedding or cfg.frame_embedding or cfg.coordinate_channels:
        problems.append(
            "pooled_text_embedding, frame_embedding and coordinate_channels must be False (diffusers has none of them)"
        )
    if cfg.temporal_head_dim != cfg.head_dim:
        problems.append(f"temporal_head_dim ({cfg.temporal_head_dim}) must equal head_dim ({cfg.head_dim})")
    if problems:
        raise ConversionError(
            "this UNetConfig has no diffusers UNet3DConditionModel equivalent: " + "; ".join(problems)
        )
    levels, attn = range(cfg.num_levels), cfg.attention_levels
    return {
        "in_channels": cfg.in_channels + cfg.extra_in_channels,
        "out_channels": cfg.out_channels,
        "down_block_types": tuple("CrossAttnDownBlock3D" if i in attn else "DownBlock3D" for i in levels),
        "up_block_types": tuple("CrossAttnUpBlock3D" if i in attn else "UpBlock3D" for i in reversed(levels)),
        "block_out_channels": tuple(cfg.model_channels * m for m in cfg.channel_mult),
        "layers_per_block": cfg.num_res_blocks,
        "norm_num_groups": cfg.num_groups,
        "cross_attention_dim": cfg.context_dim,
        # diffusers' "attention_head_dim" is the per-head width for 3D UNets (heads = width // it), as ours.
        "attention_head_dim": cfg.head_dim,
    }


def unet_config_from_diffusers(config: Mapping[str, Any], **overrides: Any) -> UNetConfig:
    """Our UNetConfig for a ``UNet3DConditionModel`` config (its ``.config`` or config.json contents)."""
    widths = list(config["block_out_channels"])
    base = widths[0]
    if any(w % base for w in widths):
        raise ConversionError(f"block_out_channels {widths} are not multiples of the first width {base}")
    head = config.get("attention_head_dim", 64)
    if not isinstance(head, int):
        raise ConversionError(f"attention_head_dim={head!r}: only one head width for all levels is supported")
    fields = dict(
        in_channels=config.get("in_channels", 4),
        out_channels=config.get("out_channels", 4),
        model_channels=base,
        channel_mult=tuple(w // base for w in widths),
        num_res_blocks=config.get("layers_per_block", 2),
        attention_levels=tuple(i for i, t in enumerate(config["down_block_types"]) if t.startswith("CrossAttn")),
        head_dim=head,
        temporal_heads=8,
        temporal_head_dim=head,
        context_dim=config.get("cross_attention_dim", 1024),
        image_embed_dim=0,
        num_groups=config.get("norm_num_groups", 32),
        temporal_attention_after_input=True,
    )
    fields.update(overrides)
    return UNetConfig(**fields)


def unet_from_diffusers(model: Any, **overrides: Any) -> UNet3D:
    """Our UNet3D with the weights of a diffusers ``UNet3DConditionModel`` instance."""
    from model.checkpoint import load_unet_weights

    cfg = unet_config_from_diffusers(dict(model.config), **overrides)
    unet = UNet3D(cfg)
    load_unet_weights(unet, diffusers_to_modelscope(model.state_dict(), cfg))
    return unet.train(model.training)


def unet_to_diffusers(unet: UNet3D, *, drop_image_condition: bool = False) -> Any:
    """A diffusers ``UNet3DConditionModel`` carrying this UNet's weights."""
    config = diffusers_config(unet.cfg)  # raises ConversionError before the import of diffusers (seconds)
    from diffusers import UNet3DConditionModel

    model = UNet3DConditionModel(**config)
    state = modelscope_to_diffusers(unet.state_dict(), unet.cfg, drop_image_condition=drop_image_condition)
    model.load_state_dict(state, strict=True)
    return model.train(unet.training)


def _lookup(key: str, table: Mapping[str, tuple[str, str]]):
    """Longest table prefix of ``key`` (whole dotted segments) -> (prefix, entry, rest of the key) or None."""
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in table:
            return prefix, table[prefix], ".".join(parts[i:])
    return None


def _rename(suffix: str, renames: Mapping[str, str]) -> str:
    for old, new in renames.items():
        if suffix == old or suffix.startswith(old + "."):
            return new + suffix[len(old) :]
    return suffix
