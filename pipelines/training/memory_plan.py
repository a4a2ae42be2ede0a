"""t2v plan --config FILE --gpus N [--gpu-memory 80] [--set key=value ...] [--dry-run]

Also ``python -m pipelines.training.memory_plan``. Prints, for a training config, the memory one GPU needs under each
ZeRO stage and offload choice, and the largest batch that fits:

- model states (16-bit weights and gradients, fp32 master weights, fp32 gradients, Adam moments) with DeepSpeed's own
  accounting, the figures its ``estimate_zero2/3_model_states_mem_needs`` give (a test holds them to those);
- the frozen encoders in 16 bits (every GPU holds them whole);
- activations: the bytes autograd saves for backward, measured on the meta device (shapes without data, so the
  large sizes cost no memory) for a batch of 1 and of 2 per branch and scaled linearly to the configured batch.
  Activation checkpointing (``activation_checkpointing``) is measured as it runs. Transient buffers, communication
  buckets and the allocator's fragmentation are not: a plan keeps ``headroom`` of the GPU free for them.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import torch

GIB = 1024**3

# (stage, offload) choices: offload "none", "optimizer" (offload_optimizer), "optimizer+params" (ZeRO-3 only)
CHOICES = [
    (0, "none"),
    (1, "none"),
    (2, "none"),
    (2, "optimizer"),
    (3, "none"),
    (3, "optimizer"),
    (3, "optimizer+params"),
]


@dataclass(frozen=True)
class ModelStates:
    """Bytes of model states per GPU and host memory per node (DeepSpeed's estimator, buffer factor 1.5)."""

    gpu: int
    cpu: int


def model_states(
    params: int, largest_layer: int, stage: int, offload: str, gpus_per_node: int, nodes: int = 1, buffer: float = 1.5
) -> ModelStates:
    """DeepSpeed's accounting of bf16/fp16 mixed-precision Adam: per parameter 2 bytes of 16-bit weights, 2 of 16-bit
    gradients, 4 of fp32 gradients, 4 of fp32 master weights and 8 of Adam moments (18 besides the weights).
    ZeRO-2 partitions the 18 across the GPUs, ZeRO-1 all but the 16-bit gradients (DeepSpeed has no estimator of
    its own for it); ZeRO-3 partitions the weights too but gathers the largest layer (4 bytes per parameter).
    Offloading the optimizer leaves the 16-bit weights (ZeRO-3: their partition) on the GPU; offloading the
    parameters as well leaves only the gathered layer."""
    n = gpus_per_node * nodes
    p, layer = params, 4 * largest_layer
    if stage in (0, 1, 2):
        if offload == "optimizer":
            return ModelStates(2 * p, int(p * max(4 * n, 16) * buffer))
        sharded = {0: 0, 1: 16 * p, 2: 18 * p}[stage]  # bytes per parameter set split across the GPUs
        return ModelStates(20 * p - sharded + int(sharded / n), int(p * 4 * gpus_per_node * buffer))
    per_node = 1 / nodes
    if offload == "optimizer+params":
        return ModelStates(layer, int(p * 18 * per_node * buffer))
    if offload == "optimizer":
        return ModelStates(layer + int(2 * p / n), int(p * 16 * per_node * buffer))
    return ModelStates(layer + int(18 * p / n), int(largest_layer * 4 * gpus_per_node * buffer))


def largest_layer_params(module: torch.nn.Module) -> int:
    """Parameters of the module that holds the most directly (what ZeRO-3 gathers at once, as DeepSpeed counts)."""
    return max(sum(p.numel() for p in m.parameters(recurse=False)) for m in module.modules())


def saved_bytes(unet, x, context, image, dtype: torch.dtype) -> tuple[int, int]:
    """Bytes autograd keeps for backward during one forward of ``unet`` (meta tensors: shapes only), and the most
    one UNet block keeps (what activation checkpointing holds again while it recomputes that block). Each saved
    tensor once, parameters left out. Meta tensors have no storage to tell views apart, so a view saved next to its
    base counts twice (a slight overestimate); the math attention kernel's saved softmax is counted, which fused
    kernels (flash) do not keep."""
    from model.unet import Block

    kept: dict[int, torch.Tensor] = {}  # holding them keeps their ids unique
    total = lambda: sum(t.numel() * t.element_size() for t in kept.values())  # noqa: E731
    starts, blocks = [], [0]

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            kept[id(t)] = t
        return t

    hooks = []
    for m in unet.modules():
        if isinstance(m, Block):
            hooks.append(m.register_forward_pre_hook(lambda *_: starts.append(total())))
            hooks.append(m.register_forward_hook(lambda *_: blocks.append(total() - starts.pop())))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            t = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
            image = None if image is None else image.to(dtype)
            unet(x.to(dtype), t, context=context.to(dtype), image_embedding=image)
    finally:
        for h in hooks:
            h.remove()
    return total(), max(blocks)


def activation_bytes_per_sample(model_config, frames: int, checkpointing: bool, dtype: torch.dtype) -> float:
    """Activation bytes per sample of ``frames`` frames, measured at batch 1 and 2 (the slope). With activation
    checkpointing: the block inputs kept, plus the largest block's activations while it is recomputed."""
    from model.stunet import build_video_unet

    u = model_config.unet
    down = 1 if model_config.encoders.first_stage == "identity" else 8
    unet = build_video_unet(model_config, "meta").to(dtype).train()
    checkpointing = unet.gradient_checkpointing or checkpointing
    sizes = []
    for b in (1, 2):
        with torch.device("meta"):
            x = torch.empty(b, u.in_channels, frames, model_config.height // down, model_config.width // down)
            context = torch.empty(b, u.num_text_tokens, u.context_dim)
            image = torch.empty(b, u.image_embed_dim) if u.image_embed_dim else None
        unet.gradient_checkpointing = False
        whole, largest_block = saved_bytes(unet, x, context, image, dtype)
        if checkpointing:
            unet.gradient_checkpointing = True
            kept, _ = saved_bytes(unet, x, context, image, dtype)
            whole = kept + largest_block
        sizes.append(whole)
    return float(sizes[1] - sizes[0])


@dataclass
class PlanRow:
    stage: int
    offload: str
    states_gib: float
    frozen_gib: float
    activations_gib: float
    total_gib: float
    cpu_gib: float
    max_video_batch: int
    max_image_batch: int


def plan(cfg, gpus: int, gpu_memory_gib: float, headroom: float = 0.1, gpus_per_node: int = 8) -> dict:
    """The plan of ``cfg`` (a TrainConfig) on ``gpus`` GPUs of ``gpu_memory_gib`` each."""
    from model.stunet import build_video_unet
    from pipelines.training.worker import resolve_model_config

    mc = resolve_model_config(cfg)
    meta = build_video_unet(mc, "meta")
    params = sum(p.numel() for p in meta.parameters())
    layer = largest_layer_params(meta)
    frozen = _frozen_params(mc)
    dtype = torch.bfloat16 if (cfg.use_gpu and cfg.precision != "fp32") else torch.float32
    act_video = activation_bytes_per_sample(mc, mc.num_frames, cfg.activation_checkpointing, dtype)
    act_image = activation_bytes_per_sample(mc, 1, cfg.activation_checkpointing, dtype)
    per_node = min(gpus, gpus_per_node)
    nodes = -(-gpus // per_node)
    budget = gpu_memory_gib * GIB * (1 - headroom)
    frozen_bytes = 2 * frozen if dtype == torch.bfloat16 else 4 * frozen
    rows = []
    for stage, offload in CHOICES:
        s = model_states(params, layer, stage, offload, per_node, nodes)
        # the branches run one after the other, each freeing its activations in its backward
        act = max(act_video * cfg.video_batch_size, act_image * cfg.image_batch_size)
        free = budget - s.gpu - frozen_bytes
        rows.append(
            PlanRow(
                stage,
                offload,
                s.gpu / GIB,
                frozen_bytes / GIB,
                act / GIB,
                (s.gpu + frozen_bytes + act) / GIB,
                s.cpu / GIB,
                int(free // act_video) if free > 0 else -1,
                int(free // act_image) if free > 0 else -1,
            )
        )
    return {
        "model": mc.name,
        "params": params,
        "largest_layer": layer,
        "frozen_params": frozen,
        "activation_bytes_per_clip": act_video,
        "activation_bytes_per_image": act_image,
        "gpus": gpus,
        "nodes": nodes,
        "gpu_memory_gib": gpu_memory_gib,
        "rows": rows,
    }


def encoder_parameter_counts(mc) -> dict[str, int]:
    """Parameters of the frozen encoders (CLIP text and vision towers, the VAE), counted on the meta device."""
    import open_clip

    from model.encoders import register_project_clip_configs

    register_project_clip_configs()
    with torch.device("meta"):
        clip = open_clip.create_model(
            mc.encoders.clip_model, device="meta", force_image_size=mc.encoders.clip_image_size
        )
    vision = sum(p.numel() for p in clip.visual.parameters())
    counts = {"clip_text": sum(p.numel() for p in clip.parameters()) - vision, "clip_vision": vision, "vae": 0}
    if mc.encoders.first_stage == "sd_vae":
        from diffusers import AutoencoderKL

        with torch.device("meta"):  # Stable Diffusion's KL-f8 autoencoder architecture
            vae = AutoencoderKL(
                down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4,
                block_out_channels=(128, 256, 512, 512),
                layers_per_block=2,
                latent_channels=4,
            )
        counts["vae"] = sum(p.numel() for p in vae.parameters())
    return counts


def _frozen_params(mc) -> int:
    return sum(encoder_parameter_counts(mc).values())


def render(p: dict, cfg) -> str:
    lines = [
        f"{p['model']}: UNet {p['params'] / 1e6:.1f}M parameters (largest layer {p['largest_layer'] / 1e6:.2f}M), "
        f"frozen encoders {p['frozen_params'] / 1e6:.0f}M; {p['gpus']} GPU(s) of {p['gpu_memory_gib']:.0f} GiB "
        f"on {p['nodes']} node(s)",
        f"activations (measured on the meta device at batch 1 and 2, scaled): "
        f"{p['activation_bytes_per_clip'] / GIB:.2f} GiB per clip, {p['activation_bytes_per_image'] / GIB:.3f} GiB "
        f"per image; configured batch {cfg.image_batch_size} images + {cfg.video_batch_size} clips per GPU"
        + (", activation checkpointing" if cfg.activation_checkpointing else ""),
        f"{'ZeRO':>4} {'offload':>16} {'states':>8} {'frozen':>7} {'activ.':>7} {'total':>8} {'fits':>5} "
        f"{'max clips':>9} {'max images':>10} {'host/node':>10}",
    ]
    for r in p["rows"]:
        fits = "yes" if r.total_gib <= p["gpu_memory_gib"] * 0.9 else "no"
        lines.append(
            f"{r.stage:>4} {r.offload:>16} {r.states_gib:7.1f}G {r.frozen_gib:6.1f}G {r.activations_gib:6.1f}G "
            f"{r.total_gib:7.1f}G {fits:>5} {max(r.max_video_batch, 0):>9} {max(r.max_image_batch, 0):>10} "
            f"{r.cpu_gib:9.1f}G"
        )
    lines.append("GiB per GPU; max clips / images: the largest batch of that branch that fits in 90% of the GPU")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from pipelines import logs, settings
    from pipelines.training.config import TrainConfig

    parser = argparse.ArgumentParser(prog="t2v plan", description="per-GPU memory of a training config")
    settings.add_arguments(parser)
    parser.add_argument("--gpus", type=int, default=None, help="data-parallel GPUs (default: num_workers)")
    parser.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU (default 80, an H100)")
    args = parser.parse_args(argv)
    cfg = settings.resolve(parser, TrainConfig, args)
    if cfg is None:
        return 0
    gpus = args.gpus or cfg.num_workers
    if gpus < 1 or args.gpu_memory <= 0:
        parser.error(f"--gpus {gpus} --gpu-memory {args.gpu_memory}: need at least 1 GPU and more than 0 GiB each")
    logs.setup()
    print(render(plan(cfg, gpus, args.gpu_memory), cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
