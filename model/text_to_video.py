"""``TextToVideo``: one object that holds a model's config, UNet, frozen encoders and noise schedule.

    t2v = TextToVideo.build(get_config("tiny"))           # random UNet (and random tiny CLIP)
    t2v.save("model.pt", step=1000)
    t2v = TextToVideo.from_checkpoint("model.pt")
    frames = t2v.generate(["a red circle moving left"], steps=50, guidance=9.0, seed=0)   # uint8 [b, f, h, w, 3]

Checkpoint file (our own format; ``torch.load(weights_only=True)`` reads it):
    {"format": "t2v-platform/1", "config": validation.to_dict(model_config), "unet": unet.state_dict(),
     "text_encoder": state_dict | None, "image_encoder": state_dict | None, "step": int, "ema": bool}
The CLIP encoders are stored when they were random-initialised (no ``encoders.clip_pretrained``), so sampling sees
exactly the encoders training used; pretrained CLIP and VAE weights are read again from their local paths.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from model import validation
from model.ddim import sample
from model.diffusion import Schedule
from model.encoders import (
    FirstStage,
    ImageEncoder,
    TextEncoder,
    build_clip_encoders,
    frames_to_tensor,
    tensor_to_frames,
)
from model.registry import ModelConfig
from model.stunet import build_video_unet
from model.unet import UNet3D
from model.validation import ConfigError

FORMAT = "t2v-platform/1"


class TextToVideo:
    """A text-to-video model: ModelConfig + UNet3D + text/image encoders + first stage + schedule."""

    def __init__(
        self,
        config: ModelConfig,
        unet: UNet3D,
        text_encoder: TextEncoder,
        image_encoder: ImageEncoder,
        first_stage: FirstStage,
    ):
        self.config = config
        self.unet = unet
        self.text_encoder = text_encoder
        self.image_encoder = image_encoder
        self.first_stage = first_stage
        self.schedule = Schedule.from_config(config.diffusion)
        self.step = 0  # training step the weights come from (set by from_checkpoint)
        self.ema = False  # whether the UNet holds EMA weights
        _check_compatible(config, text_encoder, image_encoder, first_stage)

    # -- construction -----------------------------------------------------------------------------------------

    @classmethod
    def build(cls, cfg: ModelConfig, device: str | torch.device = "cpu") -> TextToVideo:
        """A fresh model: random UNet (seeded by the caller's torch RNG), encoders per ``cfg.encoders``."""
        if not isinstance(cfg, ModelConfig):
            raise ConfigError(
                f"TextToVideo.build: expected a ModelConfig (model.registry.get_config), got {type(cfg).__name__}"
            )
        text, image = build_clip_encoders(cfg.encoders, device)
        first_stage = FirstStage.from_config(cfg.encoders, device)
        unet = build_video_unet(cfg).to(device)
        return cls(cfg, unet, text, image, first_stage)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> TextToVideo:
        """Load a file written by ``save`` (see the module docstring for the format)."""
        ckpt = read_checkpoint(path)
        try:
            cfg = validation.from_dict(ModelConfig, ckpt["config"])
        except ConfigError as e:
            raise ConfigError(f"{path}: the stored model config is not valid for this version: {e}") from None
        text, image = build_clip_encoders(cfg.encoders, device)
        for name, module in (("text_encoder", text), ("image_encoder", image)):
            if ckpt.get(name) is not None:
                _load_state(module, ckpt[name], f"{path} [{name}]")
        first_stage = FirstStage.from_config(cfg.encoders, device)
        unet = build_video_unet(cfg)
        _load_state(unet, ckpt["unet"], f"{path} [unet]")
        model = cls(cfg, unet.to(device), text, image, first_stage)
        model.step = int(ckpt.get("step", 0))
        model.ema = bool(ckpt.get("ema", False))
        return model

    def save(self, path: str | os.PathLike, step: int = 0, ema: bool = False) -> Path:
        """Write the checkpoint atomically (a reader never sees half a file). ``ema``: the UNet holds EMA weights."""
        random_clip = self.config.encoders.clip_pretrained is None
        return write_checkpoint(
            path,
            self.config,
            self.unet.state_dict(),
            text_encoder=self.text_encoder.state_dict() if random_clip else None,
            image_encoder=self.image_encoder.state_dict() if random_clip else None,
            step=step,
            ema=ema,
        )

    def to(self, device: str | torch.device, dtype: torch.dtype | None = None) -> TextToVideo:
        """Move every module to ``device``; ``dtype`` applies to the UNet only (encoders stay as loaded)."""
        self.unet.to(device=device, dtype=dtype)
        for module in (self.text_encoder, self.image_encoder, self.first_stage):
            module.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    # -- encoders -----------------------------------------------------------------------------------------------

    def encode_text(self, prompts: list[str]) -> Tensor:
        """b prompts -> [b, text_len, width] ("" is the null text)."""
        return self.text_encoder(prompts)

    def encode_image(self, images) -> Tensor:
        """uint8 [b, h, w, 3] (or one [h, w, 3]) -> pooled CLIP embedding [b, embed_dim]."""
        return self.image_encoder(images)

    def encode_video(self, frames, generator: torch.Generator | None = None) -> Tensor:
        """uint8 [b, f, h, w, 3] -> what the UNet diffuses, [b, c, f, h/d, w/d] (scaled latents or pixels)."""
        x = frames_to_tensor(frames).to(self.device)  # [b, 3, f, h, w] in [-1, 1]
        return self.first_stage.encode(x, generator).sample

    def decode(self, latents: Tensor) -> np.ndarray:
        """[b, c, f, h/d, w/d] -> uint8 [b, f, h, w, 3]."""
        return tensor_to_frames(self.first_stage.decode(latents.float()))

    def latent_shape(
        self, batch: int, num_frames: int | None = None, height: int | None = None, width: int | None = None
    ) -> tuple[int, int, int, int, int]:
        """[b, c, f, h/d, w/d] of a clip of the config's shape, or of the one given (a bucket's)."""
        cfg, d = self.config, self.first_stage.downsample
        f, h, w = num_frames or cfg.num_frames, height or cfg.height, width or cfg.width
        multiple = d * cfg.unet.downsample_factor
        if h % multiple or w % multiple:
            raise ValueError(
                f"a {w}x{h} clip: this model takes heights and widths that are multiples of {multiple} pixels "
                f"({cfg.unet.num_levels} UNet levels{', VAE x8' if d > 1 else ''}); pick a size that is"
            )
        return (batch, self.first_stage.latent_channels, f, h // d, w // d)

    # -- sampling -----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        *,
        image=None,
        steps: int | None = None,
        guidance: float | None = None,
        eta: float | None = None,
        seed: int = 0,
        negative_prompt: str | None = None,
        progress: bool = False,
        spacing: str | None = None,
        size: tuple[int, int, int] | None = None,
        fps: float | None = None,
        conditions: dict[str, torch.Tensor] | None = None,
        concat: Tensor | None = None,
        guide_conditions: bool = False,
        composite: bool = True,
    ) -> np.ndarray:
        """Prompts (and optionally a conditioning image) -> videos uint8 [b, f, h, w, 3].

        ``image``: uint8 [h, w, 3] for all prompts or [b, h, w, 3], given to the UNet as its CLIP image embedding;
        without one the UNet gets no image tokens. Guidance contrasts the prompt (+ image) with ``negative_prompt``
        (no image). Settings left None come from ``config.sampling`` (the released sampler for the released
        configs, whose ``positive_prompt`` is appended to every prompt). Same seed -> same videos.
        ``size`` (frames, height, width): another shape than the config's, e.g. a training bucket's; ``fps``: the
        frame rate an fps-conditioned UNet is given (default: the config's ``fps``). ``conditions``: structure
        conditions {kind: [1 or b, c, f or 1, h, w]} at pixel size, normalised (``model.conditions.normalise``), any
        subset of ``unet.conditions.kinds``; both guidance passes get them, so guidance contrasts the text, unless
        ``guide_conditions``: then the unconditional pass has none, and guidance contrasts text and conditions
        together with neither. A model with a condition encoder given none sees what training's all-dropped samples
        saw.
        ``concat``: [1 or b, extra_in_channels, f, h', w'] given to both sides of guidance (masked conditioning,
        ``model/masked.py``, whose given content is pasted back over the result); not with ``conditions``. Guidance
        then acts only where the model generates (``masked.guidance_map``): given content has no text to follow.
        ``composite=False`` returns the model's own output without the given content pasted back (to measure how
        well the model itself keeps it).
        """
        if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts must be a non-empty list of strings, e.g. ['a red circle moving left']")
        defaults = self.config.sampling
        steps = defaults.steps if steps is None else steps
        guidance = defaults.guidance if guidance is None else guidance
        eta = defaults.eta if eta is None else eta
        negative_prompt = defaults.negative_prompt if negative_prompt is None else negative_prompt
        spacing = defaults.timestep_spacing if spacing is None else spacing
        b = len(prompts)
        dtype = next(self.unet.parameters()).dtype
        cond = {"context": self.encode_text([p + defaults.positive_prompt for p in prompts]).to(dtype)}  # [b, n, w]
        uncond = {"context": self.text_encoder.null(1, negative_prompt).to(dtype)}  # [1, n, width]
        if image is not None:
            if not self.config.unet.image_embed_dim:
                raise ValueError("this model has no image condition (unet.image_embed_dim=0); omit the image")
            emb = self.encode_image(image).to(dtype)  # [1 or b, embed_dim]
            if emb.shape[0] not in (1, b):
                raise ValueError(f"got {emb.shape[0]} images for {b} prompts; pass one image or one per prompt")
            cond["image_embedding"] = emb.expand(b, -1)
        if self.config.unet.use_fps_condition:
            rate = float(self.config.fps if fps is None else fps)
            cond["fps"] = uncond["fps"] = torch.tensor([rate], device=self.device)  # [1]: broadcasts
        if concat is not None:
            if conditions:
                raise ValueError("give structure conditions or a masked-conditioning concat, not both")
            cond["concat"] = uncond["concat"] = concat.to(self.device, dtype)
            if self.config.masked is not None:
                from model.masked import guidance_map

                guidance = guidance_map(cond["concat"], guidance)
        shape = self.latent_shape(b, *(size or (None, None, None)))
        if self.config.unet.conditions.kinds and concat is None:
            given = {k: v.to(self.device, dtype).expand(b, -1, -1, -1, -1) for k, v in (conditions or {}).items()}
            cond["concat"] = self._condition_input(given, shape, dtype)
            # guide_conditions: the other side has none, so guidance pushes towards the conditions as well as the text
            uncond["concat"] = self._condition_input({}, shape, dtype) if guide_conditions else cond["concat"]
        was_training = self.unet.training
        self.unet.eval()
        try:
            latents = sample(
                self.unet,
                shape,
                self.config.diffusion,
                cond=cond,
                uncond=uncond,
                guidance=guidance,
                steps=steps,
                eta=eta,
                seed=seed,
                device=self.device,
                dtype=dtype,
                schedule=self.schedule,
                progress=progress,
                spacing=spacing,
            )
        finally:
            self.unet.train(was_training)
        if composite and concat is not None and self.config.masked is not None:
            from model.masked import composite as paste_given

            latents = paste_given(latents, cond["concat"].expand(b, *concat.shape[1:]).to(latents))
        return self.decode(latents)

    def _condition_input(self, given: dict[str, Tensor], shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        """The UNet's extra input for structure conditions ``given`` (any subset; none = all dropped, as training
        drops them: the encoder still adds what it learned for no condition)."""
        from model.conditions import CHANNELS

        kinds = self.config.unet.conditions.kinds
        keep = None
        if not given:
            d = self.config.unet.conditions.downsample
            b, _, _, h, w = shape
            given = {kinds[0]: torch.zeros(b, CHANNELS[kinds[0]], 1, h * d, w * d, device=self.device, dtype=dtype)}
            keep = torch.zeros(b, len(kinds), device=self.device)
        like = torch.zeros(shape, device=self.device, dtype=dtype)
        with torch.no_grad():
            return self.unet.condition_input(None, given, keep, like)


# ---------------------------------------------------------------------------------------------------------------


def read_checkpoint(path: str | os.PathLike) -> dict:
    """torch.load(weights_only=True) a TextToVideo checkpoint, with errors that say what the file is instead."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {str(path)!r} does not exist: pass a model.pt written by training "
            "(result.json 'checkpoint') or TextToVideo.save"
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many types (UnpicklingError, RuntimeError, IndexError...) on junk
        raise ValueError(
            f"{path} is not a t2v-platform checkpoint (torch.load failed: {str(e).splitlines()[0]}); "
            "pass a model.pt written by training or TextToVideo.save"
        ) from None
    if isinstance(ckpt, dict) and ckpt.get("format") == FORMAT:
        missing = [k for k in ("config", "unet") if k not in ckpt]
        if missing:
            raise ValueError(f"{path}: checkpoint is missing {missing}; the file is damaged, export it again")
        return ckpt
    if isinstance(ckpt, dict) and ckpt.get("format"):
        raise ValueError(f"{path} has format {ckpt['format']!r}; this version reads {FORMAT!r}")
    if isinstance(ckpt, dict) and (
        "state_dict" in ckpt or any(str(k).startswith(("input_blocks.", "model.diffusion_model.")) for k in ckpt)
    ):
        raise ValueError(
            f"{path} is a released ModelScope/TF-T2V UNet file, not a t2v-platform checkpoint: import it with "
            "`t2v import --from modelscope|tf-t2v PATH --out DIR`, or sample it directly with "
            "`t2v sample --checkpoint PATH --model modelscope-1.7b|tf-t2v`"
        )
    raise ValueError(
        f"{path} is not a t2v-platform checkpoint (no 'format': {FORMAT!r} entry); pass a model.pt "
        "written by training or TextToVideo.save"
    )


def write_checkpoint(
    path: str | os.PathLike,
    config: ModelConfig,
    unet: dict[str, Tensor],
    *,
    text_encoder: dict[str, Tensor] | None = None,
    image_encoder: dict[str, Tensor] | None = None,
    step: int = 0,
    ema: bool = False,
) -> Path:
    """Write a TextToVideo checkpoint from state dicts (for exporters that hold only the UNet weights, e.g. a
    DeepSpeed rank 0). Leave the encoders None when ``config.encoders.clip_pretrained`` is set; for random CLIPs
    pass them, or ``from_checkpoint`` re-creates them from ``config.encoders.seed``. Written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ckpt = {
        "format": FORMAT,
        "config": validation.to_dict(config),
        "unet": _cpu(unet),
        "text_encoder": None if text_encoder is None else _cpu(text_encoder),
        "image_encoder": None if image_encoder is None else _cpu(image_encoder),
        "step": int(step),
        "ema": bool(ema),
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(ckpt, tmp)
    _fsync(tmp)
    os.replace(tmp, path)
    _fsync(path.parent)  # the rename itself on disk
    return path


def _fsync(path: Path) -> None:
    """Flush a file (or a folder's entries) to disk, so a power cut cannot leave a renamed but empty file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def from_released(path: str | os.PathLike, config: ModelConfig, device: str | torch.device = "cpu") -> TextToVideo:
    """A TextToVideo around a released UNet file (strictly loaded, see ``model/released.py``) and the encoders
    ``config`` names; ``step`` is the file's training step when it stores one."""
    from model.released import load_released
    from model.unet import build_unet

    unet = build_unet(config.unet)
    report = load_released(unet, path, config.name)
    text, image = build_clip_encoders(config.encoders, device)
    model = TextToVideo(config, unet.to(device), text, image, FirstStage.from_config(config.encoders, device))
    model.step = report.step or 0
    return model


def _cpu(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().cpu() for k, v in state.items()}


def _load_state(module: torch.nn.Module, state: dict, where: str) -> None:
    result = module.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{where}: weights do not fit the stored config (missing {result.missing_keys[:4]}, "
            f"unexpected {result.unexpected_keys[:4]}); was the file written by another version?"
        )


def _check_compatible(cfg: ModelConfig, text: TextEncoder, image: ImageEncoder, first_stage: FirstStage) -> None:
    """The UNet's widths must match the encoders'; say which setting to change when they do not."""
    u = cfg.unet
    problems = []
    if u.in_channels != first_stage.latent_channels or u.out_channels != first_stage.latent_channels:
        problems.append(
            f"unet.in_channels/out_channels={u.in_channels}/{u.out_channels} but the first stage "
            f"({cfg.encoders.first_stage}) has {first_stage.latent_channels} channels"
        )
    if u.context_dim != text.width:
        problems.append(
            f"unet.context_dim={u.context_dim} but CLIP {cfg.encoders.clip_model!r} text width is {text.width}"
        )
    if u.image_embed_dim and u.image_embed_dim != image.embed_dim:
        problems.append(
            f"unet.image_embed_dim={u.image_embed_dim} but CLIP {cfg.encoders.clip_model!r} image "
            f"embedding has {image.embed_dim}"
        )
    step = first_stage.downsample * u.downsample_factor
    if cfg.height % step or cfg.width % step:
        problems.append(
            f"height x width = {cfg.height}x{cfg.width} must be multiples of {step} "
            f"(first stage /{first_stage.downsample}, UNet /{u.downsample_factor})"
        )
    if problems:
        raise ConfigError("model config does not fit together: " + "; ".join(problems))
