"""Lumiere's STUNet (model/stunet.py): shapes for several frame counts, the frame-count error, nearest-neighbour
temporal resizing at init, where temporal attention and convs sit, inflation with frozen spatial weights, and
the registry / checkpoint / sampler path the tiny-stunet config takes."""

from __future__ import annotations

import pytest
import torch

from model.diffusion import Schedule, training_losses
from model.registry import get_config
from model.stunet import (
    STUNet,
    STUNetConfig,
    TemporalDownsample,
    TemporalUpsample,
    build_video_unet,
    inflate_from_image,
)
from model.unet import ResBlock, TemporalConvBlock, TemporalTransformer, UNet3D, UNetConfig
from model.validation import ConfigError

# A narrower tiny layout (three levels, attention at the two coarse ones) so each forward is milliseconds.
SMALL = UNetConfig(
    in_channels=3,
    out_channels=3,
    model_channels=8,
    channel_mult=(1, 2, 2),
    num_res_blocks=1,
    attention_levels=(1, 2),
    head_dim=8,
    context_dim=8,
    num_text_tokens=4,
    image_embed_dim=0,
    temporal_heads=1,
    temporal_head_dim=8,
    num_groups=4,
    dropout=0.0,
    pooled_text_embedding=True,
    frame_embedding=True,
    coordinate_channels=True,
)


def make(seed: int = 0, **st) -> STUNet:
    torch.manual_seed(seed)
    return STUNet(SMALL, STUNetConfig(**st)).eval()


@pytest.mark.parametrize("frames", [1, 4, 8, 12])
def test_output_has_the_input_shape_for_several_frame_counts(frames):
    unet = make()
    with torch.no_grad():
        for p in unet.parameters():  # zero-initialised output layers would hide a broken path
            p.add_(torch.randn_like(p) * 0.05)
    x = torch.randn(2, 3, frames, 8, 8)
    out = unet(x, torch.tensor([3, 700]), torch.randn(2, 4, 8))
    assert out.shape == x.shape and torch.isfinite(out).all() and out.abs().sum() > 0


def test_fps_conditioning_as_the_modelscope_layout_takes_it():
    torch.manual_seed(0)
    unet = STUNet(UNetConfig(**{**vars(SMALL), "use_fps_condition": True}), STUNetConfig()).eval()
    with torch.no_grad():  # zero-initialised layers (the fps MLP's last, each ResBlock's output) would hide it
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(1, 3, 4, 8, 8)
    assert not torch.allclose(unet(x, 5, fps=4.0), unet(x, 5, fps=16.0))
    with pytest.raises(ValueError, match="pass fps"):
        unet(x, 5)
    with pytest.raises(ValueError, match="use_fps_condition is off"):
        make()(x, 5, fps=8.0)


def test_a_frame_count_the_temporal_downsampling_cannot_take_is_named():
    with pytest.raises(ValueError, match=r"6 frames cannot be halved 2 time\(s\).*multiple of 4"):
        make()(torch.randn(1, 3, 6, 8, 8), 10)
    # One temporal level halves once, so 6 frames fit.
    assert make(temporal_levels=[0])(torch.randn(1, 3, 6, 8, 8), 10).shape == (1, 3, 6, 8, 8)
    with pytest.raises(ConfigError, match="num_frames=6: STUNet: 6 frames"):
        get_config("tiny-stunet", {"num_frames": 6})
    with pytest.raises(ConfigError, match=r"stunet.temporal_levels=\[2\]: levels must be in 0..1"):
        get_config("tiny-stunet", {"stunet.temporal_levels": [2]})


def test_temporal_resizing_starts_as_nearest_neighbour():
    x = torch.randn(2 * 6, 4, 3, 3)  # [(b f), c, h, w], b=2, f=6
    clip = x.view(2, 6, 4, 3, 3)
    down = TemporalDownsample(4)(x, 6).view(2, 3, 4, 3, 3)
    assert torch.allclose(down, clip[:, ::2], atol=1e-6)  # frames 0, 2, 4 kept
    up = TemporalUpsample(4)(x, 6).view(2, 12, 4, 3, 3)
    assert torch.allclose(up, clip.repeat_interleave(2, dim=1), atol=1e-6)  # each frame twice
    # The network's own modules start that way too, and are trainable.
    unet = make()
    assert set(unet.temporal_down) == {"0", "1"} and set(unet.temporal_up) == {"0", "1"}
    for module in [*unet.temporal_down.values(), *unet.temporal_up.values()]:
        assert module.conv.weight.requires_grad
        assert torch.equal(module.conv.weight[:, :, 1, 0, 0], torch.eye(module.conv.weight.shape[0]))


def test_temporal_attention_only_at_the_coarsest_level_and_convs_everywhere_else():
    unet = make()
    coarsest = SMALL.model_channels * SMALL.channel_mult[-1]
    attention = [m for m in unet.modules() if isinstance(m, TemporalTransformer)]
    # coarsest level: one encoder block, two decoder blocks, plus the middle block
    assert len(attention) == 4 and all(m.norm.num_channels == coarsest for m in attention)
    for name, module in unet.named_modules():
        if isinstance(module, ResBlock):
            conv = isinstance(module.temopral_conv, TemporalConvBlock)
            at_coarsest = name.startswith(("middle_block", "input_blocks.5", "output_blocks.0", "output_blocks.1"))
            assert conv != at_coarsest, name
    # The ModelScope layout of the same width has temporal attention at every attention level and after the input.
    assert sum(isinstance(m, TemporalTransformer) for m in UNet3D(SMALL).modules()) > len(attention)


def test_inflated_from_an_image_model_only_temporal_weights_train():
    torch.manual_seed(1)
    image_model = UNet3D(SMALL)  # its spatial layers are the image model (same key names)
    with torch.no_grad():
        for p in image_model.parameters():
            p.normal_(0, 0.05)
    unet = make(trainable="temporal").train()
    left_at_init = inflate_from_image(unet, image_model.state_dict())
    assert set(left_at_init) == {n for n, _ in unet.named_temporal_parameters()}
    source = image_model.state_dict()
    spatial = dict(unet.named_spatial_parameters())
    for name, p in spatial.items():
        assert torch.equal(p, source[name]), name
        assert not p.requires_grad
    assert list(unet.spatial_parameters()) == []  # nothing for the optimizer's spatial group
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}

    optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-2)
    schedule = Schedule.from_config(get_config("tiny-stunet").diffusion)
    x0 = torch.randn(2, 3, 4, 8, 8)
    loss = training_losses(unet, x0, torch.tensor([100, 800]), get_config("tiny-stunet").diffusion, schedule=schedule)
    loss["loss"].backward()
    optimizer.step()
    changed = {n for n, p in unet.named_parameters() if not torch.equal(p, before[n])}
    temporal = {n for n, _ in unet.named_temporal_parameters()}
    assert changed and changed <= temporal
    assert any(n.startswith("temporal_down") for n in changed)


def test_tiny_stunet_builds_saves_loads_and_samples(tmp_path):
    from model.text_to_video import TextToVideo

    cfg = get_config("tiny-stunet", {"num_frames": 4, "height": 16, "width": 16})
    torch.manual_seed(0)
    model = TextToVideo.build(cfg)
    assert isinstance(model.unet, STUNet) and isinstance(build_video_unet(get_config("tiny")), UNet3D)
    path = model.save(tmp_path / "model.pt", step=3)
    loaded = TextToVideo.from_checkpoint(path)
    assert isinstance(loaded.unet, STUNet) and loaded.step == 3
    x = torch.randn(1, 3, 4, 16, 16)
    with torch.no_grad():
        assert torch.equal(model.unet.eval()(x, 5), loaded.unet.eval()(x, 5))
    frames = loaded.generate(["a red circle moving left"], steps=2, guidance=1.0, seed=0)
    assert frames.shape == (1, 4, 16, 16, 3)


def test_bench_model_compares_the_stunet_with_the_modelscope_layout_of_the_same_width():
    from flows.benchmarks.model import ModelBenchConfig, activation_bytes, compare_layouts, forward_flops

    shape = {"num_frames": 8, "height": 16, "width": 16}
    stunet, modelscope = get_config("tiny-stunet", shape), get_config("tiny-stunet", {**shape, "stunet": None})
    assert modelscope.stunet is None and modelscope.unet == stunet.unet
    # Halving time twice leaves the coarse levels a quarter of the frames: fewer FLOPs and stored activations.
    assert forward_flops(stunet) < 0.6 * forward_flops(modelscope)
    assert activation_bytes(stunet) < 0.6 * activation_bytes(modelscope)
    with pytest.raises(ConfigError, match="'tiny' is not a STUNet size"):
        compare_layouts("tiny", ModelBenchConfig(sizes=["tiny"]), "cpu")


def test_bench_learn_compares_the_layouts_after_the_same_training_time(tmp_path):
    from flows.benchmarks.learn import LearnBenchConfig, train_config
    from pipelines.training.worker import resolve_model_config

    bench = LearnBenchConfig(ablations=["full", "stunet"])
    full, stunet = (resolve_model_config(train_config(bench, "data", tmp_path, a, 0)) for a in ("full", "stunet"))
    assert full.stunet is None and stunet.stunet is not None
    assert stunet.unet == full.unet and stunet.num_frames == full.num_frames == 6  # same widths and clip shape
    assert train_config(bench, "data", tmp_path, "stunet", 0).time_limit_minutes == bench.minutes


def test_structure_conditions_reach_the_stunet_through_its_extra_channels():
    from model.conditions import ConditionConfig

    cfg = UNetConfig(
        **{
            **vars(SMALL),
            "extra_in_channels": 4,
            "conditions": ConditionConfig(kinds=("sketch",), out_channels=4, hidden=8, heads=2),
        }
    )
    torch.manual_seed(0)
    unet = STUNet(cfg, STUNetConfig()).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(1, 3, 4, 8, 8)
    sketch = torch.rand(1, 1, 4, 8, 8)
    assert not torch.allclose(unet(x, 5, conditions={"sketch": sketch}), unet(x, 5))
