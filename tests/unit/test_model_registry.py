"""The model registry: names, validation, overrides, serialisation, and that every size builds."""

from __future__ import annotations

import pytest
import torch

from model.encoders import PROJECT_CLIP_CONFIGS
from model.registry import MODEL_CONFIGS, ModelConfig, get_config
from model.unet import UNet3D, build_unet
from pipelines import settings
from pipelines.settings import ConfigError


def test_registry_names_tiny_first():
    assert list(MODEL_CONFIGS)[:1] == ["tiny"]
    assert {"tiny", "small", "modelscope-1.7b"} <= set(MODEL_CONFIGS)
    for name in MODEL_CONFIGS:
        assert get_config(name).name == name


def test_every_size_builds_and_has_sensible_parameter_counts():
    counts = {name: build_unet(get_config(name).unet, "meta").parameter_counts()["total"] for name in MODEL_CONFIGS}
    assert counts["tiny"] < 5e6 < counts["small"] < 5e8 < counts["modelscope-1.7b"]


def test_tiny_trains_on_its_own_clip_shape():
    cfg = get_config("tiny")
    assert cfg.encoders.first_stage == "identity" and cfg.latent_shape == (3, 8, 32, 32)
    clip = PROJECT_CLIP_CONFIGS[cfg.encoders.clip_model]
    assert (cfg.unet.context_dim, cfg.unet.image_embed_dim) == (clip["text_cfg"]["width"], clip["embed_dim"])
    torch.manual_seed(0)
    unet = UNet3D(cfg.unet).train()
    x = torch.randn(2, *cfg.latent_shape)
    context = torch.randn(2, cfg.encoders.text_len, cfg.unet.context_dim)
    out = unet(x, torch.tensor([1, 999]), context, torch.randn(2, cfg.unet.image_embed_dim))
    out.square().mean().backward()  # one full training step's worth of compute at batch 2
    assert out.shape == x.shape
    assert all(p.grad is not None for p in unet.parameters())


def test_latent_sizes_follow_the_first_stage():
    assert get_config("modelscope-1.7b").latent_shape == (4, 16, 32, 32)
    assert get_config("small", {"height": 128, "num_frames": 8}).latent_shape == (4, 8, 16, 32)


def test_overrides_nested_or_dotted_and_registry_untouched():
    cfg = get_config("tiny", {"unet.model_channels": 32, "num_frames": 4, "diffusion": {"prediction": "eps"}})
    assert (cfg.unet.model_channels, cfg.num_frames, cfg.diffusion.prediction) == (32, 4, "eps")
    assert cfg.unet.channel_mult == (1, 2, 4)  # untouched fields keep the registry values
    cfg.unet.model_channels = 64
    assert MODEL_CONFIGS["tiny"].unet.model_channels == 16 == get_config("tiny").unet.model_channels


def test_round_trips_through_plain_data():
    for name in MODEL_CONFIGS:
        cfg = get_config(name)
        assert settings.from_dict(ModelConfig, settings.to_dict(cfg)) == cfg


def test_errors_name_the_problem():
    cases = [
        (("huge",), "unknown model config 'huge'; choose one of: tiny, small, modelscope-1.7b"),
        (("tiny", {"unet.widht": 3}), "unknown setting.*unet.widht"),
        (("tiny", {"unet.context_dim": 64}), "t2v-tiny-clip text states are 32 wide; set unet.context_dim=32"),
        (("tiny", {"unet.image_embed_dim": 16}), "set unet.image_embed_dim=32"),
        (("tiny", {"encoders.first_stage": "sd_vae"}), "set unet.in_channels=4"),
        (("small", {"height": 200}), "multiples of 64"),
        (("tiny", {"encoders.text_len": 16}), "num_text_tokens=77 must equal encoders.text_len=16"),
        (("tiny", {"num_frames": 0}), "num_frames=0: must be a positive integer"),
        (("tiny", ["unet.model_channels=8"]), "expected a mapping of settings"),
    ]
    for args, message in cases:
        with pytest.raises(ConfigError, match=message):
            get_config(*args)
