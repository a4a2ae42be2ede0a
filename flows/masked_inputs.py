"""The user's inputs of ``t2v sample --image / --inpaint --mask / --cinemagraph --mask`` as the masked-conditioning
input of a Lumiere-style model (``model/masked.py``), with usage errors that say what size and length are expected.

    --image first.png                      image-to-video: the video starts from this frame
    --inpaint video.mp4 --mask mask.png    inpainting: white mask pixels are generated, the rest is kept
    --cinemagraph image.png --mask region.png   cinemagraph: the white region moves, the rest stays still

Masks are images (white = the region) or, for ``--inpaint``, an mp4 with one mask frame per video frame.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

VIDEO_SUFFIXES = (".mp4", ".mov", ".webm", ".mkv", ".avi")


def masked_concat(model, image: str | None, inpaint: str | None, cinemagraph: str | None, mask: str | None):
    """The concat tensor [1, c + 1, f, h', w'] for ``model.generate``, or None when no masked input is given."""
    from model import masked

    if not (inpaint or cinemagraph or (image and model.config.masked is not None)):
        return None
    cfg = model.config
    if cfg.masked is None:
        raise ValueError(
            f"model {cfg.name!r} has no masked conditioning (its config has masked: null), so it cannot take "
            "--inpaint or --cinemagraph; train one with --set model_overrides.masked={} and "
            f"model_overrides.unet.extra_in_channels={cfg.unet.in_channels + 1}"
        )
    f, h, w = cfg.num_frames, cfg.height, cfg.width
    if inpaint:
        video = read_video(inpaint, "--inpaint")
        if video.shape[1:3] != (h, w) or video.shape[0] != f:
            raise ValueError(
                f"--inpaint {inpaint}: {video.shape[0]} frames of {video.shape[2]}x{video.shape[1]}; the model "
                f"makes {f} frames of {w}x{h}: give a video of exactly that size and length"
            )
        region = _read_mask(mask, "--inpaint", h, w, f)
        return masked.inpaint(_encode(model, video), _to_latent(region, model))
    still = _read_image(cinemagraph or image, "--cinemagraph" if cinemagraph else "--image", h, w)
    first = _encode(model, still[None])[:, 0]  # [c, h', w']
    if cinemagraph:
        region = _read_mask(mask, "--cinemagraph", h, w, None)
        return masked.cinemagraph(first, _to_latent(region, model), f)
    return masked.image_to_video(first, f)


def _encode(model, frames: np.ndarray):
    # uint8 [f, h, w, 3] -> the UNet's input space [c, f, h', w'] (pixels in [-1, 1], or VAE latents)
    return model.encode_video(frames[None])[0]


def _to_latent(region, model):
    # [.., h, w] pixel mask -> the latent grid: a latent is generated when any of its pixels is
    import torch.nn.functional as F

    d = model.first_stage.downsample
    return region if d == 1 else F.max_pool2d(region[None].float(), d)[0]


def _exists(path: str, flag: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{flag} {path!r} does not exist: pass an existing file")
    return p


def _read_image(path: str, flag: str, h: int, w: int) -> np.ndarray:
    from pipelines import media

    image = media.decode_image(_exists(path, flag).read_bytes())  # uint8 [h, w, 3]
    if image.shape[:2] != (h, w):
        raise ValueError(
            f"{flag} {path}: the image is {image.shape[1]}x{image.shape[0]}; the model makes {w}x{h} frames: "
            f"give a {w}x{h} image"
        )
    return image


def read_video(path: str, flag: str) -> np.ndarray:
    from pipelines import media

    try:
        return media.decode_video_file(_exists(path, flag))  # uint8 [f, h, w, 3]
    except media.MediaError as e:
        raise ValueError(f"{flag} {path}: not a readable video ({e})") from None


def _read_mask(path: str | None, flag: str, h: int, w: int, f: int | None):
    """White (> 127) = the region. A video mask (inpainting only) must have f frames of w x h."""
    import torch

    from pipelines import media

    if not path:
        raise ValueError(f"{flag} needs --mask: a {w}x{h} png whose white pixels mark the region")
    p = _exists(path, "--mask")
    if p.suffix.lower() in VIDEO_SUFFIXES:
        if f is None:
            raise ValueError(f"--mask {path}: {flag} takes one mask image ({w}x{h} png), not a video")
        frames = read_video(path, "--mask")
        if frames.shape[1:3] != (h, w) or frames.shape[0] != f:
            raise ValueError(
                f"--mask {path}: {frames.shape[0]} frames of {frames.shape[2]}x{frames.shape[1]}; expected "
                f"{f} frames of {w}x{h} (one per video frame), or a single {w}x{h} png for every frame"
            )
        return torch.from_numpy(frames.mean(-1) > 127).float()  # [f, h, w]
    image = media.decode_image(p.read_bytes())
    if image.shape[:2] != (h, w):
        raise ValueError(
            f"--mask {path}: the mask is {image.shape[1]}x{image.shape[0]}; expected {w}x{h}, the size of the "
            "model's frames"
        )
    return torch.from_numpy(image.mean(-1) > 127).float()  # [h, w]


__all__ = ["masked_concat", "read_video"]
