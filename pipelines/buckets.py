"""Clip shapes: aspect/resolution buckets, shared by curation (which bucket a source goes to) and the training
loader (which samples may share a batch).

    sizes = parse_buckets(["256x256", "448x256", "256x448", "320x240"], "clips.buckets")
    choice = choose_bucket(1920, 1080, sizes, upscale=False, max_crop=0.5)   # -> Choice((448, 256), crop 0.016)

A bucket is a spatial size ``WxH``; a *shape* is a bucket plus a frame count (``448x256_16f``; images are
``_1f``). Curation resizes a source to cover its bucket and centre-crops the rest, so the fraction of the source's
pixels lost depends on the aspect ratios alone: ``1 - min(a_src / a_bucket, a_bucket / a_src)``. The nearest
bucket in aspect is the one with the least crop.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pipelines.settings import ConfigError

_SIZE = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")
MIN_SIDE, MAX_SIDE = 16, 4096  # H.264 4:2:0 needs even sides; below 16 a clip is not worth encoding


def parse_size(text: object, key: str) -> tuple[int, int]:
    """``"448x256"`` -> (448, 256); anything else is a ConfigError naming ``key`` and the accepted form."""
    m = _SIZE.match(str(text)) if isinstance(text, str) else None
    w, h = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
    if not m or not (MIN_SIDE <= w <= MAX_SIDE and MIN_SIDE <= h <= MAX_SIDE and w % 2 == 0 and h % 2 == 0):
        raise ConfigError(
            f"{key}: {text!r} is not a bucket; write WxH (width x height in pixels, even numbers within "
            f"{MIN_SIDE}..{MAX_SIDE}), e.g. 448x256"
        )
    return w, h


def parse_buckets(items: object, key: str) -> list[tuple[int, int]]:
    """A non-empty list of ``WxH`` strings -> sizes, in the given order; duplicates are an error."""
    if not isinstance(items, list) or not items:
        raise ConfigError(f"{key} must be a non-empty list of WxH buckets, e.g. [256x256, 448x256]; got {items!r}")
    sizes = [parse_size(s, key) for s in items]
    dup = {name(*s) for s in sizes if sizes.count(s) > 1}
    if dup:
        raise ConfigError(f"{key} lists {sorted(dup)} more than once; list each bucket once")
    return sizes


def name(width: int, height: int) -> str:
    return f"{width}x{height}"


def crop_fraction(src_w: int, src_h: int, width: int, height: int) -> float:
    """Share of the source's pixels a cover-resize + centre crop to ``width x height`` throws away."""
    a, b = src_w / src_h, width / height
    return 1.0 - min(a / b, b / a)


@dataclass(frozen=True)
class Choice:
    size: tuple[int, int]
    crop: float  # crop_fraction of the source in this bucket
    upscaled: bool


class Rejected(ValueError):
    """A source no bucket takes; ``reason`` is the ledger's short code."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def choose_bucket(
    src_w: int, src_h: int, sizes: list[tuple[int, int]], upscale: bool, max_crop: float | None
) -> Choice:
    """The bucket for a ``src_w x src_h`` source: of the buckets it covers without upscaling (all of them with
    ``upscale``), the one with the least crop, then the largest. ``Rejected`` (too_small | bad_aspect) when none
    fits or the least crop is over ``max_crop``."""
    if src_w < 1 or src_h < 1:
        raise Rejected("too_small", f"the source is {src_w}x{src_h}: no picture to put in a bucket")
    fits = [s for s in sizes if upscale or (src_w >= s[0] and src_h >= s[1])]
    if not fits:
        listed = ", ".join(name(*s) for s in sizes)
        raise Rejected(
            "too_small",
            f"{src_w}x{src_h} is smaller than every bucket ({listed}) and would be upscaled; curate larger "
            "sources, add a smaller bucket, or set clips.small_source=upscale",
        )
    best = min(fits, key=lambda s: (round(crop_fraction(src_w, src_h, *s), 6), -s[0] * s[1]))
    crop = crop_fraction(src_w, src_h, *best)
    if max_crop is not None and crop > max_crop:
        raise Rejected(
            "bad_aspect",
            f"{src_w}x{src_h} (aspect {src_w / src_h:.2f}): its nearest bucket {name(*best)} would crop "
            f"{crop:.0%} of the picture, more than clips.max_crop={max_crop:g}; add a bucket of that aspect or "
            "raise clips.max_crop",
        )
    return Choice(best, crop, best[0] > src_w or best[1] > src_h)
