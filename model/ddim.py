"""DDIM sampling with classifier-free guidance, as free functions (one model signature: ``model_fn(x, t) -> out``).

``model_fn`` returns what the network predicts (v or eps, per ``Schedule.prediction``); ``guided`` turns a UNet and
two condition sets into such a function. ``sample`` is the whole recipe the released TF-T2V models use: initial
noise (independent or VideoFusion), 50 DDIM steps, eta 0, guidance 9.0 with the negative-prompt embedding as the
unconditional input. Everything random is drawn from one CPU ``torch.Generator`` seeded by the caller, so a seed
gives the same video on every run and device.

Timesteps are spaced "trailing" by default (Lin et al. 2024, arXiv 2305.08891, sec. 3.3): the first step is at
t = T - 1, where zero terminal SNR makes x_T pure noise, matching how sampling starts. An eps model cannot be
evaluated there (its x0 estimate divides by sqrt(a_T) = 0), so for eps prediction any step with a_t = 0 moves to the
last t with a_t > 0. "leading" is the spacing the released ModelScopeT2V / TF-T2V samplers (VGen's
``ddim_sample_loop``) use: t = 1 + k * (T // steps) descending from 981 (T = 1000, 50 steps), each step going to
t - T // steps and the last one to t = 0 (a_0, not a clean x0); a released network samples as published with it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from model.diffusion import DiffusionConfig, Schedule, gather, initial_noise, predict_x0_eps
from model.validation import check, check_choice

ModelFn = Callable[[Tensor, Tensor], Tensor]
SPACINGS = ("trailing", "leading")

# The negative prompt and prompt suffix of VGen's TF-T2V text-to-video sampling (configs/tft2v_t2v_infer.yaml and
# the default negative_prompt of its utils/config.py).
TFT2V_NEGATIVE_PROMPT = (
    "Distorted, discontinuous, Ugly, blurry, low resolution, motionless, static, disfigured, disconnected limbs, "
    "Ugly faces, incomplete arms"
)
TFT2V_POSITIVE_PROMPT = ", cinematic, High Contrast, highly detailed, no blur, 4k render"


@dataclass
class SamplingConfig:
    """How a model is sampled unless the caller says otherwise (``t2v sample`` flags win)."""

    steps: int = 50  # DDIM steps
    guidance: float = 9.0  # classifier-free guidance scale (1 = none)
    eta: float = 0.0  # DDIM stochasticity
    negative_prompt: str = ""  # the unconditional side of guidance ("" is the null text)
    positive_prompt: str = ""  # appended to every prompt (VGen's TF-T2V appends a quality suffix)
    timestep_spacing: Literal["trailing", "leading"] = "trailing"  # leading: the released samplers

    def __post_init__(self) -> None:
        check(
            isinstance(self.steps, int) and self.steps >= 1, f"sampling.steps={self.steps!r}: must be an integer >= 1"
        )
        check(self.guidance >= 0, f"sampling.guidance={self.guidance}: must be >= 0 (1 = no guidance)")
        check(self.eta >= 0, f"sampling.eta={self.eta}: must be >= 0")
        check_choice("sampling.timestep_spacing", self.timestep_spacing, list(SPACINGS))


def ddim_pairs(schedule: Schedule, steps: int, spacing: str = "trailing") -> list[tuple[int, int]]:
    """(t, t_prev) of each DDIM step, t descending; t_prev = -1 means "to a clean x0" (a = 1)."""
    T = schedule.num_timesteps
    if not 1 <= steps <= T:
        raise ValueError(f"steps={steps}: must be between 1 and num_timesteps={T}")
    if spacing == "leading":  # VGen: steps = (1 + arange(0, T, T // n)).clamp(0, T - 1).flip(0); prev = t - stride
        stride = T // steps
        ts = sorted({min(1 + k, T - 1) for k in range(0, T, stride)}, reverse=True)
        return [(t, max(t - stride, 0)) for t in ts]
    if spacing != "trailing":
        raise ValueError(f"timestep spacing {spacing!r}: choose one of {', '.join(SPACINGS)}")
    ts = ddim_timesteps(schedule, steps)
    return [(t, ts[i + 1] if i + 1 < len(ts) else -1) for i, t in enumerate(ts)]


def ddim_timesteps(schedule: Schedule, steps: int) -> list[int]:
    """Descending timesteps for ``steps`` DDIM steps ("trailing" spacing), e.g. T=1000, 50 steps: 999, 979, ..., 19."""
    T = schedule.num_timesteps
    if not 1 <= steps <= T:
        raise ValueError(f"steps={steps}: must be between 1 and num_timesteps={T}")
    ts = [round(T - i * T / steps) - 1 for i in range(steps)]
    if schedule.prediction == "eps":
        valid = int((schedule.alphas_cumprod > 0).nonzero().max())  # last t where x0 is recoverable
        ts = [min(t, valid) for t in ts]
    return sorted(set(ts), reverse=True)


def ddim_step(
    model_output: Tensor,
    x_t: Tensor,
    t: int,
    t_prev: int,
    schedule: Schedule,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One DDIM update x_t -> x_{t_prev} (Song et al. 2021, arXiv 2010.02502, eq. 12). t_prev = -1 means x0.

    x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z,
    sigma = eta sqrt((1 - a_prev) / (1 - a_t)) sqrt(1 - a_t / a_prev). [b, c, f, h, w] -> same.
    """
    b = x_t.shape[0]
    tt = torch.full((b,), t, dtype=torch.long)
    x0, eps = predict_x0_eps(model_output, x_t, tt, schedule)
    a_t = gather(schedule.alphas_cumprod, tt, x_t)
    a_prev = (
        gather(schedule.alphas_cumprod, torch.full((b,), t_prev, dtype=torch.long), x_t)
        if t_prev >= 0
        else torch.ones_like(a_t)
    )
    sigma = eta * ((1 - a_prev) / (1 - a_t)).sqrt() * (1 - a_t / a_prev).sqrt()
    x_prev = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).clamp(min=0).sqrt() * eps
    if eta > 0 and t_prev >= 0:
        z = torch.randn(x_t.shape, generator=generator, dtype=torch.float32).to(x_t)
        x_prev = x_prev + sigma * z
    return x_prev


@torch.no_grad()
def ddim_sample(
    model_fn: ModelFn,
    x_T: Tensor,
    schedule: Schedule,
    steps: int = 50,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    progress: bool = False,
    spacing: str = "trailing",
) -> Tensor:
    """Run DDIM from noise x_T [b, c, f, h, w] to an x0 estimate [b, c, f, h, w]."""
    pairs = ddim_pairs(schedule, steps, spacing)
    x = x_T
    iterator = pairs
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(pairs, desc="ddim", unit="step")
    for t, t_prev in iterator:
        tt = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        x = ddim_step(model_fn(x, tt), x, t, t_prev, schedule, eta, generator)
    return x


def guided(
    unet: Callable[..., Tensor], cond: dict, uncond: dict | None = None, guidance: float | Tensor = 9.0
) -> ModelFn:
    """Classifier-free guidance (Ho & Salimans 2022, arXiv 2207.12598): out = u + g (c - u).

    cond/uncond: keyword arguments for ``unet(x, t, **kw)`` (context, image_embedding, concat), each tensor with
    the batch first (a batch of 1 broadcasts). The unconditional pass uses the negative-prompt embedding (as TF-T2V
    does). Both passes run as one doubled batch when they have the same conditions. guidance == 1 (or no uncond) is
    the plain conditional prediction. ``guidance`` may be a tensor that broadcasts to the output ([1 or b, 1, f, h,
    w]): a scale per position.
    """
    if uncond is None or (not isinstance(guidance, Tensor) and guidance == 1.0):
        return lambda x, t: unet(x, t, **_expand(cond, x.shape[0]))

    keys = sorted(set(cond) | set(uncond))
    # A condition given on one side and None on the other cannot share a batch: None means "no tokens" to the
    # UNet, which is not the same as a zero input tensor. Then the two passes run separately.
    batchable = all((cond.get(k) is None) == (uncond.get(k) is None) for k in keys)

    def both(x: Tensor, t: Tensor) -> Tensor:
        b = x.shape[0]
        if batchable:
            kw = {k: _pair(uncond.get(k), cond.get(k), b) for k in keys}
            out_u, out_c = unet(torch.cat([x, x]), torch.cat([t, t]), **kw).chunk(2)
        else:
            out_u, out_c = unet(x, t, **_expand(uncond, b)), unet(x, t, **_expand(cond, b))
        return out_u + guidance * (out_c - out_u)

    return both


def _pair(u: Tensor | None, c: Tensor | None, b: int) -> Tensor | None:
    # [b, ...] unconditional and conditional inputs stacked along the batch -> [2b, ...]; a batch of 1 broadcasts.
    if u is None:
        return None
    return torch.cat([u.expand(b, *u.shape[1:]), c.expand(b, *c.shape[1:])])


def _expand(kw: dict, b: int) -> dict:
    return {k: (v if v is None else v.expand(b, *v.shape[1:])) for k, v in kw.items()}


def make_generator(seed: int) -> torch.Generator:
    """A CPU generator: the same seed gives the same noise whatever device the model runs on."""
    return torch.Generator(device="cpu").manual_seed(int(seed))


@torch.no_grad()
def sample(
    unet: Callable[..., Tensor],
    shape: tuple[int, ...],
    cfg: DiffusionConfig,
    *,
    cond: dict,
    uncond: dict | None = None,
    guidance: float | Tensor = 9.0,
    steps: int = 50,
    eta: float = 0.0,
    seed: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    schedule: Schedule | None = None,
    progress: bool = False,
    spacing: str = "trailing",
) -> Tensor:
    """The full sampling recipe -> latents [b, c, f, h, w] (decode them with the first stage)."""
    schedule = schedule or Schedule.from_config(cfg)
    generator = make_generator(seed)
    x_T = initial_noise(shape, cfg, generator, device="cpu").to(device=device, dtype=dtype)  # [b, c, f, h, w]
    model_fn = guided(unet, cond, uncond, guidance)
    return ddim_sample(model_fn, x_T, schedule, steps, eta, generator, progress, spacing)
