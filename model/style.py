"""Stylised generation by weight interpolation (Lumiere, arXiv 2401.12945, sec. 4.1; shared REFERENCE.md): the
spatial (text-to-image) weights of a video model are blended with a fine-tuned style version of them,

    W = a * W_style + (1 - a) * W_orig        for every spatial weight; temporal layers stay as trained,

so the motion prior learnt on top of the original image model drives the styled appearance.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from model.checkpoint import CheckpointError, state_dict_of


def spatial_names(unet: nn.Module) -> list[str]:
    """The parameters of ``unet`` that are not temporal layers (``named_temporal_parameters``)."""
    temporal = {name for name, _ in unet.named_temporal_parameters()}
    return [name for name, _ in unet.named_parameters() if name not in temporal]


def blend_spatial(unet: nn.Module, style: Mapping[str, Tensor] | str, factor: float) -> list[str]:
    """Set every spatial weight of ``unet`` to ``factor * style + (1 - factor) * own`` in place; returns their names.

    ``style``: a state dict or file (a model.pt of the fine-tuned model, or a UNet state dict) in our key names. It
    must hold every spatial weight with its shape; temporal weights in it are ignored (they are not the style)."""
    if not 0.0 <= factor <= 1.0:
        raise ValueError(f"factor={factor}: must be within [0, 1] (0 keeps the model, 1 takes the style's weights)")
    state, _, where = state_dict_of(style)
    own = dict(unet.named_parameters())
    names = spatial_names(unet)
    missing = [n for n in names if n not in state]
    unknown = [k for k in state if k not in own and k not in dict(unet.named_buffers())]
    wrong = [
        f"{n} {tuple(state[n].shape)} vs {tuple(own[n].shape)}"
        for n in names
        if n in state and state[n].shape != own[n].shape
    ]
    if missing or unknown or wrong:
        raise CheckpointError(
            f"{where} is not a spatial weight set of this model: {len(missing)} spatial weights missing "
            f"({', '.join(missing[:4])}), {len(unknown)} unknown ({', '.join(unknown[:4])}), {len(wrong)} of another "
            f"shape ({', '.join(wrong[:4])}); fine-tune the style from this model (same config)"
        )
    with torch.no_grad():
        for n in names:
            own[n].lerp_(state[n].to(own[n]), factor)
    return names


__all__ = ["blend_spatial", "spatial_names"]
