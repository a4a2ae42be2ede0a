"""ModelScope <-> diffusers UNet3DConditionModel weights: same outputs after conversion, lossless round trips,
and the released 1.7B layout maps key-for-key onto diffusers' default UNet3DConditionModel."""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")  # pinned in clusters/constraints.txt; always installed here

from model.checkpoint import CheckpointError, load_unet_weights  # noqa: E402
from model.convert import (  # noqa: E402
    ConversionError,
    diffusers_config,
    diffusers_to_modelscope,
    modelscope_to_diffusers,
    unet_config_from_diffusers,
    unet_from_diffusers,
    unet_to_diffusers,
)
from model.registry import get_config  # noqa: E402
from model.unet import UNet3D, build_unet  # noqa: E402


def tiny_diffusers_unet() -> diffusers.UNet3DConditionModel:
    # Attention at the two fine levels and none at the coarsest, like the released model, so both block kinds
    # (and both upsample positions in output_blocks) are exercised. Random weights everywhere: diffusers
    # zero-initialises nothing we could hide behind, and ours zero-initialises several output layers.
    torch.manual_seed(0)
    model = diffusers.UNet3DConditionModel(
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D"),
        cross_attention_dim=24,
        attention_head_dim=8,
    ).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def sample_inputs():
    g = torch.Generator().manual_seed(2)
    return torch.randn(2, 4, 3, 16, 16, generator=g), torch.tensor([5, 640]), torch.randn(2, 7, 24, generator=g)


def test_converted_diffusers_weights_give_the_same_output():
    theirs = tiny_diffusers_unet()
    ours = unet_from_diffusers(theirs).eval()
    assert ours.cfg.attention_levels == (0, 1) and ours.cfg.image_embed_dim == 0
    x, t, context = sample_inputs()
    with torch.no_grad():
        expected = theirs(x, t, encoder_hidden_states=context).sample
        got = ours(x, t, context)
    assert expected.abs().mean() > 1e-2
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_round_trip_ours_to_diffusers_to_ours_is_lossless():
    theirs = tiny_diffusers_unet()
    ours = unet_from_diffusers(theirs)
    back = unet_to_diffusers(ours)  # loads strictly into a fresh diffusers model
    assert not back.training  # keeps the mode (dropout) of the source
    got, want = back.state_dict(), theirs.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], v) for k, v in want.items())

    state = ours.state_dict()
    again = diffusers_to_modelscope(modelscope_to_diffusers(state, ours.cfg), ours.cfg)
    assert again.keys() == state.keys() and all(torch.equal(again[k], v) for k, v in state.items())
    x, t, context = sample_inputs()
    with torch.no_grad():
        torch.testing.assert_close(
            back(x, t, encoder_hidden_states=context).sample, ours(x, t, context), rtol=1e-4, atol=1e-5
        )


def test_released_layout_maps_onto_diffusers_default_model():
    # diffusers' default UNet3DConditionModel is the text-to-video-ms-1.7b network; build both on the meta
    # device (shapes only) and check the mapping covers every key with the right shape.
    with torch.device("meta"):
        theirs = diffusers.UNet3DConditionModel()
    cfg = get_config("modelscope-1.7b", {"unet.image_embed_dim": 0}).unet
    assert (
        unet_config_from_diffusers(
            dict(theirs.config), dropout=cfg.dropout, gradient_checkpointing=cfg.gradient_checkpointing
        )
        == cfg
    )
    assert diffusers_config(cfg)["down_block_types"] == tuple(theirs.config.down_block_types)
    ours = build_unet(cfg, "meta").state_dict()
    converted = diffusers_to_modelscope(theirs.state_dict(), cfg)
    assert converted.keys() == ours.keys()
    assert all(converted[k].shape == ours[k].shape for k in ours)
    assert sum(v.numel() for v in ours.values()) == sum(p.numel() for p in theirs.parameters())


def test_image_condition_has_no_diffusers_counterpart():
    cfg = get_config(
        "tiny", {"unet.pooled_text_embedding": False, "unet.frame_embedding": False, "unet.coordinate_channels": False}
    ).unet
    unet = UNet3D(cfg)
    with pytest.raises(ConversionError, match="drop_image_condition=True"):
        modelscope_to_diffusers(unet.state_dict(), cfg)
    converted = modelscope_to_diffusers(unet.state_dict(), cfg, drop_image_condition=True)
    assert not any("image" in k for k in converted)
    with pytest.raises(ConversionError, match="temporal_heads must be 8"):
        diffusers_config(cfg)  # the tiny config's input temporal transformer has 1 head
    with pytest.raises(
        ConversionError, match="pooled_text_embedding, frame_embedding and coordinate_channels must be False"
    ):
        diffusers_config(get_config("tiny").unet)


def test_diffusers_names_are_recognised_when_loading():
    theirs = tiny_diffusers_unet()
    ours = UNet3D(unet_config_from_diffusers(dict(theirs.config)))
    with pytest.raises(CheckpointError, match="diffusers_to_modelscope"):
        load_unet_weights(ours, theirs.state_dict())
    with pytest.raises(ConversionError, match="no counterpart"):
        diffusers_to_modelscope({**theirs.state_dict(), "extra.weight": torch.zeros(1)}, ours.cfg)
