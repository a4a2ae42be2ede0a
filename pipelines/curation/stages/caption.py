"""Stage 4, caption filter: text rules, then OpenCLIP agreement between the caption and the clip's frames.

Sets ``caption_ok``, ``caption_reason`` and ``clip_sim`` and never rejects a row itself: the route stage decides
what a failed caption means (a text-free video, or a dropped image).

Text rules (``caption_reason`` when they fail): ``caption_missing`` (no caption given), ``caption_empty``
(blank), ``caption_bad_encoding`` (not valid UTF-8 in the source, or holds U+FFFD / control characters),
``caption_too_short`` / ``caption_too_long`` (``caption.min_chars`` / ``caption.max_chars``, after stripping).

Model: cosine similarity of OpenCLIP's normalised text and image embeddings, for the frames named in
``caption.frames`` (first / middle / last), reduced by ``caption.reduce``; below ``caption.threshold`` ->
``caption_low_similarity``. Whether the model runs at all is ``caption.filter``: "clip", "text" (rules only), or
"auto" = clip only when ``caption.pretrained`` gives real weights, because a random-weight CLIP scores noise.
In the pipeline this class is a Ray Data actor pool (the model loads once per actor, on a GPU when one is free).
"""

from __future__ import annotations

import logging
import math
import unicodedata
from typing import TYPE_CHECKING, Any

import numpy as np

from pipelines import schema
from pipelines.curation.stages import Stage, internal_error

if TYPE_CHECKING:
    from pipelines.curation.config import CaptionConfig, CurateConfig

log = logging.getLogger(__name__)

FRAME_NAMES = ("first", "middle", "last")


def model_enabled(cfg: CaptionConfig) -> bool:
    """Does the CLIP similarity run? ("auto": only with pretrained weights)."""
    return cfg.filter == "clip" or (cfg.filter == "auto" and cfg.pretrained is not None)


def text_problem(caption: str | None, caption_error: str | None, min_chars: int, max_chars: int) -> str | None:
    """The text rule a caption breaks (a ``caption_*`` reason), or None when it is fine."""
    if caption_error:
        return "caption_bad_encoding"
    if caption is None:
        return "caption_missing"
    text = caption.strip()
    if not text:
        return "caption_empty"
    if len(text) > max_chars:
        return "caption_too_long"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: undecodable bytes that slipped through
        return "caption_bad_encoding"
    if "\ufffd" in text or any(unicodedata.category(ch) == "Cc" and ch not in "\t\n\r" for ch in text):
        return "caption_bad_encoding"
    if len(text) < min_chars:
        return "caption_too_short"
    return None


class CaptionFilter(Stage):
    name = "caption"

    def __init__(self, cfg: CurateConfig, device: str | None = None):
        c = cfg.caption
        self.min_chars, self.max_chars = c.min_chars, c.max_chars
        self.threshold, self.reduce, self.frames = c.threshold, c.reduce, list(c.frames)
        self.use_model = model_enabled(c)
        self.model = None
        if self.use_model:
            import torch

            from model.encoders import ImageEncoder, load_openclip

            if device is None:
                device = "cuda" if c.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"
            self.device = torch.device(device)
            self.model, _, self.tokenizer = load_openclip(c.model, c.pretrained, seed=c.seed, device=self.device)
            image_size = self.model.visual.image_size
            image_size = image_size[0] if isinstance(image_size, (tuple, list)) else int(image_size)
            self.image_encoder = ImageEncoder(self.model, image_size)

    def process_rows(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out, scored = [], []
        for row in rows:
            row = dict(row)
            problem = text_problem(row["caption"], row["caption_error"], self.min_chars, self.max_chars)
            if problem is None:
                row["caption"] = row["caption"].strip()
            row.update(caption_ok=problem is None, caption_reason=problem or "", clip_sim=math.nan)
            (scored if problem is None and self.use_model else out).append(row)
        if scored:
            try:
                sims = self.similarity(scored)
            except Exception as e:  # a model failure rejects these rows with the reason, it does not end the run
                return out + [internal_error(r, self.name, e) for r in scored]
            for row, sim in zip(scored, sims):
                row["clip_sim"] = float(sim)
                if sim < self.threshold:
                    row.update(caption_ok=False, caption_reason="caption_low_similarity")
            out.extend(scored)
        return out

    # -- model -------------------------------------------------------------------------------------------------

    def frames_of(self, row: dict[str, Any]) -> np.ndarray:
        """uint8 [k, h, w, 3]: the frames to score (stored by decode, or decoded again from the clip)."""
        if row.get("keyframes") is not None:
            return schema.load_npy(row["keyframes"])
        from pipelines.curation.stages.decode import decode_clip, decode_still, keyframe_indices

        if row["media_type"] == "image":
            return decode_still(row["media"])[None]
        frames = decode_clip(row["media"])
        return frames[keyframe_indices(len(frames), self.frames)]

    def similarity(self, rows: list[dict[str, Any]]) -> list[float]:
        import torch

        frames = [self.frames_of(r) for r in rows]
        counts = [len(f) for f in frames]
        with torch.inference_mode():
            image = self.image_encoder(np.concatenate(frames))  # [sum k, d]
            image = torch.nn.functional.normalize(image.float(), dim=-1)
            tokens = self.tokenizer([r["caption"] for r in rows]).to(self.device)
            text = torch.nn.functional.normalize(self.model.encode_text(tokens).float(), dim=-1)  # [n, d]
        text_per_frame = torch.repeat_interleave(text, torch.tensor(counts, device=text.device), dim=0)
        sims = (image * text_per_frame).sum(-1).cpu().numpy()  # [sum k]
        reduce = {"mean": np.mean, "min": np.min, "max": np.max}[self.reduce]
        out, start = [], 0
        for k in counts:
            out.append(float(reduce(sims[start : start + k])))
            start += k
        return out
