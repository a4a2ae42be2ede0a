"""The structure conditions of ``t2v sample --condition KIND=PATH`` (repeatable, any subset of the model's
``unet.conditions.kinds``) as ``TextToVideo.generate(conditions=...)`` takes them, with usage errors that say what
size, length and kind are expected.

    --condition motion=clip.mp4       motion vectors of the video (its H.264 stream), one per frame
    --condition sketch=drawing.png    edges of an image (every frame) or of a video (per frame)
    --condition depth=scene.mp4 --depth-model midas.pt2    depth from a local network
    --condition sketch=edges.npy      a condition in the shard format (schema.CONDITIONS): [f or 1, c, h, w]

Media must have the model's size and, for videos, its frame count.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from flows.masked_inputs import VIDEO_SUFFIXES, read_video


def load_conditions(model, given: dict[str, str], depth_model: str | None = None) -> dict:
    """{kind: tensor [1, c, f or 1, h, w]} normalised for the encoder."""
    import torch

    from model.conditions import CHANNELS, normalise

    kinds = model.config.unet.conditions.kinds
    if not kinds:
        raise ValueError(
            f"model {model.config.name!r} takes no structure conditions (unet.conditions.kinds is empty); train "
            "one with --set 'model_overrides.unet.conditions={kinds: [motion, sketch]}'"
        )
    out = {}
    for kind, path in given.items():
        if kind not in kinds:
            raise ValueError(f"--condition {kind}={path}: this model takes {', '.join(kinds)}")
        array = _read(kind, path, model.config, depth_model)  # [f or 1, c, h, w]
        f, h, w = model.config.num_frames, model.config.height, model.config.width
        want = f"[{f} or 1, {CHANNELS[kind]}, {h}, {w}]"
        if array.ndim != 4 or array.shape[0] not in (1, f) or array.shape[1:] != (CHANNELS[kind], h, w):
            raise ValueError(f"--condition {kind}={path}: shape {list(array.shape)}, expected {want}")
        out[kind] = normalise(kind, torch.from_numpy(np.asarray(array, np.float32))).permute(1, 0, 2, 3)[None]
    return out


def _read(kind: str, path: str, config, depth_model: str | None) -> np.ndarray:
    from pipelines import media
    from pipelines.curation.stages.conditions import DepthEstimator, edge_map, motion_field

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--condition {kind}={path}: no such file")
    if p.suffix.lower() == ".npy":
        return np.load(p, allow_pickle=False)
    f, h, w = config.num_frames, config.height, config.width
    if p.suffix.lower() in VIDEO_SUFFIXES:
        frames = read_video(path, f"--condition {kind}=")
        if frames.shape[0] != f or frames.shape[1:3] != (h, w):
            raise ValueError(
                f"--condition {kind}={path}: {frames.shape[0]} frames of {frames.shape[2]}x{frames.shape[1]}; the "
                f"model makes {f} frames of {w}x{h}: give a video of exactly that size and length"
            )
    else:
        try:
            frames = media.decode_image(p.read_bytes())[None]
        except Exception as e:  # noqa: BLE001 - any undecodable file gets the same usage error
            raise ValueError(f"--condition {kind}={path}: not a readable image or video ({e})") from None
        if frames.shape[1:3] != (h, w):
            raise ValueError(
                f"--condition {kind}={path}: an image of {frames.shape[2]}x{frames.shape[1]}; expected {w}x{h}"
            )
    if kind == "motion":
        if len(frames) == 1:
            raise ValueError(f"--condition motion={path}: motion comes from a video ({f} frames of {w}x{h})")
        return motion_field(media.encode_mp4(frames, config.fps), f, h, w)
    if kind == "sketch":
        return edge_map(frames)
    if not depth_model:
        raise ValueError(f"--condition depth={path} needs --depth-model NETWORK.pt2 (a local depth network)")
    return DepthEstimator(depth_model)(frames)
