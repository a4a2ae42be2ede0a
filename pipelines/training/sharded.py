"""ZeRO-3 model construction: the UNet is built under ``deepspeed.zero.Init``, so each parameter is partitioned
across the ranks as soon as its module is constructed and no rank ever holds the whole UNet on its device.

    model = sharded.build_model(cfg, device, ds_config)     # worker.py, when zero_stage == 3

Two things a plain build does need care here:

- zero initialisation after construction (``_zero_(nn.Linear(...))`` in model/unet.py) runs on a parameter that
  is already partitioned, where it would change nothing: ``zero_init_partitioned`` zeroes the rank's partition too;
- ``init_from`` weights are read on rank 0 (host memory) and copied in one parameter at a time, each gathered for a
  moment with ``GatheredParameters`` (modifier rank 0), so the device holds at most one full parameter extra.

The frozen encoders are built as usual (every rank needs them whole).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch

from pipelines.training.config import TrainConfig

log = logging.getLogger("t2v.train")


@contextlib.contextmanager
def zero_init_partitioned() -> Iterator[None]:
    """``torch.nn.init.zeros_`` also zeroes the local partition (``ds_tensor``) of a partitioned parameter."""
    original = torch.nn.init.zeros_

    def zeros_(tensor):
        part = getattr(tensor, "ds_tensor", None)
        if part is not None:
            with torch.no_grad():
                part.zero_()
        return original(tensor)

    torch.nn.init.zeros_ = zeros_
    try:
        yield
    finally:
        torch.nn.init.zeros_ = original


def local_parameter_bytes(module: torch.nn.Module) -> int:
    """Bytes of parameters this rank holds: its partitions under ZeRO-3, the whole tensors otherwise."""
    total = 0
    for p in module.parameters():
        held = getattr(p, "ds_tensor", p.data)
        total += held.numel() * held.element_size()
    return total


def _init_state(cfg: TrainConfig, model_config, t2v_checkpoint: bool) -> dict[str, torch.Tensor]:
    """The ``init_from`` UNet weights as a CPU state dict (rank 0's host memory)."""
    from model.released import init_unet_from
    from model.stunet import build_video_unet
    from model.text_to_video import read_checkpoint

    if t2v_checkpoint:
        return read_checkpoint(cfg.init_from)["unet"]
    unet = build_video_unet(model_config)  # host copy: released files need the converters that load into a module
    report = init_unet_from(unet, cfg.init_from)
    log.info("initialised the UNet from %s (new: %s)", cfg.init_from, report.missing_allowed[:4])
    return unet.state_dict()


def build_model(cfg: TrainConfig, device: torch.device, ds_config: dict, mc, t2v_checkpoint: bool, weights=None):
    """TextToVideo whose UNet is partitioned by ZeRO-3 from construction on (see the module docstring). ``mc``:
    the ModelConfig (``worker.resolve_model_config``); ``t2v_checkpoint``: ``init_from`` is a TextToVideo file;
    ``weights``: a full UNet state dict on rank 0 that replaces the initial weights (a resharded resume); the other
    ranks pass an empty dict (all ranks take part in the copy, or none)."""
    import deepspeed
    import torch.distributed as dist

    from model.encoders import FirstStage, build_clip_encoders
    from model.stunet import build_video_unet
    from model.text_to_video import TextToVideo, read_checkpoint

    # zero.Init reads the world size from deepspeed.comm: adopt the process group Ray Train created
    deepspeed.init_distributed(dist_backend=dist.get_backend())
    torch.manual_seed(cfg.seed)  # rank 0's initial values are broadcast: the same as a plain seeded build
    remote = "cpu" if _offload_param(ds_config) else None
    # the parameter dtype follows the config (bf16 when enabled), as deepspeed.initialize casts a plain module
    with deepspeed.zero.Init(config_dict_or_path=ds_config, remote_device=remote), zero_init_partitioned():
        unet = build_video_unet(mc)
    if cfg.init_from or weights is not None:
        rank = dist.get_rank()
        state = None
        if rank == 0:
            state = weights if weights is not None else _init_state(cfg, mc, t2v_checkpoint)
        for name, p in unet.named_parameters():
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0), torch.no_grad():
                if rank == 0:
                    p.data.copy_(state[name])
        for name, b in unet.named_buffers():
            if rank == 0:
                b.copy_(state[name])
            dist.broadcast(b, 0)
    text, image = build_clip_encoders(mc.encoders, device)
    if t2v_checkpoint:  # random CLIP encoders are stored with the checkpoint
        ckpt = read_checkpoint(cfg.init_from)
        for module, key in ((text, "text_encoder"), (image, "image_encoder")):
            if ckpt.get(key) is not None:
                module.load_state_dict(ckpt[key])
    first_stage = FirstStage.from_config(mc.encoders, device)
    return TextToVideo(mc, unet, text, image, first_stage)


def _offload_param(ds_config: dict) -> bool:
    return ds_config.get("zero_optimization", {}).get("offload_param", {}).get("device") == "cpu"
