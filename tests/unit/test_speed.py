"""The speed settings (pipelines/training/speed.py) on CPU: each works here or stops with the reason before any
model is built; all are off by default."""

from __future__ import annotations

import pytest
import torch

from pipelines import settings
from pipelines.settings import ConfigError
from pipelines.training import speed
from pipelines.training.config import TrainConfig

CPU = torch.device("cpu")


def config(**values) -> TrainConfig:
    return settings.from_dict(TrainConfig, values)


def test_defaults_are_off_and_bf16_needs_a_gpu():
    assert speed.check(config(), CPU) == []
    with pytest.raises(ConfigError, match="precision=bf16 needs use_gpu=true"):
        config(precision="bf16")
    with pytest.raises(ConfigError, match="attention_backend"):
        config(attention_backend="xformers")


def test_attention_kernels_run_on_cpu_or_say_why_not():
    # torch has a CPU flash kernel and the math one; the memory-efficient kernel is CUDA-only
    assert speed.check(config(attention_backend="flash"), CPU) == ["attention flash"]
    assert speed.check(config(attention_backend="math"), CPU) == ["attention math"]
    with pytest.raises(ConfigError, match="attention_backend=efficient has no kernel on cpu for float32"):
        speed.check(config(attention_backend="efficient"), CPU)


def test_fused_adamw_steps_on_cpu_and_is_refused_with_offload():
    from pipelines.training.worker import deepspeed_config

    cfg = config(fused_adamw=True)
    assert speed.check(cfg, CPU) == ["fused AdamW"]
    params = dict(deepspeed_config(cfg, world_size=1, branches=2)["optimizer"]["params"])
    assert params.pop("torch_adam") is True and params["fused"] is True
    # what DeepSpeed does with torch_adam: torch.optim.AdamW with the remaining params, here on CPU
    w = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.AdamW([w], **params)
    w.sum().backward()
    opt.step()
    assert torch.all(w < 1)
    with pytest.raises(ConfigError, match="DeepSpeedCPUAdam"):
        speed.check(config(fused_adamw=True, offload_optimizer=True, zero_stage=2), CPU)


def test_compile_needs_a_compiler_on_cpu_and_checkpointing_is_set_on_the_unet(monkeypatch, small_model):
    from model.registry import get_config
    from model.unet import build_unet

    assert speed.check(config(compile_unet=True, activation_checkpointing=True), CPU) == [
        "torch.compile",
        "activation checkpointing",
    ]
    monkeypatch.setattr(speed.shutil, "which", lambda name: None)  # a machine without a C++ compiler
    with pytest.raises(ConfigError, match="needs a C\\+\\+ compiler"):
        speed.check(config(compile_unet=True), CPU)
    unet = build_unet(get_config("tiny", small_model).unet, "meta")
    speed.prepare_unet(unet, config(activation_checkpointing=True))
    assert unet.gradient_checkpointing is True


def test_ema_placement_keeps_a_whole_fp32_copy_off_the_gpu():
    # ZeRO 0-2 on GPUs: rank 0's EMA is the whole UNet in fp32, so auto keeps it in host memory; ZeRO-3 ranks each
    # keep their partition's EMA on the device; CPU training has only one memory
    assert config(use_gpu=True, zero_stage=2).ema_on_cpu is True
    assert config(use_gpu=True, zero_stage=3).ema_on_cpu is False
    assert config(zero_stage=2).ema_on_cpu is False
    assert config(use_gpu=True, zero_stage=2, ema_device="device").ema_on_cpu is False
    assert config(ema_device="cpu").ema_on_cpu is True
    with pytest.raises(ConfigError, match="ema_device"):
        config(ema_device="disk")
