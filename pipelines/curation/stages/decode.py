"""Stage 2, decode and clip: one input row -> one row per clip (videos) or one row (images).

Videos: the source is decoded, resampled to ``clips.fps`` (the fps filter keeps the source frame nearest to each
output tick: a frame stride of src_fps / fps), resized to cover the target size (short side for a square
target) and centre-cropped to ``clips.width x clips.height`` (the same filters in ``filter_chain``, for the
ffmpeg command, and ``clip_graph``, for PyAV).
``ClipPlanner`` finds scene cuts and scores motion on small RGB copies of the frames (``ANALYSIS_SIDE`` on the
short side). Clips lie on a grid of ``num_frames`` frames from the first frame; a grid window that spans a scene
cut is dropped (scene-cut aware: no clip crosses a cut), as is the incomplete tail. Each clip is H.264 at the
target fps, starting with a key frame.

Two decoders, the same clips (``clips.decoder``; a test holds them to it):

- ``pyav`` (default): FFmpeg's libraries in this process, through PyAV. Demux and decode, the same filter chain
  as a filter graph, and a fresh libx264 encoder per clip, only for windows that became clips. No process per
  video, so no ffmpeg start-up (mostly loading its libraries) per video, which dominates on short videos. The
  time limit is checked between packets.
- ``ffmpeg``: one ffmpeg process per video (the system's ffmpeg; ffmpeg-python builds the command). The frames
  are split into raw RGB on stdout for the planner and H.264 cut by the segment muxer into one mp4 per
  ``num_frames`` frames. A watchdog kills a process that runs past the time limit.

Both turn frames upright when the container says the video is displayed rotated (phone videos). With clip
policy first / max_n, decoding stops once enough clips are found, so long videos are not decoded to the end.

Images: decoded with PIL, resized to cover, centre-cropped, re-encoded as JPEG.

Buckets (``clips.buckets``, ``clips.image_buckets``, ``clips.lengths``; ``pipelines/buckets.py``): each source
goes to the bucket nearest its aspect (least crop) that it covers without upscaling, and a video gives clips of
every length, one decoding pass per length. Unset, the one size ``width x height`` and ``num_frames``.

Rejections: ``too_small`` (smaller than every bucket, unless ``clips.small_source=upscale``), ``bad_aspect``
(the least crop is over ``clips.max_crop``), ``no_clip`` (no complete window without a cut), ``decode_error``
(FFmpeg reported errors, e.g. a truncated file; ``quality.on_decode_error=keep`` keeps the clips that decoded),
``encode_error``, ``decode_timeout``, ``too_long`` (more frames than ``quality.max_duration_s x clips.fps``). A
full temp disk while encoding is a transient fault (retried, never final).
"""

from __future__ import annotations

import contextlib
import copy
import math
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ffmpeg
import numpy as np

from pipelines import buckets, schema
from pipelines.curation.stages import Stage, TransientFault, add_extra, is_transient, reject
from pipelines.curation.stages.probe import FFMPEG_INPUT_OPTIONS, media_path

if TYPE_CHECKING:
    from pipelines.curation.config import CurateConfig

HIST_BINS = 16  # per channel, for scene-cut detection
ANALYSIS_SIDE = 64  # short side of the frames scene cuts and motion are measured on


# ---------------------------------------------------------------------------------------------------------------
# Frame analysis: scene cuts and motion, on small thumbnails (cheap next to decoding)


def thumbnail(frames: np.ndarray, size: int = ANALYSIS_SIDE) -> np.ndarray:
    """uint8 [..., h, w, 3] -> strided uint8 thumbnails of at most about ``size`` pixels on the short side."""
    step = max(1, min(frames.shape[-3:-1]) // size)
    return frames[..., ::step, ::step, :]


def colour_histograms(thumbs: np.ndarray) -> np.ndarray:
    """uint8 [k, h, w, 3] -> [k, 3 * HIST_BINS] normalised per-channel histograms (each frame's sums to 3)."""
    k = thumbs.shape[0]
    bins = (thumbs.reshape(k, -1, 3) >> 4).astype(np.int64)  # 16 bins per channel
    bins += np.arange(3) * HIST_BINS + (np.arange(k) * 3 * HIST_BINS)[:, None, None]  # one bin range per frame
    counts = np.bincount(bins.ravel(), minlength=k * 3 * HIST_BINS).astype(np.float32)
    return counts.reshape(k, 3 * HIST_BINS) / max(1, thumbs.shape[1] * thumbs.shape[2])


def histogram_distances(hists: np.ndarray) -> np.ndarray:
    """[k, bins] -> [k - 1] total-variation distance between consecutive histograms, averaged over channels:
    0 same .. 1 disjoint."""
    return np.abs(np.diff(hists, axis=0)).sum(axis=1) / 6.0


def luma(thumbs: np.ndarray) -> np.ndarray:
    """uint8 [..., h, w, 3] -> float32 [..., h, w] (BT.601 weights)."""
    return thumbs.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)


def motion_score(thumbs: np.ndarray) -> float:
    """Mean absolute luma change between consecutive frames of ``thumbs`` [k, h, w, 3], in [0, 1]."""
    if len(thumbs) < 2:
        return 0.0
    return float(np.abs(np.diff(luma(thumbs), axis=0)).mean() / 255.0)


@dataclass
class Clip:
    index: int  # grid window number: the clip covers frames [index, index + 1) * num_frames
    start: int  # first frame, counted in target-fps frames from the start of the video
    frames: list[np.ndarray]  # num_frames x uint8 [h, w, 3], as pushed to the planner
    motion: float
    data: bytes = b""  # the encoded mp4 (filled by the decoder)
    keyframes: bytes | None = None  # npy of the caption filter's frames, full size (when it scores frames)


@dataclass
class ClipPlanner:
    """Takes frames in, hands finished clips out. Window k holds frames [k, k + 1) * num_frames; it becomes a
    clip unless a scene cut falls inside it (a cut exactly on a window boundary is fine). Only the current
    window's frames are held in memory. ``push_frames`` takes any number of consecutive frames at once (the
    decoder hands over a window at a time: the analysis is then a few array operations per window, not per
    frame); ``push`` takes one."""

    num_frames: int
    max_clips: int | None = None  # stop after this many clips (None: all)
    scene_threshold: float = 0.4  # histogram distance between consecutive frames that is a cut (>1: never)
    seen: int = 0  # frames pushed so far
    cuts: list[int] = field(default_factory=list)  # frame indices that start a new scene
    clips_made: int = 0
    _window: list[np.ndarray] = field(default_factory=list)
    _thumbs: list[np.ndarray] = field(default_factory=list)
    _spans_cut: bool = False
    _prev_hist: np.ndarray | None = None

    @property
    def done(self) -> bool:
        return self.max_clips is not None and self.clips_made >= self.max_clips

    @property
    def window_left(self) -> int:
        """Frames still needed to finish the current window."""
        return self.num_frames - self.seen % self.num_frames

    def push(self, frame: np.ndarray) -> Clip | None:
        clips = self.push_frames(frame[None])
        return clips[0] if clips else None

    def push_frames(self, frames: np.ndarray) -> list[Clip]:
        """uint8 [k, h, w, 3] consecutive frames -> the clips they finish (in order)."""
        if len(frames) == 0:
            return []
        thumbs = thumbnail(frames)
        hists = colour_histograms(thumbs)
        previous = hists[:1] if self._prev_hist is None else self._prev_hist[None]
        is_cut = histogram_distances(np.concatenate([previous, hists])) > self.scene_threshold
        self._prev_hist = hists[-1]
        clips = []
        for i in range(len(frames)):
            index = self.seen
            self.seen += 1
            if is_cut[i]:
                self.cuts.append(index)
            position = index % self.num_frames
            if position == 0:  # a new window starts
                self._window, self._thumbs, self._spans_cut = [], [], False
            elif is_cut[i]:
                self._spans_cut = True
                self._window, self._thumbs = [], []
            if self._spans_cut or self.done:
                continue
            self._window.append(frames[i])
            self._thumbs.append(thumbs[i])
            if position < self.num_frames - 1:
                continue
            k = index // self.num_frames
            clips.append(Clip(k, k * self.num_frames, self._window, motion_score(np.stack(self._thumbs))))
            self.clips_made += 1
            self._window, self._thumbs = [], []
        return clips


# ---------------------------------------------------------------------------------------------------------------
# The clip geometry and encoding: ffmpeg commands (built with ffmpeg-python; the benchmark's bare-ffmpeg baseline
# uses the same ones) and the same as a PyAV filter graph


def filter_chain(stream, width: int, height: int, fps: float):
    """fps resampling, scale to cover width x height, centre crop: the one definition of the clip geometry."""
    return (
        stream.filter("fps", fps=fps)
        .filter("scale", width, height, force_original_aspect_ratio="increase")
        .filter("crop", width, height)
    )


def h264_segment_args(num_frames: int, fps: float, crf: int, preset: str, threads: int) -> dict[str, Any]:
    """Output options: H.264, a key frame every ``num_frames`` frames, one mp4 file per ``num_frames`` frames.
    No B-frames, so every clip starts at timestamp 0 and decodes to exactly ``num_frames`` frames.
    (segment_time_delta: half a frame of slack, so float rounding never moves a cut to the next key frame.)"""
    return {
        "vcodec": "libx264",
        "pix_fmt": "yuv420p",
        "crf": crf,
        "preset": preset,
        "threads": threads,
        "bf": 0,
        "force_key_frames": f"expr:eq(mod(n,{num_frames}),0)",
        "f": "segment",
        "segment_format": "mp4",
        "segment_format_options": "movflags=+faststart",
        "segment_time": f"{num_frames / fps:.6f}",
        "segment_time_delta": f"{0.5 / fps:.6f}",
        "reset_timestamps": 1,
        "x264-params": "log-level=error",
    }


def clip_graph(first, time_base, rotation: int, width: int, height: int, fps: float):
    """The same geometry as ``filter_chain`` as a PyAV filter graph for decoded frames like ``first`` (size and
    pixel format) with timestamps in ``time_base``, ending in yuv420p. Like the ffmpeg command, it first turns
    frames upright when the container says the video is displayed rotated (``rotation``: degrees
    counterclockwise, as PyAV reports it; phone videos)."""
    import av

    graph = av.filter.Graph()
    chain = [graph.add_buffer(width=first.width, height=first.height, format=first.format, time_base=time_base)]
    upright = {
        90: [("transpose", "cclock")],
        -90: [("transpose", "clock")],
        180: [("hflip", ""), ("vflip", "")],
        -180: [("hflip", ""), ("vflip", "")],
    }.get(rotation, [])
    for name, args in [
        *upright,
        ("fps", f"fps={fps}"),
        ("scale", f"{width}:{height}:force_original_aspect_ratio=increase"),
        ("crop", f"{width}:{height}"),
        ("format", "yuv420p"),
        ("buffersink", ""),
    ]:
        chain.append(graph.add(name, args))
        chain[-2].link_to(chain[-1])
    graph.configure()
    return graph


def analysis_size(width: int, height: int, short_side: int = ANALYSIS_SIDE) -> tuple[int, int]:
    """The frame size scene cuts and motion are measured at: the clip scaled to ``short_side`` on its short side
    (never up)."""
    scale = min(1.0, short_side / min(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def clip_command(
    path: str,
    out_pattern: str,
    width: int,
    height: int,
    fps: float,
    num_frames: int,
    crf: int,
    preset: str,
    threads: int,
    raw_size: tuple[int, int] | None = None,
) -> list[str]:
    """One ffmpeg: decode -> fps/scale/crop -> split -> (raw RGB on stdout, H.264 clip files ``out_pattern``).
    ``raw_size`` (w, h) scales the raw frames down first (they are only analysed; default: the clip size)."""
    frames = filter_chain(ffmpeg.input(path, threads=threads).video, width, height, fps).split()
    raw_stream = frames[0]
    if raw_size is not None and tuple(raw_size) != (width, height):
        raw_stream = raw_stream.filter("scale", raw_size[0], raw_size[1], flags="neighbor")  # = strided
    raw = raw_stream.output("pipe:", format="rawvideo", pix_fmt="rgb24")
    clips = frames[1].output(out_pattern, **h264_segment_args(num_frames, fps, crf, preset, threads))
    return ffmpeg.merge_outputs(raw, clips).global_args("-nostdin", "-loglevel", "error").compile()


def _error_text(path: Path) -> str:
    try:
        lines = path.read_text("utf-8", "replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(line.split("] ", 1)[-1] for line in lines[-3:])


class _Watchdog:
    """Kills the given processes if the input takes longer than ``timeout`` seconds (a hung ffmpeg must not
    hang the run)."""

    def __init__(self, timeout: float):
        self.procs: list[subprocess.Popen] = []
        self.fired = False
        self._timer = threading.Timer(timeout, self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _fire(self) -> None:
        self.fired = True
        for p in self.procs:
            if p.poll() is None:
                p.kill()

    def cancel(self) -> None:
        self._timer.cancel()


class DecodeFailed(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


# ---------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _ffmpeg_errors():
    """FFmpeg's log messages of this thread, captured (a list of (level, name, message)). PyAV passes them on only
    while a log level is set; the previous level is restored after."""
    import av

    previous = av.logging.get_level()
    av.logging.set_level(av.logging.ERROR)
    try:
        with av.logging.Capture() as logs:
            yield logs
    finally:
        av.logging.set_level(previous)


@contextlib.contextmanager
def _open_video(path: str):
    """(PyAV container, its first video stream that is not a cover picture); DecodeFailed if there is none."""
    import av

    try:
        container = av.open(path, container_options=dict(FFMPEG_INPUT_OPTIONS, pattern_type="none"))
    except (av.FFmpegError, OSError) as e:  # e.g. the file changed since the probe
        raise DecodeFailed("decode_error", f"FFmpeg cannot open it: {e}") from None
    with container:
        streams = [s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic]
        if not streams:
            raise DecodeFailed("decode_error", "FFmpeg finds no video stream in it")
        yield container, streams[0]


def _display_rotation(path: str) -> int:
    """Degrees the container says the video is displayed rotated by (0 when it cannot say): read from the first
    decoded frame, as the decoders turn frames upright."""
    import av

    try:
        with _open_video(path) as (container, stream):
            for frame in container.decode(stream):
                return int(frame.rotation)
    except (DecodeFailed, av.FFmpegError):
        pass  # the decoders report a file they cannot read
    return 0


def keyframe_indices(num_frames: int, which: list[str]) -> list[int]:
    """first / middle / last -> frame indices within a clip."""
    table = {"first": 0, "middle": num_frames // 2, "last": num_frames - 1}
    return [table[w] for w in which]


class ClipDecoder(Stage):
    """One input row -> clip rows with ``media`` (mp4 / jpg), ``motion``, geometry and, when the caption filter
    scores frames, ``keyframes``."""

    name = "decode"

    def __init__(self, cfg: CurateConfig, keep_keyframes: bool = False):
        c = cfg.clips
        self.width, self.height, self.num_frames, self.fps = c.width, c.height, c.num_frames, c.fps
        self.sizes, self.image_sizes, self.lengths = c.video_sizes, c.image_sizes, c.clip_lengths
        self.upscale, self.max_crop = c.upscale, c.crop_limit
        self.policy, self.max_clips_cfg = c.policy, c.max_clips
        self.scene_threshold = c.scene_threshold
        self.crf, self.preset, self.threads = c.crf, c.preset, c.threads
        self.jpg_quality = c.jpg_quality
        self.timeout = c.timeout_s
        self.decoder = c.decoder
        self.on_decode_error = cfg.quality.on_decode_error
        self.keyframes_which = list(cfg.caption.frames) if keep_keyframes else []
        # a frame cap, so a file that lies about (or has no) duration cannot decode for ever
        self.max_frames = math.ceil(cfg.quality.max_duration_s * c.fps) + max(self.lengths)
        self.setup_guards(cfg.transient_retries, cfg.hard_limit_s)

    def _check_limits(self, planner: ClipPlanner, deadline: float) -> None:
        if planner.seen > self.max_frames:
            raise DecodeFailed(
                "too_long",
                f"more than {self.max_frames} frames at {self.fps:g} fps: longer than quality.max_duration_s",
            )
        if time.monotonic() > deadline:
            raise DecodeFailed("decode_timeout", f"decoding took longer than clips.timeout_s={self.timeout:.0f} s")

    # -- images ------------------------------------------------------------------------------------------------

    def _image(self, row: dict[str, Any]) -> dict[str, Any]:
        from PIL import Image

        from pipelines import media

        with media_path(row) as path:
            try:
                with Image.open(path) as im:
                    image = np.asarray(im.convert("RGB"))
            except Exception as e:  # PIL raises many types for bad data (and DecompressionBombError)
                raise DecodeFailed("decode_error", f"cannot decode the image: {type(e).__name__}: {e}") from None
        choice = self._bucket(image.shape[1], image.shape[0], self.image_sizes)
        width, height = choice.size
        image = cover_crop(image, width, height)
        out = dict(
            row,
            media=media.encode_jpg(image, quality=self.jpg_quality),
            clip_index=0,
            start_s=0.0,
            num_frames=1,
            fps=0.0,
            width=width,
            height=height,
            input_rows=1,
            data=None,
        )
        add_extra(out, crop_fraction=round(choice.crop, 4), upscaled=choice.upscaled)
        if self.keyframes_which:
            out["keyframes"] = schema.npy_bytes(image[None])
        return out

    # -- videos ------------------------------------------------------------------------------------------------

    def _bucket(self, src_w: int, src_h: int, sizes: list[tuple[int, int]]) -> buckets.Choice:
        try:
            return buckets.choose_bucket(src_w, src_h, sizes, self.upscale, self.max_crop)
        except buckets.Rejected as e:
            raise DecodeFailed(e.reason, str(e)) from None

    def _video(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        """Clips of every length in ``clips.lengths`` (one decoding pass per length, each on its own grid), at
        the bucket nearest the source's aspect. A clip's index interleaves the lengths, so a single length keeps
        the grid window number and keys stay stable."""
        out: list[dict[str, Any]] = []
        short: DecodeFailed | None = None
        with media_path(row) as path:
            src_w, src_h = row["src_width"], row["src_height"]
            if len(self.sizes) > 1 and abs(_display_rotation(path)) == 90:
                src_w, src_h = src_h, src_w  # a phone video: its bucket is the aspect it is shown (and cut) at
            choice = self._bucket(src_w, src_h, self.sizes)
            for li, length in enumerate(self.lengths):
                # the decoding methods read the geometry from the instance: a copy per (bucket, length)
                shaped = copy.copy(self)
                (shaped.width, shaped.height), shaped.num_frames = choice.size, length
                try:
                    rows = shaped._video_length(row, path)
                except DecodeFailed as e:  # too short for this length may still make clips of another
                    if e.reason != "no_clip":
                        raise
                    short, rows = short or e, []
                for r in rows:
                    r["clip_index"] = r["clip_index"] * len(self.lengths) + li
                    add_extra(r, crop_fraction=round(choice.crop, 4), upscaled=choice.upscaled)
                out += rows
        if not out and short is not None:
            raise short
        for r in out:
            r["input_rows"] = len(out)
        return out

    def _video_length(self, row: dict[str, Any], path: str) -> list[dict[str, Any]]:
        max_clips = {"all": None, "first": 1, "max_n": self.max_clips_cfg}[self.policy]
        planner = ClipPlanner(self.num_frames, max_clips, self.scene_threshold)
        with tempfile.TemporaryDirectory(prefix="t2v-decode-") as tmp:
            if self.decoder == "pyav":
                made, errors = self._clips_pyav(path, planner, Path(tmp))
            else:
                made, errors = self._clips_ffmpeg(path, planner, Path(tmp))
        if errors and (self.on_decode_error == "reject" or not made):
            raise DecodeFailed("decode_error", f"FFmpeg reported errors ({errors}); the file is truncated or corrupt")
        if not made:
            cuts = f" with {len(planner.cuts)} scene cut(s)" if planner.cuts else ""
            raise DecodeFailed(
                "no_clip",
                f"decoded {planner.seen} frames at {self.fps:g} fps{cuts}: no "
                f"window of {self.num_frames} frames without a cut",
            )

        src_fps = row["src_fps"]
        stride = (src_fps / self.fps) if src_fps and not math.isnan(src_fps) else math.nan
        out = []
        for clip in made:
            r = dict(
                row,
                media=clip.data,
                clip_index=clip.index,
                start_s=clip.start / self.fps,
                num_frames=self.num_frames,
                fps=self.fps,
                width=self.width,
                height=self.height,
                motion=clip.motion,
                input_rows=len(made),
                data=None,
                keyframes=clip.keyframes,
            )
            add_extra(
                r,
                frame_stride=None if math.isnan(stride) else round(stride, 4),
                scene_cuts=len(planner.cuts),
                decoded_frames=planner.seen,
            )
            out.append(r)
        return out

    def _clips_pyav(self, path: str, planner: ClipPlanner, tmp: Path) -> tuple[list[Clip], str]:
        """Decode in this process with PyAV: demux + decode -> the clip filter graph -> frames, a window at a
        time; the planner's clips are encoded each by a fresh libx264 encoder (a key frame first, pts from 0).
        Returns the clips and FFmpeg's error messages ("" if none)."""
        import av
        from av.video.reformatter import Interpolation, VideoReformatter

        raw_w, raw_h = analysis_size(self.width, self.height)
        reformatter = VideoReformatter()  # keeps its swscale context between frames
        deadline = time.monotonic() + self.timeout
        made: list[Clip] = []
        window: list[av.VideoFrame] = []  # the current window's frames (clip size, yuv420p)
        thumbs: list[np.ndarray] = []  # the same frames, small and RGB, for the planner
        errors: list[str] = []

        def take(graph) -> None:
            nonlocal window, thumbs
            while not planner.done:
                try:
                    frame = graph.pull()
                except (av.BlockingIOError, av.EOFError):
                    return
                window.append(frame)
                self._check_limits(planner, deadline)
                thumbs.append(
                    reformatter.reformat(frame, raw_w, raw_h, "rgb24", interpolation=Interpolation.POINT).to_ndarray()
                )
                if len(window) == self.num_frames:  # a window is complete: analyse it, encode it if it is a clip
                    for clip in planner.push_frames(np.stack(thumbs)):
                        made.append(self._encode(clip, window, tmp / f"c{clip.index:06d}.mp4"))
                    window, thumbs = [], []

        with _ffmpeg_errors() as logs, _open_video(path) as (container, stream):
            stream.codec_context.thread_count = self.threads
            if self.threads > 1:
                stream.thread_type = "AUTO"  # frame and slice threads (PyAV's default is slices only)
            graph, graph_input = None, None
            for packet in container.demux(stream):  # ends with an empty packet: flushes the decoder
                try:
                    frames = stream.decode(packet)
                except av.FFmpegError as e:
                    errors.append(str(e).split("; last error log:")[0])
                    if self.on_decode_error == "reject":
                        break
                    continue
                for frame in frames:
                    if (frame.width, frame.height, frame.format.name) != graph_input:
                        # the first frame, or the size changed mid-stream (possible in .ts / .mkv): like the
                        # ffmpeg command, flush the graph and build one for the new frames
                        if graph is not None:
                            graph.push(None)
                            take(graph)
                        graph_input = (frame.width, frame.height, frame.format.name)
                        graph = clip_graph(frame, stream.time_base, frame.rotation, self.width, self.height, self.fps)
                    graph.push(frame)
                    take(graph)
                if planner.done:
                    break
                self._check_limits(planner, deadline)
            if graph is not None and not planner.done and not (errors and self.on_decode_error == "reject"):
                graph.push(None)  # end of stream: the fps filter emits its last frames
                take(graph)
        if thumbs and not planner.done:
            planner.push_frames(np.stack(thumbs))  # an incomplete tail: counted, never a clip
        errors += [message.strip() for level, _, message in logs if level <= av.logging.ERROR]
        return made, " | ".join(dict.fromkeys(errors))

    def _encode(self, clip: Clip, frames: list, path: Path) -> Clip:
        """One clip's frames (PyAV, yuv420p) -> H.264 mp4 (+faststart) bytes in ``clip.data``."""
        import av

        rate = Fraction(self.fps).limit_denominator(1001)
        try:
            # a file, not memory: +faststart moves the index to the front by reading the file back
            with av.open(str(path), "w", format="mp4", options={"movflags": "+faststart"}) as out:
                stream = out.add_stream("libx264", rate=rate)
                stream.width, stream.height, stream.pix_fmt = self.width, self.height, "yuv420p"
                stream.codec_context.thread_count = self.threads
                stream.codec_context.max_b_frames = 0
                stream.options = {"crf": str(self.crf), "preset": self.preset, "x264-params": "log-level=error"}
                for i, frame in enumerate(frames):
                    frame.pts, frame.time_base = i, 1 / rate
                    frame.pict_type = av.video.frame.PictureType.NONE  # the encoder picks key frames, not the source
                    out.mux(stream.encode(frame))
                out.mux(stream.encode(None))
            clip.data = path.read_bytes()
        except (av.FFmpegError, OSError) as e:
            if is_transient(e):  # e.g. ENOSPC: the temp disk is full, the clip is fine
                raise TransientFault("temp_disk", f"cannot write clip {clip.index}: {e}") from None
            raise DecodeFailed("encode_error", f"FFmpeg could not encode clip {clip.index}: {e}") from None
        if self.keyframes_which:
            clip.keyframes = schema.npy_bytes(
                np.stack(
                    [
                        frames[i].to_ndarray(format="rgb24")
                        for i in keyframe_indices(self.num_frames, self.keyframes_which)
                    ]
                )
            )
        clip.frames = []
        return clip

    def _clips_ffmpeg(self, path: str, planner: ClipPlanner, tmp: Path) -> tuple[list[Clip], str]:
        """One ffmpeg process (``clip_command``): its raw-frame output feeds the planner, its segment muxer writes
        the clip files. Returns the clips and ffmpeg's error messages ("" if none)."""
        # ffmpeg hands over full-size frames only when keyframes are kept (for the CLIP caption filter); otherwise
        # frames of the analysis size, 16x fewer bytes through the pipe for a 256x256 clip.
        raw_w, raw_h = (self.width, self.height) if self.keyframes_which else analysis_size(self.width, self.height)
        frame_bytes = raw_w * raw_h * 3
        clips: list[Clip] = []
        watchdog = _Watchdog(self.timeout)
        err = tmp / "ffmpeg.err"
        cmd = clip_command(
            path,
            str(tmp / "c%06d.mp4"),
            self.width,
            self.height,
            self.fps,
            self.num_frames,
            self.crf,
            self.preset,
            self.threads,
            raw_size=(raw_w, raw_h),
        )
        with open(err, "wb") as err_file:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err_file)
        watchdog.procs.append(proc)
        stopped_early = False
        try:
            while True:
                want = planner.window_left * frame_bytes  # the rest of the current window, analysed together
                buf = proc.stdout.read(want)  # short only at the end of the stream
                if stopped_early:
                    if not buf:
                        break
                    continue  # draining what ffmpeg flushes after the interrupt
                whole = len(buf) // frame_bytes  # (a partial frame at the very end is dropped)
                frames = np.frombuffer(buf, np.uint8, count=whole * frame_bytes).reshape(whole, raw_h, raw_w, 3)
                if planner.seen > self.max_frames:
                    proc.kill()
                    self._check_limits(planner, math.inf)
                for clip in planner.push_frames(frames):
                    if self.keyframes_which:
                        idx = keyframe_indices(self.num_frames, self.keyframes_which)
                        clip.keyframes = schema.npy_bytes(np.stack([clip.frames[i] for i in idx]))
                    clip.frames = []  # ffmpeg encodes them; nothing else needs them
                    clips.append(clip)
                if len(buf) < want:
                    break
                if planner.done:
                    # enough clips: SIGINT makes ffmpeg stop reading and finalise the files it has written;
                    # keep draining stdout so it is never blocked on a full pipe
                    proc.send_signal(signal.SIGINT)
                    stopped_early = True
        finally:
            proc.stdout.close()
            proc.wait()
            watchdog.cancel()

        if watchdog.fired:
            raise DecodeFailed("decode_timeout", f"ffmpeg took longer than clips.timeout_s={self.timeout:.0f} s")
        errors = _error_text(err) or ("" if proc.returncode == 0 or stopped_early else f"exit status {proc.returncode}")
        for clip in clips:
            f = tmp / f"c{clip.index:06d}.mp4"
            if not f.is_file():
                raise DecodeFailed(
                    "decode_error" if errors else "encode_error",
                    f"ffmpeg wrote no file for clip {clip.index}: {errors}",
                )
            clip.data = f.read_bytes()
        return clips, errors

    def process(self, row: dict[str, Any]):
        try:
            if row["media_type"] == "image":
                return [self._image(row)]
            return self._video(row)
        except DecodeFailed as e:
            return [reject(row, self.name, e.reason, str(e))]


def cover_crop(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """uint8 [h, w, 3] -> resized (bicubic) to cover width x height, then centre-cropped to exactly that."""
    from PIL import Image

    h, w = image.shape[:2]
    scale = max(width / w, height / h)
    nw, nh = max(width, round(w * scale)), max(height, round(h * scale))
    im = Image.fromarray(image)
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - width) // 2, (nh - height) // 2
    return np.asarray(im.crop((left, top, left + width, top + height)))


def decode_clip(data: bytes) -> np.ndarray:
    """A clip's mp4 bytes -> uint8 [f, h, w, 3] (for the caption / encode stages and tests)."""
    from pipelines import media

    return media.decode_mp4(data)


def decode_still(data: bytes) -> np.ndarray:
    from pipelines import media

    return media.decode_image(data)
