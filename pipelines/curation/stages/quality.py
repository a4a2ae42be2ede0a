"""Stage 3, quality filters. Thresholds come from ``QualityConfig``; the scores stay in the row (and the sample's
json) whether or not they pass, so a later run can re-filter from the metadata.

Two passes with the same contract, because they need different data:

- ``InputQuality`` runs right after probe, on ffprobe's numbers, so nothing is decoded in vain:
  resolution (``too_small`` / ``too_large``) and duration (``too_short`` / ``too_long``).
- ``ClipQuality`` runs after decode, on each clip's motion score (``static`` / ``extreme_motion``).

Motion score (computed by the decode stage): mean absolute luma change between consecutive frames of the clip,
in [0, 1] (0: identical frames; about 0.33: independent grey-noise frames; 0.2: colour noise).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from pipelines.curation.stages import Stage, reject

if TYPE_CHECKING:
    from pipelines.curation.config import CurateConfig


class InputQuality(Stage):
    name = "quality"

    def __init__(self, cfg: CurateConfig):
        q = cfg.quality
        self.min_side = q.min_side
        self.max_pixels = q.max_pixels
        self.min_duration = q.resolved_min_duration(cfg.clips)
        self.max_duration = q.max_duration_s

    def process(self, row: dict[str, Any]):
        w, h = row["src_width"], row["src_height"]
        if w * h > self.max_pixels:
            yield reject(
                row, self.name, "too_large", f"{w}x{h} = {w * h:,} pixels > quality.max_pixels={self.max_pixels:,}"
            )
            return
        if min(w, h) < self.min_side:
            yield reject(
                row, self.name, "too_small", f"{w}x{h}: short side {min(w, h)} < quality.min_side={self.min_side}"
            )
            return
        duration = row["duration"]
        if row["media_type"] == "video" and duration is not None and not math.isnan(duration):
            if duration < self.min_duration:
                yield reject(
                    row,
                    self.name,
                    "too_short",
                    f"{duration:.2f} s < {self.min_duration:.2f} s (one clip, or quality.min_duration_s)",
                )
                return
            if duration > self.max_duration:
                yield reject(
                    row, self.name, "too_long", f"{duration:.0f} s > quality.max_duration_s={self.max_duration:.0f}"
                )
                return
        yield row


class ClipQuality(Stage):
    name = "quality"

    def __init__(self, cfg: CurateConfig):
        self.motion_min = cfg.quality.motion_min
        self.motion_max = cfg.quality.motion_max

    def process(self, row: dict[str, Any]):
        motion = row["motion"]
        if row["media_type"] != "video" or motion is None or math.isnan(motion):
            yield row
            return
        if motion < self.motion_min:
            yield reject(row, self.name, "static", f"motion {motion:.4f} < quality.motion_min={self.motion_min}")
        elif motion > self.motion_max:
            yield reject(
                row, self.name, "extreme_motion", f"motion {motion:.4f} > quality.motion_max={self.motion_max}"
            )
        else:
            yield row
