"""``t2v import`` and sampling released files: random narrow models of each released layout (no weights can be
downloaded here), Stable Diffusion 2.x inflation from a diffusers folder and an original LDM checkpoint, and the
errors for files that cannot be imported (nothing written)."""

from __future__ import annotations

import argparse
import re

import pytest
import torch

from flows import import_weights, sample
from model.checkpoint import CheckpointError
from model.registry import get_config
from model.released import image_unet_to_ours, inflate_image_unet, read_image_unet
from model.text_to_video import TextToVideo
from model.unet import UNet3D, UNetConfig, build_unet

# Narrow widths of the released layouts (same keys), with the tiny CLIP (32 wide) so nothing big is built.
NARROW = {
    "unet.model_channels": 32,
    "unet.head_dim": 16,
    "unet.temporal_head_dim": 16,
    "unet.context_dim": 32,
    "encoders.clip_model": "t2v-tiny-clip",
    "num_frames": 2,
    "height": 64,
    "width": 64,
}


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    from diffusers import AutoencoderKL

    # A tiny random KL autoencoder with SD's 8x downsampling, saved as a diffusers folder.
    folder = tmp_path_factory.mktemp("vae") / "vae"
    torch.manual_seed(0)
    AutoencoderKL(
        block_out_channels=(32,) * 4,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=32,
        latent_channels=4,
    ).save_pretrained(folder)
    return folder


def overrides(name: str, vae_dir) -> dict:
    out = {**NARROW, "encoders.vae_path": str(vae_dir)}
    if get_config(name).unet.image_embed_dim:
        out["unet.image_embed_dim"] = 32
    return out


def set_args(changes: dict) -> list[str]:
    return [a for k, v in changes.items() for a in ("--set", f"model_overrides.{k}={v}")]


def random_released_file(name: str, path, vae_dir, wrapped: bool = True) -> dict:
    torch.manual_seed(1)
    unet = build_unet(get_config(name, overrides(name, vae_dir)).unet)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in unet.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    state = unet.state_dict()
    torch.save({"state_dict": state, "step": 512000} if wrapped else state, path)
    return state


def test_import_tft2v_then_sample_it_and_the_released_file(tmp_path, vae_dir, capsys):
    released = tmp_path / "tft2v_t2v_non_ema.pth"
    state = random_released_file("tf-t2v", released, vae_dir)
    code = import_weights.main(
        [
            "--from",
            "tf-t2v",
            str(released),
            "--out",
            str(tmp_path / "imported"),
            *set_args(overrides("tf-t2v", vae_dir)),
        ]
    )
    assert code == 0, capsys.readouterr().err
    model = TextToVideo.from_checkpoint(tmp_path / "imported" / "model.pt")
    assert model.config.name == "tf-t2v" and model.step == 512000
    assert model.config.sampling.timestep_spacing == "leading" and model.config.diffusion.prediction == "v"
    loaded = model.unet.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())

    # the imported checkpoint and the released file (config named) sample the same video
    common = ["--prompt", "a corgi running", "--steps", "2", "--device", "cpu"]
    assert (
        sample.main(
            ["--checkpoint", str(tmp_path / "imported" / "model.pt"), "--out", str(tmp_path / "a.mp4"), *common]
        )
        == 0
    )
    direct = ["--checkpoint", str(released), "--model", "tf-t2v", *set_args(overrides("tf-t2v", vae_dir))]
    assert sample.main([*direct, "--out", str(tmp_path / "b.mp4"), *common]) == 0
    assert (tmp_path / "a.mp4").read_bytes() == (tmp_path / "b.mp4").read_bytes()


def test_import_modelscope_bare_state_dict(tmp_path, vae_dir):
    released = tmp_path / "text2video_pytorch_model.pth"
    state = random_released_file("modelscope-1.7b", released, vae_dir, wrapped=False)
    args = ["--from", "modelscope", str(released), "--out", str(tmp_path / "ms")]
    assert import_weights.main([*args, *set_args(overrides("modelscope-1.7b", vae_dir))]) == 0
    ckpt = torch.load(tmp_path / "ms" / "model.pt", weights_only=True)
    assert ckpt["config"]["name"] == "modelscope-1.7b" and ckpt["step"] == 0
    assert set(ckpt["unet"]) == set(state)


def _bad_inputs(tmp_path, vae_dir):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"this is not a checkpoint at all")
    good = tmp_path / "good.pth"
    random_released_file("tf-t2v", good, vae_dir)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    pickled = tmp_path / "pickled.pth"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "args": argparse.Namespace(lr=1e-4)}, pickled)
    other_layout = tmp_path / "modelscope.pth"
    random_released_file("modelscope-1.7b", other_layout, vae_dir)
    return [
        (junk, "not a PyTorch checkpoint"),
        (truncated, "truncated or damaged"),
        (pickled, "pickled Python objects .* argparse.Namespace"),
        (other_layout, "layout of config 'modelscope-1.7b'.*--from modelscope"),
        (tmp_path / "missing.pth", "does not exist"),
    ]


def test_bad_files_get_a_clear_error_and_nothing_is_written(tmp_path, vae_dir, capsys):
    for path, message in _bad_inputs(tmp_path, vae_dir):
        out = tmp_path / f"out-{path.stem}"
        args = ["--from", "tf-t2v", str(path), "--out", str(out), *set_args(overrides("tf-t2v", vae_dir))]
        assert import_weights.main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("t2v import: ") and "Traceback" not in err
        assert re.search(message, err, flags=re.S), (path.name, err)
        assert not out.exists()
        # t2v sample on the same file: the same clear error, no video
        video = tmp_path / f"{path.stem}.mp4"
        sample_args = ["--checkpoint", str(path), "--model", "tf-t2v", "--prompt", "x", "--out", str(video)]
        assert sample.main([*sample_args, *set_args(overrides("tf-t2v", vae_dir))]) == 2
        assert re.search(message, capsys.readouterr().err, flags=re.S)
        assert not video.exists()


# --------------------------------------------------------------------------------------------------------------
# Stable Diffusion 2.x inflation

SD_UNET = UNetConfig(
    in_channels=4,
    out_channels=4,
    model_channels=32,
    channel_mult=(1, 2, 2),
    num_res_blocks=1,
    attention_levels=(0, 1),
    head_dim=16,
    context_dim=32,
    image_embed_dim=0,
    temporal_heads=2,
    temporal_head_dim=16,
    dropout=0.0,
)


def small_sd_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    model = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=(2, 4, 4),  # diffusers' SD configs give head counts here: 16-wide heads
        use_linear_projection=True,  # SD 2.x
        norm_num_groups=32,
    ).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # zero-initialised output layers would make every comparison trivial
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def diffusers_to_ldm(state: dict) -> dict:
    """SD's original LDM key names for the small UNet above (levels: 2 attention levels, then one without;
    one ResBlock per level), written out from the LDM layout: input_blocks.N.{0 resnet, 1 attention, op},
    middle_block.{0, 1, 2}, output_blocks.N.{0 resnet, 1 attention, 1|2 upsample}."""
    res = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0"}
    res |= {"conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
    prefixes = {
        "conv_in": "input_blocks.0.0",
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "down_blocks.0.resnets.0": "input_blocks.1.0",
        "down_blocks.0.attentions.0": "input_blocks.1.1",
        "down_blocks.0.downsamplers.0.conv": "input_blocks.2.0.op",
        "down_blocks.1.resnets.0": "input_blocks.3.0",
        "down_blocks.1.attentions.0": "input_blocks.3.1",
        "down_blocks.1.downsamplers.0.conv": "input_blocks.4.0.op",
        "down_blocks.2.resnets.0": "input_blocks.5.0",
        "mid_block.resnets.0": "middle_block.0",
        "mid_block.attentions.0": "middle_block.1",
        "mid_block.resnets.1": "middle_block.2",
        "up_blocks.0.resnets.0": "output_blocks.0.0",
        "up_blocks.0.resnets.1": "output_blocks.1.0",
        "up_blocks.0.upsamplers.0.conv": "output_blocks.1.1.conv",
        "up_blocks.1.resnets.0": "output_blocks.2.0",
        "up_blocks.1.attentions.0": "output_blocks.2.1",
        "up_blocks.1.resnets.1": "output_blocks.3.0",
        "up_blocks.1.attentions.1": "output_blocks.3.1",
        "up_blocks.1.upsamplers.0.conv": "output_blocks.3.2.conv",
        "up_blocks.2.resnets.0": "output_blocks.4.0",
        "up_blocks.2.attentions.0": "output_blocks.4.1",
        "up_blocks.2.resnets.1": "output_blocks.5.0",
        "up_blocks.2.attentions.1": "output_blocks.5.1",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
    }
    out = {}
    for key, value in state.items():
        head = max((p for p in prefixes if key.startswith(p + ".")), key=len)
        rest = key[len(head) + 1 :]
        if ".resnets." in head:
            first, _, tail = rest.partition(".")
            rest = f"{res[first]}.{tail}"
        out[f"model.diffusion_model.{prefixes[head].replace('.0.op', '.0.op')}.{rest}"] = value
    # LDM's downsample is a bare module: input_blocks.N.0.op -> input_blocks.N.0.op (our table strips the .0)
    return {k.replace(".0.op.", ".op."): v for k, v in out.items()}


def assert_per_frame_equal(unet: UNet3D, image_unet) -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 3, 16, 16, generator=g)  # [b, c, f, h, w]
    t = torch.tensor([10, 700])
    text = torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        video = unet.eval()(x, t, context=text)
        for i in range(x.shape[2]):
            frame = image_unet(x[:, :, i], t, encoder_hidden_states=text).sample
            torch.testing.assert_close(video[:, :, i], frame, rtol=1e-4, atol=1e-4)


def test_sd2_inflation_from_a_diffusers_folder_gives_the_image_unet_per_frame(tmp_path):
    image_unet = small_sd_unet()
    image_unet.save_pretrained(tmp_path / "unet")
    torch.manual_seed(5)
    unet = UNet3D(SD_UNET)
    temporal_before = {n: p.clone() for n, p in unet.named_temporal_parameters()}
    report = inflate_image_unet(unet, read_image_unet(tmp_path / "unet", SD_UNET))
    assert set(report.missing_allowed) == set(temporal_before)  # only temporal layers kept their init
    assert all(torch.equal(p, temporal_before[n]) for n, p in unet.named_temporal_parameters())
    assert_per_frame_equal(unet, image_unet)


def test_sd2_inflation_from_an_ldm_checkpoint(tmp_path):
    image_unet = small_sd_unet()
    ldm = diffusers_to_ldm(image_unet.state_dict())
    ldm["first_stage_model.decoder.conv_in.weight"] = torch.zeros(1)  # a full LDM checkpoint holds the VAE too
    torch.save({"state_dict": ldm, "global_step": 1}, tmp_path / "v2-1_512-ema-pruned.ckpt")
    unet = UNet3D(SD_UNET)
    inflate_image_unet(unet, read_image_unet(tmp_path / "v2-1_512-ema-pruned.ckpt", SD_UNET))
    assert_per_frame_equal(unet, image_unet)
    # the TF-T2V layout's 8 concat input channels start at zero, so zero concat gives the same output
    tf_like = UNet3D(UNetConfig(**{**vars(SD_UNET), "extra_in_channels": 8}))
    report = inflate_image_unet(tf_like, read_image_unet(tmp_path / "v2-1_512-ema-pruned.ckpt", SD_UNET))
    assert report.padded == ["input_blocks.0.0.weight"]
    assert_per_frame_equal(tf_like, image_unet)


def test_an_image_unet_that_does_not_fit_is_refused():
    ldm = {k[len("model.diffusion_model.") :]: v for k, v in diffusers_to_ldm(small_sd_unet().state_dict()).items()}
    other = UNetConfig(**{**vars(SD_UNET), "attention_levels": (1, 2)})  # TF-T2V-style levels: SD has none at 2
    with pytest.raises(CheckpointError, match="no place in this video UNet"):
        image_unet_to_ours(ldm, other)


def test_import_from_diffusers_folder_and_sd2(tmp_path, vae_dir, capsys):
    image_unet = small_sd_unet()
    image_unet.save_pretrained(tmp_path / "unet")
    changes = {
        "unet.model_channels": 32,
        "unet.channel_mult": "[1,2,2]",
        "unet.num_res_blocks": 1,
        "unet.attention_levels": "[0,1]",
        "unet.head_dim": 16,
        "unet.temporal_head_dim": 16,
        "unet.temporal_heads": 2,
        "unet.context_dim": 32,
        "encoders.clip_model": "t2v-tiny-clip",
        "encoders.vae_path": str(vae_dir),
        "num_frames": 2,
        "height": 64,
        "width": 64,
    }
    for source in ("diffusers", "sd2"):
        out = tmp_path / source
        assert (
            import_weights.main(["--from", source, str(tmp_path / "unet"), "--out", str(out), *set_args(changes)]) == 0
        )
        model = TextToVideo.from_checkpoint(out / "model.pt")
        assert model.config.name == "modelscope-1.7b"  # the layout SD 2.x fits
        assert_per_frame_equal(model.unet, image_unet)
    # a 3-channel (pixel-space) config does not fit a 4-channel SD UNet: an error, and nothing is written
    pixel = {**changes, "encoders.first_stage": "identity", "unet.in_channels": 3, "unet.out_channels": 3}
    bad = ["--from", "diffusers", str(tmp_path / "unet"), "--out", str(tmp_path / "x"), *set_args(pixel)]
    assert import_weights.main(bad) == 2
    assert "shape" in capsys.readouterr().err and not (tmp_path / "x").exists()
