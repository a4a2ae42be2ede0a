"""Video and image bytes <-> uint8 frame arrays, through ffmpeg (ffmpeg-python builds the commands).

Frames are always ``uint8 [f, h, w, 3]`` RGB. MP4s are H.264/yuv420p with the index at the front
(``+faststart``) so they stream and play everywhere. Every failure raises ``MediaError`` with ffmpeg's own
last words, so callers can record a rejection reason instead of crashing.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from pathlib import Path

import ffmpeg
import numpy as np


class MediaError(RuntimeError):
    """ffmpeg could not read or write the media; the message carries the reason."""


def require_ffmpeg() -> None:
    if shutil.which("ffmpeg") is None or shutil.which("ffprobe") is None:
        raise MediaError("ffmpeg/ffprobe not found on PATH: install it (Debian: apt-get install -y ffmpeg)")


def _stderr_tail(err: ffmpeg.Error) -> str:
    text = (err.stderr or b"").decode("utf-8", "replace").strip().splitlines()
    return " | ".join(text[-3:]) if text else str(err)


def check_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [frames, height, width, 3], got shape {frames.shape}")
    if frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8, got {frames.dtype}; scale to 0..255 and cast first")
    return np.ascontiguousarray(frames)


def encode_mp4(frames: np.ndarray, fps: float, crf: int = 18) -> bytes:
    """uint8 [f, h, w, 3] -> H.264 mp4 bytes. Odd sizes are padded by one pixel (yuv420p needs even sizes)."""
    require_ffmpeg()
    frames = check_frames(frames)
    f, h, w, _ = frames.shape
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "v.mp4")
        try:
            (
                ffmpeg.input("pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{w}x{h}", framerate=fps)
                .filter("pad", "ceil(iw/2)*2", "ceil(ih/2)*2")
                .output(
                    out,
                    vcodec="libx264",
                    pix_fmt="yuv420p",
                    crf=crf,
                    preset="veryfast",
                    movflags="+faststart",
                    r=fps,
                    **{"x264-params": "log-level=error"},
                )
                .global_args("-nostdin", "-loglevel", "error")
                .run(input=frames.tobytes(), capture_stdout=True, capture_stderr=True)
            )
        except ffmpeg.Error as e:
            raise MediaError(f"ffmpeg could not encode {f} frames of {w}x{h}: {_stderr_tail(e)}") from None
        return Path(out).read_bytes()


def write_mp4(frames: np.ndarray, path: str | Path, fps: float) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_mp4(frames, fps))
    return path


def write_gif(frames: np.ndarray, path: str | Path, fps: float) -> Path:
    """A looping gif (MLflow's UI previews gifs, not mp4s)."""
    from PIL import Image

    frames = check_frames(frames)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images = [Image.fromarray(fr) for fr in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=max(1, round(1000 / fps)), loop=0)
    return path


def probe(source: str | Path) -> dict:
    """ffprobe a file: the parsed JSON (``streams``, ``format``). Raises MediaError when unreadable."""
    require_ffmpeg()
    try:
        return ffmpeg.probe(str(source))
    except ffmpeg.Error as e:
        raise MediaError(f"ffprobe cannot read {source}: {_stderr_tail(e)}") from None


def decode_video_file(
    path: str | Path,
    width: int | None = None,
    height: int | None = None,
    fps: float | None = None,
    max_frames: int | None = None,
) -> np.ndarray:
    """Decode a video file to uint8 [f, h, w, 3], optionally resampled to ``fps`` and scaled to width x height."""
    require_ffmpeg()
    if width is None or height is None:
        info = probe(path)
        vs = [s for s in info.get("streams", []) if s.get("codec_type") == "video"]
        if not vs:
            raise MediaError(f"{path} has no video stream")
        width, height = int(vs[0]["width"]), int(vs[0]["height"])
    stream = ffmpeg.input(str(path))
    if fps is not None:
        stream = stream.filter("fps", fps=fps)
    stream = stream.filter("scale", width, height)
    out_args = {"format": "rawvideo", "pix_fmt": "rgb24"}
    if max_frames is not None:
        out_args["vframes"] = max_frames
    try:
        raw, _ = (
            stream.output("pipe:", **out_args)
            .global_args("-nostdin", "-loglevel", "error")
            .run(capture_stdout=True, capture_stderr=True)
        )
    except ffmpeg.Error as e:
        raise MediaError(f"ffmpeg cannot decode {path}: {_stderr_tail(e)}") from None
    frame_bytes = width * height * 3
    if len(raw) < frame_bytes:
        raise MediaError(f"{path}: decoded no frames")
    n = len(raw) // frame_bytes
    return np.frombuffer(raw[: n * frame_bytes], np.uint8).reshape(n, height, width, 3)


def decode_mp4(data: bytes) -> np.ndarray:
    """mp4 bytes (e.g. a shard's ``mp4`` member) -> uint8 [f, h, w, 3], every frame as stored.

    Decoded in this process with PyAV (FFmpeg's own libraries, one decoder thread): starting ffprobe and ffmpeg
    processes per clip would cost far more than decoding a small training clip. The pixels are the same as
    ``decode_video_file``'s (which also resamples and scales)."""
    import av

    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.video:
                raise MediaError(f"FFmpeg cannot decode the video bytes ({len(data)} bytes): no video stream")
            stream = container.streams.video[0]
            stream.thread_type, stream.codec_context.thread_count = "NONE", 1  # tiny clips: threads cost more
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
    except av.FFmpegError as e:
        raise MediaError(f"FFmpeg cannot decode the video bytes ({len(data)} bytes): {e}") from None
    if not frames:
        raise MediaError(f"FFmpeg cannot decode the video bytes ({len(data)} bytes): no frames in them")
    return np.stack(frames)


def encode_jpg(image: np.ndarray, quality: int = 95) -> bytes:
    """uint8 [h, w, 3] -> jpg bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, np.uint8)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def decode_image(data: bytes) -> np.ndarray:
    """Image bytes (jpg/png/...) -> uint8 [h, w, 3]."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"))
    except Exception as e:  # PIL raises many types for bad data
        raise MediaError(f"cannot decode image: {e}") from None
