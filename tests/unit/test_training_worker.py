"""The training worker's pieces on their own, in the test process: learning-rate schedule, DeepSpeed config, parameter
groups, conditioning of pre-encoded items and one branch loss. tests/integration/test_training_job.py runs them under
Ray Train and DeepSpeed."""

from __future__ import annotations

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
    assert ds["gradient_accumulation_steps"] == 2 and ds["zero_optimization"] == {"stage": 2}
    assert ds["train_batch_size"] == 2 * 2 * 2 and ds["bf16"]["enabled"] is False
    site = train_config(shards, tmp_path, None, deepspeed={"zero_optimization": {"contiguous_gradients": False}})
    assert deepspeed_config(site, 2, 2)["zero_optimization"] == {"stage": 2, "contiguous_gradients": False}

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
