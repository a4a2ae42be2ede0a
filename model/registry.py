"""Named model sizes: a ``ModelConfig`` (UNet + diffusion + encoders + clip shape) per name, tiny first.

    cfg = get_config("tiny")                                        # what tests and the CPU demo use
    cfg = get_config("small", {"unet.model_channels": 192, "num_frames": 8})
    cfg = get_config("modelscope-1.7b")                             # ModelScopeT2V's released UNet, exactly
    cfg = get_config("tf-t2v")                                      # TF-T2V's released UNet, exactly
    cfg = get_config("tiny-stunet")                                 # tiny widths as Lumiere's STUNet

``MODEL_CONFIGS`` maps names to configs (treat them as read-only: ``get_config`` returns a fresh, validated
copy with overrides applied). Overrides are a nested dict (``{"unet": {"model_channels": 192}}``) or dotted keys
(``{"unet.model_channels": 192}``), checked like every other config (``model/validation.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from model import validation
from model.ddim import TFT2V_NEGATIVE_PROMPT, TFT2V_POSITIVE_PROMPT, SamplingConfig
from model.diffusion import DiffusionConfig
from model.encoders import PROJECT_CLIP_CONFIGS, EncoderConfig
from model.masked import MaskedConfig
from model.multidiffusion import SSRConfig
from model.stunet import STUNetConfig, check_frames
from model.unet import UNetConfig
from model.validation import ConfigError, check

VAE_FACTOR = 8  # the SD autoencoder downsamples height and width by 8
VAE_CHANNELS = 4  # ... into 4 latent channels


def _tiny_unet() -> UNetConfig:
    # Pixel space, 32x32, 8 frames: trained on CPU by the demo and used by tests, so shaped by FLOPs: a narrow first
    # level, three levels so the 8x8 bottleneck sees the whole frame, attention only at the two coarse levels, one
    # ResBlock per level, no dropout. The extra inputs (model/unet.py) make the prompt's colour and motion direction
    # learnable in minutes. About 1.8M parameters.
    return UNetConfig(
        in_channels=3,
        out_channels=3,
        model_channels=16,
        channel_mult=(1, 2, 4),
        num_res_blocks=1,
        attention_levels=(1, 2),
        head_dim=16,
        context_dim=32,
        image_embed_dim=32,
        temporal_heads=1,
        temporal_head_dim=16,
        num_groups=8,
        dropout=0.0,
        pooled_text_embedding=True,
        frame_embedding=True,
        coordinate_channels=True,
    )


def _tiny_encoders() -> EncoderConfig:
    # The word code (model/encoders.py TextEncoder) at gain 2: the random tiny CLIP's own states carry the motion
    # direction word too faintly for the tiny model to learn it.
    return EncoderConfig(first_stage="identity", clip_model="t2v-tiny-clip", word_code_gain=2.0)


@dataclass
class ModelConfig:
    """Everything that fixes a text-to-video model's weights and the clips it makes. Defaults: the tiny model."""

    name: str = "tiny"
    unet: UNetConfig = field(default_factory=_tiny_unet)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    encoders: EncoderConfig = field(default_factory=_tiny_encoders)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    num_frames: int = 8
    height: int = 32  # pixels
    width: int = 32
    fps: int = 8  # frame rate clips are sampled at for training and written at
    stunet: STUNetConfig | None = None  # Lumiere's space-time UNet (model/stunet.py); None: the ModelScope layout
    masked: MaskedConfig | None = None  # Lumiere's masked conditioning (model/masked.py); None: text only
    ssr: SSRConfig | None = None  # a spatial super-resolution model (model/multidiffusion.py); None: base model

    def __post_init__(self) -> None:
        check(bool(self.name), "name is empty: give the model config a name")
        for key in ("num_frames", "height", "width", "fps"):
            value = getattr(self, key)
            check(isinstance(value, int) and value >= 1, f"{key}={value!r}: must be a positive integer")
        u, e = self.unet, self.encoders
        channels = 3 if e.first_stage == "identity" else VAE_CHANNELS
        check(
            u.in_channels == channels,
            f"unet.in_channels={u.in_channels} but encoders.first_stage={e.first_stage!r} gives {channels} channels; "
            f"set unet.in_channels={channels}",
        )
        check(
            u.out_channels == u.in_channels,
            f"unet.out_channels={u.out_channels} must equal unet.in_channels={u.in_channels} (the model predicts "
            "v or noise of the same shape as its input)",
        )
        check(
            not u.conditions.kinds or u.conditions.downsample == self.vae_factor,
            f"unet.conditions.downsample={u.conditions.downsample}: conditions come at pixel size, the UNet works "
            f"at 1/{self.vae_factor} of it; set unet.conditions.downsample={self.vae_factor}",
        )
        multiple = self.vae_factor * u.downsample_factor
        check(
            self.height % multiple == 0 and self.width % multiple == 0,
            f"height x width = {self.height}x{self.width} must be multiples of {multiple} "
            f"({'VAE x8, ' if self.vae_factor > 1 else ''}{u.num_levels} UNet levels)",
        )
        check(
            u.num_text_tokens == e.text_len,
            f"unet.num_text_tokens={u.num_text_tokens} must equal encoders.text_len={e.text_len}",
        )
        # Project CLIP widths are known without importing open_clip; others are checked when encoders load.
        clip = PROJECT_CLIP_CONFIGS.get(e.clip_model)
        if clip is not None:
            text_width, embed_dim = clip["text_cfg"]["width"], clip["embed_dim"]
            check(
                u.context_dim == text_width,
                f"unet.context_dim={u.context_dim} but {e.clip_model} text states are {text_width} wide; "
                f"set unet.context_dim={text_width}",
            )
            check(
                u.image_embed_dim in (0, embed_dim),
                f"unet.image_embed_dim={u.image_embed_dim} but {e.clip_model} image embeddings are {embed_dim} wide; "
                f"set unet.image_embed_dim={embed_dim} (or 0 for no image condition)",
            )

        if self.masked is not None or self.ssr is not None:
            check(
                not u.conditions.kinds,
                "masked conditioning and super-resolution fill the extra input channels that structure conditions "
                "use: leave unet.conditions.kinds empty",
            )
        if self.masked is not None:
            check(
                u.extra_in_channels == u.in_channels + 1,
                f"masked conditioning concatenates a {u.in_channels}-channel video and its mask: "
                f"set unet.extra_in_channels={u.in_channels + 1} (it is {u.extra_in_channels})",
            )
        if self.ssr is not None:
            check(self.masked is None, "ssr and masked both use the extra input channels: configure one of them")
            check(
                u.extra_in_channels == u.in_channels,
                f"a super-resolution model concatenates the upsampled {u.in_channels}-channel low-resolution video: "
                f"set unet.extra_in_channels={u.in_channels} (it is {u.extra_in_channels})",
            )
            check(
                self.height % self.ssr.scale == 0 and self.width % self.ssr.scale == 0,
                f"height x width = {self.height}x{self.width} must be multiples of ssr.scale={self.ssr.scale}",
            )
        if self.stunet is not None:
            problem = check_frames(self.num_frames, self.stunet.frame_multiple(u), self.stunet.levels(u))
            check(problem is None, f"num_frames={self.num_frames}: {problem}")

    @property
    def vae_factor(self) -> int:
        return VAE_FACTOR if self.encoders.first_stage == "sd_vae" else 1

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        """The UNet's input per sample: (channels, frames, height, width)."""
        return (self.unet.in_channels, self.num_frames, self.height // self.vae_factor, self.width // self.vae_factor)


def _tiny() -> ModelConfig:
    # The defaults are the tiny model, trained with timesteps shifted towards high noise, where a clip's layout and
    # motion are decided: on CPU it sees only a few thousand steps.
    return ModelConfig(diffusion=DiffusionConfig(timestep_shift=3.0))


def _tiny_stunet() -> ModelConfig:
    # The tiny widths as a Lumiere STUNet: time halves after both spatial downsamples (8 -> 4 -> 2 frames at the
    # 8x8 level), trained from scratch on CPU like tiny, so every weight trains.
    return ModelConfig(name="tiny-stunet", diffusion=DiffusionConfig(timestep_shift=3.0), stunet=STUNetConfig())


def _small() -> ModelConfig:
    # The ModelScope layout at 128 wide (about 240M parameters): trains on one GPU in SD-VAE latent space
    # (256x256 -> 32x32 latents) with the real OpenCLIP ViT-H/14 (pass its weights as encoders.clip_pretrained).
    return ModelConfig(
        name="small",
        unet=UNetConfig(
            in_channels=4,
            out_channels=4,
            model_channels=128,
            channel_mult=(1, 2, 4, 4),
            num_res_blocks=2,
            attention_levels=(0, 1, 2),
            head_dim=64,
            context_dim=1024,
            image_embed_dim=1024,
            dropout=0.1,
        ),
        encoders=EncoderConfig(first_stage="sd_vae", clip_model="ViT-H-14"),
        num_frames=16,
        height=256,
        width=256,
        fps=8,
    )


def _modelscope_unet(**changes) -> UNetConfig:
    # The ModelScopeT2V UNet (VGen's UNetSD_T2VBase / ModelScope's UNetSD): 320 wide, levels x1 x2 x4 x4, two
    # ResBlocks per level, 8 x 64 temporal heads after the input conv, GroupNorm 32.
    fields = dict(
        in_channels=4,
        out_channels=4,
        model_channels=320,
        channel_mult=(1, 2, 4, 4),
        num_res_blocks=2,
        attention_levels=(0, 1, 2),
        head_dim=64,
        context_dim=1024,
        image_embed_dim=0,
        temporal_heads=8,
        temporal_head_dim=64,
        dropout=0.1,
        gradient_checkpointing=True,
    )
    return UNetConfig(**{**fields, **changes})


def _modelscope() -> ModelConfig:
    # ModelScopeT2V's released text2video_pytorch_model.pth, key for key (1.41B parameters, 0.55B temporal):
    # attention at levels 0-2 (attn_scales 1, 1/2, 1/4), no image condition. Trained for eps prediction on the SD
    # linear schedule without zero terminal SNR or offset noise; sampled with VGen's DDIM spacing, 50 steps,
    # guidance 9 against the null text.
    return ModelConfig(
        name="modelscope-1.7b",
        unet=_modelscope_unet(),
        diffusion=DiffusionConfig(prediction="eps", zero_terminal_snr=False, offset_noise=0.0),
        encoders=EncoderConfig(first_stage="sd_vae", clip_model="ViT-H-14"),
        sampling=SamplingConfig(timestep_spacing="leading"),
        num_frames=16,
        height=256,
        width=256,
        fps=8,
    )


def _tft2v() -> ModelConfig:
    # TF-T2V's released UNet (VGen UNetSD_TFT2V as configs/tft2v_t2v_infer.yaml builds it), key for key: attention
    # at levels 1-3 (the class default attn_scales 1/2, 1/4, 1/8), an input conv over 4 latent + 8 concat
    # channels (the VideoComposer condition slots, zeros for text-to-video) and the image-condition MLP (CLIP image
    # embedding -> 4 context tokens). v-prediction, zero terminal SNR, offset noise 0.1 on the SD linear schedule;
    # sampled with VGen's DDIM spacing, 50 steps, guidance 9, VGen's negative prompt and prompt suffix.
    return ModelConfig(
        name="tf-t2v",
        unet=_modelscope_unet(attention_levels=(1, 2, 3), extra_in_channels=8, image_embed_dim=1024),
        diffusion=DiffusionConfig(prediction="v", zero_terminal_snr=True, offset_noise=0.1),
        encoders=EncoderConfig(first_stage="sd_vae", clip_model="ViT-H-14"),
        sampling=SamplingConfig(
            timestep_spacing="leading",
            negative_prompt=TFT2V_NEGATIVE_PROMPT,
            positive_prompt=TFT2V_POSITIVE_PROMPT,
        ),
        num_frames=16,
        height=256,
        width=448,
        fps=8,
    )


MODEL_CONFIGS: dict[str, ModelConfig] = {
    "tiny": _tiny(),
    "small": _small(),
    "modelscope-1.7b": _modelscope(),
    "tf-t2v": _tft2v(),
    "tiny-stunet": _tiny_stunet(),
}


def get_config(name: str, overrides: Mapping[str, Any] | None = None) -> ModelConfig:
    """A validated copy of the named config with ``overrides`` (nested or dotted keys) applied."""
    if name not in MODEL_CONFIGS:
        raise ConfigError(f"unknown model config {name!r}; choose one of: {', '.join(MODEL_CONFIGS)}")
    data = validation.merge(validation.to_dict(MODEL_CONFIGS[name]), validation.nested(overrides or {}))
    return validation.from_dict(ModelConfig, data)


__all__ = ["ModelConfig", "MODEL_CONFIGS", "get_config", "VAE_FACTOR", "VAE_CHANNELS"]
