"""Lumiere's STUNet through the real trainer (Ray Train + DeepSpeed, one CPU worker): ``tiny-stunet`` inflated from
a trained image model's checkpoint with its spatial weights frozen by config trains, and only its temporal weights
move."""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = pytest.mark.slow


def test_tiny_stunet_inflated_from_an_image_model_trains_only_its_temporal_weights(
    ray_session, shards, train_config, small_model, tmp_path
):
    from model.registry import get_config
    from model.stunet import STUNet
    from model.text_to_video import TextToVideo
    from model.validation import ConfigError
    from pipelines.training import job as train
    from pipelines.training.worker import resolve_model_config

    torch.manual_seed(5)
    image_model = TextToVideo.build(get_config("tiny", small_model))
    with torch.no_grad():  # a trained image model: no zero-initialised layer left
        for p in image_model.unet.parameters():
            p.normal_(0, 0.05)
    image_path = image_model.save(tmp_path / "image.pt")

    out = tmp_path / "run"
    overrides = {**small_model, "stunet.trainable": "temporal"}
    settings = dict(model="tiny-stunet", model_overrides=overrides, init_from=str(image_path), num_workers=1)
    with pytest.raises(ConfigError, match="set image_batch_size=0"):  # image batches would train nothing
        resolve_model_config(train_config(shards, out, None, **settings))
    cfg = train_config(shards, out, None, **settings, image_batch_size=0, steps=2)
    result = train.run(cfg)
    assert result["steps"] == 2 and math.isfinite(result["final_loss"])

    trained = TextToVideo.from_checkpoint(out / "model" / "model.pt")
    assert isinstance(trained.unet, STUNet) and trained.config.stunet.trainable == "temporal"
    source = image_model.unet.state_dict()
    for name, p in trained.unet.named_spatial_parameters():
        assert torch.equal(p, source[name]), f"frozen spatial weight {name} changed"
    # The text encoder is the image model's, so the STUNet reads prompts as the image model learnt to.
    for name, p in trained.text_encoder.state_dict().items():
        assert torch.equal(p, image_model.text_encoder.state_dict()[name]), name
    eye = torch.eye(trained.unet.temporal_down["0"].conv.weight.shape[0])
    assert not torch.equal(trained.unet.temporal_down["0"].conv.weight[:, :, 1, 0, 0], eye)  # new layers trained
