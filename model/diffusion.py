"""Diffusion math for TF-T2V as pure functions over tensors: schedules, noising, targets, losses.

Everything here is stateless except ``Schedule``, a small holder of the per-timestep tables. Videos are
``[b, c, f, h, w]`` (images train as 1-frame videos, f == 1). Timesteps ``t`` are integer indices
``0 .. num_timesteps-1`` of shape ``[b]``.

Notation (DDPM, Ho et al. 2020, arXiv 2006.11239): ``a_t = alphas_cumprod[t]`` ("alpha bar"),
``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps``. The velocity target (Salimans & Ho 2022, arXiv 2202.00512, eq. in
sec. 4) is ``v = sqrt(a_t) eps - sqrt(1 - a_t) x0``.

Defaults follow the released TF-T2V models (see shared REFERENCE.md): 1000 "linear_sd" steps, zero terminal SNR
(Lin et al. 2024, arXiv 2305.08891), v-prediction, offset noise 0.1 of shape (b, c, f, 1, 1), per-sample MSE, and
the TF-T2V temporal coherence loss (arXiv 2312.15770, eq. 3) weighted by 0.1.

Zero terminal SNR and epsilon prediction: with ``a_T = 0`` the last timestep's ``x_T`` is pure noise, so an eps
model's output carries no information about x0 there and ``x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)`` divides by
zero. Training an eps model on it is harmless (the target is well defined), but converting eps to x0 at ``t = T``
is not; ``x0_from_eps`` floors ``a_t`` (``MIN_ALPHA_BAR``) so nothing becomes inf, and the sampler starts an eps
model at the last timestep with ``a_t > 0`` (see ``model/ddim.py``). That is why v-prediction is the default.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from model.validation import check, check_choice

# Floor for a_t where a formula divides by sqrt(a_t) (only eps -> x0 needs it; see the module docstring).
MIN_ALPHA_BAR = 1e-8


@dataclass
class DiffusionConfig:
    """How data is noised and what the network predicts. Validated on construction."""

    num_timesteps: int = 1000
    beta_schedule: Literal["linear_sd", "cosine"] = "linear_sd"
    zero_terminal_snr: bool = True  # rescale so a_T = 0 (Lin et al. 2024, Algorithm 1)
    prediction: Literal["v", "eps"] = "v"  # network output: velocity or noise
    offset_noise: float = 0.1  # strength of the (b, c, f, 1, 1) offset added to training noise
    noise_mode: Literal["independent", "videofusion"] = "independent"
    videofusion_ratio: float = 0.5  # l: share of per-frame noise variance that is common to all frames
    coherence_weight: float = 0.1  # lambda in L = L_diffusion + lambda * L_coherence (TF-T2V; verify)
    timestep_shift: float = 1.0  # > 1: train more on high noise (sample_timesteps); 1: uniform

    def __post_init__(self) -> None:
        check(
            isinstance(self.num_timesteps, int) and self.num_timesteps >= 2,
            f"diffusion.num_timesteps={self.num_timesteps!r}: must be an integer >= 2 (1000 in the released models)",
        )
        check_choice("diffusion.beta_schedule", self.beta_schedule, ["linear_sd", "cosine"])
        check_choice("diffusion.prediction", self.prediction, ["v", "eps"])
        check_choice("diffusion.noise_mode", self.noise_mode, ["independent", "videofusion"])
        check(self.offset_noise >= 0, f"diffusion.offset_noise={self.offset_noise}: must be >= 0 (0 turns it off)")
        check(
            0.0 <= self.videofusion_ratio < 1.0,
            f"diffusion.videofusion_ratio={self.videofusion_ratio}: must be in [0, 1) "
            "(1 would give every frame the same noise)",
        )
        check(
            self.timestep_shift > 0,
            f"diffusion.timestep_shift={self.timestep_shift}: must be > 0 (1 samples timesteps uniformly)",
        )
        check(
            self.coherence_weight >= 0,
            f"diffusion.coherence_weight={self.coherence_weight}: must be >= 0 (0 turns the coherence loss off)",
        )


# ---------------------------------------------------------------------------------------------------------------
# Beta schedules


def betas_linear_sd(num_timesteps: int, start: float = 0.00085, end: float = 0.012) -> Tensor:
    """Stable Diffusion's "scaled linear" schedule: linear in sqrt(beta). -> [T] float64."""
    return torch.linspace(start**0.5, end**0.5, num_timesteps, dtype=torch.float64) ** 2


def betas_cosine(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Cosine schedule (Nichol & Dhariwal 2021, arXiv 2102.09672, eq. 17), betas clipped at max_beta. -> [T]."""
    steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Shift/scale sqrt(a_t) so a_T = 0 while a_1 is unchanged (Lin et al. 2024, arXiv 2305.08891, Alg. 1). [T]."""
    sqrt_ab = torch.cumprod(1 - betas.double(), 0).sqrt()  # [T]
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)  # sqrt_ab[-1] == 0, sqrt_ab[0] kept
    ab = sqrt_ab**2
    alphas = torch.cat([ab[:1], ab[1:] / ab[:-1]])  # a_t / a_{t-1}
    return 1 - alphas  # last beta == 1


def make_betas(cfg: DiffusionConfig) -> Tensor:
    """The configured schedule, zero-terminal-SNR rescaled if asked. -> [T] float64."""
    if cfg.beta_schedule == "linear_sd":
        betas = betas_linear_sd(cfg.num_timesteps)
    else:
        betas = betas_cosine(cfg.num_timesteps)
    return rescale_zero_terminal_snr(betas) if cfg.zero_terminal_snr else betas


def alphas_cumprod(betas: Tensor) -> Tensor:
    """a_t = prod_{s<=t} (1 - beta_s). [T] -> [T]."""
    return torch.cumprod(1 - betas.double(), 0)


@dataclass(frozen=True)
class Schedule:
    """Per-timestep tables of one ``DiffusionConfig`` (float64 on CPU; gathered to the data's device/dtype)."""

    betas: Tensor  # [T]
    alphas_cumprod: Tensor  # [T]  a_t
    prediction: str  # "v" | "eps"

    @classmethod
    def from_config(cls, cfg: DiffusionConfig) -> Schedule:
        betas = make_betas(cfg)
        return cls(betas=betas, alphas_cumprod=alphas_cumprod(betas), prediction=cfg.prediction)

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.shape[0])

    def coefficients(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """(sqrt(a_t), sqrt(1 - a_t)) for timesteps ``t`` [b], shaped [b, 1, 1, ...] to broadcast over ``like``."""
        ab = gather(self.alphas_cumprod, t, like)
        return ab.sqrt(), (1 - ab).clamp(min=0).sqrt()

    def snr(self, t: Tensor) -> Tensor:
        """a_t / (1 - a_t) for [b] timesteps (0 at t = T under zero terminal SNR)."""
        ab = self.alphas_cumprod.to(t.device)[t.long()]
        return ab / (1 - ab).clamp(min=MIN_ALPHA_BAR)


def gather(values: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """values[t] as [b, 1, ..., 1] with like.ndim dims, on like's device and dtype."""
    out = values.to(t.device)[t.long()].to(device=like.device, dtype=like.dtype)
    return out.reshape(-1, *([1] * (like.ndim - 1)))


# ---------------------------------------------------------------------------------------------------------------
# Noise


def _randn(shape, generator: torch.Generator | None, device=None, dtype=torch.float32) -> Tensor:
    # Draw on the generator's device (CPU generators cannot fill CUDA tensors), then move.
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device, dtype=dtype).to(device)


def videofusion_noise(
    shape, ratio: float, generator: torch.Generator | None = None, device=None, dtype=torch.float32
) -> Tensor:
    """Decomposed noise (VideoFusion, arXiv 2303.08320, eq. 5): eps_i = sqrt(l) base + sqrt(1 - l) residual_i.

    shape [b, c, f, h, w]; base [b, c, 1, h, w] is shared by every frame, residuals are independent per frame.
    Each frame stays N(0, 1); two frames have correlation l = ``ratio``.
    """
    b, c, f, h, w = shape
    base = _randn((b, c, 1, h, w), generator, device, dtype)  # [b, c, 1, h, w]
    residual = _randn((b, c, f, h, w), generator, device, dtype)  # [b, c, f, h, w]
    return math.sqrt(ratio) * base + math.sqrt(1 - ratio) * residual


def offset_noise(
    shape, strength: float, generator: torch.Generator | None = None, device=None, dtype=torch.float32
) -> Tensor:
    """strength * N(0, 1) of shape [b, c, f, 1, 1]: one value per sample, channel and frame (Guttenberg 2023).

    Added to the training noise so the model can learn to change a frame's mean brightness.
    """
    b, c, f = shape[:3]
    return strength * _randn((b, c, f, 1, 1), generator, device, dtype)


def initial_noise(
    shape, cfg: DiffusionConfig, generator: torch.Generator | None = None, device=None, dtype=torch.float32
) -> Tensor:
    """x_T for sampling: independent or VideoFusion noise (no offset: the offset is a training-time device)."""
    if cfg.noise_mode == "videofusion":
        return videofusion_noise(shape, cfg.videofusion_ratio, generator, device, dtype)
    return _randn(tuple(shape), generator, device, dtype)


def training_noise(
    shape, cfg: DiffusionConfig, generator: torch.Generator | None = None, device=None, dtype=torch.float32
) -> Tensor:
    """The eps used to noise x0 in training: ``initial_noise`` plus offset noise. [b, c, f, h, w]."""
    noise = initial_noise(shape, cfg, generator, device, dtype)
    if cfg.offset_noise > 0:
        noise = noise + offset_noise(shape, cfg.offset_noise, generator, device, dtype)
    return noise


def sample_timesteps(
    batch: int, num_timesteps: int, generator: torch.Generator | None = None, device=None, shift: float = 1.0
) -> Tensor:
    """Integer timesteps in [0, T): uniform, or with ``shift`` > 1 moved towards high noise. -> [b] int64.

    The shift maps a uniform u in [0, 1) to s u / (1 + (s - 1) u) (Esser et al. 2024, arXiv 2403.03206, sec. 5.3.2:
    larger images and videos carry more redundant pixels, so the same noise level destroys less of them and
    training should see more high-noise steps, where the layout - and in a video the motion - is decided).
    shift 3 puts a quarter of the samples at t >= 0.9 T instead of a tenth.
    """
    gen_device = generator.device if generator is not None else device
    if shift == 1.0:
        return torch.randint(0, num_timesteps, (batch,), generator=generator, device=gen_device).to(device)
    u = torch.rand(batch, generator=generator, device=gen_device, dtype=torch.float64)
    shifted = shift * u / (1 + (shift - 1) * u)
    return (shifted * num_timesteps).long().clamp(max=num_timesteps - 1).to(device)


# ---------------------------------------------------------------------------------------------------------------
# Forward process, targets and conversions (all [b, c, f, h, w] -> same; t is [b])


def q_sample(x0: Tensor, t: Tensor, noise: Tensor, schedule: Schedule) -> Tensor:
    """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps (DDPM eq. 4)."""
    s, r = schedule.coefficients(t, x0)
    return s * x0 + r * noise


def v_target(x0: Tensor, noise: Tensor, t: Tensor, schedule: Schedule) -> Tensor:
    """v = sqrt(a_t) eps - sqrt(1 - a_t) x0 (Salimans & Ho 2022)."""
    s, r = schedule.coefficients(t, x0)
    return s * noise - r * x0


def training_target(x0: Tensor, noise: Tensor, t: Tensor, schedule: Schedule) -> Tensor:
    """What the network should output: v or eps, per ``schedule.prediction``."""
    return v_target(x0, noise, t, schedule) if schedule.prediction == "v" else noise


def x0_from_v(x_t: Tensor, v: Tensor, t: Tensor, schedule: Schedule) -> Tensor:
    """x0 = sqrt(a_t) x_t - sqrt(1 - a_t) v (exact for every t, including a_T = 0)."""
    s, r = schedule.coefficients(t, x_t)
    return s * x_t - r * v


def eps_from_v(x_t: Tensor, v: Tensor, t: Tensor, schedule: Schedule) -> Tensor:
    """eps = sqrt(1 - a_t) x_t + sqrt(a_t) v."""
    s, r = schedule.coefficients(t, x_t)
    return r * x_t + s * v


def x0_from_eps(x_t: Tensor, eps: Tensor, t: Tensor, schedule: Schedule) -> Tensor:
    """x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t); a_t floored at MIN_ALPHA_BAR (undefined at a_t = 0)."""
    ab = gather(schedule.alphas_cumprod, t, x_t).clamp(min=MIN_ALPHA_BAR)
    return (x_t - (1 - ab).sqrt() * eps) / ab.sqrt()


def eps_from_x0(x_t: Tensor, x0: Tensor, t: Tensor, schedule: Schedule) -> Tensor:
    """eps = (x_t - sqrt(a_t) x0) / sqrt(1 - a_t) (1 - a_t > 0 for every t >= 0 of these schedules)."""
    s, r = schedule.coefficients(t, x_t)
    return (x_t - s * x0) / r.clamp(min=MIN_ALPHA_BAR)


def v_from_eps(x_t: Tensor, eps: Tensor, t: Tensor, schedule: Schedule) -> Tensor:
    """v from eps via x0 (same a_t = 0 caveat as ``x0_from_eps``)."""
    x0 = x0_from_eps(x_t, eps, t, schedule)
    s, r = schedule.coefficients(t, x_t)
    return s * eps - r * x0


def predict_x0_eps(model_output: Tensor, x_t: Tensor, t: Tensor, schedule: Schedule) -> tuple[Tensor, Tensor]:
    """The network's output (v or eps) -> (x0 estimate, eps estimate)."""
    if schedule.prediction == "v":
        return x0_from_v(x_t, model_output, t, schedule), eps_from_v(x_t, model_output, t, schedule)
    return x0_from_eps(x_t, model_output, t, schedule), model_output


# ---------------------------------------------------------------------------------------------------------------
# Losses


def diffusion_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Per-sample MSE: mean over (c, f, h, w). [b, c, f, h, w] x2 -> [b] (float32)."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)


def coherence_loss(pred: Tensor, target: Tensor) -> Tensor:
    """TF-T2V temporal coherence loss (arXiv 2312.15770, eq. 3), per sample.

    L_c = 1/(F-1) sum_j || (o^_{j+1} - o^_j) - (o_{j+1} - o_j) ||^2 over frames j = 1..F-1, where o^ is the network
    output and o its target. The squared norm is taken as a mean over (c, h, w) so L_c has the same scale as the
    MSE it is added to. A prediction that is off by the same amount in every frame costs nothing; only
    frame-to-frame changes count. [b, c, f, h, w] x2 -> [b]; 1-frame inputs (images) give 0.
    """
    if pred.shape[2] < 2:
        return pred.new_zeros(pred.shape[0], dtype=torch.float32)
    d_pred = pred.float().diff(dim=2)  # [b, c, f-1, h, w]
    d_true = target.float().diff(dim=2)  # [b, c, f-1, h, w]
    per_pair = (d_pred - d_true).pow(2).mean(dim=(1, 3, 4))  # [b, f-1]
    return per_pair.mean(1)  # [b]: 1/(F-1) sum_j


def training_losses(
    unet_fn: Callable[..., Tensor],
    x0: Tensor,
    t: Tensor,
    cfg: DiffusionConfig | None = None,
    *,
    context: Tensor | None = None,
    image_embedding: Tensor | None = None,
    concat: Tensor | None = None,
    schedule: Schedule | None = None,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """One training loss evaluation (TF-T2V: L = L_diffusion + coherence_weight * L_coherence).

    unet_fn(x_t, t, context=..., image_embedding=..., concat=...) -> [b, c, f, h, w] (the UNet3D forward).
    x0 [b, c, f, h, w] (latents or [-1, 1] pixels); t [b] int timesteps; conditions as in ``UNet3D.forward``.
    Returns scalars ``loss`` (batch mean, what to backpropagate), ``diffusion``, ``coherence`` (batch means) and
    ``loss_per_sample`` [b].
    """
    cfg = cfg or DiffusionConfig()
    schedule = schedule or Schedule.from_config(cfg)
    if noise is None:
        noise = training_noise(x0.shape, cfg, generator, x0.device, x0.dtype)  # [b, c, f, h, w]
    x_t = q_sample(x0, t, noise, schedule)
    target = training_target(x0, noise, t, schedule)
    pred = unet_fn(x_t, t, context=context, image_embedding=image_embedding, concat=concat)
    if pred.shape != target.shape:
        raise ValueError(
            f"the UNet returned {tuple(pred.shape)} for input {tuple(x_t.shape)}; "
            "its out_channels must equal the data channels"
        )
    l_diff = diffusion_loss(pred, target)  # [b]
    l_coh = coherence_loss(pred, target)  # [b]
    per_sample = l_diff + cfg.coherence_weight * l_coh  # [b]
    return {
        "loss": per_sample.mean(),
        "diffusion": l_diff.mean().detach(),
        "coherence": l_coh.mean().detach(),
        "loss_per_sample": per_sample.detach(),
    }
