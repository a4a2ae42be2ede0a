"""Released weights: the exact ModelScopeT2V and TF-T2V layouts, output parity with VGen's forward and sampler,
and the errors a user gets for a file of the other layout.

``VGenUNet`` below re-implements, from the public VGen code (tools/modules/unet/unet_tf2tv.py, unet_t2v.py and
util.py), how ``UNetSD_TFT2V`` / ``UNetSD_T2VBase`` build their module tree (the ``scale in attn_scales`` loop,
``shortcut_dims``, the Upsample placement) and what their forward does with the conditions: the concat slots are
zeros, the text tokens (or ``zero_y``) come first, the image tokens are appended only when an image is given.
Its state dict therefore has VGen's key names, so loading it strictly into our UNet checks the layout, and
comparing outputs checks the semantics. Attention is written as plain softmax attention (what xformers computes).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model.checkpoint import CheckpointError
from model.ddim import ddim_pairs, ddim_sample, guided
from model.diffusion import Schedule
from model.registry import get_config
from model.released import layout_names, load_released
from model.unet import build_unet

# --------------------------------------------------------------------------------------------------------------
# A small re-implementation of VGen's UNet (module names and forward semantics as in VGen).


class VAttention(nn.Module):
    def __init__(self, query_dim, context_dim, heads, dim_head):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.dim_head = heads, dim_head
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))

    def forward(self, x, context=None):
        context = x if context is None else context
        b = x.shape[0]
        q, k, v = (
            t.reshape(b, t.shape[1], self.heads, self.dim_head).permute(0, 2, 1, 3)
            for t in (self.to_q(x), self.to_k(context), self.to_v(context))
        )
        w = (q @ k.transpose(-1, -2) / math.sqrt(self.dim_head)).softmax(-1)
        out = (w @ v).permute(0, 2, 1, 3).reshape(b, -1, self.heads * self.dim_head)
        return self.to_out(out)


class VGEGLU(nn.Module):
    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class VBasicTransformerBlock(nn.Module):
    def __init__(self, dim, heads, d_head, context_dim):
        super().__init__()
        self.attn1 = VAttention(dim, None, heads, d_head)
        self.ff = nn.Module()
        self.ff.net = nn.Sequential(VGEGLU(dim, dim * 4), nn.Dropout(0.0), nn.Linear(dim * 4, dim))
        self.attn2 = VAttention(dim, context_dim, heads, d_head)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x, context=None):
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context=context) + x
        return self.ff.net(self.norm3(x)) + x


class VSpatialTransformer(nn.Module):  # use_linear=True, depth 1
    def __init__(self, c, heads, d_head, context_dim):
        super().__init__()
        self.norm = nn.GroupNorm(32, c, eps=1e-6)
        self.proj_in = nn.Linear(c, heads * d_head)
        self.transformer_blocks = nn.ModuleList([VBasicTransformerBlock(heads * d_head, heads, d_head, context_dim)])
        self.proj_out = nn.Linear(c, heads * d_head)

    def forward(self, x, context):
        b, c, h, w = x.shape
        y = self.proj_in(self.norm(x).flatten(2).transpose(1, 2))
        y = self.transformer_blocks[0](y, context)
        return self.proj_out(y).transpose(1, 2).reshape(b, c, h, w) + x


class VTemporalTransformer(nn.Module):  # use_linear=False (Conv1d), only_self_att=True
    def __init__(self, c, heads, d_head):
        super().__init__()
        self.norm = nn.GroupNorm(32, c, eps=1e-6)
        self.proj_in = nn.Conv1d(c, heads * d_head, 1)
        self.transformer_blocks = nn.ModuleList([VBasicTransformerBlock(heads * d_head, heads, d_head, None)])
        self.proj_out = nn.Conv1d(heads * d_head, c, 1)

    def forward(self, x):  # [b, c, f, h, w]
        b, c, f, h, w = x.shape
        y = self.proj_in(self.norm(x).permute(0, 3, 4, 1, 2).reshape(b * h * w, c, f))  # (b h w) c f
        y = self.transformer_blocks[0](y.transpose(1, 2))  # (b h w) f c
        y = self.proj_out(y.transpose(1, 2))
        return y.reshape(b, h, w, c, f).permute(0, 3, 4, 1, 2) + x


class VTemporalConv(nn.Module):  # TemporalConvBlock_v2
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Sequential(nn.GroupNorm(32, c), nn.SiLU(), nn.Conv3d(c, c, (3, 1, 1), padding=(1, 0, 0)))
        for name in ("conv2", "conv3", "conv4"):
            layers = [nn.GroupNorm(32, c), nn.SiLU(), nn.Dropout(0.1), nn.Conv3d(c, c, (3, 1, 1), padding=(1, 0, 0))]
            setattr(self, name, nn.Sequential(*layers))

    def forward(self, x):
        return x + self.conv4(self.conv3(self.conv2(self.conv1(x))))


class VResBlock(nn.Module):
    def __init__(self, c, emb, out):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(32, c), nn.SiLU(), nn.Conv2d(c, out, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb, out))
        self.out_layers = nn.Sequential(
            nn.GroupNorm(32, out), nn.SiLU(), nn.Dropout(0.1), nn.Conv2d(out, out, 3, padding=1)
        )
        self.skip_connection = nn.Identity() if out == c else nn.Conv2d(c, out, 1)
        self.temopral_conv = VTemporalConv(out)

    def forward(self, x, e, batch):
        h = self.in_layers(x) + self.emb_layers(e)[..., None, None]
        h = self.skip_connection(x) + self.out_layers(h)
        h = h.reshape(batch, -1, *h.shape[1:]).transpose(1, 2)  # (b f) c h w -> b c f h w
        h = self.temopral_conv(h)
        return h.transpose(1, 2).flatten(0, 1)


class VDownsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.op = nn.Conv2d(c, c, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class VUpsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


def sinusoidal_embedding(timesteps, dim):
    half = dim // 2
    timesteps = timesteps.float()
    sinusoid = torch.outer(timesteps, torch.pow(10000, -torch.arange(half).to(timesteps).div(half)))
    return torch.cat([torch.cos(sinusoid), torch.sin(sinusoid)], dim=1)


class VGenUNet(nn.Module):
    """UNetSD_TFT2V (``tft2v=True``: 8 concat channels, image MLP) or UNetSD_T2VBase, as VGen builds them."""

    def __init__(self, dim, context_dim, head_dim, attn_scales, tft2v, zero_y, num_heads=8, num_res_blocks=2):
        super().__init__()
        dim_mult, in_dim, out_dim_final = [1, 2, 4, 4], 4, 4
        self.tft2v, self.dim, self.context_dim, self.num_tokens = tft2v, dim, context_dim, 4
        self.concat_dim = 8 if tft2v else 0
        self.register_buffer("zero_y", zero_y)
        embed_dim = dim * 4
        enc_dims = [dim * u for u in [1] + dim_mult]
        dec_dims = [dim * u for u in [dim_mult[-1]] + dim_mult[::-1]]
        shortcut_dims, scale = [], 1.0
        self.time_embed = nn.Sequential(nn.Linear(dim, embed_dim), nn.SiLU(), nn.Linear(embed_dim, embed_dim))
        if tft2v:
            self.pre_image_condition = nn.Sequential(
                nn.Linear(context_dim, context_dim), nn.SiLU(), nn.Linear(context_dim, context_dim * 4)
            )
        self.input_blocks = nn.ModuleList()
        init_block = nn.ModuleList([nn.Conv2d(in_dim + self.concat_dim, dim, 3, padding=1)])
        init_block.append(VTemporalTransformer(dim, num_heads, head_dim))
        self.input_blocks.append(init_block)
        shortcut_dims.append(dim)

        def attention(out_dim, block):
            block.append(VSpatialTransformer(out_dim, out_dim // head_dim, head_dim, context_dim))
            block.append(VTemporalTransformer(out_dim, out_dim // head_dim, head_dim))

        for i, (a, out_dim) in enumerate(zip(enc_dims[:-1], enc_dims[1:])):
            for j in range(num_res_blocks):
                block = nn.ModuleList([VResBlock(a, embed_dim, out_dim)])
                if scale in attn_scales:
                    attention(out_dim, block)
                a = out_dim
                self.input_blocks.append(block)
                shortcut_dims.append(out_dim)
                if i != len(dim_mult) - 1 and j == num_res_blocks - 1:
                    shortcut_dims.append(out_dim)
                    scale /= 2.0
                    self.input_blocks.append(VDownsample(out_dim))
        self.middle_block = nn.ModuleList([VResBlock(out_dim, embed_dim, out_dim)])
        attention(out_dim, self.middle_block)
        self.middle_block.append(VResBlock(out_dim, embed_dim, out_dim))
        self.output_blocks = nn.ModuleList()
        for i, (a, out_dim) in enumerate(zip(dec_dims[:-1], dec_dims[1:])):
            for j in range(num_res_blocks + 1):
                block = nn.ModuleList([VResBlock(a + shortcut_dims.pop(), embed_dim, out_dim)])
                if scale in attn_scales:
                    attention(out_dim, block)  # VGen hard-codes context_dim=1024 here: the released width
                a = out_dim
                if i != len(dim_mult) - 1 and j == num_res_blocks:
                    block.append(VUpsample(out_dim))
                    scale *= 2.0
                self.output_blocks.append(block)
        self.out = nn.Sequential(nn.GroupNorm(32, out_dim), nn.SiLU(), nn.Conv2d(out_dim, out_dim_final, 3, padding=1))

    def forward(self, x, t, y=None, image=None):
        batch, c, f, h, w = x.shape
        self.batch = batch
        if self.concat_dim:
            x = torch.cat([x, x.new_zeros(batch, self.concat_dim, f, h, w)], dim=1)
        e = self.time_embed(sinusoidal_embedding(t, self.dim))
        context = x.new_zeros(batch, 0, self.context_dim)
        y_context = y if y is not None else self.zero_y.repeat(batch, 1, 1)
        context = torch.cat([context, y_context], dim=1)
        if image is not None:
            image_context = self.pre_image_condition(image).view(-1, self.num_tokens, self.context_dim)
            context = torch.cat([context, image_context], dim=1)
        e = e.repeat_interleave(repeats=f, dim=0)
        context = context.repeat_interleave(repeats=f, dim=0)
        x = x.transpose(1, 2).flatten(0, 1)  # b c f h w -> (b f) c h w
        xs = []
        for block in self.input_blocks:
            x = self._single(block, x, e, context)
            xs.append(x)
        x = self._single(self.middle_block, x, e, context)
        for block in self.output_blocks:
            x = self._single(block, torch.cat([x, xs.pop()], dim=1), e, context)
        x = self.out(x)
        return x.reshape(batch, f, *x.shape[1:]).transpose(1, 2)

    def _single(self, module, x, e, context):
        if isinstance(module, VResBlock):
            return module(x, e, self.batch)
        if isinstance(module, VSpatialTransformer):
            return module(x, context)
        if isinstance(module, VTemporalTransformer):
            x = x.reshape(self.batch, -1, *x.shape[1:]).transpose(1, 2)
            return module(x).transpose(1, 2).flatten(0, 1)
        if isinstance(module, nn.ModuleList):
            for m in module:
                x = self._single(m, x, e, context)
            return x
        return module(x)


def vgen_ddim_sample_loop(model, noise, kwargs_pair, guide_scale, ddim_timesteps, alphas_cumprod):
    """VGen's DiffusionDDIM.ddim_sample_loop for mean_type 'v', eta 0, as in tools/modules/diffusions."""
    T = len(alphas_cumprod)
    a = alphas_cumprod.float()
    steps = (1 + torch.arange(0, T, T // ddim_timesteps)).clamp(0, T - 1).flip(0)
    stride = T // ddim_timesteps
    xt = noise
    for step in steps:
        t = torch.full((noise.shape[0],), int(step), dtype=torch.long)
        y_out = model(xt, t, **kwargs_pair[0])
        u_out = model(xt, t, **kwargs_pair[1])
        out = u_out + guide_scale * (y_out - u_out)
        at = a[t].view(-1, 1, 1, 1, 1)
        x0 = at.sqrt() * xt - (1 - at).sqrt() * out
        eps = ((1 / at).sqrt() * xt - x0) / (1 / at - 1).sqrt()
        a_prev = a[(t - stride).clamp(0)].view(-1, 1, 1, 1, 1)
        xt = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return xt


# --------------------------------------------------------------------------------------------------------------

NARROW = {"unet.model_channels": 32, "unet.head_dim": 16, "unet.temporal_head_dim": 16}


def narrow_config(name: str, context_dim: int = 32):
    changes = {**NARROW, "unet.context_dim": context_dim}
    if get_config(name).unet.image_embed_dim:
        changes["unet.image_embed_dim"] = context_dim
    return get_config(name, changes)


def vgen_model(tft2v: bool, context_dim: int = 32, seed: int = 0) -> VGenUNet:
    torch.manual_seed(seed)
    scales = [1 / 2, 1 / 4, 1 / 8] if tft2v else [1 / 1, 1 / 2, 1 / 4]
    model = VGenUNet(32, context_dim, 16, scales, tft2v, zero_y=torch.randn(1, 77, context_dim)).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # every weight random, so zero-initialised layers matter too
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def vgen_state(model: VGenUNet) -> dict:
    return {k: v for k, v in model.state_dict().items() if k != "zero_y"}


@pytest.mark.parametrize(
    ("name", "tft2v", "scales"),
    [("modelscope-1.7b", False, [1 / 1, 1 / 2, 1 / 4]), ("tf-t2v", True, [1 / 2, 1 / 4, 1 / 8])],
)
def test_full_size_layout_is_vgens_key_for_key(name, tft2v, scales):
    # Both UNets at full size on the meta device: the same keys and the same shapes, nothing more or less.
    with torch.device("meta"):
        theirs = VGenUNet(320, 1024, 64, scales, tft2v, zero_y=torch.zeros(1, 77, 1024))
    theirs = {k: tuple(v.shape) for k, v in vgen_state(theirs).items()}
    ours = {k: tuple(v.shape) for k, v in build_unet(get_config(name).unet, "meta").state_dict().items()}
    assert set(ours) == set(theirs)
    assert ours == theirs
    assert layout_names(ours) == [name]


def test_the_two_released_layouts_and_their_settings():
    ms, tf = get_config("modelscope-1.7b"), get_config("tf-t2v")
    ms_state = build_unet(ms.unet, "meta").state_dict()
    tf_state = build_unet(tf.unet, "meta").state_dict()
    assert ms_state["input_blocks.0.0.weight"].shape == (320, 4, 3, 3)
    assert tf_state["input_blocks.0.0.weight"].shape == (320, 12, 3, 3)  # 4 latent + 8 concat channels
    assert not any(k.startswith("pre_image_condition.") for k in ms_state)  # released ModelScope has no image MLP
    assert tf_state["pre_image_condition.2.weight"].shape == (4096, 1024)  # 4 tokens of 1024
    # attention: ModelScope at level 0 (input_blocks.1), TF-T2V not there but at level 3 (input_blocks.10)
    assert "input_blocks.1.1.norm.weight" in ms_state and "input_blocks.1.1.norm.weight" not in tf_state
    assert "input_blocks.10.1.norm.weight" in tf_state and "input_blocks.10.1.norm.weight" not in ms_state
    assert len(set(ms_state) - set(tf_state)) == 262 and len(set(tf_state) - set(ms_state)) == 262 + 4
    assert (ms.diffusion.prediction, ms.diffusion.zero_terminal_snr, ms.diffusion.offset_noise) == ("eps", False, 0.0)
    assert (tf.diffusion.prediction, tf.diffusion.zero_terminal_snr, tf.diffusion.offset_noise) == ("v", True, 0.1)
    assert ms.sampling.timestep_spacing == tf.sampling.timestep_spacing == "leading"
    assert (tf.sampling.steps, tf.sampling.guidance) == (50, 9.0)
    assert tf.sampling.negative_prompt.startswith("Distorted, discontinuous") and ms.sampling.negative_prompt == ""


@pytest.mark.parametrize("name", ["modelscope-1.7b", "tf-t2v"])
def test_both_file_forms_load_strictly(name, tmp_path):
    theirs = vgen_state(vgen_model(tft2v=name == "tf-t2v"))
    torch.save({"state_dict": theirs, "step": 512000}, tmp_path / "wrapped.pth")
    torch.save(theirs, tmp_path / "bare.pth")
    for file, step in (("wrapped.pth", 512000), ("bare.pth", None)):
        unet = build_unet(narrow_config(name).unet)
        report = load_released(unet, tmp_path / file, name)
        assert report.step == step and not report.missing_allowed and not report.padded
        loaded = unet.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in theirs.items())


def test_a_file_of_the_other_layout_names_the_config_that_fits(tmp_path):
    torch.save({"state_dict": vgen_state(vgen_model(tft2v=True)), "step": 1}, tmp_path / "tft2v.pth")
    torch.save(vgen_state(vgen_model(tft2v=False)), tmp_path / "ms.pth")
    with pytest.raises(CheckpointError, match=r"layout of config 'tf-t2v'.*--from tf-t2v"):
        load_released(build_unet(narrow_config("modelscope-1.7b").unet), tmp_path / "tft2v.pth", "modelscope-1.7b")
    with pytest.raises(CheckpointError, match=r"layout of config 'modelscope-1.7b'.*--from modelscope"):
        load_released(build_unet(narrow_config("tf-t2v").unet), tmp_path / "ms.pth", "tf-t2v")
    # same layout, other widths: the shape mismatches are listed
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_released(build_unet(narrow_config("tf-t2v", context_dim=64).unet), tmp_path / "tft2v.pth", "tf-t2v")


def _loaded(name: str, vgen: VGenUNet):
    unet = build_unet(narrow_config(name).unet).eval()
    load_released(unet, vgen_state(vgen), name)
    return unet


def test_tft2v_output_equals_vgens_with_and_without_an_image():
    vgen = vgen_model(tft2v=True)
    ours = _loaded("tf-t2v", vgen)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 3, 16, 16, generator=g)
    t = torch.tensor([981, 421])
    text = torch.randn(2, 77, 32, generator=g)
    image = torch.randn(2, 32, generator=g)
    with torch.no_grad():
        no_image = vgen(x, t, y=text)
        torch.testing.assert_close(ours(x, t, context=text), no_image, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(
            ours(x, t, context=text, image_embedding=image), vgen(x, t, text, image), rtol=1e-4, atol=1e-4
        )
        # four zero image tokens (what a dropped image is in training) are not "no image": the output changes
        zero_tokens = ours(x, t, context=text, image_embedding=image, image_keep=torch.zeros(2))
        assert not torch.allclose(zero_tokens, ours(x, t, context=text))


def test_modelscope_output_equals_vgens():
    vgen = vgen_model(tft2v=False)
    ours = _loaded("modelscope-1.7b", vgen)
    g = torch.Generator().manual_seed(4)
    x, t, text = torch.randn(1, 4, 4, 16, 16, generator=g), torch.tensor([500]), torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t, context=text), vgen(x, t, y=text), rtol=1e-4, atol=1e-4)


def test_released_sampler_equals_vgens_ddim_loop():
    # Same network, same noise, same prompt and negative prompt: VGen's DDIM loop (leading spacing, guidance 9
    # against the negative prompt) and ours give the same latents.
    cfg = narrow_config("tf-t2v")
    vgen = vgen_model(tft2v=True)
    ours = _loaded("tf-t2v", vgen)
    schedule = Schedule.from_config(cfg.diffusion)
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(1, 4, 2, 8, 8, generator=g)
    text, negative = torch.randn(1, 77, 32, generator=g), torch.randn(1, 77, 32, generator=g)
    steps = 4
    with torch.no_grad():
        expected = vgen_ddim_sample_loop(
            vgen, noise, [{"y": text}, {"y": negative}], 9.0, steps, schedule.alphas_cumprod
        )
        fn = guided(ours, {"context": text}, {"context": negative}, 9.0)
        got = ddim_sample(fn, noise, schedule, steps, spacing="leading")
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)
    assert [t for t, _ in ddim_pairs(schedule, 50, "leading")][:3] == [981, 961, 941]
    assert ddim_pairs(schedule, 50, "leading")[-1] == (1, 0)


def test_generate_uses_the_models_sampling_settings():
    # A model whose config names VGen-style sampling settings samples exactly as explicit arguments would.
    from model.text_to_video import TextToVideo

    small = {"num_frames": 2, "height": 16, "width": 16}
    released_like = {
        **small,
        "sampling.negative_prompt": "blurry, static",
        "sampling.positive_prompt": ", cinematic",
        "sampling.timestep_spacing": "leading",
        "sampling.steps": 3,
        "sampling.guidance": 4.0,
    }
    torch.manual_seed(0)
    plain = TextToVideo.build(get_config("tiny", small))
    configured = TextToVideo(
        get_config("tiny", released_like), plain.unet, plain.text_encoder, plain.image_encoder, plain.first_stage
    )
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in plain.unet.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)  # the fresh UNet predicts 0 whatever it is given
    got = configured.generate(["a red circle"])
    explicit = plain.generate(
        ["a red circle, cinematic"], steps=3, guidance=4.0, negative_prompt="blurry, static", spacing="leading"
    )
    assert (got == explicit).all()
    assert not (got == plain.generate(["a red circle"], steps=3, guidance=4.0)).all()
