"""The training worker's pieces on their own, in the test process: learning-rate schedule, DeepSpeed config, parameter
groups, conditioning of pre-encoded items and one branch loss. tests/integration/test_training_job.py runs them under
Ray Train and DeepSpeed."""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch


def test_schedule_config_and_conditioning_without_ray(shards, train_config, tmp_path):
    import numpy as np

    from pipelines import loader
    from pipelines.training.worker import (
        Conditioner,
        branch_loss,
        build_model,
        deepspeed_config,
        encoder_identity,
        lr_factor,
        param_groups,
    )

    cfg = train_config(shards, tmp_path, None, steps=100, warmup_steps=10, min_lr_ratio=0.1, spatial_lr_mult=0.5)
    assert lr_factor(0, cfg) == pytest.approx(0.1) and lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(99, cfg) == pytest.approx(0.1, abs=1e-3)  # cosine down to min_lr_ratio
    # a time limit that runs out first drives the decay: half the minutes used at step 20 -> the cosine midpoint
    assert lr_factor(20, cfg, time_used=0.5) == pytest.approx(0.55) and lr_factor(20, cfg, time_used=1.0) == 0.1
    ds = deepspeed_config(cfg, world_size=2, branches=2)
    assert ds["gradient_accumulation_steps"] == 2 and ds["train_batch_size"] == 2 * 2 * 2
    assert ds["bf16"]["enabled"] is False
    # ZeRO-2 on CPU copies no gradient into a contiguous buffer; on GPUs DeepSpeed's default (on) stays
    assert ds["zero_optimization"] == {"stage": 2, "contiguous_gradients": False}
    gpu = dataclasses.replace(cfg, use_gpu=True)
    assert deepspeed_config(gpu, 2, 2)["zero_optimization"] == {"stage": 2}
    site = train_config(shards, tmp_path, None, deepspeed={"zero_optimization": {"contiguous_gradients": True}})
    assert deepspeed_config(site, 2, 2)["zero_optimization"] == {"stage": 2, "contiguous_gradients": True}

    model = build_model(cfg, torch.device("cpu"))
    groups = param_groups(model.unet, cfg)
    assert [(g["name"], g["lr"]) for g in groups] == [("temporal", 1e-3), ("spatial", 5e-4)]
    assert sum(len(g["params"]) for g in groups) == len(list(model.unet.parameters()))

    # pre-encoded items are used as they are: latents (identity first stage: the pixels) and text states
    cond = Conditioner(model, cfg, torch.device("cpu"))
    mean = np.random.default_rng(0).uniform(-1, 1, (3, 4, 16, 16)).astype(np.float32)
    text = np.random.default_rng(1).normal(size=(77, 32)).astype(np.float32)
    pre = loader.Item(
        "k",
        "video_text",
        "a red circle moving left",
        None,
        np.zeros((16, 16, 3), np.uint8),
        latent_mean=mean,
        latent_std=np.zeros_like(mean),
        text_emb=text,
    )
    free = loader.Item("f", "video", None, np.zeros((4, 16, 16, 3), np.uint8), np.zeros((16, 16, 3), np.uint8))
    x0 = cond.latents([pre, free], torch.Generator().manual_seed(0))
    assert x0.shape == (2, 3, 4, 16, 16)
    torch.testing.assert_close(x0[0], torch.from_numpy(mean))
    assert torch.all(x0[1] == -1)  # black frames -> -1 in pixel space
    context = cond.text([pre, free])
    torch.testing.assert_close(context[0], torch.from_numpy(text))
    torch.testing.assert_close(context[1], cond.null[0])  # text-free: the null text
    out = branch_loss(
        model.unet,
        model,
        cond,
        [pre, free],
        "motion",
        cfg,
        torch.Generator().manual_seed(0),
        torch.Generator().manual_seed(1),
    )
    assert out["loss"].requires_grad and out["coherence"] >= 0
    # the identity the curation pre-encode stage writes for these encoders is what training expects
    identity = encoder_identity(model)
    assert identity["clip_model"] == "t2v-tiny-clip" and len(identity["weights_sha1"]) == 40


def test_vgen_condition_dropout_shares():
    from pipelines.training.worker import condition_dropout

    g = torch.Generator().manual_seed(0)
    keep = condition_dropout(4000, 0.5, 0.1, 0.1, 2, g)  # [2 conditions, b]
    # 10% of the samples lose both, 10% keep both; each condition then drops Binomial(b, 0.5) samples, all from
    # the other 80%, so 0.5 / 0.8 of those lose it (VGen draws the count over the whole batch)
    share = 0.5 / 0.8
    assert abs((~keep[0]).float().mean() - (0.1 + 0.5)) < 0.03  # text dropped
    assert abs((~keep).all(0).float().mean() - (0.1 + 0.8 * share**2)) < 0.03  # both dropped
    assert abs(keep.all(0).float().mean() - (0.1 + 0.8 * (1 - share) ** 2)) < 0.03  # both kept
    assert torch.equal(condition_dropout(50, 1.0, 0.0, 1.0, 2, g), torch.ones(2, 50, dtype=torch.bool))
    assert not condition_dropout(50, 0.0, 1.0, 0.0, 2, g).any()
    assert condition_dropout(50, 0.0, 0.0, 0.0, 2, g).all()


@functools.cache
def _tiny_model():
    from model.registry import get_config
    from model.text_to_video import TextToVideo

    torch.manual_seed(0)
    return TextToVideo.build(get_config("tiny", {"num_frames": 2, "height": 16, "width": 16}))


def _recipe_setup(**changes):
    import numpy as np

    from pipelines import loader
    from pipelines.training.config import TrainConfig
    from pipelines.training.worker import Conditioner

    model = _tiny_model()
    cfg = TrainConfig(data=[], condition_sampling="per_sample", negative_prompt="blurry", **changes)
    rng = np.random.default_rng(0)
    items = []
    for i in range(16):
        caption = None if i % 4 == 3 else f"clip {i}"  # every fourth clip is text-free
        frames = np.zeros((2, 16, 16, 3), np.uint8)
        item = loader.Item(f"k{i}", "video" if caption is None else "video_text", caption, frames, frames[0])
        item.text_emb = rng.normal(size=(77, 32)).astype(np.float32) if caption else None
        item.image_emb = rng.normal(size=32).astype(np.float32)
        items.append(item)
    return model, cfg, Conditioner(model, cfg, torch.device("cpu")), items


def test_per_sample_recipe_content_branch_chooses_text_or_image_per_sample():
    from pipelines.training.worker import per_sample_conditions

    model, cfg, cond, items = _recipe_setup(image_condition_prob=0.5, condition_dropout=0.0, p_all_zero=0.0)
    context, image, keep = per_sample_conditions(cond, items, "content", cfg, torch.Generator().manual_seed(1))
    captions = cond.text(items)
    for i, it in enumerate(items):
        torch.testing.assert_close(image[i], torch.from_numpy(it.image_emb))
        if keep[i] == 1:  # conditioned on its image: the null text
            torch.testing.assert_close(context[i], cond.null[0])
        else:  # conditioned on its caption: zero image tokens
            torch.testing.assert_close(context[i], captions[i])
    assert 0 < keep.sum() < len(items)  # both kinds in one batch


def test_per_sample_recipe_motion_branch_gives_every_clip_its_image_and_drops_conditions():
    from pipelines.training.worker import branch_loss, per_sample_conditions

    # the paper's recipe: every clip gets its image; no dropout -> every caption (null text when text-free) kept
    model, cfg, cond, items = _recipe_setup(video_image_condition_prob=1.0, condition_dropout=0.0, p_all_zero=0.0)
    context, image, keep = per_sample_conditions(cond, items, "motion", cfg, torch.Generator().manual_seed(1))
    assert keep.tolist() == [1.0] * len(items)
    torch.testing.assert_close(context, cond.text(items))
    # all-zero samples lose both: the negative prompt (or zeros, as VGen) and zero image tokens
    for dropped_text, expected in (("negative_prompt", cond.negative[0]), ("zeros", torch.zeros(77, 32))):
        model, cfg, cond, items = _recipe_setup(p_all_zero=1.0, p_all_keep=0.0, dropped_text=dropped_text)
        context, image, keep = per_sample_conditions(cond, items, "motion", cfg, torch.Generator().manual_seed(2))
        assert keep.sum() == 0 and all(torch.equal(c, expected) for c in context)
    # the UNet receives those per-sample image masks
    model, cfg, cond, items = _recipe_setup(video_image_condition_prob=1.0, condition_dropout=0.5, p_all_zero=0.1)
    seen = {}

    def net(*args, **kwargs):
        seen.update(kwargs)
        return model.unet(*args, **kwargs)

    g = torch.Generator().manual_seed(3)
    expected_keep = per_sample_conditions(cond, items[:8], "motion", cfg, torch.Generator().manual_seed(3))[2]
    out = branch_loss(net, model, cond, items[:8], "motion", cfg, g, torch.Generator())
    assert out["loss"].requires_grad
    assert seen["image_embedding"].shape == (8, 32) and torch.equal(seen["image_keep"], expected_keep)
    assert 0 < expected_keep.sum() < 8
