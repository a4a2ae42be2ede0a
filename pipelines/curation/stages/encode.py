"""Optional stage, pre-encode: store what the frozen encoders make of each sample, so training skips them.

Enabled by ``encode.mode=latents+clip`` (default ``none``). Runs after routing as a Ray Data actor pool (the
encoders load once per actor, on a GPU when the cluster has one) and adds to each accepted sample the members
of ``schema.PRE_ENCODED``:

- ``latent_mean.npy`` / ``latent_std.npy``: the first stage's raw posterior moments, float16 ``[c, f, h, w]``,
  unscaled (as EDM2's dataset tool stores them): the training loader samples ``mean + std * noise`` and applies
  the latent scale at load time, so one shard set serves any scale and every epoch gets a fresh posterior
  sample. With the "identity" first stage the mean is the clip in [-1, 1] and the std is zero.
- ``text_emb.npy``: text encoder token states, float16 ``[text_len, width]`` (captioned kinds only).
- ``image_emb.npy``: pooled CLIP image embedding of the conditioning frame (``encode.condition_frame``, the
  middle frame as in TF-T2V; the image itself for images), float16 ``[embed_dim]``.
- ``encoders.json``: the encoders' identity (``schema.encoder_stamp``); training compares it with its own
  encoders and encodes on the fly instead when they differ.

Encoders come from a model config name (``encode.model`` + ``encode.model_overrides``, e.g. the "tiny" model's
random-but-seeded CLIP) or from a TextToVideo checkpoint (``encode.checkpoint``: the encoders it stores).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import numpy as np

from pipelines import schema
from pipelines.curation.stages import Stage, internal_error

if TYPE_CHECKING:
    from pipelines.curation.config import CurateConfig


def load_encoders(cfg: CurateConfig, device: str):
    """(model config, text encoder, image encoder, first stage, name) for ``cfg.encode``."""
    e = cfg.encode
    if e.checkpoint:
        from model.text_to_video import TextToVideo

        t2v = TextToVideo.from_checkpoint(e.checkpoint, device=device)
        t2v.unet = None  # only the encoders are needed here
        return t2v.config, t2v.text_encoder, t2v.image_encoder, t2v.first_stage, e.checkpoint
    from model.encoders import FirstStage, build_clip_encoders
    from model.registry import get_config

    model_cfg = get_config(e.model, e.model_overrides)
    text, image = build_clip_encoders(model_cfg.encoders, device)
    return model_cfg, text, image, FirstStage.from_config(model_cfg.encoders, device), e.model


class PreEncoder(Stage):
    name = "encode"

    def __init__(self, cfg: CurateConfig, device: str | None = None):
        import torch

        if device is None:
            device = "cuda" if cfg.encode.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.condition_frame = cfg.encode.condition_frame
        model_cfg, self.text, self.image, self.first_stage, name = load_encoders(cfg, str(self.device))
        self.identity = schema.encoder_stamp(model_cfg.encoders, self.text, self.image, self.first_stage, name)
        self.identity_json = json.dumps(self.identity, sort_keys=True)

    def _frames(self, row: dict[str, Any]) -> np.ndarray:
        """uint8 [f, h, w, 3] of a routed row (1 frame for images)."""
        from pipelines import media

        if row["kind"] == "image":
            return media.decode_image(row["media"])[None]
        return media.decode_mp4(row["media"])

    def process_rows(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        # one forward pass per group of same-shaped clips (videos and images differ in frame count)
        groups: dict[tuple, list[int]] = {}
        frames: list[np.ndarray] = []
        out = [dict(r) for r in rows]
        for i, row in enumerate(out):
            try:
                frames.append(self._frames(row))
            except Exception as e:  # an undecodable clip is this row's problem only
                out[i] = internal_error(row, self.name, e)
                frames.append(None)
                continue
            groups.setdefault(frames[i].shape, []).append(i)
        for _shape, idx in groups.items():
            try:
                self._encode_group(out, idx, np.stack([frames[i] for i in idx]))
            except Exception as e:
                for i in idx:
                    out[i] = internal_error(out[i], self.name, e)
        return out

    def _encode_group(self, rows: list[dict[str, Any]], idx: list[int], clips: np.ndarray) -> None:
        import torch

        from model.encoders import frames_to_tensor

        with torch.inference_mode():
            x = frames_to_tensor(clips).to(self.device)  # [b, 3, f, h, w] in [-1, 1]
            mean, std = self.first_stage.encode_moments(x)  # [b, c, f, h', w'] each
            f = clips.shape[1]
            cond = clips[:, 0 if self.condition_frame == "first" or f == 1 else f // 2]  # [b, h, w, 3]
            image_emb = self.image(cond)  # [b, embed_dim]
            captioned = [i for i in idx if rows[i]["kind"] != "video"]
            text_emb = self.text([rows[i]["caption"] for i in captioned]) if captioned else None  # [n, len, width]
        as16 = lambda t: t.detach().to("cpu", torch.float16).numpy()  # noqa: E731
        mean, std, image_emb = as16(mean), as16(std), as16(image_emb)
        text_by_row = dict(zip(captioned, as16(text_emb))) if text_emb is not None else {}
        for j, i in enumerate(idx):
            rows[i].update(
                latent_mean=schema.npy_bytes(mean[j]),
                latent_std=schema.npy_bytes(std[j]),
                image_emb=schema.npy_bytes(image_emb[j]),
                encoders=self.identity_json,
                text_emb=schema.npy_bytes(text_by_row[i]) if i in text_by_row else None,
            )
