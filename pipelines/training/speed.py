"""The settings a GPU user expects, applied at the edge of the model: activation checkpointing, fused AdamW,
``torch.compile`` of the UNet and the scaled-dot-product attention kernel (bf16 is ``precision``). Each is a
``TrainConfig`` value whose default is the safe choice; ``check`` runs before the model is built and stops with the
reason when this machine cannot do what was asked, instead of training slower or differently than configured.

    t2v train --set activation_checkpointing=true --set fused_adamw=true --set compile_unet=true \\
        --set attention_backend=flash --config clusters/deepspeed/h100x1.yaml
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator

import torch

from pipelines.settings import ConfigError
from pipelines.training.config import TrainConfig

# attention_backend -> torch's kernel; auto lets torch pick (flash or memory-efficient on GPUs where they apply)
BACKENDS = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "math": "MATH", "cudnn": "CUDNN_ATTENTION"}


def _dtype(cfg: TrainConfig) -> torch.dtype:
    return torch.bfloat16 if cfg.bf16 else torch.float32


def check(cfg: TrainConfig, device: torch.device) -> list[str]:
    """Stop (ConfigError) with the reason if a setting cannot work on ``device``; returns what is on, for the log."""
    on = []
    if cfg.attention_backend != "auto":
        q = torch.randn(1, 2, 16, 64, device=device, dtype=_dtype(cfg))  # [b, heads, n, head_dim]
        try:
            with attention(cfg):
                torch.nn.functional.scaled_dot_product_attention(q, q, q)
        except RuntimeError as e:
            raise ConfigError(
                f"attention_backend={cfg.attention_backend} has no kernel on {device.type} for "
                f"{str(_dtype(cfg)).removeprefix('torch.')} inputs ({str(e).splitlines()[0][:200]}); "
                "use attention_backend=auto (torch picks an available kernel)"
            ) from None
        on.append(f"attention {cfg.attention_backend}")
    if cfg.fused_adamw:
        if cfg.offload_optimizer:
            raise ConfigError(
                "fused_adamw=true with offload_optimizer=true: the offloaded step is DeepSpeedCPUAdam (already a "
                "vectorised CPU kernel); set fused_adamw=false"
            )
        on.append("fused AdamW")
    if cfg.compile_unet:
        if device.type == "cpu" and not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
            raise ConfigError(
                "compile_unet=true on CPU needs a C++ compiler (torch.compile generates C++ kernels there) and "
                "none is on PATH: install g++ (apt-get install g++) or set compile_unet=false"
            )
        on.append("torch.compile")
    if cfg.activation_checkpointing:
        on.append("activation checkpointing")
    return on


@contextlib.contextmanager
def attention(cfg: TrainConfig) -> Iterator[None]:
    """The configured attention kernel for the ``with`` block (every UNet call of a training step)."""
    if cfg.attention_backend == "auto":
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([getattr(SDPBackend, BACKENDS[cfg.attention_backend])]):
        yield


def prepare_unet(unet, cfg: TrainConfig) -> None:
    """Before DeepSpeed wraps it: activation checkpointing (recompute each block's activations in backward)."""
    unet.gradient_checkpointing = unet.gradient_checkpointing or cfg.activation_checkpointing


def compile_engine(engine, cfg: TrainConfig) -> None:
    """``torch.compile`` the UNet inside the DeepSpeed engine (DeepSpeed's own entry point, which keeps its hooks
    and the parameter names checkpoints use)."""
    if cfg.compile_unet:
        engine.compile()
