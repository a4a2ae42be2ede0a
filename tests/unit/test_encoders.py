"""Frozen encoders: tiny OpenCLIP text/image towers and the first stage (identity and a tiny SD-style VAE).

Real pretrained CLIP/VAE weights cannot be downloaded here, so the tests build tiny random models, save them
in the formats users have (open_clip state dict, diffusers folder, single .safetensors files) and load them from
those paths, exactly as a real checkpoint would be loaded.
"""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch

from model.encoders import (
    EncoderConfig,
    FirstStage,
    ImageEncoder,
    TextEncoder,
    build_clip_encoders,
    clip_dims,
    frames_to_tensor,
    load_openclip,
    tensor_to_frames,
)
from pipelines.settings import ConfigError


@pytest.fixture(scope="module")
def tiny_clip():
    return load_openclip("t2v-tiny-clip", seed=0)


# -- text -------------------------------------------------------------------------------------------------------


def test_text_encoder_gives_frozen_penultimate_token_states(tiny_clip):
    clip, _, tokenizer = tiny_clip
    enc = TextEncoder(clip, tokenizer)
    prompts = ["a red circle moving left", ""]
    states = enc(prompts)
    assert states.shape == (2, 77, clip_dims("t2v-tiny-clip")[0])
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.training  # frozen modules stay in eval mode
    # Penultimate layer then the final layer norm, computed by hand through open_clip's own modules.
    with torch.no_grad():
        x = clip.token_embedding(tokenizer(prompts)) + clip.positional_embedding
        for block in clip.transformer.resblocks[:-1]:
            x = block(x, attn_mask=clip.attn_mask)
        assert torch.allclose(states, clip.ln_final(x), atol=1e-5)
        full = clip.ln_final(clip.transformer.resblocks[-1](x, attn_mask=clip.attn_mask))
        assert not torch.allclose(states, full, atol=1e-3)  # not the last layer
    assert not torch.allclose(states[0], states[1])  # the null prompt differs from a prompt
    null = enc.null(3)
    assert null.shape == (3, 77, states.shape[-1])
    # the null prompt is encoded on its own (batch of 1), states[1] within a batch of 2: the same numbers up to
    # float rounding, which depends on the batch size on some CPUs (1.3e-6 apart on the 2-core dev machine)
    torch.testing.assert_close(null[2], states[1], rtol=1e-5, atol=1e-5)
    assert torch.equal(enc.null(1, "blurry")[0], enc(["blurry"])[0])  # negative prompts work the same way


def test_word_code_adds_each_word_at_full_scale_and_leaves_the_null_prompt_alone(tiny_clip):
    clip, _, tokenizer = tiny_clip
    plain, coded = TextEncoder(clip, tokenizer), TextEncoder(clip, tokenizer, word_code_gain=2.0)
    prompts = ["a red circle moving left", "a red circle moving right", "a blue square moving left", ""]
    code = coded.word_code(tokenizer(prompts))  # [4, width]
    width = code.shape[-1]
    # The same vector, times the gain, on every token state; nothing for the null prompt (no words), so
    # guidance's unconditional input is the plain encoder's.
    torch.testing.assert_close(coded(prompts), plain(prompts) + 2.0 * code[:, None])
    assert torch.equal(code[3], torch.zeros(width))
    torch.testing.assert_close(coded.null(1)[0], plain.null(1)[0])
    # Layer-normalised mean of the words' own embeddings (start and end of text and padding left out), by hand.
    with torch.no_grad():
        words = clip.token_embedding(tokenizer(["a red circle moving left"]))[0, 1:6]  # 5 words
        torch.testing.assert_close(code[0], torch.nn.functional.layer_norm(words.mean(0), (width,)))
    # unit variance per channel (a little less: layer norm's eps is not small against embeddings of std 0.02)
    assert ((code[:3].norm(dim=-1) > 0.85 * width**0.5) & (code[:3].norm(dim=-1) <= width**0.5)).all()
    # What it is for: one changed word moves the code by a large share of its norm (the random transformer's
    # mean-pooled states move by about a tenth), and the direction word's part does not depend on the other words.
    states = plain(prompts[:2]).mean(dim=1)
    code_move = (code[0] - code[1]).norm() / code[0].norm()
    state_move = (states[0] - states[1]).norm() / states[0].norm()
    assert code_move > 0.3 and code_move > 3 * state_move, (code_move, state_move)
    with pytest.raises(ConfigError, match="word_code_gain"):
        EncoderConfig(word_code_gain=-1.0)


def test_random_clip_is_deterministic_from_seed_and_loads_from_a_local_file(tmp_path):
    text0, _ = build_clip_encoders(EncoderConfig(clip_model="t2v-tiny-clip", seed=0))
    again, _ = build_clip_encoders(EncoderConfig(clip_model="t2v-tiny-clip", seed=0))
    other, _ = build_clip_encoders(EncoderConfig(clip_model="t2v-tiny-clip", seed=1))
    p = ["a blue square"]
    assert torch.equal(text0(p), again(p)) and not torch.allclose(text0(p), other(p))
    # Weights saved as an open_clip state dict load from the path, whatever the seed.
    clip, _, _ = load_openclip("t2v-tiny-clip", seed=0)
    torch.save(clip.state_dict(), tmp_path / "clip.pt")
    loaded, _ = build_clip_encoders(
        EncoderConfig(clip_model="t2v-tiny-clip", clip_pretrained=str(tmp_path / "clip.pt"), seed=123)
    )
    assert torch.equal(loaded(p), text0(p))


def test_project_clip_configs_register_without_leaving_files(tmp_path, monkeypatch):
    import tempfile

    from model import encoders

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(encoders, "_registered", False)
    encoders.register_project_clip_configs()
    assert clip_dims("t2v-small-clip") == (64, 64)
    assert list(tmp_path.iterdir()) == []  # else every process building a CLIP leaves a folder in /tmp


def test_clip_loading_errors_say_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="clip_pretrained"):
        load_openclip("t2v-tiny-clip", pretrained=str(tmp_path / "missing.bin"))
    with pytest.raises(ConfigError, match="unknown CLIP model"):
        load_openclip("no-such-clip")


def test_random_weights_of_a_non_project_clip_warn(tmp_path):
    import open_clip

    cfg = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 16, "head_width": 8, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 2},
    }
    (tmp_path / "test-external-clip.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "test-external-clip.json")
    with pytest.warns(UserWarning, match="random weights.*clip_pretrained"):
        load_openclip("test-external-clip")


# -- image --------------------------------------------------------------------------------------------------------


def test_image_encoder_pools_with_clip_preprocessing(tiny_clip):
    from PIL import Image

    clip, preprocess, _ = tiny_clip
    enc = ImageEncoder(clip, 224)
    yy, xx = np.meshgrid(np.linspace(0, 1, 180), np.linspace(0, 1, 300), indexing="ij")
    img = (np.stack([xx, yy, xx * yy], -1) * 255).astype(np.uint8)  # smooth, non-square [180, 300, 3]
    emb = enc(np.stack([img, img[::-1].copy()]))
    assert emb.shape == (2, clip_dims("t2v-tiny-clip")[1])
    assert not torch.allclose(emb[0], emb[1])
    # Same resize + centre crop + normalisation as open_clip's own (PIL) transform, to resampling precision.
    ours = enc.preprocess(img)
    theirs = preprocess(Image.fromarray(img))[None]
    assert ours.shape == theirs.shape == (1, 3, 224, 224)
    assert (ours - theirs).abs().max() < 0.05
    with pytest.raises(ValueError, match="uint8"):
        enc(img.astype(np.float32))


# -- first stage --------------------------------------------------------------------------------------------------


def test_identity_first_stage_round_trips_uint8_frames():
    frames = np.random.default_rng(0).integers(0, 256, (2, 3, 8, 10, 3), dtype=np.uint8)
    x = frames_to_tensor(frames)
    assert x.shape == (2, 3, 3, 8, 10) and x.min() >= -1 and x.max() <= 1
    fs = FirstStage.from_config(EncoderConfig())
    enc = fs.encode(x)
    assert torch.equal(enc.sample, x) and fs.latent_channels == 3 and fs.downsample == 1
    assert np.array_equal(tensor_to_frames(fs.decode(enc.sample)), frames)


def _tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(32, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        norm_num_groups=32,
        sample_size=16,
    ).eval()


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae")
    _tiny_vae().save_pretrained(folder)
    return folder


def test_vae_first_stage_loads_from_a_folder_and_encodes_frame_by_frame(vae_folder):
    fs = FirstStage.from_config(EncoderConfig(first_stage="sd_vae", vae_path=str(vae_folder), vae_chunk=2))
    assert fs.latent_channels == 4 and fs.downsample == 2
    x = torch.rand(1, 3, 5, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1  # [b, c, f, h, w]
    enc = fs.encode(x, generator=torch.Generator().manual_seed(1))
    assert enc.sample.shape == enc.mean.shape == enc.std.shape == (1, 4, 5, 8, 8)
    assert (enc.std > 0).all()
    # Frame-wise and chunked: frame 3 alone through the VAE gives the same posterior mean.
    with torch.no_grad():
        ref = fs.vae.encode(x[:, :, 3]).latent_dist.mean
    assert torch.allclose(enc.mean[:, :, 3], ref, atol=1e-5)
    # The sample is the scaled posterior sample, reproducible from the same generator.
    again = fs.latents_from_moments(enc.mean, enc.std, torch.Generator().manual_seed(1))
    assert torch.allclose(again, enc.sample)
    assert torch.allclose(enc.sample / 0.18215, enc.mean, atol=6 * enc.std.max().item())
    decoded = fs.decode(enc.sample)
    assert decoded.shape == (1, 3, 5, 16, 16)
    assert not any(p.requires_grad for p in fs.parameters())


def _ldm_keys(sd: dict, levels: int) -> dict:
    """diffusers AutoencoderKL keys -> original Stable Diffusion (LDM) keys, as SD .ckpt/.safetensors files have."""
    out = {}
    for k, v in sd.items():
        n = k
        n = re.sub(r"down_blocks\.(\d+)\.resnets\.(\d+)\.", r"down.\1.block.\2.", n)
        n = re.sub(r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample.", n)
        n = re.sub(r"up_blocks\.(\d+)\.resnets\.(\d+)\.", lambda m: f"up.{levels - 1 - int(m[1])}.block.{m[2]}.", n)
        n = re.sub(r"up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"up.{levels - 1 - int(m[1])}.upsample.", n)
        n = re.sub(r"mid_block\.resnets\.(\d)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", n)
        n = n.replace("mid_block.attentions.0.", "mid.attn_1.").replace("conv_shortcut", "nin_shortcut")
        n = n.replace("conv_norm_out", "norm_out")
        if "attn_1." in n:
            n = (
                n.replace("group_norm", "norm")
                .replace("to_q", "q")
                .replace("to_k", "k")
                .replace("to_v", "v")
                .replace("to_out.0", "proj_out")
            )
            if v.ndim == 2:
                v = v[:, :, None, None]  # LDM attention uses 1x1 convs
        out["first_stage_model." + n] = v
    return out


def test_vae_loads_from_single_files_in_both_key_layouts(vae_folder, tmp_path):
    from safetensors.torch import load_file, save_file

    x = torch.rand(1, 3, 2, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    ref = FirstStage.from_config(EncoderConfig(first_stage="sd_vae", vae_path=str(vae_folder))).encode_moments(x)[0]
    # diffusers key names, the file alone (no config.json beside it)
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(vae_folder / "diffusion_pytorch_model.safetensors", alone / "vae.safetensors")
    single = FirstStage.from_config(EncoderConfig(first_stage="sd_vae", vae_path=str(alone / "vae.safetensors")))
    assert torch.allclose(single.encode_moments(x)[0], ref, atol=1e-5)
    # original Stable Diffusion key names inside a full-checkpoint-style file
    ldm = _ldm_keys(load_file(vae_folder / "diffusion_pytorch_model.safetensors"), levels=2)
    save_file(ldm, tmp_path / "sd-vae.safetensors")
    original = FirstStage.from_config(
        EncoderConfig(first_stage="sd_vae", vae_path=str(tmp_path / "sd-vae.safetensors"))
    )
    assert torch.allclose(original.encode_moments(x)[0], ref, atol=1e-5)


def test_bad_vae_paths_fail_clearly(tmp_path):
    with pytest.raises(ConfigError, match="vae_path"):
        FirstStage.from_config(EncoderConfig(first_stage="sd_vae"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FirstStage.from_config(EncoderConfig(first_stage="sd_vae", vae_path=str(tmp_path / "nope")))
    with pytest.raises(FileNotFoundError, match="config.json"):
        FirstStage.from_config(EncoderConfig(first_stage="sd_vae", vae_path=str(tmp_path)))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="cannot read VAE weights from .*junk.safetensors"):
        FirstStage.from_config(EncoderConfig(first_stage="sd_vae", vae_path=str(junk)))
