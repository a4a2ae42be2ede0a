"""Structure conditions of a clip (the inputs of ``model/conditions.py``), extracted from what curation already has:

- ``motion_field``: motion vectors read from the clip's own H.264 stream (FFmpeg exports them as frame side data
  with ``flags2=+export_mvs``; no flow network), painted into a dense field ``[f, 2, h, w]`` of the forward
  displacement per frame as a fraction of the width and height; I-frames (no vectors) are zero.
- ``edge_map``: a classic detector (Sobel gradient magnitude of the luma, thresholded against the clip's own
  gradient scale) as the sketch condition ``[f, 1, h, w]`` (1 on an edge, 0 elsewhere).
- ``DepthEstimator``: a MiDaS/DPT-style network from a local file (``torch.export`` or TorchScript; relative
  inverse depth per frame, larger is nearer), normalised per clip to [0, 1] as ``[f, 1, h, w]``.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipelines import media, schema
from pipelines.curation.stages import Stage, add_extra

if TYPE_CHECKING:
    from pipelines.curation.config import CurateConfig

SOBEL = np.array([[1, 0, -1], [2, 0, -2], [1, 0, -1]], dtype=np.float32)


class ConditionError(ValueError):
    """A condition could not be extracted from this clip (the clip itself is still good)."""


def motion_field(mp4: bytes, frames: int, height: int, width: int) -> np.ndarray:
    """Dense motion of an H.264 clip: float16 ``[frames, 2, height, width]`` (dx / width, dy / height per frame)."""
    import av

    field = np.zeros((frames, 2, height, width), dtype=np.float32)
    try:
        with av.open(io.BytesIO(mp4)) as container:
            stream = container.streams.video[0]
            stream.codec_context.options = {"flags2": "+export_mvs"}
            for i, frame in enumerate(container.decode(stream)):
                if i >= frames:
                    break
                if (frame.height, frame.width) != (height, width):
                    raise ConditionError(f"clip frames are {frame.width}x{frame.height}, expected {width}x{height}")
                vectors = frame.side_data.get("MOTION_VECTORS")
                if vectors is not None:
                    _paint(field[i], vectors.to_ndarray())
    except (av.error.FFmpegError, IndexError) as e:
        raise ConditionError(f"motion vectors unreadable: {e}") from e
    return field.astype(np.float16)


def _paint(out: np.ndarray, mv: np.ndarray) -> None:
    """Fill each vector's block with its forward displacement (a past reference moved content src -> dst; a future
    one dst -> src); where blocks overlap (B-frames' two references) the later vector wins."""
    _, height, width = out.shape
    scale = np.maximum(mv["motion_scale"].astype(np.float32), 1.0)
    step = (mv["dst_x"] - mv["src_x"]).astype(np.float32), (mv["dst_y"] - mv["src_y"]).astype(np.float32)
    if "motion_x" in mv.dtype.names:
        step = -mv["motion_x"] / scale, -mv["motion_y"] / scale  # sub-pixel: src = dst + motion / scale
    sign = np.where(mv["source"] < 0, 1.0, -1.0).astype(np.float32)
    for k in range(len(mv)):
        w, h = int(mv["w"][k]), int(mv["h"][k])
        x0, y0 = int(mv["dst_x"][k]) - w // 2, int(mv["dst_y"][k]) - h // 2
        xs, ys = slice(max(x0, 0), min(x0 + w, width)), slice(max(y0, 0), min(y0 + h, height))
        out[0, ys, xs] = sign[k] * step[0][k] / width
        out[1, ys, xs] = sign[k] * step[1][k] / height


def edge_map(frames: np.ndarray, threshold: float = 0.25) -> np.ndarray:
    """Sketch condition of uint8 frames ``[f, h, w, 3]``: uint8 ``[f, 1, h, w]``, 1 where the luma gradient is above
    ``threshold`` of the clip's strongest gradient."""
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ConditionError(f"edge_map takes frames [f, h, w, 3], got shape {frames.shape}")
    luma = frames.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    padded = np.pad(luma, ((0, 0), (1, 1), (1, 1)), mode="edge")
    gx = sum(SOBEL[i, j] * padded[:, i : i + luma.shape[1], j : j + luma.shape[2]] for i in range(3) for j in range(3))
    gy = sum(SOBEL[j, i] * padded[:, i : i + luma.shape[1], j : j + luma.shape[2]] for i in range(3) for j in range(3))
    magnitude = np.hypot(gx, gy)
    peak = float(magnitude.max())
    if peak == 0.0:
        return np.zeros((frames.shape[0], 1, *frames.shape[1:3]), dtype=np.uint8)
    return (magnitude >= threshold * peak).astype(np.uint8)[:, None]


class DepthEstimator:
    """A depth network from a local file: a ``torch.export`` archive (``.pt2``, no code runs at load) or a TorchScript
    file (runs the code it holds: load only networks you trust). It takes ``[1, 3, s, s]`` RGB (ImageNet-normalised,
    as MiDaS does) and returns relative inverse depth ``[1, s, s]`` or ``[1, 1, s, s]``; frames go one at a time, so
    an export with static shapes works."""

    MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
    STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)

    def __init__(self, path: str | Path, size: int = 256, device: str = "cpu"):
        import torch

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"depth network {path} does not exist: give a local .pt2 (torch.export) file")
        try:
            if path.suffix == ".pt2":
                self.net = torch.export.load(str(path)).module().to(device)
            else:
                self.net = torch.jit.load(str(path), map_location=device).eval()
        except Exception as e:  # both loaders raise several types for a file of another kind
            raise ValueError(
                f"{path} is not a depth network ({type(e).__name__}: {e}); save it with torch.export.save as .pt2"
            ) from e
        self.size, self.device = size, device

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        """uint8 frames ``[f, h, w, 3]`` -> float16 ``[f, 1, h, w]`` in [0, 1] (nearest = 1), normalised per clip."""
        import torch
        import torch.nn.functional as F

        f, h, w, _ = frames.shape
        x = (frames.astype(np.float32) / 255.0 - self.MEAN) / self.STD
        x = torch.from_numpy(x).permute(0, 3, 1, 2).to(self.device)
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        try:
            with torch.no_grad():
                y = torch.cat([self.net(frame[None]) for frame in x])
        except Exception as e:  # an exported network checks its input shape with its own error types
            raise ConditionError(
                f"depth network failed on [1, 3, {self.size}, {self.size}] input ({type(e).__name__}: {e}); "
                "set conditions.depth_size to the side the network takes"
            ) from e
        if y.ndim == 3:
            y = y.unsqueeze(1)
        if y.ndim != 4 or y.shape[0] != f or y.shape[1] != 1:
            raise ConditionError(f"depth network returned shape {tuple(y.shape)} for {f} frames, expected [1, 1, s, s]")
        y = F.interpolate(y.float(), size=(h, w), mode="bilinear", align_corners=False).cpu().numpy()
        lo, hi = float(y.min()), float(y.max())
        if not np.isfinite([lo, hi]).all():
            raise ConditionError("depth network returned non-finite values")
        return ((y - lo) / (hi - lo) if hi > lo else np.zeros_like(y)).astype(np.float16)


class ExtractConditions(Stage):
    """Stage ``conditions`` (after route): the configured conditions of every clip as ``cond_<kind>`` columns (npy
    bytes; the write stage stores them as ``<kind>.npy``). Images get sketch and depth (one frame), not motion. A
    condition that fails is noted in ``extra.condition_errors`` with its reason; the clip goes on without it."""

    name = "conditions"

    def __init__(self, cfg: CurateConfig):
        self.cfg = cfg.conditions
        self.setup_guards(cfg.transient_retries, None)
        self._depth: DepthEstimator | None = None

    def depth(self) -> DepthEstimator:
        if self._depth is None:  # loaded in the worker, once
            self._depth = DepthEstimator(self.cfg.depth_model, size=self.cfg.depth_size)
        return self._depth

    def process(self, row: dict[str, Any]):
        row = dict(row)
        is_video = row["media_type"] != "image"
        frames = media.decode_mp4(row["media"]) if is_video else media.decode_image(row["media"])[None]
        errors: dict[str, str] = {}
        for kind in self.cfg.kinds:
            try:
                if kind == "motion":
                    if not is_video:
                        continue
                    array = motion_field(row["media"], frames.shape[0], frames.shape[1], frames.shape[2])
                elif kind == "sketch":
                    array = edge_map(frames, self.cfg.edge_threshold)
                else:
                    array = self.depth()(frames)
            except Exception as e:  # noqa: BLE001 - a condition that fails never costs the clip
                errors[kind] = str(e) if isinstance(e, ConditionError) else f"{type(e).__name__}: {e}"
                continue
            row[f"cond_{kind}"] = schema.npy_bytes(array)
        if errors:
            add_extra(row, condition_errors=errors)
        yield row
