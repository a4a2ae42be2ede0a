"""The training loop one Ray Train worker runs (``train_loop_per_worker``); ``job.py`` starts it.

Read top to bottom, as nanoGPT's train.py: config, process group, model, DeepSpeed, data, resume, loop,
checkpoint, export. The model is plain PyTorch (``model/``); DeepSpeed wraps the UNet here, at the edge.

One optimizer step is joint, as TF-T2V trains (arXiv 2312.15770), and is two DeepSpeed micro-steps
(gradient_accumulation_steps = number of active branches, so both gradients land in one update):

- content branch: an image-text batch as 1-frame videos (temporal layers pass through, only spatial weights get
  gradients); the whole batch is conditioned on the text or, with ``image_condition_prob``, on the image's CLIP
  embedding with the null text (the UNet takes one image embedding per batch or none, so the choice is per batch);
- motion branch: a video batch of text-free clips (null text) and captioned clips (their text); with
  ``video_image_condition_prob`` the batch also gets the CLIP image embedding of each clip's middle frame. TF-T2V
  always gives it; the default 0.5 also trains text-only video generation, which is how prompts are sampled.
  The coherence loss (model/diffusion.py) applies here.

CFG dropout replaces a sample's text with the negative-prompt embedding (what sampling uses as unconditional
input). Noise, timesteps, dropout decisions and UNet dropout are drawn from RNGs seeded by (seed, step, rank), so a
resumed run repeats exactly the steps the interrupted one would have taken.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipelines import loader, logs, run_facts, schema, settings
from pipelines.tracking_buffer import BufferedTracker
from pipelines.training import efficiency, export, sharded, speed
from pipelines.training.config import EXPORT_DIR, RAY_DIR, RAY_RUN_NAME, TrainConfig
from pipelines.training.periodic_eval import PeriodicEvaluator

log = logging.getLogger("t2v.train")


# ---------------------------------------------------------------------------------------------------------------
# Model


def _is_t2v_checkpoint(path: str | None) -> bool:
    if not path or not Path(path).is_file() or Path(path).suffix == ".safetensors":
        return False
    from model.text_to_video import FORMAT

    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return isinstance(ckpt, dict) and ckpt.get("format") == FORMAT


def resolve_model_config(cfg: TrainConfig):
    """The ModelConfig training uses: the registry entry with overrides, or the one stored in ``init_from`` when
    that is a TextToVideo checkpoint (its architecture and encoders must be kept to load its weights)."""
    from model.inflation import is_image_model_for
    from model.registry import ModelConfig, get_config

    if _is_t2v_checkpoint(cfg.init_from) and not is_image_model_for(
        get_config(cfg.model, cfg.model_overrides), cfg.init_from
    ):
        from model.text_to_video import read_checkpoint

        stored = settings.from_dict(ModelConfig, read_checkpoint(cfg.init_from)["config"])
        if cfg.model_overrides and settings.to_dict(get_config(cfg.model, cfg.model_overrides)) != settings.to_dict(
            stored
        ):
            log.warning(
                "init_from is a TextToVideo checkpoint: its stored model config is used and model_overrides, which "
                "differ from it, are ignored"
            )
        return stored
    model_config = get_config(cfg.model, cfg.model_overrides or None)
    frozen = model_config.stunet is not None and model_config.stunet.trainable == "temporal"
    settings.check(
        not (frozen and cfg.image_batch_size),
        f"image_batch_size={cfg.image_batch_size}: stunet.trainable=temporal freezes every weight an image batch "
        "reaches; set image_batch_size=0",
    )
    return model_config


def build_model(cfg: TrainConfig, device: torch.device):
    """TextToVideo with random (seeded, identical on every rank) or ``init_from`` weights."""
    from model.inflation import inflate_model_from_image, is_image_model_for
    from model.released import init_unet_from
    from model.text_to_video import TextToVideo

    torch.manual_seed(cfg.seed)
    model_config = resolve_model_config(cfg)
    if is_image_model_for(model_config, cfg.init_from):
        # Lumiere: a STUNet grows from a trained image model; its new temporal layers keep their init.
        model = TextToVideo.build(model_config)
        new = inflate_model_from_image(model, cfg.init_from)
        log.info("inflated the STUNet from the image model %s (new: %s)", cfg.init_from, new[:4])
    elif _is_t2v_checkpoint(cfg.init_from):
        model = TextToVideo.from_checkpoint(cfg.init_from)
    else:
        model = TextToVideo.build(model_config)
        if cfg.init_from:
            # A released file, a diffusers folder or an SD image UNet (inflated); what it lacks keeps its init.
            report = init_unet_from(model.unet, cfg.init_from)
            log.info("initialised the UNet from %s (new: %s)", cfg.init_from, report.missing_allowed[:4])
    return model.to(device)


def param_groups(unet, cfg: TrainConfig) -> list[dict]:
    """Temporal weights at lr, spatial ones at lr * spatial_lr_mult (TF-T2V: 0.5 for pretrained SD weights)."""
    temporal = list(unet.temporal_parameters())
    spatial = list(unet.spatial_parameters())
    groups = [
        {"params": temporal, "lr": cfg.lr, "name": "temporal"},
        {"params": spatial, "lr": cfg.lr * cfg.spatial_lr_mult, "name": "spatial"},
    ]
    return [g for g in groups if g["params"]]


def lr_factor(step: int, cfg: TrainConfig, time_used: float = 0.0) -> float:
    """Linear warm-up over warmup_steps, then cosine decay to min_lr_ratio at ``steps``. ``step`` counts from 0.

    ``time_used`` is the share of ``time_limit_minutes`` spent (0 without a limit): the decay follows whichever
    budget runs out first, so a run its time limit stops still ends at the low learning rate."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = max((step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps), time_used)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine


class TimeBudget:
    """Share of ``time_limit_minutes`` used since ``start()`` (0 without a limit). Each rank measures its own
    (``local``); the loop averages them across ranks once a step into ``used``, which the LR schedule reads, so
    every rank applies the same learning rate."""

    def __init__(self, minutes: float):
        self.seconds = minutes * 60
        self.t0 = time.perf_counter()
        self.used = 0.0

    def start(self) -> None:
        self.t0 = time.perf_counter()

    def local(self) -> float:
        return (time.perf_counter() - self.t0) / self.seconds if self.seconds > 0 else 0.0


def deepspeed_config(cfg: TrainConfig, world_size: int, branches: int) -> dict:
    """The DeepSpeed config; ``cfg.deepspeed`` is merged over it (recursively) for site-specific settings."""
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cfg.use_gpu}
    if cfg.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if cfg.zero_stage == 2 and not cfg.use_gpu:
        # The contiguous buffer keeps GPU memory from fragmenting; on CPU it is only one more copy of every gradient
        # in each micro-step (`t2v bench train` measures the step against a plain loop)
        zero["contiguous_gradients"] = False
    micro = max(cfg.image_batch_size, cfg.video_batch_size)
    ds = {
        # DeepSpeed's batch bookkeeping: one micro-batch per branch; the sizes only feed its throughput counters.
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": branches,
        "train_batch_size": micro * branches * world_size,
        "gradient_clipping": 0.0 if clips_itself(cfg) else cfg.grad_clip,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": cfg.lr,
                "betas": [0.9, 0.999],
                "eps": 1e-8,
                "weight_decay": cfg.weight_decay,
                # torch's AdamW needs no compiled op; offload needs DeepSpeedCPUAdam (JIT-compiled once).
                "torch_adam": not cfg.offload_optimizer,
                **({"fused": True} if cfg.fused_adamw else {}),
            },
        },
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return _merge(ds, cfg.deepspeed)


def clips_itself(cfg: TrainConfig) -> bool:
    """ZeRO-0 in fp32 steps a plain torch optimizer, and DeepSpeed drops the gradient norm it clips with (it reports
    the norm only from its ZeRO and bf16 optimizers): there the loop clips itself (``OptimizerStep``)."""
    return cfg.zero_stage == 0 and not cfg.bf16


class OptimizerStep:
    """``engine.step`` for each branch (a no-op until the gradient accumulation boundary), and the gradient norm of
    the last optimizer step, clipped to ``grad_clip`` by DeepSpeed or, where ``clips_itself``, here with the same
    formula (torch's ``clip_grad_norm_``) just before DeepSpeed's step."""

    def __init__(self, engine, cfg: TrainConfig):
        self.engine, self.max_norm = engine, cfg.grad_clip or math.inf  # grad_clip 0: measured, not clipped
        self.own = clips_itself(cfg)
        self._norm = 0.0

    def __call__(self) -> None:
        if self.own and self.engine.is_gradient_accumulation_boundary():
            self._norm = float(torch.nn.utils.clip_grad_norm_(self.engine.module.parameters(), self.max_norm))
        self.engine.step()

    @property
    def grad_norm(self) -> float:
        return self._norm if self.own else float(self.engine.get_global_grad_norm() or 0.0)


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def encoder_identity(model) -> dict:
    """What pre-encoded shard arrays must have been made with to be used as they are: the identity the curation
    pre-encode stage writes (encoder settings + a fingerprint of the encoder weights), less the keys that do not
    change the arrays (the model config's name, a description)."""
    found = schema.encoder_stamp(
        model.config.encoders, model.text_encoder, model.image_encoder, model.first_stage, model.config.name
    )
    return {k: v for k, v in found.items() if k not in schema.STAMP_DESCRIPTIVE}


def loader_spec(cfg: TrainConfig, model) -> loader.LoaderSpec:
    """What the loader must deliver for this model: its clip geometry, latent size and encoders."""
    mc = model.config
    latent = model.latent_shape(1)  # (1, c, f, h', w')
    return loader.LoaderSpec(
        data=cfg.data,
        image_batch=cfg.image_batch_size,
        video_batch=cfg.video_batch_size,
        text_free_fraction=cfg.text_free_fraction,
        num_frames=mc.num_frames,
        height=mc.height,
        width=mc.width,
        frame_stride=cfg.frame_stride,
        latent_hw=(latent[3], latent[4]),
        expected_encoders=encoder_identity(model),
        seed=cfg.seed,
        shuffle_block=cfg.shuffle_block,
        prefetch=cfg.prefetch,
        decode_workers=cfg.decode_workers,
        max_bad_fraction=cfg.max_bad_fraction,
        cache_mb=cfg.decode_cache_mb,
        image_frame=cfg.image_frame,
        shapes=cfg.shapes,
        pixel_budget=cfg.pixel_budget,
        bucket_weights=dict(cfg.bucket_weights),
        frame_mixing=cfg.frame_mixing,
        frame_lens=list(cfg.frame_lens),
        size_multiple=mc.vae_factor * mc.unet.downsample_factor,
        latent_factor=mc.vae_factor,
        condition_kinds=mc.unet.conditions.kinds,
    )


def _skip_inference_shm_op() -> None:
    """DeepSpeed JIT-compiles a shared-memory all-reduce op on CPU at start-up (about a minute the first time); only
    its inference all-reduce uses it, training uses the process group. Mark it unavailable so it is not built."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False


# ---------------------------------------------------------------------------------------------------------------
# EMA over whatever each rank holds of the weights


class Ema:
    """Exponential moving average of the UNet weights.

    ZeRO 0-2: every rank holds the full weights; rank 0 keeps the EMA. ZeRO-3: each rank holds a partition
    (``param.ds_tensor``) and keeps the EMA of its own partition. ``swapped_in`` puts the EMA into the live weights
    for a moment (to gather or sample them) and restores the trained weights afterwards.
    """

    def __init__(self, engine, decay: float, rank: int, on_cpu: bool = False):
        self.engine, self.decay = engine, decay
        self.partitioned = bool(engine.zero_optimization_partition_weights())
        self.holder = self.partitioned or rank == 0
        self.updates = 0
        where = "cpu" if on_cpu else None  # cpu: the device keeps no fp32 copy (ema_device)
        self.tensors = [t.detach().to(where, torch.float32, copy=True) for t in self._live()] if self.holder else None

    def _live(self) -> list[Tensor]:
        params = list(self.engine.module.parameters())
        return [p.ds_tensor for p in params] if self.partitioned else [p.data for p in params]

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        if not self.holder:
            return
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))  # short runs: early weights fade fast
        for e, t in zip(self.tensors, self._live()):
            e.lerp_(t.to(e.device, torch.float32), 1 - decay)

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        if not self.holder:
            yield
            return
        live = self._live()
        backup = [t.detach().clone() for t in live]
        with torch.no_grad():
            for t, e in zip(live, self.tensors):
                t.copy_(e.to(t.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for t, b in zip(self._live(), backup):
                    t.copy_(b)

    def full_state(self) -> dict[str, Tensor]:
        """The EMA as a full fp32 state dict (ZeRO 0-2, on the holder: rank 0); buffers as the module holds them."""
        names = [name for name, _ in self.engine.module.named_parameters()]
        state = {name: t.detach().cpu().clone() for name, t in zip(names, self.tensors)}
        for name, buffer in self.engine.module.named_buffers():
            state.setdefault(name, buffer.detach().float().cpu().clone())
        return {k: state[k] for k in self.engine.module.state_dict() if k in state}

    def state(self) -> dict:
        return {"updates": self.updates, "tensors": self.tensors}

    def load(self, state: dict) -> None:
        self.updates = int(state["updates"])
        if self.holder and state["tensors"] is not None:
            self.tensors = [t.to(e.device, torch.float32) for t, e in zip(state["tensors"], self.tensors)]


# ---------------------------------------------------------------------------------------------------------------
# The two branches


def _fill(rows: list[Tensor | None], encode) -> Tensor:
    """Batch rows: those already given (pre-encoded) stay; the missing ones come from one ``encode(indices)``
    call returning a [len(indices), ...] tensor. -> float [b, ...]"""
    todo = [i for i, r in enumerate(rows) if r is None]
    if todo:
        encoded = encode(todo)
        for j, i in enumerate(todo):
            rows[i] = encoded[j : j + 1]
    return torch.cat(rows).float()


class Conditioner:
    """Text/image embeddings for a batch: pre-encoded arrays when the shards have them, the frozen encoders
    otherwise. Null and negative-prompt embeddings are computed once."""

    def __init__(self, model, cfg: TrainConfig, device: torch.device):
        self.model, self.cfg, self.device = model, cfg, device
        self.null = model.encode_text([""]).to(device)  # [1, n, d]
        self.negative = model.encode_text([cfg.negative_prompt]).to(device)  # [1, n, d]

    def latents(self, items: list[loader.Item], gen: torch.Generator) -> Tensor:
        """Diffusion input x0 [b, c, f, h', w'] (scaled latents, or pixels in [-1, 1])."""
        out: list[Tensor | None] = [None] * len(items)
        fs = self.model.first_stage
        for i, it in enumerate(items):
            if it.latent_mean is not None:
                mean = torch.from_numpy(it.latent_mean)[None].to(self.device)
                std = torch.from_numpy(it.latent_std)[None].to(self.device)
                out[i] = fs.latents_from_moments(mean, std, gen)
        return _fill(
            out, lambda todo: self.model.encode_video(loader.collate_frames([items[i] for i in todo]), gen)
        )  # uint8 [b', f, h, w, 3] -> latents

    def text(self, items: list[loader.Item]) -> Tensor:
        """[b, n, d]: caption states; the null text for text-free items."""
        rows: list[Tensor | None] = [None] * len(items)
        for i, it in enumerate(items):
            if it.caption is None:
                rows[i] = self.null
            elif it.text_emb is not None:
                rows[i] = torch.from_numpy(it.text_emb)[None].to(self.device)
        return _fill(rows, lambda todo: self.model.encode_text([items[i].caption for i in todo]).to(self.device))

    def conditions(self, items: list[loader.Item], gen: torch.Generator) -> tuple[dict[str, Tensor], Tensor]:
        """Every kind the model takes, [b, c, f, h, w] (zeros where an item lacks it), and which to use [b, kinds]:
        what an item has, after VideoComposer's dropout. All kinds always go in, so every rank's encoder gets
        gradients (ZeRO reduces the same parameters on every rank)."""
        from model.conditions import CHANNELS, keep_masks

        ccfg = self.model.config.unet.conditions
        f, h, w = self._pixel_shape(items)
        out, has = {}, torch.zeros(len(items), len(ccfg.kinds))
        for j, kind in enumerate(ccfg.kinds):
            x = torch.zeros(len(items), CHANNELS[kind], f, h, w)
            for i, it in enumerate(items):
                if kind in it.conditions:
                    x[i] = torch.from_numpy(it.conditions[kind])
                    has[i, j] = 1.0
            out[kind] = x.to(self.device)
        return out, (keep_masks(len(items), ccfg, gen) * has).to(self.device)

    def _pixel_shape(self, items: list[loader.Item]) -> tuple[int, int, int]:
        """(frames, height, width) in pixels of a batch's clips (decoded, or pre-encoded latents)."""
        it = items[0]
        if it.frames is not None:
            return it.frames.shape[0], it.frames.shape[1], it.frames.shape[2]
        factor = self.model.config.vae_factor
        _, f, h, w = it.latent_mean.shape
        return f, h * factor, w * factor

    def image(self, items: list[loader.Item]) -> Tensor:
        """[b, embed_dim] CLIP image embeddings of the conditioning frames."""
        rows: list[Tensor | None] = [None] * len(items)
        for i, it in enumerate(items):
            if it.image_emb is not None:
                rows[i] = torch.from_numpy(it.image_emb)[None].to(self.device)
        return _fill(
            rows, lambda todo: self.model.encode_image(np.stack([items[i].cond_frame for i in todo])).to(self.device)
        )  # uint8 [b', h, w, 3]

    def cfg_dropout(self, context: Tensor, gen: torch.Generator) -> Tensor:
        """Per sample, with probability cfg_dropout: text -> negative-prompt embedding."""
        drop = torch.rand(context.shape[0], generator=gen) < self.cfg.cfg_dropout  # [b]
        if not drop.any():
            return context
        return torch.where(drop.to(context.device)[:, None, None], self.negative.to(context.dtype), context)


def condition_dropout(
    b: int, p: float, p_all_zero: float, p_all_keep: float, conditions: int, gen: torch.Generator
) -> Tensor:
    """VGen's per-sample condition dropout (UNetSD_TFT2V ``misc_dropout``, a DropPath with all-zero and all-keep
    samples) -> keep [conditions, b] bool.

    Binomial(b, p_all_zero) samples, drawn without replacement, lose every condition and the next
    Binomial(b, p_all_keep) keep all; for each condition in turn Binomial(b, p) of the remaining samples (at most all
    of them) lose that condition."""
    zero = torch.zeros(b, dtype=torch.bool)
    keep = torch.zeros(b, dtype=torch.bool)
    n_zero = int((torch.rand(b, generator=gen) < p_all_zero).sum())
    n_keep = int((torch.rand(b, generator=gen) < p_all_keep).sum())
    order = torch.randperm(b, generator=gen)
    zero[order[:n_zero]] = True
    keep[order[n_zero : n_zero + n_keep]] = True
    out = torch.ones(conditions, b, dtype=torch.bool)
    eligible = torch.where(~zero & ~keep)[0]
    for c in range(conditions):
        n = int((torch.rand(b, generator=gen) < p).sum())
        out[c, eligible[torch.randperm(len(eligible), generator=gen)[:n]]] = False
    out[:, zero] = False
    return out


def per_sample_conditions(
    cond: Conditioner, items: list[loader.Item], branch: str, cfg: TrainConfig, gen: torch.Generator
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The TF-T2V recipe's conditions of one branch batch, chosen per sample -> (context [b, n, d], image
    embedding [b, e] or None, image_keep [b] or None).

    content: each sample is conditioned on its image (image_condition_prob; its text is then the null text) or
    on its caption (zero image tokens); motion: each clip has its caption (null text when text-free) and, with
    video_image_condition_prob, its image. Then ``condition_dropout`` drops text and image per sample."""
    b = len(items)
    prob = cfg.image_condition_prob if branch == "content" else cfg.video_image_condition_prob
    has_image = cond.model.config.unet.image_embed_dim > 0 and prob > 0
    use_image = (torch.rand(b, generator=gen) < prob) & has_image  # [b]
    context = cond.text(items)  # [b, n, d]
    if branch == "content":
        context = torch.where(use_image.to(context.device)[:, None, None], cond.null.to(context), context)
    keep_text, keep_image = condition_dropout(b, cfg.condition_dropout, cfg.p_all_zero, cfg.p_all_keep, 2, gen)
    dropped = cond.negative.to(context) if cfg.dropped_text == "negative_prompt" else torch.zeros_like(context[:1])
    context = torch.where(keep_text.to(context.device)[:, None, None], context, dropped)
    if not has_image:
        return context, None, None
    image_keep = (use_image & keep_image).float().to(context.device)  # [b]
    return context, cond.image(items), image_keep


def _coin(p: float, gen: torch.Generator) -> bool:
    return bool(torch.rand((), generator=gen) < p)


def branch_loss(
    net,
    model,
    cond: Conditioner,
    items: list[loader.Item],
    branch: str,
    cfg: TrainConfig,
    gen: torch.Generator,
    shared: torch.Generator,
) -> dict[str, Tensor]:
    """The diffusion loss of one branch's batch (model/diffusion.py training_losses). ``net`` runs the UNet: the
    DeepSpeed engine wrapping ``model.unet`` (or the bare UNet in the plain-loop benchmark). ``gen`` draws this
    rank's noise and dropout, ``shared`` the conditioning choices all ranks make alike."""
    from model.diffusion import sample_timesteps, training_losses

    x0 = cond.latents(items, gen)  # [b, c, f, h', w']
    b = x0.shape[0]
    concat = None
    if model.config.masked is not None:  # Lumiere: a task per sample, its condition concatenated to the input
        from model.masked import training_condition

        x0, concat, _ = training_condition(x0, model.config.masked, gen)
    if model.config.ssr is not None:  # super-resolution: the clip's low-resolution version as the condition
        from model.multidiffusion import training_condition as low_resolution

        concat = low_resolution(x0, model.config.ssr.scale)
    has_image_cond = model.config.unet.image_embed_dim > 0
    image_keep = None
    if cfg.condition_sampling == "per_sample":
        context, image, image_keep = per_sample_conditions(cond, items, branch, cfg, gen)
    else:
        if branch == "content":
            use_image = has_image_cond and _coin(cfg.image_condition_prob, shared)
            context = cond.null.expand(b, -1, -1) if use_image else cond.text(items)  # [b, n, d]
        else:
            use_image = has_image_cond and _coin(cfg.video_image_condition_prob, shared)
            context = cond.text(items)  # null text for text-free clips
        context = cond.cfg_dropout(context, gen)
        image = cond.image(items) if use_image else None
    t = sample_timesteps(b, model.schedule.num_timesteps, gen, x0.device, model.config.diffusion.timestep_shift)
    dtype = next(model.unet.parameters()).dtype
    fps = None
    if model.config.unet.use_fps_condition:  # images (fps 0) get the model's rate, as sampling does
        fps = torch.tensor([it.fps or model.config.fps for it in items], device=x0.device)  # [b]
    conditions = condition_keep = None
    if model.config.unet.conditions.kinds:
        conditions, condition_keep = cond.conditions(items, gen)

    def unet_fn(x, t, context=None, image_embedding=None, concat=None):
        # bf16 engines take bf16 inputs; the loss is computed in fp32 by training_losses.
        cast = lambda v: v.to(dtype) if v is not None else None  # noqa: E731
        extra = {} if image_keep is None else {"image_keep": image_keep}
        if fps is not None:
            extra["fps"] = fps
        if conditions is not None:
            extra.update(conditions={k: cast(v) for k, v in conditions.items()}, condition_keep=condition_keep)
        return net(
            cast(x), t, context=cast(context), image_embedding=cast(image_embedding), concat=cast(concat), **extra
        ).float()

    losses = training_losses(
        unet_fn,
        x0,
        t,
        model.config.diffusion,
        context=context,
        image_embedding=image,
        concat=concat,
        schedule=model.schedule,
        generator=gen,
    )
    if condition_keep is not None:  # which conditions this branch saw: a share per kind
        kinds = model.config.unet.conditions.kinds
        losses["conditions"] = {k: float(condition_keep[:, j].mean()) for j, k in enumerate(kinds)}
    return losses


def _seed_step(cfg: TrainConfig, step: int, rank: int) -> tuple[torch.Generator, torch.Generator]:
    """Seeds the global RNG (UNet dropout) and returns two generators for the step: one per rank (noise,
    timesteps, CFG dropout) and one shared by all ranks (which conditions a batch gets). The shared one matters:
    conditions decide which parameters get gradients (the image MLP), and ZeRO reduces gradients in buckets that
    must hold the same parameters on every rank."""
    seed = (cfg.seed * 1_000_003 + step * 10_007) % 2**62
    torch.manual_seed(seed + rank)
    return torch.Generator().manual_seed(seed + rank), torch.Generator().manual_seed(seed + 2**62)


def joint_step(
    net, model, cond: Conditioner, batch: loader.StepBatch, cfg: TrainConfig, step: int, rank: int, backward, micro_step
) -> dict[str, float]:
    """Forward and backward of both branches of one step: ``backward(loss)`` then ``micro_step()`` per branch
    (DeepSpeed: engine.backward / engine.step). Returns the branch losses as floats."""
    gen, shared = _seed_step(cfg, step, rank)
    losses = {"image": 0.0, "video": 0.0, "diffusion_video": 0.0, "coherence": 0.0}
    for branch, items, weight in (("content", batch.image, cfg.image_loss_weight), ("motion", batch.video, 1.0)):
        if not items:
            continue
        out = branch_loss(net, model, cond, items, branch, cfg, gen, shared)
        backward(out["loss"] * weight)
        micro_step()
        for kind, share in out.get("conditions", {}).items():
            losses.setdefault("conditions", {})[f"{branch}/{kind}"] = share
        if branch == "content":
            losses["image"] = out["loss"].item()
        else:
            losses.update(
                video=out["loss"].item(), diffusion_video=out["diffusion"].item(), coherence=out["coherence"].item()
            )
    return losses


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(
    engine, ema: Ema, step: int, position: dict, rank: int, world_size: int, cfg: TrainConfig, model, metrics: dict
) -> None:
    """Every rank writes its DeepSpeed shard + its worker state into a local directory and reports it; Ray merges
    the directories into one checkpoint in storage. ``ray.train.report`` is a barrier: all ranks call it."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix="t2v-ckpt-") as d:
        engine.save_checkpoint(d, tag=export.DS_TAG, client_state={"step": step})
        torch.save(
            {"step": step, "loader": position, "ema": ema.state(), "rank": rank},
            Path(d) / export.worker_state_file(rank),
        )
        if rank == 0:
            info = {
                "step": step,
                "world_size": world_size,
                "zero_stage": cfg.zero_stage,
                "model_config": settings.to_dict(model.config),
                "param_names": [n for n, _ in engine.module.named_parameters()],
                "time": time.time(),
            }
            (Path(d) / export.TRAIN_STATE_FILE).write_text(json.dumps(info), encoding="utf-8")
            if model.config.encoders.clip_pretrained is None:  # random CLIP: keep it for offline export
                torch.save(
                    {
                        "text_encoder": model.text_encoder.state_dict(),
                        "image_encoder": model.image_encoder.state_dict(),
                    },
                    Path(d) / "encoders.pt",
                )
        ray.train.report(
            {"step": step, **metrics},
            checkpoint=ray.train.Checkpoint.from_directory(d),
            checkpoint_dir_name=f"step_{step:08d}",
        )


def load_checkpoint(engine, ema: Ema, checkpoint, rank: int, world_size: int, cfg: TrainConfig) -> tuple[int, dict]:
    """Restore engine (weights, optimizer, LR schedule), EMA and data position; returns (step, loader state)."""
    with checkpoint.as_directory() as d:
        info = json.loads((Path(d) / export.TRAIN_STATE_FILE).read_text(encoding="utf-8"))
        if info["world_size"] != world_size or info["zero_stage"] != cfg.zero_stage:
            raise RuntimeError(f"checkpoint {d} is of another world size or ZeRO stage: resume it with Reshard")
        engine.load_checkpoint(d, tag=export.DS_TAG, load_optimizer_states=True, load_lr_scheduler_states=True)
        state = torch.load(Path(d) / export.worker_state_file(rank), map_location="cpu", weights_only=True)
    ema.load(state["ema"])
    return int(state["step"]), state["loader"]


class Reshard:
    """Resume from a checkpoint another number of workers (or ZeRO stage) wrote.

    DeepSpeed's own checkpoint holds optimizer partitions for its world size, so the run starts from the
    consolidated fp32 weights (``export.state_from_checkpoint``) loaded before ``deepspeed.initialize`` with a fresh
    optimizer state (Adam moments restart; under bf16 the master weights start from the bf16-cast module, as a new
    run's do). Kept: the step (and so the LR schedule), the EMA (its saved copy when ZeRO 0-2 wrote it and
    this run is ZeRO 0-2, else the consolidated weights) and the data position: every old rank's loader state,
    which ``loader.TrainLoader(resharded_from=...)`` turns into the samples all ranks took (see pipelines/loader.py).
    """

    def __init__(self, info: dict, world_size: int, zero_stage: int, loader_states: list, weights, ema, ema_updates):
        self.info, self.world_size, self.zero_stage = info, world_size, zero_stage
        self.loader_states, self.weights, self.ema, self.ema_updates = loader_states, weights, ema, ema_updates

    @classmethod
    def read(cls, checkpoint, rank: int, world_size: int, cfg: TrainConfig) -> Reshard | None:
        """None when the checkpoint's world size and ZeRO stage are this run's (the full DeepSpeed load applies)."""
        with checkpoint.as_directory() as d:
            d = Path(d)
            info = json.loads((d / export.TRAIN_STATE_FILE).read_text(encoding="utf-8"))
            if info["world_size"] == world_size and info["zero_stage"] == cfg.zero_stage:
                return None
            states = [
                torch.load(d / export.worker_state_file(r), map_location="cpu", weights_only=True)
                for r in range(info["world_size"])
            ]
            weights, ema = {}, None  # ZeRO-3 copies rank 0's weights in (sharded.build_model)
            if rank == 0 or cfg.zero_stage < 3:
                weights, ema, _ = export.state_from_checkpoint(d)
        return cls(
            info, world_size, cfg.zero_stage, [s["loader"] for s in states], weights, ema, states[0]["ema"]["updates"]
        )

    def message(self) -> str:
        old, new = self.info["world_size"], self.world_size
        text = f"optimizer state restarts: checkpoint was saved by {old} workers, this run has {new}"
        if self.info["zero_stage"] != self.zero_stage:
            text += f" (ZeRO stage {self.info['zero_stage']} -> {self.zero_stage})"
        return text

    def tags(self) -> dict[str, str]:
        return {
            "resumed_from_workers": str(self.info["world_size"]),
            "resumed_from_zero_stage": str(self.info["zero_stage"]),
            "resumed_at_step": str(self.info["step"]),
            "reshard": self.message(),
        }

    def resume(self, engine, scheduler, ema: Ema, rank: int) -> int:
        """Step, LR schedule and EMA of the checkpoint on the freshly initialised engine -> the step."""
        step = int(self.info["step"])
        if rank == 0:
            log.warning("%s; step, EMA and data position carry over", self.message())
        scheduler.last_epoch = step - 1
        scheduler.step()  # the learning rate of step ``step``, as the loaded schedule state would give
        engine.global_steps = step
        engine.global_samples = step * engine.train_batch_size()
        ema.updates = int(self.ema_updates)
        if self.ema is not None and ema.holder and not ema.partitioned:
            names = [name for name, _ in engine.module.named_parameters()]
            ema.tensors = [self.ema[n].to(e.device, torch.float32) for n, e in zip(names, ema.tensors)]
        self.weights = self.ema = None  # host memory: the engine holds the weights now
        return step


# ---------------------------------------------------------------------------------------------------------------
# Rank-0 side work: samples, snapshots, export


class Exporter:
    """Rank 0's separate copy of the model (sharing the frozen encoders) that gathered weights are loaded into
    for sample videos, snapshots and the final export; the engine's weights are never touched.

    The copy exists only while it is used: on the device for sampling and evaluation (``model``, dropped by
    ``release``), in host memory for snapshots and the export, so the device never keeps a second UNet."""

    def __init__(self, model, engine, ema: Ema, rank: int, cfg: TrainConfig, out: Path, tracker):
        self.engine, self.ema, self.rank, self.cfg, self.out, self.tracker = engine, ema, rank, cfg, out, tracker
        self.base, self._model = model, None

    def _copy(self, device: torch.device):
        from model.stunet import build_video_unet
        from model.text_to_video import TextToVideo

        unet = build_video_unet(self.base.config, "meta").to_empty(device=device)  # no init: weights are loaded
        b = self.base
        return TextToVideo(b.config, unet, b.text_encoder, b.image_encoder, b.first_stage)

    @property
    def model(self):
        if self._model is None and self.rank == 0:
            self._model = self._copy(self.base.device)
        return self._model

    def release(self) -> None:
        self._model = None
        if self.base.device.type == "cuda":
            torch.cuda.empty_cache()

    def gather(self, ema: bool) -> dict[str, Tensor] | None:
        """Full weights on rank 0 (collective under ZeRO: every rank calls this): the fp32 master weights, or the
        EMA (kept in fp32; whole on rank 0 under ZeRO 0-2, per partition under ZeRO-3)."""
        if ema:
            if not self.ema.partitioned:
                return self.ema.full_state() if self.rank == 0 else None
            with self.ema.swapped_in():
                return export.consolidated_state_dict(self.engine)
        return export.master_state_dict(self.engine)

    def samples(self, step: int) -> None:
        state = self.gather(ema=True)
        if self.rank != 0:
            return
        from pipelines import media

        self.model.unet.load_state_dict(state)
        t0 = time.perf_counter()
        frames = self.model.generate(
            list(self.cfg.sample_prompts),
            steps=self.cfg.sample_steps,
            guidance=self.cfg.sample_guidance,
            seed=self.cfg.seed,
            negative_prompt=self.cfg.negative_prompt,
        )  # [b, f, h, w, 3]
        with tempfile.TemporaryDirectory() as d:
            for i, (prompt, video) in enumerate(zip(self.cfg.sample_prompts, frames)):
                stem = f"{i:02d}_" + "".join(c if c.isalnum() else "_" for c in prompt)[:60]
                media.write_mp4(video, Path(d) / f"{stem}.mp4", self.cfg.sample_fps)
                media.write_gif(video, Path(d) / f"{stem}.gif", self.cfg.sample_fps)
            self.tracker.log_artifact(d, f"samples/step_{step:06d}")
        self.tracker.log_metrics({"sample_time_s": time.perf_counter() - t0}, step)
        self.release()

    def snapshot(self, step: int) -> None:
        state = self.gather(ema=True)
        if self.rank == 0:
            host = self._copy(torch.device("cpu"))
            host.unet.load_state_dict(state)
            host.save(self.out / EXPORT_DIR / "snapshots" / f"model_ema_{step:08d}.pt", step=step, ema=True)

    def final(self, step: int, metrics: dict) -> str | None:
        """Writes the final model (rank 0); returns what it wrote, for the log, or None."""
        if not self.cfg.save_final:  # what the driver reads, without weights (tens of GiB for the large sizes)
            if self.rank == 0:
                (self.out / EXPORT_DIR).mkdir(parents=True, exist_ok=True)
                (self.out / EXPORT_DIR / "export.json").write_text(json.dumps({"step": step, "checkpoint": None}))
                (self.out / EXPORT_DIR / "final_metrics.json").write_text(json.dumps(metrics), encoding="utf-8")
            return None
        raw = self.gather(ema=False)
        ema = self.gather(ema=True)
        if self.rank == 0:
            host = self._copy(torch.device("cpu"))
            files = export.write_models(host, raw, ema, self.out / EXPORT_DIR, step, dtype=self.cfg.export_dtype)
            (self.out / EXPORT_DIR / "final_metrics.json").write_text(json.dumps(metrics), encoding="utf-8")
            where = self.out / EXPORT_DIR
            names = [
                os.path.relpath(files[k], where) for k in ("checkpoint", "ema_checkpoint", "diffusers") if files.get(k)
            ]
            return f"{', '.join(names)} to {where}"
        return None


# ---------------------------------------------------------------------------------------------------------------
# The loop


def _log_bucket_histogram(data: loader.TrainLoader, tracker, step: int, world_size: int) -> None:
    """The samples of each shape (bucket and frames) all ranks trained on: ``data_bucket/<shape>`` metrics and
    ``data/buckets.json``."""
    if data.plan is None:
        return  # shapes=model: every sample was resized to the model's one shape
    names = data.shape_names  # the same list on every rank
    totals = _reduce_mean([float(data.seen.get(k, 0)) for k in names], world_size)
    counts = {k: round(v * world_size) for k, v in zip(names, totals)}
    tracker.log_metrics({f"data_bucket/{k}": float(v) for k, v in counts.items()}, step)
    tracker.log_text(json.dumps({"step": step, "samples_per_bucket": counts}, indent=1), "data/buckets.json")


def _reduce_mean(values: list[float], world_size: int) -> list[float]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    if world_size > 1:
        dist.all_reduce(t)
        t /= world_size
    return t.tolist()


def _debug_fail(cfg: TrainConfig, step: int, rank: int, world_size: int, out: Path) -> None:
    """Test hook: the last rank dies like a killed process, once (a marker file stops it from firing again).

    It first waits (up to a minute) until the Ray Train controller has registered the latest checkpoint: the
    controller learns of reported checkpoints asynchronously, so on a busy machine a process killed right after a
    report can be recovered from the checkpoint before it; waiting makes the test's expected restart step exact."""
    if cfg.debug_fail_at_step != step or rank != world_size - 1:
        return
    marker = out / f".debug_failed_at_{step}"
    if marker.exists():
        return
    last = step // cfg.checkpoint_every * cfg.checkpoint_every
    snapshot = out / RAY_DIR / RAY_RUN_NAME / "checkpoint_manager_snapshot.json"
    deadline = time.time() + 60
    while last and time.time() < deadline:
        if snapshot.is_file() and f'"step_{last:08d}"' in snapshot.read_text(encoding="utf-8"):
            break
        time.sleep(0.5)
    marker.write_text(str(os.getpid()), encoding="utf-8")
    log.warning("debug_fail_at_step=%d: rank %d exits now", step, rank)
    os._exit(1)


def _time_left(clock: TimeBudget, done: int, todo: int) -> str:
    """Minutes left: the steps still to do at this run's pace, or the time limit if that comes first."""
    spent = time.perf_counter() - clock.t0
    left = spent / max(done, 1) * todo
    if clock.seconds > 0:
        left = min(left, max(0.0, clock.seconds - spent))
    return f"{left / 60:.1f} min"


def train_loop_per_worker(config: dict) -> None:
    import deepspeed
    import ray.train
    import ray.train.torch

    from pipelines import tracking

    # -- config and process group (Ray Train already created it: gloo on CPU, NCCL on GPU) ----------------------
    cfg = settings.from_dict(TrainConfig, config["cfg"])
    out = Path(cfg.output).resolve()
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.threads_per_worker or cfg.cpus_per_worker)
    device = ray.train.torch.get_device()
    logs.setup(rank=rank)
    if not cfg.use_gpu:
        _skip_inference_shm_op()
    t_start = time.perf_counter()
    clock = TimeBudget(cfg.time_limit_minutes)

    # -- model and DeepSpeed -------------------------------------------------------------------------------------
    branches = int(cfg.image_batch_size > 0) + int(cfg.video_batch_size > 0)
    speed_on = speed.check(cfg, device)
    checkpoint = ray.train.get_checkpoint()
    # another world size or ZeRO stage: the weights come consolidated, before DeepSpeed partitions them
    reshard = Reshard.read(checkpoint, rank, world_size, cfg) if checkpoint is not None else None
    if cfg.zero_stage == 3:  # partitioned from construction on: no rank holds the whole UNet
        ds_config = deepspeed_config(cfg, world_size, branches)
        model = sharded.build_model(
            cfg,
            device,
            ds_config,
            resolve_model_config(cfg),
            _is_t2v_checkpoint(cfg.init_from),
            weights=reshard.weights if reshard is not None else None,
        )
    else:
        model = build_model(cfg, device)
        if reshard is not None:
            model.unet.load_state_dict(reshard.weights)
    model.unet.train()
    speed.prepare_unet(model.unet, cfg)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model.unet,
        model_parameters=param_groups(model.unet, cfg),
        config=deepspeed_config(cfg, world_size, branches),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg, clock.used)),
    )
    speed.compile_engine(engine, cfg)
    ema = Ema(engine, cfg.ema_decay, rank, on_cpu=cfg.ema_on_cpu)
    optimizer_step = OptimizerStep(engine, cfg)

    # -- resume --------------------------------------------------------------------------------------------------
    step, loader_state = 0, None
    if reshard is not None:
        step = reshard.resume(engine, scheduler, ema, rank)
        log.info("resumed from step %d (resharded)", step)
    elif checkpoint is not None:
        step, loader_state = load_checkpoint(engine, ema, checkpoint, rank, world_size, cfg)
        log.info("resumed from step %d", step)

    # -- data ----------------------------------------------------------------------------------------------------
    data = loader.TrainLoader(
        loader_spec(cfg, model),
        rank,
        world_size,
        state=loader_state,
        resharded_from=reshard.loader_states if reshard is not None else None,
    )
    cond = Conditioner(model, cfg, device)

    # -- tracking (rank 0 only) ----------------------------------------------------------------------------------
    tracker: Any = tracking.NullTracker()
    if rank == 0 and config.get("run_id"):
        # an outage of the tracking store never stops training: calls are buffered and retried in the background
        tracker = BufferedTracker(
            lambda: tracking.MlflowTracker(
                config["tracking_uri"],
                cfg.mlflow.experiment,
                run_id=config["run_id"],
                system_metrics_s=cfg.mlflow.system_metrics_s,
            ),
            run_id=config["run_id"],
        )
        counts = model.unet.parameter_counts()
        tracker.log_params(
            {
                "derived": {
                    "world_size": world_size,
                    "unet_params": counts["total"],
                    "unet_temporal_params": counts["temporal"],
                    "deepspeed": json.dumps(deepspeed_config(cfg, world_size, branches)),
                }
            }
        )
        tracker.set_tags(run_facts.hardware_tags(device, world_size, cfg.cpus_per_worker))
        if reshard is not None:
            tracker.set_tags(reshard.tags())
    exporter = Exporter(model, engine, ema, rank, cfg, out, tracker)
    evaluator = PeriodicEvaluator(cfg.periodic_eval, rank, world_size, tracker)
    throughput = run_facts.Throughput()
    eff = None
    if rank == 0:
        # counted on the meta-device UNet at this run's shapes; Throughput's own first-step count would add encoders
        flops = efficiency.step_flops(model.config, cfg.image_batch_size, cfg.video_batch_size)
        throughput.flops_per_step = flops.step
        eff = efficiency.Efficiency(
            flops, world_size, run_facts.peak_flops(device, cfg.bf16, cfg.device_peak_tflops), device
        )
        log.info("%s", eff.describe())
    print_every = cfg.print_every or max(1, cfg.steps // 20)
    log.info(
        "%d worker(s), ZeRO-%d%s, start-up %.1fs; steps %d..%d",
        world_size,
        cfg.zero_stage,
        "".join(f", {s}" for s in speed_on),
        time.perf_counter() - t_start,
        step + 1,
        cfg.steps,
    )

    # -- loop ----------------------------------------------------------------------------------------------------
    metrics: dict[str, float] = {}
    position = loader_state
    clock.start()
    evaluator.start()
    first_step = step
    samples_per_step = (cfg.image_batch_size + cfg.video_batch_size) * world_size
    try:
        while step < cfg.steps:
            step += 1
            t0 = time.perf_counter()
            batch = next(data)
            t_data = time.perf_counter() - t0
            # engine.step() is a no-op until the last branch (the gradient accumulation boundary)
            with throughput.counting(rank == 0 and step == first_step + 1), speed.attention(cfg):
                losses = joint_step(engine, model, cond, batch, cfg, step, rank, engine.backward, optimizer_step)
            ema.update()
            position = batch.position
            step_time = time.perf_counter() - t0
            used = clock.local()  # share of the time limit (0 without one)
            img, vid, dvid, coh, wait, stop, clock.used = _reduce_mean(
                [
                    losses["image"],
                    losses["video"],
                    losses["diffusion_video"],
                    losses["coherence"],
                    t_data,
                    float(used >= 1.0),
                    used,
                ],
                world_size,
            )
            metrics = {
                "loss": cfg.image_loss_weight * img + vid,
                "loss_image": img,
                "loss_video": vid,
                "diffusion_loss_video": dvid,
                "coherence_loss": coh,
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": optimizer_step.grad_norm,
                "samples_per_s": samples_per_step / step_time,
                "step_time_s": step_time,
                "data_wait_s": wait,
            }
            # which structure conditions each branch saw this step (rank 0's share of its batch)
            metrics.update({f"conditions/{k}": v for k, v in losses.get("conditions", {}).items()})
            if not cfg.image_batch_size:
                metrics.pop("loss_image")
            if not cfg.video_batch_size:
                for k in ("loss_video", "diffusion_loss_video", "coherence_loss"):
                    metrics.pop(k)
            throughput.record(step_time, metrics["samples_per_s"])
            if eff is not None:
                metrics.update(eff.figures(step_time, wait))
            if step % cfg.log_every == 0 or step == cfg.steps:
                tracker.log_metrics({**metrics, **data.health.metrics()}, step)
            if step % print_every == 0 or step == 1 or step == cfg.steps:
                log.info(
                    "step %d/%d loss %.4f (image %.4f video %.4f coherence %.4f) lr %.2e %.1f samples/s "
                    "data wait %.0f%% %s, %s left",
                    step,
                    cfg.steps,
                    metrics["loss"],
                    img,
                    vid,
                    coh,
                    metrics["lr"],
                    metrics["samples_per_s"],
                    100 * wait / step_time,
                    efficiency.Efficiency.progress(metrics) if eff is not None else "",
                    _time_left(clock, step - first_step, cfg.steps - step),
                )
            if cfg.sample_every and step % cfg.sample_every == 0:
                exporter.samples(step)
            if cfg.snapshot_every and step % cfg.snapshot_every == 0:
                exporter.snapshot(step)
            _debug_fail(cfg, step, rank, world_size, out)
            last = step == cfg.steps or stop > 0
            if evaluator.due(step, last):
                clock.t0 += evaluator.run(exporter, step)  # evaluations do not use up the time limit
                exporter.release()
            if step % cfg.checkpoint_every == 0 or (last and cfg.save_final):
                save_checkpoint(engine, ema, step, position, rank, world_size, cfg, model, metrics)
            if stop > 0:
                log.info("time limit of %s min reached at step %d", cfg.time_limit_minutes, step)
                break
    finally:
        data.close()
    _log_bucket_histogram(data, tracker, step, world_size)

    # -- export --------------------------------------------------------------------------------------------------
    if cfg.sample_every and step % cfg.sample_every != 0 and metrics:
        exporter.samples(step)
    t_export = time.perf_counter()
    written = exporter.final(step, metrics)
    if written:
        log.info("exported %s in %.1fs", written, time.perf_counter() - t_export)
    if rank == 0:
        summary = throughput.summary(run_facts.peak_flops(device, cfg.bf16, cfg.device_peak_tflops))
        tracker.log_metrics({"train_time_s": time.perf_counter() - t_start, **summary}, step)
        tracker.set_tags(run_facts.summary_tags(summary))
        tracker.pause()  # the driver marks the run finished once the model is logged
