"""Diffusion math: schedules, noise, targets/conversions and the TF-T2V losses (pure tensor functions, CPU)."""

from __future__ import annotations

import pytest
import torch

from model import diffusion as D
from pipelines.settings import ConfigError


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- schedules ----------------------------------------------------------------------------------------------------


def test_linear_sd_betas_are_linear_in_sqrt():
    betas = D.betas_linear_sd(1000)
    assert betas[0].item() == pytest.approx(0.00085) and betas[-1].item() == pytest.approx(0.012)
    steps = betas.sqrt().diff()
    assert torch.allclose(steps, steps[0].expand_as(steps), atol=1e-12)


@pytest.mark.parametrize("schedule", ["linear_sd", "cosine"])
def test_zero_terminal_snr_gives_alpha_T_zero(schedule):
    plain = D.Schedule.from_config(D.DiffusionConfig(beta_schedule=schedule, zero_terminal_snr=False))
    zsnr = D.Schedule.from_config(D.DiffusionConfig(beta_schedule=schedule, zero_terminal_snr=True))
    assert plain.alphas_cumprod[-1] > 0
    assert zsnr.alphas_cumprod[-1] == 0  # SNR(T) = 0: x_T is pure noise
    assert zsnr.snr(torch.tensor([999])).item() == 0
    # The first step is kept and the schedule still only ever adds noise.
    assert zsnr.alphas_cumprod[0].item() == pytest.approx(plain.alphas_cumprod[0].item(), rel=1e-9)
    assert (zsnr.alphas_cumprod.diff() < 0).all()
    assert ((zsnr.betas > 0) & (zsnr.betas <= 1)).all()


def test_config_rejects_bad_values_with_a_reason():
    with pytest.raises(ConfigError, match="videofusion_ratio"):
        D.DiffusionConfig(videofusion_ratio=1.0)
    with pytest.raises(ConfigError, match="prediction"):
        D.DiffusionConfig(prediction="x0")
    with pytest.raises(ConfigError, match="num_timesteps"):
        D.DiffusionConfig(num_timesteps=1)


# -- targets and conversions ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule,zero_snr", [("linear_sd", True), ("cosine", True), ("linear_sd", False)])
def test_eps_v_x0_conversions_round_trip(schedule, zero_snr):
    sched = D.Schedule.from_config(D.DiffusionConfig(beta_schedule=schedule, zero_terminal_snr=zero_snr))
    g = _gen(1)
    x0 = torch.randn(5, 3, 4, 6, 6, generator=g, dtype=torch.float64)
    eps = torch.randn(5, 3, 4, 6, 6, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 500, 998, 999])
    x_t = D.q_sample(x0, t, eps, sched)
    v = D.v_target(x0, eps, t, sched)
    assert torch.allclose(D.x0_from_v(x_t, v, t, sched), x0, atol=1e-9)  # exact at every t, even a_T = 0
    assert torch.allclose(D.eps_from_v(x_t, v, t, sched), eps, atol=1e-9)
    assert torch.allclose(D.eps_from_x0(x_t, x0, t, sched), eps, atol=1e-9)
    ok = sched.alphas_cumprod[t] > 0  # eps -> x0 needs a_t > 0
    assert torch.allclose(D.x0_from_eps(x_t, eps, t, sched)[ok], x0[ok], atol=1e-6)
    assert torch.allclose(D.v_from_eps(x_t, eps, t, sched)[ok], v[ok], atol=1e-6)
    x0_hat, eps_hat = D.predict_x0_eps(v, x_t, t, sched)
    assert torch.allclose(x0_hat, x0, atol=1e-9) and torch.allclose(eps_hat, eps, atol=1e-9)


def test_eps_to_x0_at_zero_snr_stays_finite():
    sched = D.Schedule.from_config(D.DiffusionConfig(prediction="eps"))
    x = torch.randn(1, 2, 2, 4, 4)
    assert torch.isfinite(D.x0_from_eps(x, x, torch.tensor([999]), sched)).all()


# -- noise --------------------------------------------------------------------------------------------------------


def _frame_correlation(noise: torch.Tensor, i: int, j: int) -> float:
    a, b = noise[:, :, i].flatten(), noise[:, :, j].flatten()
    return torch.corrcoef(torch.stack([a, b]))[0, 1].item()


@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.8])
def test_videofusion_noise_has_the_stated_frame_correlation(ratio):
    noise = D.videofusion_noise((32, 2, 4, 16, 16), ratio, _gen(3))  # 16k values per frame
    assert noise.var().item() == pytest.approx(1.0, abs=0.03)  # each frame stays N(0, 1)
    for i, j in [(0, 1), (0, 3), (1, 2)]:
        assert _frame_correlation(noise, i, j) == pytest.approx(ratio, abs=0.03)


def test_independent_noise_is_uncorrelated_and_videofusion_is_used_when_configured():
    shape = (32, 2, 4, 16, 16)
    ind = D.initial_noise(shape, D.DiffusionConfig(), _gen(4))
    vf = D.initial_noise(shape, D.DiffusionConfig(noise_mode="videofusion", videofusion_ratio=0.6), _gen(4))
    assert abs(_frame_correlation(ind, 0, 2)) < 0.03
    assert _frame_correlation(vf, 0, 2) == pytest.approx(0.6, abs=0.03)


def test_offset_noise_is_one_value_per_sample_channel_frame():
    off = D.offset_noise((2, 4, 3, 8, 8), 0.1, _gen(5))
    assert off.shape == (2, 4, 3, 1, 1)
    # Training noise = base noise + offset: with the same seed the difference is exactly that offset, constant
    # over height and width, and about 0.1 in size.
    shape = (64, 4, 3, 8, 8)
    with_offset = D.training_noise(shape, D.DiffusionConfig(offset_noise=0.1), _gen(6))
    without = D.training_noise(shape, D.DiffusionConfig(offset_noise=0.0), _gen(6))
    diff = with_offset - without
    assert diff.std(dim=(3, 4)).max().item() < 1e-6
    assert diff[:, :, :, 0, 0].std().item() == pytest.approx(0.1, rel=0.15)


# -- losses ---------------------------------------------------------------------------------------------------------


def test_coherence_loss_zero_when_frame_differences_match():
    target = torch.randn(3, 4, 5, 6, 6, generator=_gen(7))
    offset = torch.randn(3, 4, 1, 6, 6, generator=_gen(8))  # same error in every frame
    assert torch.allclose(D.coherence_loss(target + offset, target), torch.zeros(3), atol=1e-6)
    assert torch.allclose(D.coherence_loss(target + 2.5, target), torch.zeros(3), atol=1e-6)
    # ... while the plain MSE does see that error.
    assert (D.diffusion_loss(target + offset, target) > 0.1).all()


def test_coherence_loss_positive_per_sample_and_matches_the_formula():
    target = torch.randn(3, 2, 4, 5, 5, generator=_gen(9))
    pred = target.clone()
    pred[1] += 0.3 * torch.randn(2, 4, 5, 5, generator=_gen(10))  # frame-varying error, sample 1 only
    loss = D.coherence_loss(pred, target)
    assert loss.shape == (3,)
    assert loss[0].item() == pytest.approx(0.0, abs=1e-7) and loss[2].item() == pytest.approx(0.0, abs=1e-7)
    assert loss[1] > 0
    # L_c = 1/(F-1) sum_j mean((o^_{j+1} - o^_j) - (o_{j+1} - o_j))^2, written out frame by frame.
    F = pred.shape[2]
    manual = sum(
        ((pred[1, :, j + 1] - pred[1, :, j]) - (target[1, :, j + 1] - target[1, :, j])).pow(2).mean()
        for j in range(F - 1)
    ) / (F - 1)
    assert loss[1].item() == pytest.approx(manual.item(), rel=1e-5)
    assert (D.coherence_loss(pred[:, :, :1], target[:, :, :1]) == 0).all()  # images (1 frame): nothing to compare


def test_training_losses_combine_diffusion_and_coherence_and_backpropagate():
    torch.manual_seed(0)
    net = torch.nn.Conv3d(3, 3, 3, padding=1)

    def unet_fn(x, t, context=None, image_embedding=None, concat=None):
        return net(x)

    x0 = torch.randn(2, 3, 4, 8, 8, generator=_gen(11))
    t = torch.tensor([10, 900])
    noise = D.training_noise(x0.shape, D.DiffusionConfig(), _gen(12))
    out = D.training_losses(unet_fn, x0, t, D.DiffusionConfig(coherence_weight=0.5), noise=noise)
    assert set(out) >= {"loss", "diffusion", "coherence", "loss_per_sample"}
    assert out["loss"].item() == pytest.approx(out["diffusion"].item() + 0.5 * out["coherence"].item(), rel=1e-5)
    assert out["coherence"] > 0
    out["loss"].backward()
    assert net.weight.grad is not None and net.weight.grad.abs().sum() > 0
    # Images train as 1-frame videos: the coherence term vanishes.
    img = D.training_losses(unet_fn, x0[:, :, :1], t, D.DiffusionConfig(), generator=_gen(13))
    assert img["coherence"].item() == 0


def test_training_losses_rejects_wrong_output_channels():
    with pytest.raises(ValueError, match="out_channels"):
        D.training_losses(lambda x, t, **kw: x[:, :1], torch.zeros(1, 3, 2, 4, 4), torch.tensor([5]))


def test_timestep_shift_moves_training_towards_high_noise():
    from model.diffusion import DiffusionConfig, sample_timesteps
    from model.registry import get_config

    g = torch.Generator().manual_seed(0)
    uniform = sample_timesteps(20000, 1000, g)
    shifted = sample_timesteps(20000, 1000, g, shift=3.0)
    assert uniform.min() >= 0 and uniform.max() <= 999 and shifted.min() >= 0 and shifted.max() <= 999
    high = lambda t: (t >= 900).float().mean().item()  # noqa: E731
    assert abs(high(uniform) - 0.10) < 0.01 and abs(high(shifted) - 0.25) < 0.015  # 3u / (1 + 2u) >= 0.9: u >= 3/4
    assert get_config("tiny").diffusion.timestep_shift == 3.0
    with pytest.raises(ConfigError, match="timestep_shift"):
        DiffusionConfig(timestep_shift=0)
