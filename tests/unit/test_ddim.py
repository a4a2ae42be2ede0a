"""DDIM + classifier-free guidance: exactness with an oracle model, determinism, guidance arithmetic."""

from __future__ import annotations

import pytest
import torch

from model import ddim as S
from model import diffusion as D
from model.unet import UNet3D, UNetConfig


def _tiny_unet() -> UNet3D:
    torch.manual_seed(0)
    cfg = UNetConfig(
        in_channels=3,
        out_channels=3,
        model_channels=16,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_levels=(1,),
        head_dim=8,
        context_dim=16,
        num_text_tokens=5,
        image_embed_dim=8,
        temporal_heads=2,
        temporal_head_dim=8,
        num_groups=8,
        dropout=0.0,
    )
    unet = UNet3D(cfg).eval()
    # Zero-initialised output layers would make every prediction 0 and every comparison trivial.
    with torch.no_grad():
        for p in unet.parameters():
            if p.abs().sum() == 0 and p.ndim > 1:
                p.normal_(0, 0.05)
    return unet


def _oracle(x_star: torch.Tensor, sched: D.Schedule):
    """The exact denoiser for data that is always x_star: what a perfectly trained model predicts."""

    def fn(x_t, t):
        s, r = sched.coefficients(t, x_t)
        eps = (x_t - s * x_star) / r
        return s * eps - r * x_star if sched.prediction == "v" else eps

    return fn


@pytest.mark.parametrize("prediction", ["v", "eps"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_with_an_exact_model_lands_on_the_data(prediction, eta):
    cfg = D.DiffusionConfig(prediction=prediction)
    sched = D.Schedule.from_config(cfg)
    x_star = torch.linspace(-1, 1, 2 * 3 * 2 * 4 * 4, dtype=torch.float64).reshape(2, 3, 2, 4, 4)
    x_T = torch.randn(x_star.shape, generator=S.make_generator(0), dtype=torch.float64)
    out = S.ddim_sample(_oracle(x_star, sched), x_T, sched, steps=10, eta=eta, generator=S.make_generator(1))
    assert torch.allclose(out, x_star, atol=1e-4)


def test_timesteps_are_trailing_and_skip_the_degenerate_step_for_eps():
    v = S.ddim_timesteps(D.Schedule.from_config(D.DiffusionConfig()), 50)
    assert len(v) == 50 and v[0] == 999 and v[-1] == 19 and v == sorted(v, reverse=True)
    eps = S.ddim_timesteps(D.Schedule.from_config(D.DiffusionConfig(prediction="eps")), 50)
    assert eps[0] == 998  # a_999 = 0: eps cannot give x0 there
    with pytest.raises(ValueError, match="steps"):
        S.ddim_timesteps(D.Schedule.from_config(D.DiffusionConfig()), 0)


def _conds(unet, b=2, image=False):
    g = torch.Generator().manual_seed(5)
    cond = {"context": torch.randn(b, 5, 16, generator=g)}
    uncond = {"context": torch.randn(1, 5, 16, generator=g)}  # one negative prompt for the batch
    if image:
        cond["image_embedding"] = torch.randn(b, 8, generator=g)
    return cond, uncond


def test_sampling_is_deterministic_given_a_seed_and_differs_across_seeds():
    unet = _tiny_unet()
    cond, uncond = _conds(unet)
    cfg = D.DiffusionConfig()

    def run(seed):
        return S.sample(unet, (2, 3, 3, 8, 8), cfg, cond=cond, uncond=uncond, guidance=4.0, steps=3, seed=seed)

    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert torch.isfinite(a).all()


@pytest.mark.parametrize("image", [False, True])
def test_guidance_one_is_the_conditional_prediction_and_g_extrapolates(image):
    unet = _tiny_unet()
    cond, uncond = _conds(unet, image=image)
    x = torch.randn(2, 3, 3, 8, 8, generator=torch.Generator().manual_seed(6))
    t = torch.tensor([999, 400])
    with torch.no_grad():
        c = unet(x, t, **cond)
        u = unet(x, t, context=uncond["context"].expand(2, -1, -1))
        assert torch.allclose(S.guided(unet, cond, uncond, 1.0)(x, t), c, atol=1e-5)
        assert torch.allclose(S.guided(unet, cond, uncond, 3.0)(x, t), u + 3.0 * (c - u), atol=1e-4)
        assert not torch.allclose(c, u, atol=1e-4)  # the conditions really differ
        # a scale per position: 3 in the left half, none (1) in the right half
        scale = torch.ones(1, 1, 3, 8, 8)
        scale[..., :4] = 3.0
        mixed = S.guided(unet, cond, uncond, scale)(x, t)
        assert torch.allclose(mixed[..., :4], (u + 3.0 * (c - u))[..., :4], atol=1e-4)
        assert torch.allclose(mixed[..., 4:], c[..., 4:], atol=1e-5)


def test_videofusion_initial_noise_is_used_when_configured():
    seen = []

    def record(x, t, **kw):
        seen.append(x.clone())
        return torch.zeros_like(x)

    cfg = D.DiffusionConfig(noise_mode="videofusion", videofusion_ratio=0.7)
    shape = (1, 2, 4, 8, 8)
    S.sample(record, shape, cfg, cond={}, steps=2, seed=9)
    expected = D.initial_noise(shape, cfg, S.make_generator(9))
    assert torch.equal(seen[0], expected)
