"""The "shapes" corpus: a small, seeded, synthetic video/image corpus the platform generates for itself.

    t2v corpus --output runs/corpus [--set num_videos=100 --set seed=1] [--dry-run]
    python -m pipelines.shapes --output runs/corpus

Each video is a real H.264 mp4 of one coloured shape (circle, square, triangle; red, green, blue, yellow)
moving in one of four directions across a plain background; each image is a static shape. Captions read
"a red circle moving left" / "a blue square". A configurable fraction of the videos is written without a
caption (text-free videos: the TF-T2V motion branch's data). ``manifest.csv`` records the ground truth
(colour, shape, direction), so later stages can measure what a model learned with ``detect``.

A few (colour, shape, direction) combinations are held out of the corpus (``HELDOUT``): evaluation prompts
come from them, so a model is scored on prompts it never saw as captions.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import itertools
import sys
from pathlib import Path
from typing import Literal

import numpy as np

from pipelines import logs, media, settings
from pipelines.settings import check

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 215, 40),
}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = ("left", "right", "up", "down")
# unit motion in image coordinates (x to the right, y downwards)
_DIRECTION_VECTORS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
BACKGROUND = (24, 24, 24)

ALL_COMBOS = list(itertools.product(COLOURS, SHAPES, DIRECTIONS))
# 12 of the 48 combinations, a Latin-square pattern: each (colour, shape) pair loses exactly one direction and each
# direction is held out 3 times, so evaluation covers every colour and every direction while each held-out
# combination's colour, shape and direction (and most of their pairs) still appear in training.
HELDOUT = [
    (c, s, d)
    for (ci, c), (si, s), (di, d) in itertools.product(enumerate(COLOURS), enumerate(SHAPES), enumerate(DIRECTIONS))
    if (ci + si + di) % 4 == 0
]


@dataclasses.dataclass
class CorpusConfig:
    num_videos: int = 48
    num_images: int = 48
    width: int = 64
    height: int = 64
    fps: float = 12.0
    seconds: float = 2.0
    text_free_fraction: float = 0.25  # videos written without a caption
    # captioned videos whose caption leaves the motion out ("a red circle"), as real captions often do
    motionless_caption_fraction: float = 0.0
    shape_scale: tuple[float, float] = (0.22, 0.32)  # shape size as a fraction of min(width, height)
    travel: float = 0.6  # distance travelled over the video, as a fraction of the frame
    # how far a path may run beside the centre line (0: every shape crosses the centre, so where it is in each
    # frame depends on the direction alone, which a small model learns much sooner; 1: anywhere in the frame)
    path_offset: float = 1.0
    image_format: Literal["png", "jpg", "mixed"] = "mixed"
    exclude_heldout: bool = True  # keep HELDOUT combinations out of the corpus
    seed: int = 0

    def __post_init__(self) -> None:
        check(self.num_videos >= 0 and self.num_images >= 0, "num_videos and num_images must be >= 0")
        check(8 <= self.width <= 4096 and 8 <= self.height <= 4096, "width and height must be within 8..4096 pixels")
        check(0 < self.fps <= 120, f"fps={self.fps} must be within (0, 120]")
        check(0 < self.seconds <= 60, f"seconds={self.seconds} must be within (0, 60]")
        check(0.0 <= self.text_free_fraction <= 1.0, "text_free_fraction must be within [0, 1]")
        check(0.0 <= self.motionless_caption_fraction <= 1.0, "motionless_caption_fraction must be within [0, 1]")
        check(
            0 < self.shape_scale[0] <= self.shape_scale[1] < 1,
            "shape_scale must be (low, high) with 0 < low <= high < 1",
        )
        check(0 < self.travel < 1, "travel must be within (0, 1)")
        check(0 <= self.path_offset <= 1, "path_offset must be within [0, 1] (0: every path crosses the centre)")

    @property
    def num_frames(self) -> int:
        return max(1, round(self.seconds * self.fps))


def caption_for(colour: str, shape: str, direction: str | None = None) -> str:
    return f"a {colour} {shape} moving {direction}" if direction else f"a {colour} {shape}"


def _shape_mask(shape: str, cx: float, cy: float, size: float, width: int, height: int) -> np.ndarray:
    """Boolean [h, w] mask of a shape of ``size`` pixels (bounding box side) centred at (cx, cy)."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    half = size / 2
    if shape == "circle":
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= half**2
    if shape == "square":
        return (np.abs(xs - cx) <= half) & (np.abs(ys - cy) <= half)
    if shape == "triangle":  # apex up; width grows linearly towards the base
        top, bottom = cy - half, cy + half
        frac = (ys - top) / max(size, 1e-6)
        return (ys >= top) & (ys <= bottom) & (np.abs(xs - cx) <= half * frac)
    raise ValueError(f"unknown shape {shape!r}; choose from {SHAPES}")


def _canvas(width: int, height: int, background=BACKGROUND) -> np.ndarray:
    canvas = np.empty((height, width, 3), np.uint8)
    canvas[:] = background
    return canvas


def render_image(
    colour: str,
    shape: str,
    width: int,
    height: int,
    size: float | None = None,
    centre: tuple[float, float] | None = None,
) -> np.ndarray:
    """uint8 [h, w, 3]: one static shape."""
    size = size if size is not None else 0.3 * min(width, height)
    cx, cy = centre if centre is not None else (width / 2, height / 2)
    image = _canvas(width, height)
    image[_shape_mask(shape, cx, cy, size, width, height)] = COLOURS[colour]
    return image


def render_video(
    colour: str,
    shape: str,
    direction: str,
    width: int,
    height: int,
    num_frames: int,
    size: float | None = None,
    travel: float = 0.6,
    offset: float = 0.0,
) -> np.ndarray:
    """uint8 [f, h, w, 3]: a shape crossing ``travel`` of the frame in ``direction`` at constant speed.

    ``offset`` in [-1, 1] shifts the path sideways (perpendicular to the motion) from the centre line.
    """
    if direction not in _DIRECTION_VECTORS:
        raise ValueError(f"unknown direction {direction!r}; choose from {DIRECTIONS}")
    size = size if size is not None else 0.3 * min(width, height)
    dx, dy = _DIRECTION_VECTORS[direction]
    span_x, span_y = travel * width, travel * height
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    for i in range(num_frames):
        p = i / max(num_frames - 1, 1) - 0.5  # -0.5 .. 0.5 along the path
        cx = width / 2 + dx * p * span_x + abs(dy) * offset * (width - size) / 2 * 0.8
        cy = height / 2 + dy * p * span_y + abs(dx) * offset * (height - size) / 2 * 0.8
        frames[i] = _canvas(width, height)
        frames[i][_shape_mask(shape, cx, cy, size, width, height)] = COLOURS[colour]
    return frames


def _combos(cfg: CorpusConfig) -> list[tuple[str, str, str]]:
    return [c for c in ALL_COMBOS if not (cfg.exclude_heldout and c in HELDOUT)]


def generate(cfg: CorpusConfig, out_dir: str | Path, progress: bool = True) -> Path:
    """Write the corpus under ``out_dir`` and return the manifest path (``out_dir/manifest.csv``).

    Deterministic: the same config writes the same files. Manifest paths are absolute.
    """
    out = Path(out_dir).resolve()
    (out / "videos").mkdir(parents=True, exist_ok=True)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    combos = _combos(cfg)
    rows: list[dict[str, str]] = []
    side = min(cfg.width, cfg.height)
    n_text_free = round(cfg.num_videos * cfg.text_free_fraction)
    text_free = set(rng.choice(cfg.num_videos, size=n_text_free, replace=False).tolist()) if n_text_free else set()
    # a generator of its own, so corpora without motionless captions stay what they were
    motionless = np.random.default_rng([cfg.seed, 1]).random(cfg.num_videos) < cfg.motionless_caption_fraction

    items = [("video", i) for i in range(cfg.num_videos)] + [("image", i) for i in range(cfg.num_images)]
    for kind, i in _progress(items, progress, "shapes corpus"):
        colour, shape, direction = combos[rng.integers(len(combos))]
        size = float(rng.uniform(*cfg.shape_scale)) * side
        if kind == "video":
            frames = render_video(
                colour,
                shape,
                direction,
                cfg.width,
                cfg.height,
                cfg.num_frames,
                size=size,
                travel=cfg.travel,
                offset=float(rng.uniform(-cfg.path_offset, cfg.path_offset)),
            )
            path = out / "videos" / f"s{cfg.seed}_v{i:05d}.mp4"
            media.write_mp4(frames, path, cfg.fps)
            caption = "" if i in text_free else caption_for(colour, shape, None if motionless[i] else direction)
        else:
            margin = size / 2 + 1
            centre = (float(rng.uniform(margin, cfg.width - margin)), float(rng.uniform(margin, cfg.height - margin)))
            image = render_image(colour, shape, cfg.width, cfg.height, size=size, centre=centre)
            fmt = cfg.image_format if cfg.image_format != "mixed" else ("png" if i % 2 == 0 else "jpg")
            path = out / "images" / f"s{cfg.seed}_i{i:05d}.{fmt}"
            path.write_bytes(_encode_image(image, fmt))
            caption, direction = caption_for(colour, shape), ""
        rows.append(
            {
                "path": str(path),
                "caption": caption,
                "kind": kind,
                "colour": colour,
                "shape": shape,
                "direction": direction,
            }
        )

    manifest = out / "manifest.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "caption", "kind", "colour", "shape", "direction"])
        writer.writeheader()
        writer.writerows(rows)
    (out / "corpus.yaml").write_text(settings.dump(cfg), encoding="utf-8")
    return manifest


def _encode_image(image: np.ndarray, fmt: str) -> bytes:
    if fmt == "jpg":
        return media.encode_jpg(image)
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _progress(items, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="file", file=sys.stderr)


def heldout_prompts(n: int | None = None) -> list[tuple[str, str, str, str]]:
    """Evaluation prompts ``(prompt, colour, shape, direction)`` from the held-out combinations, cycled to n."""
    combos = HELDOUT if n is None else [HELDOUT[i % len(HELDOUT)] for i in range(n)]
    return [(caption_for(c, s, d), c, s, d) for c, s, d in combos]


# ---------------------------------------------------------------------------------------------------------------
# Detector: what colour is the shape and which way does it move? Used to score generated videos.


@dataclasses.dataclass
class Detection:
    colour: str | None  # nearest palette colour of the foreground, None if no foreground found
    direction: str | None  # dominant motion of the centroid, None if it hardly moves
    displacement: tuple[float, float]  # centroid motion first -> last frame, as a fraction of (width, height)
    foreground: float  # mean fraction of pixels that differ from the background


def foreground(frames: np.ndarray, threshold: float = 60.0) -> np.ndarray:
    """bool [f, h, w]: pixels farther than ``threshold`` (RGB) from the median colour of their frame's border."""
    x = frames.astype(np.float32)
    border = np.concatenate([x[:, 0], x[:, -1], x[:, :, 0], x[:, :, -1]], axis=1)  # [f, 2w+2h, 3]
    background = np.median(border, axis=1)  # [f, 3]
    return np.linalg.norm(x - background[:, None, None, :], axis=-1) > threshold


def nearest_colour(rgb: np.ndarray) -> str:
    """The palette entry (``COLOURS``) nearest to an RGB colour."""
    names = list(COLOURS)
    palette = np.array([COLOURS[n] for n in names], np.float32)
    return names[int(np.argmin(np.linalg.norm(palette - np.asarray(rgb, np.float32), axis=1)))]


def detect(frames: np.ndarray, min_motion: float = 0.08, threshold: float = 60.0) -> Detection:
    """Classify colour and motion direction of the shape in uint8 [f, h, w, 3] frames (or one [h, w, 3] image).

    Background = median colour of each frame's border; foreground = pixels farther than ``threshold`` from it
    (in RGB). Colour = palette entry nearest to the mean foreground colour. Direction = the axis and sign of
    the least-squares slope of the foreground centroid over time, if it moves more than ``min_motion`` of the
    frame from first to last frame.
    """
    frames = np.asarray(frames)
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"detect expects uint8 [f, h, w, 3] frames, got shape {frames.shape}")
    f, h, w, _ = frames.shape
    x = frames.astype(np.float32)
    mask = foreground(frames, threshold)
    fg_fraction = float(mask.mean())
    if mask.sum() == 0:
        return Detection(None, None, (0.0, 0.0), 0.0)

    colour = nearest_colour(x[mask].mean(axis=0))

    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    cx, cy, valid = [], [], []
    for i in range(f):
        m = mask[i]
        if m.sum() > 0:
            cx.append(float((xs * m).sum() / m.sum()) / w)
            cy.append(float((ys * m).sum() / m.sum()) / h)
            valid.append(i)
    if len(valid) < 2:
        return Detection(colour, None, (0.0, 0.0), fg_fraction)
    t = np.array(valid, np.float32)
    span = float(t[-1] - t[0])
    slope_x = float(np.polyfit(t, cx, 1)[0]) * span
    slope_y = float(np.polyfit(t, cy, 1)[0]) * span
    direction = None
    if max(abs(slope_x), abs(slope_y)) >= min_motion:
        if abs(slope_x) >= abs(slope_y):
            direction = "right" if slope_x > 0 else "left"
        else:
            direction = "down" if slope_y > 0 else "up"
    return Detection(colour, direction, (slope_x, slope_y), fg_fraction)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="t2v corpus", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="directory to write videos/, images/ and manifest.csv into")
    settings.add_arguments(parser)
    args = parser.parse_args(argv)
    cfg = settings.resolve(parser, CorpusConfig, args)
    if cfg is None:
        return 0
    logs.setup()
    manifest = generate(cfg, args.output)
    print(f"wrote {cfg.num_videos} videos and {cfg.num_images} images; manifest: {manifest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
