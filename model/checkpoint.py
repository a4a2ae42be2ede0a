"""Load and save UNet weights in the released ModelScope / TF-T2V formats, from local files only.

Accepted files (all read with ``torch.load(weights_only=True)``, or safetensors):

- ModelScopeT2V ``text2video_pytorch_model.pth``: a plain UNet state dict with ModelScope key names;
- TF-T2V checkpoints: ``{"state_dict": <UNet state dict>, "step": int}``;
- this project's ``TextToVideo`` file (``{"format": "t2v-platform/1", "unet": ..., "step": ...}``);
- any of these whose keys carry a ``module.`` (DDP / DeepSpeed) or ``model.diffusion_model.`` (LDM) prefix.

A load either fits the model exactly or fails with a ``CheckpointError`` that names the missing keys, the
unexpected keys and every shape mismatch, and says what to change. Two deliberate exceptions: ``allow_missing``
names key prefixes the caller expects to be new (e.g. ``pre_image_condition.`` when a TF-T2V model starts from
ModelScope weights), and ``pad_input_channels`` zero-pads a checkpoint's input convolution when the model has
extra concat input channels (VideoComposer-style conditions start switched off).

    unet = UNet3D(get_config("modelscope-1.7b").unet)
    report = load_unet_weights(unet, "text2video_pytorch_model.pth", allow_missing=NEW_IN_TFT2V)
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

# Keys a TF-T2V UNet has and the released ModelScope UNet lacks: pass as allow_missing to start from ModelScope.
NEW_IN_TFT2V = ("pre_image_condition.",)
INPUT_CONV_KEY = "input_blocks.0.0.weight"
_PREFIXES = ("module.", "model.diffusion_model.", "_orig_mod.")
_SHOW = 12  # keys listed per category in an error message


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not fit the model; the message says what differs and what to do."""


@dataclass
class LoadReport:
    """What a load did: the step stored in the file (if any), keys left at init, and adapted tensors."""

    path: str
    step: int | None = None
    missing_allowed: list[str] = field(default_factory=list)
    padded: list[str] = field(default_factory=list)


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, Tensor], int | None]:
    """Read a UNet state dict and the training step (None if the file has none) from a local file."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(
            f"checkpoint {str(p)!r} does not exist; pass the local path of a .pth/.pt/.safetensors "
            "file (nothing is downloaded)"
        )
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        obj: Any = load_file(str(p))
    else:
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle errors, truncated files, non-tensor objects
            raise CheckpointError(load_failure(p, e)) from None
    return unwrap_state_dict(obj, where=str(p))


def load_failure(path: str | os.PathLike, error: Exception) -> str:
    """What to tell a user whose file ``torch.load(weights_only=True)`` could not read."""
    text = str(error)
    first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    where = f"cannot read checkpoint {str(path)!r} with torch.load(weights_only=True)"
    if "Unsupported global" in text:
        found = [line.strip() for line in text.splitlines() if "Unsupported global" in line]
        return (
            f"{where}: it holds pickled Python objects that a weights-only load refuses to run "
            f"({found[0].split(' was not')[0]}); only tensors and plain containers load. Re-save just the "
            "state dict (torch.save(model.state_dict(), path)) on a machine that trusts the file"
        )
    if "central directory" in text or "zip archive" in text or isinstance(error, EOFError):
        return f"{where}: the file is truncated or damaged ({first.split('. ')[0]}); copy it again"
    if "Unsupported operand" in text or "invalid load key" in text:
        return f"{where}: the file is not a PyTorch checkpoint (pass a .pth/.pt/.ckpt written by torch.save)"
    return f"{where}: not a PyTorch checkpoint ({first})"


def unwrap_state_dict(obj: Any, where: str = "checkpoint") -> tuple[dict[str, Tensor], int | None]:
    """Find the UNet state dict inside any of the accepted container formats; strip wrapper prefixes."""
    step = None
    if isinstance(obj, Mapping) and "format" in obj and "unet" in obj:  # this project's TextToVideo file
        obj, step = obj["unet"], obj.get("step")
    elif isinstance(obj, Mapping) and "state_dict" in obj:  # TF-T2V {'state_dict', 'step'}
        obj, step = obj["state_dict"], obj.get("step")
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(
            f"{where}: expected a UNet state dict (or {{'state_dict': ..., 'step': ...}}), "
            f"got {type(obj).__name__}{' (empty)' if isinstance(obj, Mapping) else ''}"
        )
    bad = [k for k, v in obj.items() if not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(f"{where}: entries {bad[:_SHOW]} are not tensors; this does not look like a state dict")
    state = dict(obj)
    for prefix in _PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state, (int(step) if step is not None else None)


def state_dict_of(source) -> tuple[dict, int | None, str]:
    """``(state dict, training step or None, where it came from)`` of a file path or an in-memory state dict."""
    if isinstance(source, Mapping):
        return (*unwrap_state_dict(source), "state dict")
    return (*read_state_dict(source), str(source))


def load_unet_weights(
    model: nn.Module,
    source: str | os.PathLike | Mapping[str, Tensor],
    *,
    allow_missing: Iterable[str] = (),
    pad_input_channels: bool = False,
) -> LoadReport:
    """Copy weights from a file path or state dict into ``model``; raise CheckpointError unless they fit."""
    state, step, where = state_dict_of(source)
    report = LoadReport(path=where, step=step)
    own = model.state_dict()
    allow = tuple(allow_missing)

    if pad_input_channels and INPUT_CONV_KEY in state and INPUT_CONV_KEY in own:
        state = dict(state)
        src, dst = state[INPUT_CONV_KEY], own[INPUT_CONV_KEY]
        same_but_fewer_inputs = (
            src.ndim == 4
            and src.shape[1] < dst.shape[1]
            and src.shape[0] == dst.shape[0]
            and src.shape[2:] == dst.shape[2:]
        )
        if same_but_fewer_inputs:
            # The checkpoint's input channels come first (x, then concat), so the new concat slots start at zero.
            padded = src.new_zeros(dst.shape)
            padded[:, : src.shape[1]] = src
            state[INPUT_CONV_KEY] = padded
            report.padded.append(INPUT_CONV_KEY)

    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        (k, tuple(state[k].shape), tuple(own[k].shape)) for k in own if k in state and state[k].shape != own[k].shape
    ]
    hard_missing = [k for k in missing if not k.startswith(allow)] if allow else missing
    report.missing_allowed = [k for k in missing if k not in hard_missing]
    if hard_missing or unexpected or mismatched:
        raise CheckpointError(_explain(where, hard_missing, unexpected, mismatched, state, own))
    # Every key was checked above; strict=False only lets the allowed-missing ones keep their initialisation.
    model.load_state_dict(state, strict=False)
    return report


def save_unet_weights(
    model_or_state: nn.Module | Mapping[str, Tensor], path: str | os.PathLike, step: int | None = None
) -> Path:
    """Write a ModelScope-style plain state dict, or TF-T2V's ``{'state_dict', 'step'}`` when ``step`` is given."""
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else dict(model_or_state)
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    torch.save(state if step is None else {"state_dict": state, "step": int(step)}, tmp)
    fd = os.open(tmp, os.O_RDONLY)  # on disk before the rename, so a power cut cannot leave an empty file
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, p)  # a crash mid-write never leaves a truncated checkpoint under the final name
    return p


def _explain(
    where: str,
    missing: list[str],
    unexpected: list[str],
    mismatched: list[tuple[str, tuple, tuple]],
    state: Mapping[str, Tensor],
    own: Mapping[str, Tensor],
) -> str:
    lines = [f"checkpoint {where} does not fit this UNet:"]
    if missing:
        lines.append(f"- {len(missing)} missing key(s) (in the model, not in the checkpoint): {_list(missing)}")
    if unexpected:
        lines.append(
            f"- {len(unexpected)} unexpected key(s) (in the checkpoint, not in the model): {_list(unexpected)}"
        )
    if mismatched:
        shown = ", ".join(f"{k}: checkpoint {list(a)} vs model {list(b)}" for k, a, b in mismatched[:_SHOW])
        more = f" (+{len(mismatched) - _SHOW} more)" if len(mismatched) > _SHOW else ""
        lines.append(f"- {len(mismatched)} shape mismatch(es): {shown}{more}")
    lines.append("hint: " + _hint(missing, unexpected, mismatched, state, own))
    return "\n".join(lines)


def _hint(missing, unexpected, mismatched, state, own) -> str:
    if any(k.startswith(("down_blocks.", "conv_in.", "mid_block.")) for k in unexpected):
        return (
            "the checkpoint uses diffusers UNet3DConditionModel names; convert it first with "
            "model.convert.diffusers_to_modelscope(state, unet_config)"
        )
    if missing and all(k.startswith(NEW_IN_TFT2V) for k in missing):
        return (
            "only the TF-T2V image-condition MLP is missing (a ModelScope checkpoint): pass "
            "allow_missing=NEW_IN_TFT2V to start it from its initialisation, or set unet.image_embed_dim=0"
        )
    if any(k.startswith(NEW_IN_TFT2V) for k in unexpected):
        return (
            "the checkpoint has an image-condition MLP: set unet.image_embed_dim to its input width (1024 for ViT-H-14)"
        )
    for k, a, b in mismatched:
        if k == INPUT_CONV_KEY:
            return (
                f"input conv takes {a[1]} channels in the checkpoint and {b[1]} in the model: "
                "set unet.in_channels + unet.extra_in_channels to match, or pass pad_input_channels=True "
                "to start extra concat channels at zero"
            )
        if k.startswith("out."):
            return f"output channels differ: set unet.out_channels={a[0]}"
    return (
        "the architecture differs: check unet.model_channels, channel_mult, num_res_blocks, attention_levels, "
        "head_dim, context_dim and temporal_attention_after_input against the checkpoint's model config"
    )


def _list(keys: list[str]) -> str:
    more = f" ... (+{len(keys) - _SHOW} more)" if len(keys) > _SHOW else ""
    return ", ".join(keys[:_SHOW]) + more
