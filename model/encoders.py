"""Frozen encoders around the UNet: OpenCLIP text and image encoders and the first stage (pixels <-> latents).

- ``TextEncoder``: OpenCLIP text tower, run up to the penultimate transformer layer then the final layer norm
  (as Stable Diffusion 2 and ModelScopeT2V do) -> token states ``[b, text_len, width]`` (77 x 1024 for ViT-H-14).
  Optionally (``word_code_gain`` > 0, on in the tiny config) every state also carries the prompt's *word code*:
  the layer-normalised mean of its words' token embeddings, taken before the transformer mixes them.
- ``ImageEncoder``: OpenCLIP vision tower -> the pooled, projected image embedding ``[b, embed_dim]`` (1024 for
  ViT-H-14), *not* L2-normalised: TF-T2V feeds CLIP's image embedding to a small MLP that makes 4 context tokens,
  and the MLP can learn any scale it needs, while normalising would throw away the norm for no gain. Images get
  CLIP preprocessing: resize the short side to ``clip_image_size`` (bicubic), centre crop, CLIP mean/std.
- ``FirstStage``: "identity" (pixel-space diffusion: uint8 -> [-1, 1] and back) or "sd_vae" (a diffusers
  ``AutoencoderKL`` from a local folder or a single .safetensors/.ckpt file, applied frame by frame in chunks).

Nothing is downloaded: CLIP and VAE weights come from local paths. The project registers tiny CLIP architectures
("t2v-tiny-clip", "t2v-small-clip") that tests and the small models use; without weights every CLIP is initialised
randomly but deterministically from ``seed``, so a checkpoint that stores those weights reproduces them exactly.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.validation import ConfigError, check, check_choice

log = logging.getLogger(__name__)

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class EncoderConfig:
    """Which frozen encoders a model uses and where their weights are (local paths only)."""

    first_stage: Literal["identity", "sd_vae"] = "identity"
    vae_path: str | None = None  # diffusers AutoencoderKL folder or single .safetensors/.ckpt file
    latent_scale: float = 0.18215  # SD latents are multiplied by this (ignored by "identity")
    vae_chunk: int = 8  # frames per VAE call (bounds activation memory)
    clip_model: str = "ViT-H-14"  # an open_clip architecture name or a project one (t2v-tiny-clip)
    clip_pretrained: str | None = None  # local open_clip checkpoint file; None = random init from seed
    text_len: int = 77  # tokens per prompt (CLIP's context length)
    clip_image_size: int = 224  # CLIP image crop size
    seed: int = 0  # seeds random CLIP init when no weights are given
    # Adds gain x the prompt's word code (TextEncoder.word_code) to every token state; 0 = off (the released
    # models). For randomly initialised CLIPs, whose transformer mixes every word into every state: see TextEncoder.
    word_code_gain: float = 0.0

    def __post_init__(self) -> None:
        check_choice("encoders.first_stage", self.first_stage, ["identity", "sd_vae"])
        check(self.latent_scale > 0, f"encoders.latent_scale={self.latent_scale}: must be > 0 (SD uses 0.18215)")
        check(self.vae_chunk >= 1, f"encoders.vae_chunk={self.vae_chunk}: must be >= 1 frames per VAE call")
        check(self.text_len >= 2, f"encoders.text_len={self.text_len}: must be >= 2 (CLIP uses 77)")
        check(
            self.clip_image_size >= 16,
            f"encoders.clip_image_size={self.clip_image_size}: must be >= 16 (ViT-H-14 uses 224)",
        )
        check(bool(self.clip_model), "encoders.clip_model is empty: name an open_clip model, e.g. ViT-H-14")
        check(
            isinstance(self.word_code_gain, (int, float)) and 0 <= self.word_code_gain <= 100,
            f"encoders.word_code_gain={self.word_code_gain!r}: must be a number in [0, 100] (0 turns it off)",
        )


# ---------------------------------------------------------------------------------------------------------------
# OpenCLIP loading

# Project CLIP architectures (open_clip config format). The vocabulary stays CLIP's (49408) so the standard
# tokenizer works; everything else is small enough for CPU tests. Widths: text width = UNet context_dim,
# embed_dim = UNet image_embed_dim.
PROJECT_CLIP_CONFIGS: dict[str, dict] = {
    "t2v-tiny-clip": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 224, "layers": 2, "width": 32, "head_width": 16, "patch_size": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    },
    "t2v-small-clip": {
        "embed_dim": 64,
        "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 3},
    },
}

_registered = False


def register_project_clip_configs() -> None:
    """Make the project CLIP architectures known to open_clip (idempotent; open_clip reads configs from JSON)."""
    global _registered
    if _registered:
        return
    import open_clip

    # open_clip reads the files as it adds the folder and keeps what it read, so the folder can go at once
    with tempfile.TemporaryDirectory(prefix="t2v-openclip-configs-") as folder:
        for name, cfg in PROJECT_CLIP_CONFIGS.items():
            (Path(folder) / f"{name}.json").write_text(json.dumps(cfg), encoding="utf-8")
        open_clip.add_model_config(folder)
    _registered = True


def clip_dims(model_name: str) -> tuple[int, int]:
    """(text width, image embed dim) of a CLIP architecture, without building it: the UNet's context_dim and
    image_embed_dim must equal these."""
    import open_clip

    register_project_clip_configs()
    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        raise ConfigError(f"unknown CLIP model {model_name!r}; known: {', '.join(open_clip.list_models())}")
    return int(cfg["text_cfg"]["width"]), int(cfg["embed_dim"])


class _DropRandomWeightsWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Model initialized randomly" not in record.getMessage()


@contextlib.contextmanager
def _without_random_weights_warning(active: bool) -> Iterator[None]:
    """open_clip warns through the root logger that it drew random weights; when that was asked for, the
    message above already said so with what to do, and the repeat is dropped."""
    root, drop = logging.getLogger(), _DropRandomWeightsWarning()
    if active:
        root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def load_openclip(
    model_name: str,
    pretrained: str | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    image_size: int | None = None,
    context_length: int | None = None,
):
    """An OpenCLIP model, eval mode and frozen: ``(model, preprocess, tokenizer)``.

    ``pretrained`` is a local checkpoint file (open_clip state dict, .bin/.pt/.safetensors). Without it the
    weights are random, drawn from ``seed`` (same seed -> same weights); that is fine for the project's tiny
    models and tests, and warned about otherwise. ``preprocess`` is open_clip's PIL eval transform.
    """
    import open_clip

    register_project_clip_configs()
    if open_clip.get_model_config(model_name) is None:
        raise ConfigError(f"unknown CLIP model {model_name!r}; use one of: {', '.join(open_clip.list_models())}")
    if pretrained is not None and not os.path.isfile(pretrained):
        raise FileNotFoundError(
            f"CLIP weights {pretrained!r} not found: pass a local open_clip checkpoint file (.bin/.pt/.safetensors) "
            "as encoders.clip_pretrained; nothing can be downloaded here"
        )
    if pretrained is None:
        message = (
            f"CLIP {model_name!r} has random weights (seed {seed}); text and image conditions carry no "
            "pretrained meaning. Pass a local checkpoint file with --set encoders.clip_pretrained=PATH"
        )
        if model_name in PROJECT_CLIP_CONFIGS:  # built for tests and the demo, never with pretrained weights
            log.debug(message)
        else:
            warnings.warn(message, stacklevel=2)
    # Fork the RNG so random init is reproducible from `seed` and leaves the caller's RNG untouched.
    with torch.random.fork_rng(devices=[]), _without_random_weights_warning(pretrained is None):
        torch.manual_seed(seed)
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name,
            pretrained=pretrained,
            device=device,
            force_image_size=image_size,
            force_context_length=context_length,
        )
    model.eval().requires_grad_(False)
    tokenizer = open_clip.get_tokenizer(model_name, context_length=context_length)
    return model, preprocess, tokenizer


class TextEncoder(nn.Module):
    """Prompts -> CLIP token states [b, text_len, width]: penultimate layer, then the final layer norm. Frozen.

    With ``word_code_gain`` > 0 every state also gets ``gain * word_code(prompt)``: each word's own embedding,
    averaged over the prompt's words and layer-normalised, so every word is an additive part of it at full scale
    whatever the other words. Why: a randomly initialised CLIP (all there is without downloaded weights) mixes
    every word into every state, which leaves a single word, such as a motion direction, too faint to learn from.
    The null prompt (no words) gets zero, so classifier-free guidance's unconditional input is unchanged. A
    pretrained CLIP separates words itself and needs no word code (off by default).
    """

    def __init__(self, clip_model: nn.Module, tokenizer, text_len: int = 77, word_code_gain: float = 0.0):
        super().__init__()
        if not hasattr(clip_model, "token_embedding"):
            raise ConfigError(
                "the CLIP model has a custom text tower (e.g. a HF text model); use a standard "
                "open_clip CLIP such as ViT-H-14 or t2v-tiny-clip"
            )
        self.tokenizer = tokenizer
        self.text_len = text_len
        self.word_code_gain = float(word_code_gain)
        self.token_embedding = clip_model.token_embedding
        self.positional_embedding = clip_model.positional_embedding
        # The last block's output is never used (penultimate layer), so it is not kept.
        self.blocks = nn.ModuleList(list(clip_model.transformer.resblocks)[:-1])
        self.ln_final = clip_model.ln_final
        self.register_buffer("attn_mask", clip_model.attn_mask, persistent=False)  # causal [n, n]
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):  # frozen: stays in eval mode whatever the parent does
        return super().train(False)

    @property
    def width(self) -> int:
        return int(self.token_embedding.weight.shape[1])

    def tokenize(self, prompts: list[str]) -> Tensor:
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, e.g. ['a red circle moving left']")
        return self.tokenizer(list(prompts))  # [b, text_len] int64

    @torch.no_grad()
    def encode_tokens(self, tokens: Tensor) -> Tensor:
        """[b, n] token ids -> [b, n, width] token states."""
        device = self.token_embedding.weight.device
        x = self.token_embedding(tokens.to(device))  # [b, n, width]
        x = x + self.positional_embedding.to(x.dtype)
        for block in self.blocks:
            x = block(x, attn_mask=self.attn_mask)
        states = self.ln_final(x)  # [b, n, width]
        if self.word_code_gain:
            states = states + self.word_code_gain * self.word_code(tokens)[:, None].to(states.dtype)
        return states

    @torch.no_grad()
    def word_code(self, tokens: Tensor) -> Tensor:
        """[b, n] token ids -> [b, width]: layer norm (no affine) of the mean token embedding of the words, the
        tokens between start-of-text and end-of-text (CLIP's end-of-text has the largest id, as CLIP pooling
        assumes); zeros for a prompt with no words."""
        tokens = tokens.to(self.token_embedding.weight.device)
        position = torch.arange(tokens.shape[1], device=tokens.device)[None]  # [1, n]
        words = (position > 0) & (position < tokens.argmax(dim=-1, keepdim=True))  # [b, n]
        count = words.sum(dim=1, keepdim=True)  # [b, 1]
        mean = (self.token_embedding(tokens) * words[..., None]).sum(dim=1) / count.clamp(min=1)
        return F.layer_norm(mean.float(), mean.shape[-1:]) * (count > 0)  # [b, width]

    def forward(self, prompts: list[str]) -> Tensor:
        """list of b prompts ("" is the null prompt) -> [b, text_len, width]."""
        return self.encode_tokens(self.tokenize(prompts))

    def null(self, batch: int = 1, negative_prompt: str = "") -> Tensor:
        """The null ("") or negative-prompt embedding repeated for a batch -> [batch, text_len, width].

        What classifier-free guidance uses as the unconditional input and what training substitutes for dropped or
        missing captions; computed once per prompt and reused (the encoder is frozen, so it never changes).
        """
        cache = self.__dict__.setdefault("_null_cache", {})
        device = self.token_embedding.weight.device
        if negative_prompt not in cache or cache[negative_prompt].device != device:
            cache[negative_prompt] = self([negative_prompt])
        return cache[negative_prompt].expand(batch, -1, -1)

    def load_state_dict(self, *args, **kwargs):
        self.__dict__.pop("_null_cache", None)  # new weights, new null embedding
        return super().load_state_dict(*args, **kwargs)


class ImageEncoder(nn.Module):
    """Images -> CLIP's pooled, projected image embedding [b, embed_dim] (not normalised). Frozen."""

    def __init__(self, clip_model: nn.Module, image_size: int = 224):
        super().__init__()
        self.visual = clip_model.visual
        self.image_size = image_size
        mean = getattr(self.visual, "image_mean", None) or OPENAI_CLIP_MEAN
        std = getattr(self.visual, "image_std", None) or OPENAI_CLIP_STD
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)

    @property
    def embed_dim(self) -> int:
        return int(getattr(self.visual, "output_dim", 0) or self.visual.proj.shape[1])

    def preprocess(self, images) -> Tensor:
        """uint8 [b, h, w, 3] or [h, w, 3] (numpy or torch) -> normalised float [b, 3, size, size]."""
        x = torch.as_tensor(np.array(images) if not isinstance(images, Tensor) else images)  # copy: may be read-only
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != torch.uint8:
            raise ValueError(f"images must be uint8 [b, h, w, 3] RGB, got {tuple(x.shape)} {x.dtype}")
        x = x.to(self.mean.device).permute(0, 3, 1, 2).float() / 255.0  # [b, 3, h, w] in [0, 1]
        h, w = x.shape[-2:]
        scale = self.image_size / min(h, w)  # short side -> image_size
        size = (max(self.image_size, round(h * scale)), max(self.image_size, round(w * scale)))
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        top, left = (size[0] - self.image_size) // 2, (size[1] - self.image_size) // 2
        x = x[:, :, top : top + self.image_size, left : left + self.image_size]  # [b, 3, s, s] centre crop
        return (x - self.mean) / self.std

    @torch.no_grad()
    def forward(self, images) -> Tensor:
        x = self.preprocess(images).to(next(self.visual.parameters()).dtype)
        return self.visual(x).float()  # [b, embed_dim]


def build_clip_encoders(cfg: EncoderConfig, device: str | torch.device = "cpu") -> tuple[TextEncoder, ImageEncoder]:
    """One CLIP, split into the frozen text and image encoders the model uses."""
    clip, _, tokenizer = load_openclip(
        cfg.clip_model,
        cfg.clip_pretrained,
        cfg.seed,
        device,
        image_size=cfg.clip_image_size,
        context_length=cfg.text_len,
    )
    return (TextEncoder(clip, tokenizer, cfg.text_len, cfg.word_code_gain), ImageEncoder(clip, cfg.clip_image_size))


# ---------------------------------------------------------------------------------------------------------------
# First stage


def frames_to_tensor(frames) -> Tensor:
    """uint8 [b, f, h, w, 3] (numpy or torch) -> float [b, 3, f, h, w] in [-1, 1]."""
    x = torch.as_tensor(np.array(frames) if not isinstance(frames, Tensor) else frames)  # copy: may be read-only
    if x.ndim != 5 or x.shape[-1] != 3 or x.dtype != torch.uint8:
        raise ValueError(f"frames must be uint8 [b, f, h, w, 3], got {tuple(x.shape)} {x.dtype}")
    return x.permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0


def tensor_to_frames(x: Tensor) -> np.ndarray:
    """float [b, 3, f, h, w] in [-1, 1] -> uint8 [b, f, h, w, 3] numpy (values outside [-1, 1] are clipped)."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 4, 1).cpu().numpy()


class Encoded(NamedTuple):
    sample: Tensor  # [b, c, f, h', w'] scaled latent (what the UNet sees)
    mean: Tensor  # [b, c, f, h', w'] raw posterior mean (unscaled)
    std: Tensor  # [b, c, f, h', w'] raw posterior std (zeros for identity)


class FirstStage(nn.Module):
    """Pixels [b, 3, f, h, w] in [-1, 1] <-> what the UNet diffuses. Frozen.

    "identity": the UNet works on pixels; encode/decode are the identity (latent_scale does not apply).
    "sd_vae": a Stable Diffusion KL autoencoder applied to each frame (chunks of ``chunk`` frames); latents are
    the posterior sample times ``latent_scale``. The raw posterior mean/std are returned too, so latents can be
    pre-encoded once and re-sampled (and normalised) at load time.
    """

    def __init__(
        self, kind: str = "identity", vae: nn.Module | None = None, latent_scale: float = 0.18215, chunk: int = 8
    ):
        super().__init__()
        check_choice("encoders.first_stage", kind, ["identity", "sd_vae"])
        if kind == "sd_vae" and vae is None:
            raise ConfigError("first_stage='sd_vae' needs an AutoencoderKL; use FirstStage.from_config")
        self.kind = kind
        self.vae = vae
        self.latent_scale = latent_scale if kind == "sd_vae" else 1.0
        self.chunk = chunk
        if vae is not None:
            vae.requires_grad_(False).eval()

    @classmethod
    def from_config(cls, cfg: EncoderConfig, device: str | torch.device = "cpu") -> FirstStage:
        if cfg.first_stage == "identity":
            return cls("identity")
        if not cfg.vae_path:
            raise ConfigError(
                "encoders.first_stage='sd_vae' needs encoders.vae_path: a local diffusers "
                "AutoencoderKL folder or a single .safetensors/.ckpt file "
                "(--set encoders.vae_path=/path/to/vae)"
            )
        return cls("sd_vae", load_vae(cfg.vae_path).to(device), cfg.latent_scale, cfg.vae_chunk)

    def train(self, mode: bool = True):
        return super().train(False)

    @property
    def latent_channels(self) -> int:
        return 3 if self.vae is None else int(self.vae.config.latent_channels)

    @property
    def downsample(self) -> int:
        """Spatial factor between pixels and latents (8 for SD's VAE)."""
        return 1 if self.vae is None else 2 ** (len(self.vae.config.block_out_channels) - 1)

    def _per_frame(self, x: Tensor, fn) -> Tensor:
        # [b, c, f, h, w] -> frames [(b f), c, h, w] in chunks -> [b, c', f, h', w']
        b, _, f = x.shape[:3]
        frames = x.transpose(1, 2).reshape(b * f, *x.shape[1:2], *x.shape[3:])
        out = torch.cat([fn(part) for part in frames.split(self.chunk)])
        return out.reshape(b, f, *out.shape[1:]).transpose(1, 2)

    @torch.no_grad()
    def encode_moments(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """[b, 3, f, h, w] in [-1, 1] -> raw posterior (mean, std), each [b, c, f, h/d, w/d]."""
        if self.vae is None:
            return x, torch.zeros_like(x)
        dtype = next(self.vae.parameters()).dtype
        moments = self._per_frame(x.to(dtype), lambda fr: self.vae.encode(fr).latent_dist.parameters)
        mean, logvar = moments.chunk(2, dim=1)
        return mean.float(), torch.exp(0.5 * logvar.float().clamp(-30.0, 20.0))

    def latents_from_moments(self, mean: Tensor, std: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Posterior sample, scaled: (mean + std * N(0, 1)) * latent_scale. [b, c, f, h', w']."""
        if self.vae is None:
            return mean
        noise = torch.randn(mean.shape, generator=generator, device=generator.device if generator else mean.device)
        return (mean + std * noise.to(mean.device)) * self.latent_scale

    def encode(self, x: Tensor, generator: torch.Generator | None = None) -> Encoded:
        mean, std = self.encode_moments(x)
        return Encoded(self.latents_from_moments(mean, std, generator), mean, std)

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        """Scaled latents [b, c, f, h', w'] -> pixels [b, 3, f, h, w] (about [-1, 1])."""
        if self.vae is None:
            return z
        dtype = next(self.vae.parameters()).dtype
        return self._per_frame((z / self.latent_scale).to(dtype), lambda fr: self.vae.decode(fr).sample).float()


def load_vae(path: str | os.PathLike) -> nn.Module:
    """A diffusers AutoencoderKL from a local folder (``config.json`` + weights, or a pipeline folder with
    ``vae/``) or one file (.safetensors/.ckpt/.pt/.bin; original Stable Diffusion or diffusers key names)."""
    from diffusers import AutoencoderKL

    p = Path(path)
    if p.is_dir():
        folder = p / "vae" if (p / "vae" / "config.json").is_file() else p
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"{p} is a folder without config.json (or vae/config.json): pass a diffusers "
                "AutoencoderKL folder (saved with save_pretrained) or a single weights file"
            )
        try:
            return AutoencoderKL.from_pretrained(folder, local_files_only=True, low_cpu_mem_usage=False)
        except Exception as e:  # diffusers raises several types for broken folders
            raise ValueError(f"cannot load an AutoencoderKL from {folder}: {e}") from None
    if p.is_file():
        if p.suffix not in (".safetensors", ".ckpt", ".pt", ".pth", ".bin"):
            raise ValueError(f"VAE file {p} must be .safetensors, .ckpt, .pt, .pth or .bin")
        return _load_vae_file(p)
    raise FileNotFoundError(
        f"VAE path {str(p)!r} does not exist: pass a local diffusers AutoencoderKL folder or a "
        "single .safetensors/.ckpt file (--set encoders.vae_path=PATH)"
    )


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors and torch.load raise many types for unreadable files
        raise ValueError(
            f"cannot read VAE weights from {path}: {str(e).splitlines()[0] if str(e) else e!r}; "
            "pass a Stable Diffusion VAE .safetensors/.ckpt file or a diffusers folder"
        ) from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not sd:
        raise ValueError(f"{path} holds no state dict")
    return sd


def _load_vae_file(path: Path) -> nn.Module:
    from diffusers import AutoencoderKL

    sd = _read_state_dict(path)
    if any(k.startswith("encoder.down_blocks.") for k in sd):
        # diffusers key names: use config.json beside the file (save_pretrained writes one) or infer the
        # architecture from the tensor shapes (GroupNorm groups cannot be inferred: SD's 32 is assumed).
        config_file = path.parent / "config.json"
        if config_file.is_file():
            vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(path.parent), local_files_only=True))
        else:
            vae = AutoencoderKL(**_diffusers_vae_config(sd))
        missing, unexpected = vae.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{path}: not an AutoencoderKL state dict (missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
        return vae
    # Original (LDM) key names, alone or inside a full SD checkpoint: describe the architecture to diffusers
    # with an "original config" inferred from shapes, so it never reaches for a config on the hub.
    prefix = "first_stage_model." if any(k.startswith("first_stage_model.") for k in sd) else ""
    if f"{prefix}encoder.conv_in.weight" not in sd:
        raise ValueError(
            f"{path} is not a VAE checkpoint (no encoder.conv_in.weight); pass a Stable Diffusion "
            "VAE file or a diffusers AutoencoderKL folder"
        )
    try:
        return AutoencoderKL.from_single_file(
            str(path), original_config=_ldm_original_config(sd, prefix), local_files_only=True
        )
    except Exception as e:
        raise ValueError(f"cannot load an AutoencoderKL from {path}: {e}") from None


def _count(sd: dict, pattern: str) -> int:
    n = 0
    while any(k.startswith(pattern.format(n)) for k in sd):
        n += 1
    return n


def _diffusers_vae_config(sd: dict) -> dict:
    levels = _count(sd, "encoder.down_blocks.{}.")
    return {
        "in_channels": int(sd["encoder.conv_in.weight"].shape[1]),
        "out_channels": int(sd["decoder.conv_out.weight"].shape[0]),
        "latent_channels": int(sd["decoder.conv_in.weight"].shape[1]),
        "block_out_channels": [
            int(sd[f"encoder.down_blocks.{i}.resnets.0.conv2.weight"].shape[0]) for i in range(levels)
        ],
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "layers_per_block": _count(sd, "encoder.down_blocks.0.resnets.{}."),
    }


def _ldm_original_config(sd: dict, prefix: str) -> dict:
    ch = int(sd[f"{prefix}encoder.conv_in.weight"].shape[0])
    levels = _count(sd, prefix + "encoder.down.{}.")
    mults = [int(sd[f"{prefix}encoder.down.{i}.block.0.conv2.weight"].shape[0]) // ch for i in range(levels)]
    ddconfig = {
        "double_z": True,
        "z_channels": int(sd[f"{prefix}decoder.conv_in.weight"].shape[1]),
        "resolution": 256,
        "in_channels": int(sd[f"{prefix}encoder.conv_in.weight"].shape[1]),
        "out_ch": int(sd[f"{prefix}decoder.conv_out.weight"].shape[0]),
        "ch": ch,
        "ch_mult": mults,
        "num_res_blocks": _count(sd, prefix + "encoder.down.0.block.{}."),
        "attn_resolutions": [],
        "dropout": 0.0,
    }
    return {"model": {"params": {"first_stage_config": {"params": {"ddconfig": ddconfig}}}}}
