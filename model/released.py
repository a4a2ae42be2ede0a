"""Start from released weights: ModelScopeT2V, TF-T2V and Stable Diffusion 2.x image UNets (local files only).

    unet = build_unet(get_config("tf-t2v").unet)
    load_released(unet, "tft2v_t2v_non_ema_512000.pth", "tf-t2v")       # strict: every key, every shape
    unet = build_unet(get_config("modelscope-1.7b").unet)
    inflate_image_unet(unet, read_image_unet("stable-diffusion-2-1-base/unet", unet.cfg))  # SD 2.x -> video

A released file must fit its config exactly; when it does not, the error names the registry config whose layout
(key set) the file has, so a TF-T2V file offered as ModelScope says "tf-t2v" and the other way round.

Inflation follows ModelScopeT2V's own start: every spatial layer (ResBlocks, spatial transformers, resampling,
time embedding, input and output convs) comes from the image UNet, and every temporal layer keeps its
initialisation, whose last projection is zero, so the video UNet computes the image UNet frame by frame. The image
UNet is an original LDM checkpoint (``model.diffusion_model.*`` keys, optionally inside ``state_dict``) or a
diffusers ``UNet2DConditionModel`` folder; input channels the image UNet lacks (TF-T2V's 8 concat slots) start
at zero, and layers it has no counterpart for (the image-condition MLP) keep their initialisation.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from model.checkpoint import (
    INPUT_CONV_KEY,
    CheckpointError,
    LoadReport,
    load_unet_weights,
    read_state_dict,
    state_dict_of,
    unwrap_state_dict,
)
from model.unet import TemporalTransformer, UNet3D, UNetConfig, build_unet

# Which registry config each released file is (``t2v import --from`` names).
RELEASED_CONFIGS = {"modelscope": "modelscope-1.7b", "tf-t2v": "tf-t2v"}
# What an inflated image UNet may leave at initialisation besides the temporal layers.
NEW_IN_VIDEO = ("pre_image_condition.", "text_embed.", "frame_embed.")
_LDM_PREFIX = "model.diffusion_model."


@functools.cache
def _layout(name: str) -> frozenset[str]:
    from model.registry import get_config

    return frozenset(build_unet(get_config(name).unet, "meta").state_dict())


def layout_names(state: Mapping[str, Tensor]) -> list[str]:
    """Registry configs whose UNet has exactly the keys of ``state`` (widths aside): the layouts it fits."""
    from model.registry import MODEL_CONFIGS

    keys = frozenset(state)
    return [name for name in MODEL_CONFIGS if _layout(name) == keys]


def load_released(
    unet: UNet3D, source: str | os.PathLike | Mapping[str, Tensor], config_name: str | None = None
) -> LoadReport:
    """Strictly load a released UNet file (``{'state_dict', 'step'}`` or a bare state dict) into ``unet``.

    No missing, unexpected or mis-shaped key is allowed; when the file has another registry config's layout the
    error names that config."""
    state, step, where = state_dict_of(source)
    try:
        report = load_unet_weights(unet, state)
    except CheckpointError as e:
        fits = [n for n in layout_names(state) if n != config_name]
        if fits:
            raise CheckpointError(
                f"{where} has the layout of config {' / '.join(repr(n) for n in fits)}, not "
                f"{config_name!r}: load it with that config (t2v import --from "
                f"{_from_name(fits[0])} / --set model={fits[0]})\n{e}"
            ) from None
        raise CheckpointError(str(e).replace("checkpoint state dict", f"checkpoint {where}", 1)) from None
    report.path, report.step = where, step
    return report


def _from_name(config_name: str) -> str:
    return next((k for k, v in RELEASED_CONFIGS.items() if v == config_name), config_name)


# ---------------------------------------------------------------------------------------------------------------
# Stable Diffusion 2.x inflation


def ldm_to_ours(cfg: UNetConfig) -> dict[str, str]:
    """Our module prefix -> the LDM image UNet's, for every spatial module of a UNet3D built from ``cfg``.

    Our blocks are the LDM blocks with temporal transformers inserted, so a block's LDM index counts only its
    spatial layers (``middle_block.3`` is LDM ``middle_block.2``; an upsample after attention is ``.3`` here and
    ``.2`` there)."""
    unet = build_unet(cfg, "meta")
    table = {
        "time_embed.0": "time_embed.0",
        "time_embed.2": "time_embed.2",
        "out.0": "out.0",
        "out.2": "out.2",
    }
    groups = [(f"input_blocks.{n}", b) for n, b in enumerate(unet.input_blocks)]
    groups += [("middle_block", unet.middle_block)]
    groups += [(f"output_blocks.{n}", b) for n, b in enumerate(unet.output_blocks)]
    for prefix, block in groups:
        if not isinstance(block, torch.nn.ModuleList):  # a bare Downsample: input_blocks.N.op
            table[f"{prefix}.op"] = f"{prefix}.op"
            continue
        j = 0
        for i, layer in enumerate(block):
            if isinstance(layer, TemporalTransformer):
                continue
            table[f"{prefix}.{i}"] = f"{prefix}.{j}"
            j += 1
    return table


def _spatial_keys(cfg: UNetConfig) -> list[str]:
    unet = build_unet(cfg, "meta")
    temporal = {name for name, _ in unet.named_temporal_parameters()}
    return [k for k in unet.state_dict() if k not in temporal and not k.startswith(NEW_IN_VIDEO)]


def image_unet_to_ours(ldm_state: Mapping[str, Tensor], cfg: UNetConfig) -> dict[str, Tensor]:
    """An LDM-named image UNet state dict -> our names for the spatial layers of ``cfg``'s video UNet."""
    table = ldm_to_ours(cfg)
    ours_by_ldm = {v: k for k, v in table.items()}
    out: dict[str, Tensor] = {}
    unmapped = []
    for key, value in ldm_state.items():
        parts = key.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            head = ".".join(parts[:cut])
            if head in ours_by_ldm:
                name = f"{ours_by_ldm[head]}.{'.'.join(parts[cut:])}"
                if name.endswith(("proj_in.weight", "proj_out.weight")) and value.ndim == 4:
                    value = value[:, :, 0, 0]  # SD 1.x 1x1-conv projections -> SD 2.x / our Linear
                out[name] = value
                break
        else:
            unmapped.append(key)
    if unmapped:
        raise CheckpointError(
            f"{len(unmapped)} image-UNet key(s) have no place in this video UNet: {', '.join(unmapped[:12])}; "
            "the image UNet's levels, blocks or attention levels differ from the config's (SD 2.x fits "
            "modelscope-1.7b: attention at levels 0-2)"
        )
    return out


def read_image_unet(path: str | os.PathLike, cfg: UNetConfig) -> dict[str, Tensor]:
    """Read a local SD image UNet (diffusers folder, or original LDM .ckpt/.safetensors) -> our-named spatial
    weights for ``cfg``."""
    p = Path(path)
    if p.is_dir():
        return _diffusers_image_unet(p, cfg)
    if p.suffix == ".safetensors" and p.is_file():
        from safetensors.torch import load_file

        obj = load_file(str(p))
    elif p.is_file():
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(
                f"cannot read image UNet {str(p)!r} with torch.load(weights_only=True): {e}"
            ) from None
    else:
        raise CheckpointError(f"image UNet {str(p)!r} does not exist: pass a diffusers UNet folder or an LDM .ckpt")
    if isinstance(obj, Mapping) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{p}: expected an LDM checkpoint (a state dict), got {type(obj).__name__}")
    state = {k[len(_LDM_PREFIX) :]: v for k, v in obj.items() if k.startswith(_LDM_PREFIX)}
    if not state:
        state, _ = unwrap_state_dict(obj, where=str(p))  # a bare image UNet state dict
    return image_unet_to_ours(state, cfg)


def _diffusers_image_unet(folder: Path, cfg: UNetConfig) -> dict[str, Tensor]:
    from model.convert import ConversionError, diffusers_to_modelscope

    config_file = folder / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{folder} has no config.json: pass a diffusers UNet folder (e.g. .../unet)")
    kind = json.loads(config_file.read_text(encoding="utf-8")).get("_class_name")
    if kind != "UNet2DConditionModel":
        raise CheckpointError(f"{folder} holds a {kind}, not a UNet2DConditionModel (a Stable Diffusion UNet)")
    from diffusers import UNet2DConditionModel

    model = UNet2DConditionModel.from_pretrained(str(folder))
    # diffusers names the spatial modules of its 2D and 3D UNets alike, so the 3D table converts them.
    try:
        return diffusers_to_modelscope(model.state_dict(), cfg)
    except ConversionError as e:
        raise CheckpointError(f"{folder}: {e}") from None


def inflate_image_unet(unet: UNet3D, spatial: Mapping[str, Tensor]) -> LoadReport:
    """Fill every spatial layer of ``unet`` from our-named image-UNet weights; temporal layers keep their init.

    Every spatial key must be present with its shape (the input conv may have fewer input channels: the extra
    concat slots start at zero); a key the video UNet lacks is an error."""
    spatial_keys = set(_spatial_keys(unet.cfg))
    missing = sorted(spatial_keys - set(spatial))
    unexpected = sorted(set(spatial) - spatial_keys)
    if missing or unexpected:
        raise CheckpointError(
            "the image UNet does not fill this video UNet's spatial layers: "
            f"{len(missing)} missing ({', '.join(missing[:8])}), {len(unexpected)} unexpected "
            f"({', '.join(unexpected[:8])}); check unet.model_channels, channel_mult, num_res_blocks, "
            "attention_levels and context_dim against the image UNet"
        )
    allow = tuple({k for k in unet.state_dict() if k not in spatial_keys})
    report = load_unet_weights(unet, dict(spatial), allow_missing=allow, pad_input_channels=True)
    if INPUT_CONV_KEY in report.padded:
        report.padded = [INPUT_CONV_KEY]
    return report


def init_unet_from(unet: UNet3D, path: str | os.PathLike) -> LoadReport:
    """Start ``unet`` from a local UNet file or folder (what ``t2v train --set init_from=`` takes besides a
    model.pt): a ModelScope / TF-T2V file (a ModelScope file leaves the image MLP at its initialisation, extra
    concat channels start at zero), a diffusers UNet3DConditionModel folder, or an SD image UNet (diffusers
    UNet2DConditionModel folder or LDM checkpoint), which is inflated."""
    from model.checkpoint import NEW_IN_TFT2V

    p = Path(path)
    if p.is_dir():
        kind = (
            json.loads((p / "config.json").read_text(encoding="utf-8")).get("_class_name")
            if (p / "config.json").is_file()
            else None
        )
        if kind == "UNet3DConditionModel":
            from diffusers import UNet3DConditionModel

            from model.convert import diffusers_to_modelscope

            state = diffusers_to_modelscope(UNet3DConditionModel.from_pretrained(str(p)).state_dict(), unet.cfg)
            return load_unet_weights(unet, state, allow_missing=NEW_IN_TFT2V, pad_input_channels=True)
        return inflate_image_unet(unet, read_image_unet(p, unet.cfg))
    try:
        return load_unet_weights(unet, p, allow_missing=NEW_IN_TFT2V, pad_input_channels=True)
    except CheckpointError as video_error:
        try:
            spatial = read_image_unet(p, unet.cfg)
        except CheckpointError:
            fits = _layouts_of_file(p)
            if fits:
                raise CheckpointError(
                    f"{p} has the layout of config {' / '.join(repr(n) for n in fits)}: train with model={fits[0]} "
                    f"(or start a config of that layout from it)\n{video_error}"
                ) from None
            raise video_error from None
        return inflate_image_unet(unet, spatial)


def _layouts_of_file(path: Path) -> list[str]:
    try:
        state, _ = read_state_dict(path)
    except CheckpointError:
        return []
    return layout_names(state)


__all__ = [
    "init_unet_from",
    "RELEASED_CONFIGS",
    "layout_names",
    "load_released",
    "ldm_to_ours",
    "image_unet_to_ours",
    "read_image_unet",
    "inflate_image_unet",
]
