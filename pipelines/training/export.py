"""Consolidated model weights out of DeepSpeed training, written as TextToVideo checkpoints and diffusers folders.

    python -m pipelines.training.export --checkpoint runs/train/ray/train/step_00000400 --output runs/exported

During training (``worker.py``) every rank calls ``consolidated_state_dict(engine)``: under ZeRO-3
the parameters are partitioned across ranks and gathering them is a collective, one module at a time, so
all ranks must take part; under ZeRO 0-2 every rank already holds the full weights and rank 0 just copies them.
``write_models`` then writes, on rank 0:

    <dir>/model.pt            TextToVideo checkpoint (model/text_to_video.py format) of the raw weights: the
                              optimizer's fp32 master weights (``master_state_dict``), not a bf16 engine's copy
    <dir>/model_ema.pt        the same with the EMA weights (what generation should use)
    <dir>/diffusers/unet/     diffusers UNet3DConditionModel folder of the EMA weights (model/convert.py), when
                              the architecture has a diffusers equivalent (diffusers has no TF-T2V image MLP,
                              so the image condition is dropped there)

Offline (this module's ``main``) a DeepSpeed checkpoint directory reported by training is turned into the same
files without a running job: ZeRO 1-3 shards are merged to fp32 with DeepSpeed's zero_to_fp32 route, and the EMA
weights are added when the checkpoint holds them whole (ZeRO 0-2; under ZeRO-3 each rank stores only its EMA
partition, so offline export writes the raw weights only).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pipelines import durable, logs, settings

log = logging.getLogger(__name__)

DS_TAG = "ds"  # DeepSpeed checkpoint tag used by training
TRAIN_STATE_FILE = "train_state.json"


def worker_state_file(rank: int) -> str:
    return f"worker_rank{rank}.pt"


def master_state_dict(engine) -> dict[str, Tensor] | None:
    """The optimizer's fp32 master weights as a full UNet state dict on CPU on rank 0 (None on other ranks).

    A bf16 engine runs a rounded copy of the weights; the optimizer updates fp32 masters (partitioned across ranks
    under ZeRO 1-3), and those are the trained weights to export. Collective whenever the masters are partitioned:
    every rank calls this. Without a separate master (fp32 ZeRO-0) the module's weights are the masters."""
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_fp32_param

    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    state: dict[str, Tensor] = {}
    for name, p in engine.module.named_parameters():
        full = safe_get_full_fp32_param(p)  # every rank: assembling a partitioned master is a collective
        if rank0:
            state[name] = (p.detach() if full is None else full).float().cpu().clone()
    if not rank0:
        return None
    for name, buffer in engine.module.named_buffers():
        state.setdefault(name, buffer.detach().float().cpu().clone())
    return {k: state[k] for k in engine.module.state_dict() if k in state}


def consolidated_state_dict(engine) -> dict[str, Tensor] | None:
    """The full UNet state dict on CPU on rank 0 (None on other ranks), as the module holds it (the rounded copy in
    a bf16 engine: what the EMA swap and samples read). Collective under ZeRO-3."""
    import torch.distributed as dist

    if engine.zero_optimization_partition_weights():  # ZeRO-3
        state = engine._zero3_consolidated_16bit_state_dict()
        return {k: v.float() for k, v in state.items()} if state is not None else None
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    return {k: v.detach().float().cpu().clone() for k, v in engine.module.state_dict().items()}


def export_diffusers(unet, out_dir: Path) -> str | None:
    """Write a diffusers UNet folder; returns None, or the reason when this architecture has no diffusers form."""
    from model.convert import ConversionError, unet_to_diffusers

    try:
        model = unet_to_diffusers(unet, drop_image_condition=bool(unet.cfg.image_embed_dim))
    except ConversionError as e:
        return str(e)
    model.save_pretrained(str(out_dir))
    return None


def write_models(
    model,
    raw: dict[str, Tensor],
    ema: dict[str, Tensor] | None,
    out_dir: str | Path,
    step: int,
    diffusers: bool = True,
    dtype: str = "fp32",
) -> dict[str, Any]:
    """Write model.pt (raw), model_ema.pt (EMA, if given) and the diffusers folder; returns their paths.

    ``model`` is a TextToVideo whose UNet is overwritten (it carries the config and encoders to save with them);
    the checkpoints hold the weights in ``dtype`` (fp32: the master weights unrounded).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Any] = {}
    model.unet.to({"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype])
    model.unet.load_state_dict(raw)
    files["checkpoint"] = str(model.save(out / "model.pt", step=step, ema=False))
    if ema is not None:
        model.unet.load_state_dict(ema)
        files["ema_checkpoint"] = str(model.save(out / "model_ema.pt", step=step, ema=True))
    if diffusers:
        reason = export_diffusers(model.unet, out / "diffusers" / "unet")
        files["diffusers"] = None if reason else str(out / "diffusers" / "unet")
        if reason:
            files["diffusers_skipped"] = reason
            log.info("no diffusers export: %s", reason)  # the architecture's own limit; export.json records it
    durable.write_text(out / "export.json", json.dumps({"step": step, **files}, indent=2))
    return files


# ---------------------------------------------------------------------------------------------------------------
# Offline export from a reported checkpoint directory


def state_from_checkpoint(ckpt_dir: str | Path) -> tuple[dict[str, Tensor], dict[str, Tensor] | None, dict]:
    """(fp32 UNet state, EMA state or None, train_state.json) from a training checkpoint directory."""
    d = Path(ckpt_dir)
    info_path = d / TRAIN_STATE_FILE
    if not info_path.is_file():
        raise FileNotFoundError(
            f"{d} is not a training checkpoint (no {TRAIN_STATE_FILE}); pass a directory "
            "under <output>/ray/train/ such as step_00000400"
        )
    info = json.loads(info_path.read_text(encoding="utf-8"))
    if info["zero_stage"] == 0:
        model_states = _load_deepspeed_states(d / DS_TAG / "mp_rank_00_model_states.pt")
        raw = {k: v.float() for k, v in model_states["module"].items()}
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        raw = dict(get_fp32_state_dict_from_zero_checkpoint(str(d), tag=DS_TAG))
    ema = None
    rank0 = d / worker_state_file(0)
    if info["zero_stage"] < 3 and rank0.is_file():
        saved = torch.load(rank0, map_location="cpu", weights_only=True).get("ema") or {}
        tensors = saved.get("tensors")  # Ema.state(): {"updates", "tensors"}
        if tensors is not None:
            ema = {name: t.reshape(raw[name].shape).float() for name, t in zip(info["param_names"], tensors)}
            ema.update({k: v for k, v in raw.items() if k not in ema})  # buffers: as trained
    return raw, ema, info


def _load_deepspeed_states(path: Path) -> dict:
    """DeepSpeed's model-states file: weights-only when it holds nothing else; DeepSpeed's format may pickle
    Python objects (an LR schedule's function), and then only a file a trusted run wrote may be loaded."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        log.warning(
            "%s holds pickled Python objects (DeepSpeed's checkpoint format; %s): loading it runs code from the "
            "file, so export only checkpoints your own runs wrote (pipelines/RELIABILITY.md, trusted files)",
            path,
            str(e).splitlines()[0][:200],
        )
        return torch.load(path, map_location="cpu", weights_only=False)


def export_checkpoint(ckpt_dir: str | Path, output: str | Path, diffusers: bool = True) -> dict[str, Any]:
    """A training checkpoint directory -> model.pt / model_ema.pt / diffusers folder under ``output``."""
    from model.registry import ModelConfig
    from model.text_to_video import TextToVideo
    from pipelines import settings

    raw, ema, info = state_from_checkpoint(ckpt_dir)
    model = TextToVideo.build(settings.from_dict(ModelConfig, info["model_config"]))
    encoders = Path(ckpt_dir) / "encoders.pt"
    if encoders.is_file():  # random-init CLIP weights training used (see TextToVideo.save)
        state = torch.load(encoders, map_location="cpu", weights_only=True)
        model.text_encoder.load_state_dict(state["text_encoder"])
        model.image_encoder.load_state_dict(state["image_encoder"])
    return write_models(model, raw, ema, output, step=int(info["step"]), diffusers=diffusers)


@dataclass
class ExportConfig:
    checkpoint: str | None = None  # a checkpoint directory written by training (<output>/ray/train/step_XXXXXXXX)
    output: str | None = None  # directory for model.pt, model_ema.pt, diffusers/
    diffusers: bool = True  # also write the diffusers folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.training.export", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="a checkpoint directory written by training "
        "(<output>/ray/train/step_XXXXXXXX); same as --set checkpoint=...",
    )
    parser.add_argument("--output", default=None, help="directory for model.pt, model_ema.pt, diffusers/")
    settings.add_arguments(parser)
    args = parser.parse_args(argv)
    cfg = settings.resolve(parser, ExportConfig, args, {"checkpoint": args.checkpoint, "output": args.output})
    if cfg is None:
        return 0
    if not cfg.checkpoint or not cfg.output:
        parser.error("give --checkpoint (a training checkpoint directory) and --output")
    logs.setup()
    files = export_checkpoint(cfg.checkpoint, cfg.output, diffusers=cfg.diffusers)
    print(json.dumps(files, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
