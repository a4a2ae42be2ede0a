"""Stage 5, route: give every surviving row its ``kind`` and stable ``key``.

- images: ``image`` when the caption passed; otherwise rejected (an image-text pair needs its text), with the
  caption's reason.
- videos: ``video_text`` when the caption passed; otherwise ``video`` (text-free, for the TF-T2V motion branch)
  when ``caption.text_free=keep``, or rejected with the caption's reason when ``drop``. Why a video is
  text-free is kept in its json (``extra.text_free_reason``, ``extra.unused_caption``).

Keys: ``schema.sample_key(source, clip_index)``, so the same input always gets the same keys.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pipelines import schema
from pipelines.curation.stages import Stage, add_extra, reject

if TYPE_CHECKING:
    from pipelines.curation.config import CurateConfig


class Route(Stage):
    name = "route"

    def __init__(self, cfg: CurateConfig):
        self.text_free = cfg.caption.text_free

    def process(self, row: dict[str, Any]):
        row = dict(row, key=schema.sample_key(row["source"], row["clip_index"]))
        reason = row["caption_reason"] or "caption_missing"
        if row["media_type"] == "image":
            if not row["caption_ok"]:
                yield reject(row, "caption", reason, "an image needs a usable caption (image-text pairs only)")
                return
            row["kind"] = "image"
        elif row["caption_ok"]:
            row["kind"] = "video_text"
        elif self.text_free == "keep":
            row["kind"] = "video"
            # the caption that was not used, shortened, so a reviewer can see what failed
            add_extra(row, text_free_reason=reason, unused_caption=(row["caption"] or "")[:200] or None)
        else:
            yield reject(row, "caption", reason, "caption.text_free=drop: videos need a usable caption")
            return
        yield row
