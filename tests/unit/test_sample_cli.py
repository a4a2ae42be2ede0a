"""TextToVideo checkpoints and the ``t2v sample`` entry point, end to end on the tiny model (CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flows.sample import main
from model.registry import get_config
from model.text_to_video import FORMAT, TextToVideo
from pipelines import media


def _trained_like(model: TextToVideo) -> TextToVideo:
    # A freshly built UNet has zero-initialised output layers and so predicts 0 everywhere; nudge every zero
    # weight so the model behaves like a trained one and generations depend on the weights, seed and prompt.
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.unet.parameters():
            if p.ndim > 1 and p.abs().sum() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    # The tiny model with 4 frames instead of 8 keeps these tests quick; nothing here depends on the length.
    model = _trained_like(TextToVideo.build(get_config("tiny", {"num_frames": 4})))
    path = model.save(tmp_path_factory.mktemp("ckpt") / "model.pt", step=7)
    return model, path


def test_checkpoint_format_and_round_trip_gives_identical_generations(tiny_checkpoint):
    model, path = tiny_checkpoint
    ckpt = torch.load(path, map_location="cpu", weights_only=True)  # our format needs no pickled code
    assert ckpt["format"] == FORMAT and ckpt["step"] == 7
    assert {"config", "unet", "text_encoder", "image_encoder"} <= set(ckpt)
    assert ckpt["text_encoder"] is not None  # random CLIP travels with the model

    loaded = TextToVideo.from_checkpoint(path)
    assert loaded.step == 7 and loaded.config == model.config
    kw = dict(steps=2, guidance=3.0, seed=11)
    prompts = ["a red circle moving left"]
    a = model.generate(prompts, **kw)
    b = loaded.generate(prompts, **kw)
    cfg = model.config
    assert a.shape == (1, cfg.num_frames, cfg.height, cfg.width, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, model.generate(prompts, steps=2, guidance=3.0, seed=12))


def test_generation_in_sd_vae_latent_space(tmp_path):
    from diffusers import AutoencoderKL

    # A tiny random KL autoencoder with SD's 8x downsampling (4 levels), saved as a diffusers folder.
    torch.manual_seed(0)
    AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(32,) * 4,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=32,
    ).save_pretrained(tmp_path / "vae")
    cfg = get_config(
        "tiny",
        {
            "encoders.first_stage": "sd_vae",
            "encoders.vae_path": str(tmp_path / "vae"),
            "unet.in_channels": 4,
            "unet.out_channels": 4,
            "num_frames": 2,
            "height": 64,
            "width": 64,
        },
    )
    model = TextToVideo.build(cfg)
    assert model.latent_shape(1) == (1, *cfg.latent_shape) == (1, 4, 2, 8, 8)
    video = model.generate(["a red circle"], steps=2, guidance=2.0)
    assert video.shape == (1, 2, 64, 64, 3) and video.dtype == np.uint8
    assert model.encode_video(video).shape == (1, 4, 2, 8, 8)


def test_files_that_are_not_our_checkpoints_are_refused_clearly(tmp_path):
    bare = tmp_path / "bare.pt"
    torch.save({"input_blocks.0.0.weight": torch.zeros(1)}, bare)
    with pytest.raises(ValueError, match="ModelScope"):
        TextToVideo.from_checkpoint(bare)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match="not a t2v-platform checkpoint"):
        TextToVideo.from_checkpoint(junk)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TextToVideo.from_checkpoint(tmp_path / "missing.pt")


def _video_stream(path):
    info = media.probe(path)
    return next(s for s in info["streams"] if s["codec_type"] == "video")


def test_t2v_sample_writes_a_playable_mp4_and_gif(tiny_checkpoint, tmp_path, capsys):
    model, path = tiny_checkpoint
    out = tmp_path / "out.mp4"
    assert (
        main(
            [
                "--checkpoint",
                str(path),
                "--prompt",
                "a red circle moving left",
                "--out",
                str(out),
                "--gif",
                "--steps",
                "2",
                "--guidance",
                "4",
                "--seed",
                "3",
            ]
        )
        == 0
    )
    stream = _video_stream(out)
    cfg = model.config
    assert stream["codec_name"] == "h264"
    assert (int(stream["width"]), int(stream["height"])) == (cfg.width, cfg.height)
    frames = media.decode_video_file(out)
    assert frames.shape == (cfg.num_frames, cfg.height, cfg.width, 3)
    assert out.with_suffix(".gif").stat().st_size > 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "gif" in printed


def test_t2v_sample_several_prompts_and_an_image_condition(tiny_checkpoint, tmp_path, capsys):
    model, path = tiny_checkpoint
    image = tmp_path / "cond.png"
    image.write_bytes(media.encode_jpg(np.full((40, 48, 3), 200, np.uint8)))
    out = tmp_path / "many.mp4"
    main(
        [
            "--checkpoint",
            str(path),
            "--prompt",
            "a red circle",
            "--prompt",
            "a green triangle",
            "--out",
            str(out),
            "--steps",
            "1",
            "--image",
            str(image),
        ]
    )
    for i in range(2):
        assert _video_stream(tmp_path / f"many-{i}.mp4")["codec_name"] == "h264"
    assert "many-1.mp4" in capsys.readouterr().out


def test_t2v_sample_dry_run_prints_the_config_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "never.mp4"
    assert (
        main(
            [
                "--checkpoint",
                "whatever.pt",
                "--prompt",
                "a red circle",
                "--out",
                str(out),
                "--set",
                "steps=7",
                "--dry-run",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "checkpoint: whatever.pt" in printed and "steps: 7" in printed and "a red circle" in printed
    assert not out.exists()


def test_t2v_sample_without_a_prompt_says_how_to_fix(capsys):
    with pytest.raises(SystemExit):
        main(["--checkpoint", "model.pt"])
    assert "--prompt" in capsys.readouterr().err
