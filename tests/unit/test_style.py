"""Style interpolation (model/style.py, ``t2v style``): spatial weights blended by the factor, temporal ones kept,
the blended model samples, and a style set that does not fit is a usage error."""

from __future__ import annotations

import pytest
import torch

from flows import cli
from model.registry import get_config
from model.style import blend_spatial, spatial_names
from model.text_to_video import TextToVideo
from pipelines import media

SHAPE = {"num_frames": 4, "height": 16, "width": 16}


@pytest.fixture(scope="module")
def model_and_style(tmp_path_factory):
    root = tmp_path_factory.mktemp("style")
    torch.manual_seed(0)
    model = TextToVideo.build(get_config("tiny", SHAPE))
    with torch.no_grad():
        for p in model.unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    styled = TextToVideo.from_checkpoint(model.save(root / "model.pt"))
    with torch.no_grad():  # a fine-tune moves every weight; its temporal ones must not leak into the blend
        for p in styled.unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model, styled, root / "model.pt", styled.save(root / "styled.pt")


def test_spatial_weights_are_blended_by_the_factor_and_temporal_ones_kept(model_and_style):
    model, styled, model_path, style_path = model_and_style
    blended = TextToVideo.from_checkpoint(model_path)
    names = blend_spatial(blended.unet, style_path, 0.25)
    assert set(names) == set(spatial_names(model.unet)) and "input_blocks.0.0.weight" in names
    own, style, out = model.unet.state_dict(), styled.unet.state_dict(), blended.unet.state_dict()
    for name in out:
        expected = 0.25 * style[name] + 0.75 * own[name] if name in names else own[name]
        torch.testing.assert_close(out[name], expected, rtol=0, atol=1e-6)


def test_t2v_style_writes_a_model_that_samples(model_and_style, tmp_path, capsys):
    _, _, model_path, style_path = model_and_style
    out = tmp_path / "blended.pt"
    assert (
        cli.main(
            ["style", "--checkpoint", str(model_path), "--style", str(style_path), "--factor", "0.6", "--out", str(out)]
        )
        == 0
    )
    video = tmp_path / "v.mp4"
    assert (
        cli.main(["sample", "--checkpoint", str(out), "--prompt", "a red circle", "--steps", "2", "--out", str(video)])
        == 0
    )
    assert media.decode_video_file(video).shape == (4, 16, 16, 3)
    # a style fine-tuned from another model does not fit
    torch.manual_seed(1)
    other = TextToVideo.build(get_config("tiny", {**SHAPE, "unet.model_channels": 8, "unet.num_groups": 4}))
    other_path = other.save(tmp_path / "other.pt")
    assert cli.main(["style", "--checkpoint", str(model_path), "--style", str(other_path), "--out", str(out)]) == 2
    assert "is not a spatial weight set of this model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["style", "--checkpoint", str(model_path), "--style", str(style_path), "--factor", "1.5"])
    assert "factor=1.5: must be within [0, 1]" in capsys.readouterr().err
