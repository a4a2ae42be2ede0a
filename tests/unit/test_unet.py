"""UNet3D behaviour: shapes, determinism, image mode, temporal zero-init, reference sizes and key names,
checkpoint loading (round trip and every error a user can hit), bad inputs, gradient checkpointing."""

from __future__ import annotations

import re

import pytest
import torch

from model.checkpoint import NEW_IN_TFT2V, CheckpointError, load_unet_weights, read_state_dict, save_unet_weights
from model.registry import get_config
from model.unet import TemporalConvBlock, TemporalTransformer, UNet3D, UNetConfig, build_unet, coordinate_planes

# The tiny registry UNet; tests feed it 16x16 clips of 4 frames to stay fast.
TINY = get_config("tiny").unet
B, F, H, W = 2, 4, 16, 16


def make(seed: int = 0, **overrides) -> UNet3D:
    torch.manual_seed(seed)
    return UNet3D(UNetConfig(**{**vars(TINY), **overrides})).eval()


def randomize(module: torch.nn.Module, seed: int = 1, std: float = 0.1, only=None) -> None:
    """Give every parameter (or those in ``only``) random values, so zero-initialised layers do something."""
    g = torch.Generator().manual_seed(seed)
    params = list(module.parameters()) if only is None else list(only)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * std)


def temporal_layers_to_identity(unet: UNet3D) -> None:
    """Zero the last layer of every temporal block (their residual branch), so frames pass through independently."""
    for module in unet.modules():
        if isinstance(module, (TemporalConvBlock, TemporalTransformer)):
            last = module.conv4[-1] if isinstance(module, TemporalConvBlock) else module.proj_out
            last.weight.zero_()
            last.bias.zero_()


def inputs(cfg: UNetConfig = TINY, frames: int = F, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, cfg.in_channels, frames, H, W, generator=g)
    t = torch.tensor([3, 870])
    context = torch.randn(B, cfg.num_text_tokens, cfg.context_dim, generator=g)
    image = torch.randn(B, cfg.image_embed_dim, generator=g)
    return x, t, context, image


def test_output_shape_and_determinism():
    a, b = make(seed=0), make(seed=0)
    randomize(a), randomize(b)
    x, t, context, image = inputs()
    with torch.no_grad():
        out = a(x, t, context, image)
        assert out.shape == (B, TINY.out_channels, F, H, W)
        assert torch.isfinite(out).all()
        assert torch.equal(out, a(x, t, context, image))  # same call twice: same result
        assert torch.equal(out, b(x, t, context, image))  # same seed and weights: same result
        assert not torch.allclose(out, a(x, t.flip(0), context, image))  # the timestep matters


def test_fresh_unet_predicts_zero_and_conditions_matter_once_trained():
    # The released init zeroes the output conv, so a new model predicts 0; after "training" (random weights)
    # text, image embedding and concat channels each change the output.
    fresh = make(extra_in_channels=2)
    x, t, context, image = inputs()
    with torch.no_grad():
        assert torch.count_nonzero(fresh(x, t, context, image)) == 0
        randomize(fresh)
        base = fresh(x, t, context, image)
        assert not torch.allclose(base, fresh(x, t, context * 2, image))
        assert not torch.allclose(base, fresh(x, t, context, image * 2))
        assert not torch.allclose(base, fresh(x, t, context, image, concat=torch.ones(B, 2, F, H, W)))


def test_none_conditions_mean_zeros():
    unet = make(extra_in_channels=2)
    randomize(unet)
    x, t, _, _ = inputs()
    zeros_text = torch.zeros(B, TINY.num_text_tokens, TINY.context_dim)
    with torch.no_grad():
        implicit = unet(x, t)
        # no text -> zero text tokens; no image -> no image tokens (as VGen calls the released TF-T2V network),
        # which is neither the MLP of a zero embedding nor four zero tokens (a dropped image in training)
        explicit_text = unet(x, t, context=zeros_text, concat=torch.zeros(B, 2, F, H, W))
        assert torch.equal(implicit, explicit_text)
        assert not torch.allclose(implicit, unet(x, t, zeros_text, torch.zeros(B, TINY.image_embed_dim)))
        text, image = inputs()[2:]
        dropped = unet(x, t, text, image, image_keep=torch.zeros(B))
        assert not torch.allclose(unet(x, t, text), dropped)
        # image_keep acts per sample: sample 0 keeps its image, sample 1 sees zero image tokens
        mixed = unet(x, t, text, image, image_keep=torch.tensor([1.0, 0.0]))
        torch.testing.assert_close(mixed[0], unet(x, t, text, image)[0])
        torch.testing.assert_close(mixed[1], dropped[1])


def test_image_mode_bypasses_temporal_layers():
    unet = make()
    randomize(unet)
    x, t, context, image = inputs(frames=1)
    with torch.no_grad():
        before = unet(x, t, context, image)
        video_before = unet(*inputs(frames=F)[:1], t, context, image)
        randomize(unet, seed=7, only=unet.temporal_parameters())  # change every temporal weight
        assert torch.equal(before, unet(x, t, context, image))  # 1-frame output is independent of them
        assert not torch.allclose(video_before, unet(*inputs(frames=F)[:1], t, context, image))  # videos use them

    unet.train()
    unet(x, t, context, image).square().mean().backward()
    assert all(p.grad is None for p in unet.temporal_parameters())
    assert sum(p.grad is not None for p in unet.spatial_parameters()) > 0.9 * len(list(unet.spatial_parameters()))


def test_new_video_unet_equals_per_frame_image_unet():
    # Temporal layers start as identity (zero-init output layers), so a new video UNet is the image UNet run on
    # each frame. Spatial layers get random weights so the comparison is not 0 == 0.
    unet = make()
    randomize(unet, only=unet.spatial_parameters())
    x, t, context, image = inputs(frames=F)
    with torch.no_grad():
        video = unet(x, t, context, image)
        frames = torch.cat([unet(x[:, :, i : i + 1], t, context, image) for i in range(F)], dim=2)
    assert video.abs().mean() > 1e-3
    torch.testing.assert_close(video, frames, rtol=1e-4, atol=1e-5)


def test_temporal_and_spatial_parameters_partition_the_model():
    unet = make()
    # In the ModelScope layout temporal layers are the ResBlocks' temopral_conv, input_blocks.0.1, middle_block.2
    # and slot 2 of every block with attention (plus the tiny config's frame-index embedding).
    layout = re.compile(
        r"(.*\.temopral_conv\.|input_blocks\.0\.1\.|middle_block\.2\.|(input|output)_blocks\.\d+\.2\."
        r"|frame_embed\.)"
    )
    temporal = dict(unet.named_temporal_parameters())
    assert temporal and all(layout.match(n) for n in temporal)
    assert not any(layout.match(n) for n, _ in unet.named_parameters() if n not in temporal)
    ids_t = {id(p) for p in unet.temporal_parameters()}
    ids_s = {id(p) for p in unet.spatial_parameters()}
    assert not ids_t & ids_s and ids_t | ids_s == {id(p) for p in unet.parameters()}
    counts = unet.parameter_counts()
    assert counts["temporal"] + counts["spatial"] == counts["total"] == sum(p.numel() for p in unet.parameters())


def test_modelscope_sizes_match_the_reference():
    cfg = get_config("modelscope-1.7b").unet
    counts = build_unet(cfg, "meta").parameter_counts()  # shapes only, no memory
    assert 1.3e9 < counts["total"] < 1.5e9  # "the UNet about 1.4B"
    assert 0.4e9 < counts["temporal"] < 0.6e9  # "of which about 0.5B temporal"


def test_modelscope_key_names_and_shapes():
    state = build_unet(get_config("modelscope-1.7b").unet, "meta").state_dict()
    expected = {
        "time_embed.0.weight": (1280, 320),
        "input_blocks.0.0.weight": (320, 4, 3, 3),
        "input_blocks.0.1.proj_in.weight": (512, 320, 1),  # temporal transformer after the input conv: 8 x 64
        "input_blocks.1.0.in_layers.2.weight": (320, 320, 3, 3),
        "input_blocks.1.0.temopral_conv.conv1.2.weight": (320, 320, 3, 1, 1),
        "input_blocks.1.0.temopral_conv.conv4.3.weight": (320, 320, 3, 1, 1),
        "input_blocks.1.1.proj_in.weight": (320, 320),  # spatial transformer: linear projections
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
        "input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight": (2560, 320),
        "input_blocks.1.2.proj_out.weight": (320, 320, 1),  # temporal transformer: Conv1d-shaped
        "input_blocks.1.2.transformer_blocks.0.attn2.to_k.weight": (320, 320),  # second self-attention
        "input_blocks.3.op.weight": (320, 320, 3, 3),  # downsample
        "input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
        "input_blocks.11.0.out_layers.3.weight": (1280, 1280, 3, 3),
        "middle_block.1.norm.weight": (1280,),
        "middle_block.3.temopral_conv.conv2.3.bias": (1280,),
        "output_blocks.0.0.in_layers.2.weight": (1280, 2560, 3, 3),
        "output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),  # upsample of the level without attention
        "output_blocks.5.3.conv.weight": (1280, 1280, 3, 3),  # upsample after spatial + temporal transformer
        "output_blocks.11.2.proj_in.weight": (320, 320, 1),
        "out.2.weight": (4, 320, 3, 3),
    }
    assert not any(k.startswith("pre_image_condition.") for k in state)  # the released ModelScope UNet has none
    for key, shape in expected.items():
        assert key in state, key
        assert tuple(state[key].shape) == shape, key
    # 12 input and 12 output blocks; no attention at the coarsest level
    absent = (
        "input_blocks.12.",
        "output_blocks.12.",
        "input_blocks.10.1.",
        "input_blocks.11.1.",
        "output_blocks.0.1.norm",
    )
    assert not any(k.startswith(absent) for k in state)


# ---- checkpoint loading --------------------------------------------------------------------------------------


def test_checkpoint_round_trip(tmp_path):
    src = make(seed=0)
    randomize(src)
    x, t, context, image = inputs()
    plain = save_unet_weights(src, tmp_path / "text2video_pytorch_model.pth")
    wrapped = save_unet_weights(src, tmp_path / "tft2v.pth", step=1234)
    assert set(torch.load(wrapped, weights_only=True)) == {"state_dict", "step"}
    for path, step in ((plain, None), (wrapped, 1234)):
        dst = make(seed=5)
        report = load_unet_weights(dst, path)
        assert report.step == step
        with torch.no_grad():
            assert torch.equal(src(x, t, context, image), dst(x, t, context, image))


def test_load_accepts_prefixed_and_project_checkpoints(tmp_path):
    src = make()
    randomize(src)
    state = src.state_dict()
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "ddp.pth")
    torch.save({"format": "t2v-platform/1", "config": {}, "unet": state, "step": 9}, tmp_path / "model.pt")
    for name, step in (("ddp.pth", None), ("model.pt", 9)):
        dst = make(seed=3)
        assert load_unet_weights(dst, tmp_path / name).step == step
        loaded = dst.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_load_errors_name_missing_unexpected_and_mismatched_keys(tmp_path):
    unet = make()
    state = unet.state_dict()

    missing = {k: v for k, v in state.items() if k != "middle_block.1.proj_in.weight"}
    with pytest.raises(CheckpointError, match=r"1 missing key\(s\).*middle_block\.1\.proj_in\.weight"):
        load_unet_weights(unet, missing)

    unexpected = {**state, "input_blocks.0.0.lora_down.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match=r"unexpected key\(s\).*input_blocks\.0\.0\.lora_down\.weight"):
        load_unet_weights(unet, unexpected)

    wider = make(model_channels=32, head_dim=16).state_dict()
    mismatch = r"shape mismatch.*time_embed\.0\.weight: checkpoint \[128, 32\] vs model \[64, 16\]"
    with pytest.raises(CheckpointError, match=mismatch):
        load_unet_weights(unet, wider)

    with pytest.raises(CheckpointError, match="does not exist"):
        load_unet_weights(unet, tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        read_state_dict(tmp_path / "junk.pth")


def test_tft2v_wrapper_and_modelscope_start_for_image_condition(tmp_path):
    # A ModelScope checkpoint has no image-condition MLP: loading it into a TF-T2V UNet fails with a hint,
    # and succeeds when those keys are declared new.
    modelscope = make(image_embed_dim=0)
    randomize(modelscope)
    torch.save({"state_dict": modelscope.state_dict(), "step": 267000}, tmp_path / "ms.pth")
    tft2v = make()
    with pytest.raises(CheckpointError, match="allow_missing=NEW_IN_TFT2V"):
        load_unet_weights(tft2v, tmp_path / "ms.pth")
    report = load_unet_weights(tft2v, tmp_path / "ms.pth", allow_missing=NEW_IN_TFT2V)
    assert report.step == 267000 and all(k.startswith("pre_image_condition.") for k in report.missing_allowed)
    with pytest.raises(CheckpointError, match="image_embed_dim"):
        load_unet_weights(modelscope, tft2v.state_dict())


def test_pad_input_channels_starts_concat_slots_at_zero():
    plain = make()
    randomize(plain)
    concat_model = make(extra_in_channels=3)
    with pytest.raises(CheckpointError, match="pad_input_channels=True"):
        load_unet_weights(concat_model, plain.state_dict())
    report = load_unet_weights(concat_model, plain.state_dict(), pad_input_channels=True)
    assert report.padded == ["input_blocks.0.0.weight"]
    x, t, context, image = inputs()
    with torch.no_grad():  # zero concat weights: the concat input has no effect yet, the rest is unchanged
        assert torch.equal(
            plain(x, t, context, image), concat_model(x, t, context, image, concat=torch.randn(B, 3, F, H, W))
        )


# ---- bad inputs ----------------------------------------------------------------------------------------------


def test_bad_inputs_say_what_is_wrong():
    unet = make()
    x, t, context, image = inputs()
    cases = [
        ((x[:, :, 0], t, context, image), {}, r"\[b, c, f, h, w\].*1-frame videos"),
        ((x[:, :2], t, context, image), {}, "has 2 channels but unet.in_channels=3"),
        ((x[..., :15, :15], t, context, image), {}, "multiples of 4"),
        ((x, t[:1], context, image), {}, r"timesteps must have shape \[2\]"),
        ((x, t, context[:1], image), {}, r"context must be \[b=2"),
        ((x, t, context[..., :8], image), {}, "context_dim=32"),
        ((x, t, context, image[:, :5]), {}, r"image_embedding must be \[b=2, image_embed_dim=32\]"),
        ((x, t, context, image), {"concat": torch.zeros(B, 1, F, H, W)}, "extra_in_channels=0"),
    ]
    for args, kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            unet(*args, **kwargs)
    no_image = make(image_embed_dim=0)
    with pytest.raises(ValueError, match="no image condition"):
        no_image(x, t, context, image)


def test_bad_config_values_say_how_to_fix():
    from pipelines.settings import ConfigError

    for overrides, message in [
        ({"attention_levels": (5,)}, "levels must be in 0..2"),
        ({"head_dim": 24}, "head_dim=24 must divide"),
        ({"num_groups": 5}, "divisible by unet.num_groups=5"),
        ({"channel_mult": ()}, "non-empty"),
        ({"dropout": 1.0}, r"dropout=1.0: must be in \[0, 1\)"),
    ]:
        with pytest.raises(ConfigError, match=message):
            UNetConfig(**{**vars(TINY), **overrides})


def test_gradient_checkpointing_gives_the_same_gradients():
    plain, ckpt = make(), make(gradient_checkpointing=True)
    randomize(plain)
    ckpt.load_state_dict(plain.state_dict())
    x, t, context, image = inputs()
    grads = []
    for unet in (plain, ckpt):
        unet.train()
        unet(x, t, context, image).square().mean().backward()
        grads.append({n: p.grad for n, p in unet.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_other_dtypes_follow_the_weights():
    # Trainers cast the whole model (DeepSpeed bf16); float64 checks the same dtype plumbing cheaply on CPU.
    unet = make()
    randomize(unet)
    x, t, context, image = inputs()
    with torch.no_grad():
        ref = unet(x, t, context, image)
        out = unet.to(torch.float64)(x.double(), t, context.double(), image.double())
        assert out.dtype == torch.float64 and unet(x.double(), t).dtype == torch.float64
    torch.testing.assert_close(out.float(), ref, rtol=1e-3, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_matches_cpu_fp32():
    unet = make()
    randomize(unet)
    x, t, context, image = inputs()
    with torch.no_grad():
        ref = unet(x, t, context, image)
        gpu = unet.cuda().to(torch.bfloat16)
        out = gpu(x.cuda().bfloat16(), t.cuda(), context.cuda().bfloat16(), image.cuda().bfloat16()).float().cpu()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            mixed = unet.float()(x.cuda(), t.cuda(), context.cuda(), image.cuda()).float().cpu()
    for result in (out, mixed):
        assert ((result - ref).norm() / ref.norm()) < 0.05


def test_frame_and_pooled_text_embeddings_condition_every_frame():
    # The tiny config's extras: without them a frame cannot tell where it sits in the clip (the temporal layers
    # are permutation-equivariant apart from the convs' edges) and the prompt reaches only the attention levels.
    unet = make(attention_levels=(), temporal_attention_after_input=False)
    assert unet.cfg.frame_embedding and unet.cfg.pooled_text_embedding
    x, t, context, image = inputs(frames=F)
    still = x[:, :, :1].expand(-1, -1, F, -1, -1).contiguous()  # the same frame F times
    randomize(unet)
    with torch.no_grad():
        temporal_layers_to_identity(unet)  # frames are independent
        out = unet(still, t, context, image)
        other = torch.randn_like(context)
        other_text = unet(still, t, other, image)
        unet.text_embed[-1].weight.zero_()  # the prompt now reaches the ResBlocks only with the frame
        unet.text_embed[-1].bias.zero_()
        image_mode = unet(still[:, :, :1], t, context, image)
        frame_text = unet(still, t, context, image) - unet(still, t, other, image)
        unet.frame_embed.net[-1].weight.zero_()
        unet.frame_embed.net[-1].bias.zero_()
        no_position = unet(still, t, context, image)
    # identical frames come out different only through their index ...
    assert (out[:, :, 1] - out[:, :, 2]).abs().mean() > 1e-4
    for i in range(1, F):
        torch.testing.assert_close(no_position[:, :, i], no_position[:, :, 0])
    # ... and the frame code reads the prompt: "frame 0 of a clip moving right" is not "frame 0 moving left"
    assert (frame_text[:, :, 1] - frame_text[:, :, 2]).abs().mean() > 1e-5
    # images (1 frame) get no frame embedding, and the prompt acts without any cross-attention level
    torch.testing.assert_close(image_mode[:, :, 0], no_position[:, :, 0])
    assert (out - other_text).abs().mean() > 1e-3


def test_frame_embedding_without_pooled_prompt_codes_each_frame_of_every_clip():
    # frame_embedding on, pooled_text_embedding off: the frame code is the index alone, the same for every clip of
    # a batch (this combination once broke on batches of more than one clip).
    unet = make(pooled_text_embedding=False, attention_levels=(), temporal_attention_after_input=False)
    x, t, context, image = inputs(frames=F)
    still = x[:, :, :1].expand(-1, -1, F, -1, -1).contiguous()
    randomize(unet)
    with torch.no_grad():
        temporal_layers_to_identity(unet)
        out = unet(still, t, context, image)
        code = unet.frame_embed(B, F, None, torch.float32)
    assert out.shape == (B, TINY.out_channels, F, H, W)
    assert code.shape == (B * F, unet.time_embed[-1].out_features)
    torch.testing.assert_close(code[:F], code[F:])  # every clip gets the same frame codes
    assert (out[:, :, 1] - out[:, :, 2]).abs().mean() > 1e-4  # and frames differ by their index


def test_coordinate_channels_feed_each_pixel_its_position():
    unet = make()
    assert unet.cfg.coordinate_channels
    planes = coordinate_planes(B, F, H, W, torch.zeros(1))  # [b, 2, f, h, w]
    assert planes.shape == (B, 2, F, H, W)
    assert planes[0, 0, 0, 0, 0] == -1 and planes[0, 0, 0, 0, -1] == 1  # x: left to right
    assert planes[0, 1, 0, 0, 0] == -1 and planes[0, 1, 0, -1, 0] == 1  # y: top to bottom
    first = unet.input_blocks[0][0]
    assert first.in_channels == unet.cfg.in_channels + 2
    randomize(unet)
    x, t, context, image = inputs()
    with torch.no_grad():
        out = unet(x, t, context, image)
        first.weight[:, unet.cfg.in_channels :] = 0  # blind the network to position
        blind = unet(x, t, context, image)
    assert (out - blind).abs().mean() > 1e-3
