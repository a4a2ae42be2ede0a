"""Video metrics: CLIPSIM, frame consistency, FVD (Frechet distance of video features) and shapes accuracy.

All functions take generated videos as uint8 ``[f, h, w, 3]`` frame arrays (the project's frame convention).

- CLIPSIM: mean cosine similarity between the prompt's CLIP text embedding and each frame's CLIP image
  embedding, averaged over frames and videos (raw cosine, not x100: ModelScopeT2V reports 0.2930 on MSR-VTT).
- Frame consistency: mean cosine similarity of the CLIP image embeddings of adjacent frames (what TF-T2V
  reports for temporal coherence).
- FVD: Frechet distance between Gaussians fitted to video features of real and generated videos. The feature
  network is a TorchScript file (for example an I3D exported to TorchScript); nothing is downloaded.
- Shapes accuracy: on the synthetic shapes corpus, ``pipelines.shapes.detect`` reads colour and direction from
  a generated video; accuracy is the fraction matching the prompt.

``t2v evaluate`` (flows/evaluate.py) and the periodic evaluation during training
(pipelines/training/periodic_eval.py) both measure with these functions and read prompts with ``prompt_set``.

Which direction is "better" per metric lives in ``HIGHER_IS_BETTER`` (the promotion gate uses it).
"""

from __future__ import annotations

import csv
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".gif")

# metric name -> True if larger values are better. The evaluation gate compares models with this.
HIGHER_IS_BETTER: dict[str, bool] = {
    "clipsim": True,
    "frame_consistency": True,
    "fvd": False,
    "colour_accuracy": True,
    "direction_accuracy": True,
    "shapes_accuracy": True,
}


def higher_is_better(metric: str) -> bool:
    if metric not in HIGHER_IS_BETTER:
        raise ValueError(f"unknown metric {metric!r}; choose one of {sorted(HIGHER_IS_BETTER)}")
    return HIGHER_IS_BETTER[metric]


def is_better(metric: str, candidate: float, incumbent: float, min_delta: float = 0.0) -> bool:
    """Whether ``candidate`` beats ``incumbent`` on ``metric`` by more than ``min_delta`` (ties do not win)."""
    if not np.isfinite(candidate):
        return False
    if not np.isfinite(incumbent):
        return True
    if higher_is_better(metric):
        return candidate > incumbent + min_delta
    return candidate < incumbent - min_delta


# ---------------------------------------------------------------------------------------------------------------
# Frechet distance


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Features [n, d] -> (mean [d], covariance [d, d]) with the unbiased (n - 1) estimator."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need features [n >= 2, d] to fit a Gaussian, got shape {x.shape}; evaluate more videos")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2):

        d^2 = ||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2))

    The matrix square root comes from ``scipy.linalg.sqrtm``. With few samples the covariances are singular and
    sqrtm can return non-finite values; then ``eps`` is added to both diagonals (the usual FID/FVD remedy).
    Tiny imaginary parts from numerical error are dropped; large ones mean the input is not a covariance.
    """
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    with warnings.catch_warnings():  # singular products are expected with few samples; handled just below
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(
                f"imaginary component {np.abs(covmean.imag).max():.3g} in sqrtm: the inputs are "
                "not valid covariance matrices"
            )
        covmean = covmean.real
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean)
    return float(max(value, 0.0))  # rounding can make a zero distance slightly negative


def fvd_from_features(real: np.ndarray, fake: np.ndarray) -> float:
    """FVD from video features [n, d] of real and of generated videos."""
    return frechet_distance(*gaussian_stats(real), *gaussian_stats(fake))


class VideoFeatureNet:
    """A TorchScript video network -> one feature vector per video (for FVD).

    The file is loaded with ``torch.jit.load`` (TorchScript archives hold no pickled Python code). Input is
    float ``[b, 3, f, size, size]`` scaled to ``value_range``; ``call_kwargs`` are passed to the module's forward
    (some exported I3D networks take switches such as ``return_features``). The output is flattened to [b, d].
    """

    def __init__(
        self,
        path: str | os.PathLike,
        size: int | None = 224,
        value_range: tuple[float, float] = (-1.0, 1.0),
        call_kwargs: dict | None = None,
        device: str | torch.device = "cpu",
    ):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"FVD feature network {str(path)!r} not found: pass a local TorchScript file "
                "(torch.jit.save of a video network, e.g. an I3D) as fvd_network"
            )
        try:
            self.net = torch.jit.load(str(path), map_location=device).eval()
        except RuntimeError as e:
            raise ValueError(
                f"{path} is not a TorchScript archive ({str(e).splitlines()[0]}); export the network "
                "with torch.jit.script or torch.jit.trace and torch.jit.save"
            ) from None
        self.size = size
        self.value_range = value_range
        self.call_kwargs = dict(call_kwargs or {})
        self.device = torch.device(device)

    def prepare(self, videos: np.ndarray) -> torch.Tensor:
        """uint8 [b, f, h, w, 3] -> float [b, 3, f, size, size] in ``value_range``."""
        x = torch.as_tensor(np.ascontiguousarray(videos))
        if x.ndim != 5 or x.shape[-1] != 3 or x.dtype != torch.uint8:
            raise ValueError(f"videos must be uint8 [b, f, h, w, 3], got {tuple(x.shape)} {x.dtype}")
        b, f = x.shape[:2]
        x = x.to(self.device).permute(0, 1, 4, 2, 3).reshape(b * f, 3, *x.shape[2:4]).float() / 255.0
        if self.size is not None and tuple(x.shape[-2:]) != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        lo, hi = self.value_range
        x = x * (hi - lo) + lo
        return x.reshape(b, f, 3, *x.shape[-2:]).permute(0, 2, 1, 3, 4).contiguous()  # [b, 3, f, s, s]

    @torch.no_grad()
    def __call__(self, videos: np.ndarray, batch_size: int = 8) -> np.ndarray:
        feats = []
        for i in range(0, len(videos), batch_size):
            out = self.net(self.prepare(videos[i : i + batch_size]), **self.call_kwargs)
            feats.append(out.reshape(out.shape[0], -1).float().cpu().numpy())
        return np.concatenate(feats, axis=0)  # [b, d]


def reference_videos(source: str, limit: int) -> list[Path]:
    """Real video files for FVD from a manifest.csv (rows with kind=video), a folder, or a text file of paths."""
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES)
    elif path.suffix == ".csv" and path.is_file():
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        files = [
            Path(r["path"]) if Path(r["path"]).is_absolute() else path.parent / r["path"]
            for r in rows
            if r.get("kind", "video") == "video"
        ]
    elif path.is_file():
        files = [Path(line.strip()) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        raise FileNotFoundError(
            f"fvd_reference {source!r} not found: give a manifest.csv, a folder of videos or a "
            "text file with one video path per line"
        )
    if len(files) < 2:
        raise ValueError(f"fvd_reference {source!r} has {len(files)} videos; FVD needs at least 2 (more is better)")
    return files[:limit]


def read_reference(files: list[Path], num_frames: int, height: int, width: int, fps: float) -> np.ndarray:
    """Decode real videos to the generated videos' size and frame count: uint8 [n, f, h, w, 3].

    Videos shorter than ``num_frames`` repeat their last frame, so every clip has the same length.
    """
    from pipelines import media

    videos = []
    for path in files:
        frames = media.decode_video_file(path, width=width, height=height, fps=fps, max_frames=num_frames)
        if len(frames) < num_frames:
            frames = np.concatenate([frames, np.repeat(frames[-1:], num_frames - len(frames), axis=0)])
        videos.append(frames)
    return np.stack(videos)


# ---------------------------------------------------------------------------------------------------------------
# CLIP metrics


class ClipScorer:
    """L2-normalised CLIP embeddings of prompts and frames, from an open_clip model.

    Frames go through the same tensor preprocessing the model's image encoder uses (short side to the CLIP
    size, centre crop, CLIP mean/std), so no PIL round trip per frame.
    """

    def __init__(self, clip_model: torch.nn.Module, tokenizer, image_size: int = 224, batch_size: int = 32):
        from model.encoders import ImageEncoder

        self.clip = clip_model.eval()
        self.tokenizer = tokenizer
        self.images = ImageEncoder(clip_model, image_size)
        self.batch_size = batch_size

    @torch.no_grad()
    def text(self, prompts: Sequence[str]) -> torch.Tensor:
        device = next(self.clip.parameters()).device
        emb = self.clip.encode_text(self.tokenizer(list(prompts)).to(device)).float()
        return F.normalize(emb, dim=-1)  # [n, d]

    @torch.no_grad()
    def frames(self, frames: np.ndarray) -> torch.Tensor:
        """uint8 [n, h, w, 3] -> [n, d] unit vectors."""
        out = [self.images(frames[i : i + self.batch_size]) for i in range(0, len(frames), self.batch_size)]
        return F.normalize(torch.cat(out).float(), dim=-1)


def load_clip_scorer(
    clip_model: str, clip_pretrained: str | None = None, seed: int = 0, device: str | torch.device = "cpu"
) -> ClipScorer:
    """A ``ClipScorer`` for open_clip ``clip_model`` (project tiny names work too) with local weights, or random
    ones (warned: figures then only compare models scored with the same random CLIP)."""
    from model.encoders import PROJECT_CLIP_CONFIGS, load_openclip

    if clip_pretrained is None and clip_model not in PROJECT_CLIP_CONFIGS:
        warnings.warn(
            f"CLIPSIM and frame consistency use a randomly initialised {clip_model}: the figures "
            "only compare models evaluated the same way. Pass clip_pretrained=PATH (a local open_clip "
            "checkpoint) for meaningful values.",
            stacklevel=2,
        )
    clip, _, tokenizer = load_openclip(clip_model, clip_pretrained, seed=seed, device=device)
    size = getattr(clip.visual, "image_size", 224)  # open_clip keeps (h, w)
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    return ClipScorer(clip, tokenizer, size)


def clipsim(text_embedding: torch.Tensor, frame_embeddings: torch.Tensor) -> float:
    """Mean cosine similarity of one prompt embedding [d] to every frame embedding [f, d] (unit vectors)."""
    return float((frame_embeddings @ text_embedding.reshape(-1)).mean())


def frame_consistency(frame_embeddings: torch.Tensor) -> float:
    """Mean cosine similarity of adjacent frames' embeddings [f, d] (unit vectors); 1.0 for a single frame."""
    if frame_embeddings.shape[0] < 2:
        return 1.0
    return float((frame_embeddings[1:] * frame_embeddings[:-1]).sum(-1).mean())


def clip_metrics(scorer: ClipScorer, videos: Sequence[np.ndarray], prompts: Sequence[str]) -> dict[str, float]:
    """Mean CLIPSIM and frame consistency over videos (each uint8 [f, h, w, 3]) and their prompts."""
    if len(videos) != len(prompts):
        raise ValueError(f"got {len(videos)} videos for {len(prompts)} prompts")
    texts = scorer.text(prompts)
    sims, consistency = [], []
    for i, video in enumerate(videos):
        emb = scorer.frames(np.asarray(video))
        sims.append(clipsim(texts[i], emb))
        consistency.append(frame_consistency(emb))
    return {"clipsim": float(np.mean(sims)), "frame_consistency": float(np.mean(consistency))}


# ---------------------------------------------------------------------------------------------------------------
# Shapes accuracy


def shapes_metrics(videos: Sequence[np.ndarray], labels: Sequence[tuple[str, str]]) -> dict[str, float]:
    """Colour / direction / both-correct accuracy of generated shapes videos against (colour, direction) labels."""
    from pipelines.shapes import detect

    if len(videos) != len(labels):
        raise ValueError(f"got {len(videos)} videos for {len(labels)} labels")
    colour_ok, direction_ok = [], []
    for video, (colour, direction) in zip(videos, labels):
        found = detect(np.asarray(video))
        colour_ok.append(found.colour == colour)
        direction_ok.append(found.direction == direction)
    both = [c and d for c, d in zip(colour_ok, direction_ok)]
    return {
        "colour_accuracy": float(np.mean(colour_ok)),
        "direction_accuracy": float(np.mean(direction_ok)),
        "shapes_accuracy": float(np.mean(both)),
    }


def condition_metrics(videos: Sequence[np.ndarray], conditions: Sequence[dict[str, np.ndarray]]) -> dict[str, float]:
    """How closely generated shapes videos follow the structure conditions they were given (stored form,
    ``schema.CONDITIONS``): ``motion_agreement``, the share whose detected direction is the dominant direction of
    their motion vectors; ``sketch_iou``, the mean IoU of the generated shape's box (its largest connected
    foreground region: a stray pixel elsewhere would stretch the box) and the sketch's edge box less the one pixel
    a Sobel edge reaches past the shape on each side, per frame. A figure is left out when no video had that
    condition."""
    from pipelines.shapes import detect, foreground

    if len(videos) != len(conditions):
        raise ValueError(f"got {len(videos)} videos for {len(conditions)} condition sets")
    agree, ious = [], []
    for video, given in zip(videos, conditions):
        video = np.asarray(video)
        if "motion" in given:
            agree.append(detect(video).direction == _dominant_direction(given["motion"]))
        if "sketch" in given:
            edges = np.asarray(given["sketch"])[:, 0] > 0  # [f or 1, h, w]
            shape = foreground(video)  # [f, h, w]
            for i in range(len(shape)):
                ious.append(_box_iou(_largest_blob(shape[i]), edges[min(i, len(edges) - 1)], inset_b=SOBEL_REACH))
    out = {}
    if agree:
        out["motion_agreement"] = float(np.mean(agree))
    if ious:
        out["sketch_iou"] = float(np.mean(ious))
    return out


def _dominant_direction(motion: np.ndarray) -> str | None:
    """The direction of the mean of the non-zero motion vectors [f, 2, h, w] (dx, dy), or None without motion."""
    motion = np.asarray(motion, np.float32)
    moving = np.abs(motion).sum(axis=1) > 0  # [f, h, w]
    if not moving.any():
        return None
    dx, dy = (float(motion[:, k][moving].mean()) for k in (0, 1))
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


SOBEL_REACH = 1  # a 3x3 gradient marks the pixels on both sides of a boundary


def _largest_blob(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected region of a bool mask [h, w] (the mask itself when empty)."""
    from scipy import ndimage

    labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if n <= 1:
        return mask
    sizes = np.bincount(labels.ravel())[1:]
    return labels == 1 + int(np.argmax(sizes))


def _box_iou(a: np.ndarray, b: np.ndarray, inset_b: int = 0) -> float:
    """IoU of the bounding boxes of two bool masks [h, w] (0 when either is empty); ``b``'s box shrunk by
    ``inset_b`` pixels on each side where it is wide enough."""
    if not a.any() or not b.any():
        return 0.0
    boxes = []
    for m, inset in ((a, 0), (b, inset_b)):
        ys, xs = np.nonzero(m)
        x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
        if x1 - x0 > 2 * inset:
            x0, x1 = x0 + inset, x1 - inset
        if y1 - y0 > 2 * inset:
            y0, y1 = y0 + inset, y1 - inset
        boxes.append((x0, y0, x1, y1))
    (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = boxes
    inter = max(0, min(ax1, bx1) - max(ax0, bx0)) * max(0, min(ay1, by1) - max(ay0, by0))
    union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter
    return float(inter / union)


# ---------------------------------------------------------------------------------------------------------------
# Prompt sets


def prompt_set(prompts: str, num_prompts: int = 0) -> tuple[list[str], list[tuple[str, str]] | None]:
    """The first ``num_prompts`` (0: all) prompts of ``"shapes"`` (the held-out prompts of the shapes corpus, with
    their (colour, direction) labels) or of a text file (one prompt per line, ``#`` comments; no labels)."""
    if prompts == "shapes":
        from pipelines.shapes import heldout_prompts

        rows = heldout_prompts(num_prompts or None)
        return [r[0] for r in rows], [(r[1], r[3]) for r in rows]
    path = Path(prompts)
    if not path.is_file():
        raise FileNotFoundError(
            f"prompt file {str(path)!r} not found: give a text file with one prompt per line "
            "(e.g. MSR-VTT test captions) or prompts=shapes"
        )
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    lines = [p for p in lines if p and not p.startswith("#")]
    if not lines:
        raise ValueError(f"prompt file {path} has no prompts (one per line; lines starting with # are ignored)")
    return (lines[:num_prompts] if num_prompts else lines), None
