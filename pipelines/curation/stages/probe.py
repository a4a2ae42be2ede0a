"""Stage 1, probe: find the input, read it if it is remote, and ask FFmpeg what it is.

Fills ``media_type`` (video | image), ``container``, ``codec``, ``duration``, ``src_fps``, ``src_width``,
``src_height`` and ``src_frames``. Rejects, with a reason and never an exception:

    missing_file   the path/URI does not exist          empty_file      zero bytes
    unreadable     the probe cannot parse it             not_media       no video/image stream (e.g. a text file)
    bad_dimensions the probe reports no usable size      image_in_video_file  a still image behind a video name
    fetch_error    a remote read was refused (permission) probe_timeout  ffprobe took longer than clips.timeout_s
    too_big        larger than inputs.max_bytes, seen before a byte is read  (PyAV's timeout ends as unreadable)

A remote read that fails for any other reason (network, an unreachable object store, throttling) and a full
temp disk are transient faults: retried, and if they persist the input is left out of the ledger for the next run.

FFmpeg opens only what this stage hands it: a local file, through a link with a plain name (``input.<ext>``, so
no ``%d`` image pattern, protocol prefix or leading dash in a file name means anything to FFmpeg), with the
``file`` protocol only and the demuxers in ``FORMAT_WHITELIST`` only (no playlists, concat lists or image
sequences: none of them can make FFmpeg read a file that no manifest names).

Two ways to ask (``clips.probe``), the same answer: ``pyav`` (default) opens the container in this process with
PyAV's libavformat and reads its header; ``ffprobe`` starts an ffprobe process per input (ffmpeg-python's
command), which costs far more, mostly loading FFmpeg's libraries. Both fill an ffprobe-shaped dict that
``describe`` reads.

Inputs that are not plain local files (``s3://``, ``gs://``, a member of a re-ingested tar) are read here into
the row's ``data`` column, so the decode stage works the same for every origin.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.curation.stages import Stage, TransientFault, reject

if TYPE_CHECKING:
    from pipelines.curation.config import CurateConfig

VIDEO_EXTENSIONS = frozenset(
    {"mp4", "m4v", "mov", "mkv", "webm", "avi", "mpg", "mpeg", "ts", "flv", "wmv", "3gp", "ogv", "gif", "y4m"}
)
IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff"})
MEDIA_EXTENSIONS = VIDEO_EXTENSIONS | IMAGE_EXTENSIONS

# FFmpeg demuxers curation opens (matched against any of a demuxer's names, e.g. "mov,mp4,m4a,3gp,3g2,mj2").
# Left out on purpose: hls/dash (playlists that name other files or URLs), concat, image sequences beyond the
# one file (image2 is kept for single images, with pattern_type=none), tty (any text), and raw formats.
FORMAT_WHITELIST = (
    "mov,mp4,matroska,webm,avi,mpeg,mpegts,mpegvideo,flv,asf,gif,yuv4mpegpipe,ogg,h264,hevc,m4v,image2,"
    "png_pipe,jpeg_pipe,webp_pipe,bmp_pipe,tiff_pipe,gif_pipe,jpegls_pipe"
)
# what every FFmpeg open gets (PyAV container options, or ffmpeg/ffprobe input flags)
FFMPEG_INPUT_OPTIONS = {"protocol_whitelist": "file", "format_whitelist": FORMAT_WHITELIST}


def extension(name: str) -> str:
    """Lower-case extension of a path, URI or ``tar#key.ext`` source, without the dot ("" if none)."""
    base = name.rsplit("/", 1)[-1]
    return base.rsplit(".", 1)[-1].lower() if "." in base else ""


def is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def local_path(uri: str) -> str:
    return uri[len("file://") :] if uri.startswith("file://") else uri


def filesystem(uri: str):
    """(pyarrow filesystem, path inside it) for any URI pyarrow understands (s3://, gs://, hdfs://, file://)."""
    from pyarrow import fs

    if is_local(uri):
        return fs.LocalFileSystem(), os.path.abspath(local_path(uri))
    return fs.FileSystem.from_uri(uri)


def read_bytes(uri: str, offset: int = -1, length: int = -1) -> bytes:
    """The whole file, or ``length`` bytes at ``offset`` (a member inside a tar)."""
    fsys, path = filesystem(uri)
    if offset >= 0:
        with fsys.open_input_file(path) as f:
            return f.read_at(length, offset)
    with fsys.open_input_stream(path) as f:
        return f.read()


def is_plain_local_file(row: dict[str, Any]) -> bool:
    return is_local(row["uri"]) and row["offset"] < 0


@contextlib.contextmanager
def media_path(row: dict[str, Any]) -> Iterator[str]:
    """A local path FFmpeg can open, with a plain name (``<tmp>/input.<ext>``): a link to the file itself, or a
    temporary copy of the fetched ``data`` bytes. A full temp disk is a TransientFault."""
    suffix = "." + (re.sub(r"[^a-z0-9]", "", extension(row["source"]))[:8] or "bin")
    try:
        tmp = tempfile.TemporaryDirectory(prefix="t2v-curate-")
    except OSError as e:
        raise TransientFault("temp_dir", f"cannot create a temporary directory: {e}") from None
    with tmp as d:
        path = os.path.join(d, "input" + suffix)
        try:
            if row.get("data") is None:
                os.symlink(os.path.abspath(local_path(row["uri"])), path)
            else:
                with open(path, "wb") as f:
                    f.write(row["data"])
        except OSError as e:
            raise TransientFault("temp_dir", f"cannot write to the temporary directory: {e}") from None
        yield path


def ffprobe(path: str, timeout: float) -> dict:
    """ffprobe's JSON (streams + format). Raises RuntimeError(reason) with ffprobe's last words."""
    whitelist = [a for k, v in FFMPEG_INPUT_OPTIONS.items() for a in (f"-{k}", v)]
    cmd = ["ffprobe", "-v", "error", *whitelist, "-show_format", "-show_streams", "-of", "json", path]
    proc = subprocess.run(cmd, capture_output=True, timeout=timeout)
    if proc.returncode != 0:
        lines = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        raise RuntimeError(" | ".join(line.split("] ", 1)[-1] for line in lines[-2:]) or f"exit {proc.returncode}")
    return json.loads(proc.stdout.decode("utf-8", "replace") or "{}")


def pyav_probe(path: str, timeout: float) -> dict:
    """The ffprobe-JSON subset ``describe`` reads (format name and duration; per video stream codec, size, frame
    rates, duration, frame count, attached-picture flag), from PyAV. Raises RuntimeError(reason)."""
    import av

    try:
        with av.open(
            path, timeout=timeout, container_options=dict(FFMPEG_INPUT_OPTIONS, pattern_type="none")
        ) as container:
            streams = []
            for s in container.streams.video:
                ctx = s.codec_context
                streams.append(
                    {
                        "codec_type": "video",
                        "codec_name": ctx.name if ctx else "",
                        "width": ctx.width if ctx else 0,
                        "height": ctx.height if ctx else 0,
                        "avg_frame_rate": str(s.average_rate) if s.average_rate else None,
                        "r_frame_rate": str(s.base_rate) if s.base_rate else None,
                        "duration": float(s.duration * s.time_base) if s.duration and s.time_base else None,
                        "nb_frames": s.frames or None,
                        "disposition": {"attached_pic": int(bool(s.disposition & av.stream.Disposition.attached_pic))},
                    }
                )
            duration = container.duration / 1e6 if container.duration else None  # AV_TIME_BASE units
            return {"format": {"format_name": container.format.name, "duration": duration}, "streams": streams}
    except (av.FFmpegError, OSError, ValueError) as e:
        raise RuntimeError(str(e).replace(f": '{path}'", "")) from None


def _rate(text: str | None) -> float:
    """ffprobe's "30000/1001" -> 29.97; "0/0" or missing -> nan."""
    if not text:
        return math.nan
    num, _, den = text.partition("/")
    try:
        value = float(num) / float(den or 1)
    except (ValueError, ZeroDivisionError):
        return math.nan
    return value if value > 0 else math.nan


def _float(value: Any) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return math.nan
    return out if math.isfinite(out) and out >= 0 else math.nan


def describe(info: dict) -> dict[str, Any]:
    """Pick what curation needs out of ffprobe's JSON. ``media_type`` is "" when there is no picture stream."""
    fmt = info.get("format", {}) or {}
    container = str(fmt.get("format_name", ""))
    streams = [
        s
        for s in info.get("streams", []) or []
        if s.get("codec_type") == "video" and not (s.get("disposition") or {}).get("attached_pic")
    ]
    if not streams or container == "tty":  # ffmpeg reads any text as "tty" (ANSI art)
        return {"media_type": "", "container": container, "codec": ""}
    s = streams[0]
    # image2 / png_pipe / jpeg_pipe / webp_pipe ...: a still image (yuv4mpegpipe is a raw *video* format)
    is_image = container == "image2" or container.endswith("_pipe")
    fps = _rate(s.get("avg_frame_rate")) if not is_image else math.nan
    if not is_image and math.isnan(fps):
        fps = _rate(s.get("r_frame_rate"))
    duration = _float(s.get("duration"))
    if math.isnan(duration):
        duration = _float(fmt.get("duration"))
    frames = s.get("nb_frames")
    try:
        frames = int(frames)
    except (TypeError, ValueError):
        frames = round(duration * fps) if not (math.isnan(duration) or math.isnan(fps)) else 0
    return {
        "media_type": "image" if is_image else "video",
        "container": container,
        "codec": str(s.get("codec_name", "")),
        "duration": math.nan if is_image else duration,
        "src_fps": fps,
        "src_width": int(s.get("width") or 0),
        "src_height": int(s.get("height") or 0),
        "src_frames": 1 if is_image else int(frames),
    }


class Probe(Stage):
    """Locate, fetch (if remote) and probe each input; see the module docstring for the rejection reasons."""

    name = "probe"

    def __init__(self, cfg: CurateConfig):
        self.timeout = cfg.clips.timeout_s
        self.probe = pyav_probe if cfg.clips.probe == "pyav" else ffprobe
        self.tool = cfg.clips.probe
        self.content_mismatch = cfg.quality.content_mismatch
        self.max_bytes = cfg.inputs.max_bytes
        self.setup_guards(cfg.transient_retries, cfg.hard_limit_s)

    def _too_big(self, row: dict[str, Any], size: int) -> dict[str, Any] | None:
        if size <= self.max_bytes:
            return None
        return reject(row, self.name, "too_big", f"{size:,} bytes > inputs.max_bytes={self.max_bytes:,}")

    def process(self, row: dict[str, Any]):
        row = dict(row)
        uri = row["uri"]
        if is_plain_local_file(row):
            path = Path(local_path(uri))
            if not path.is_file():
                yield reject(row, self.name, "missing_file", f"{path} does not exist (or is not a file)")
                return
            size = path.stat().st_size
            if size == 0:
                yield reject(row, self.name, "empty_file", f"{path} is empty (0 bytes)")
                return
            if big := self._too_big(row, size):
                yield big
                return
        else:
            if row["offset"] >= 0 and (big := self._too_big(row, row["length"])):
                yield big
                return
            try:
                if row["offset"] < 0:
                    fsys, p = filesystem(uri)
                    from pyarrow import fs

                    info = fsys.get_file_info(p)
                    if info.type != fs.FileType.File:
                        yield reject(row, self.name, "missing_file", f"{uri} does not exist")
                        return
                    if big := self._too_big(row, info.size or 0):
                        yield big
                        return
                row["data"] = read_bytes(uri, row["offset"], row["length"])
            except PermissionError as e:  # the store answered, and said no: the input's problem, not the network's
                yield reject(row, self.name, "fetch_error", f"cannot read {uri}: {type(e).__name__}: {e}")
                return
            except OSError as e:  # network, throttling, an unreachable store: try again, later
                raise TransientFault("fetch_failed", f"cannot read {uri}: {type(e).__name__}: {e}") from None
            except Exception as e:  # e.g. a URI no filesystem understands
                yield reject(row, self.name, "fetch_error", f"cannot read {uri}: {type(e).__name__}: {e}")
                return
            if not row["data"]:
                yield reject(row, self.name, "empty_file", f"{row['source']} is empty (0 bytes)")
                return

        try:
            with media_path(row) as path:
                info = self.probe(path, self.timeout)
        except subprocess.TimeoutExpired:
            yield reject(row, self.name, "probe_timeout", f"ffprobe took longer than {self.timeout:.0f} s")
            return
        except RuntimeError as e:
            yield reject(row, self.name, "unreadable", f"{self.tool} cannot read it: {e}")
            return

        found = describe(info)
        row.update(found)
        if not found["media_type"]:
            yield reject(
                row,
                self.name,
                "not_media",
                f"no video or image stream ({self.tool} sees format {found['container']!r})",
            )
            return
        if row["src_width"] <= 0 or row["src_height"] <= 0:
            yield reject(
                row,
                self.name,
                "bad_dimensions",
                f"{self.tool} reports a {row['src_width']}x{row['src_height']} picture (the header declares a "
                "size ffmpeg refuses, or none)",
            )
            return
        ext = extension(row["source"])
        if found["media_type"] == "image" and ext in VIDEO_EXTENSIONS and ext != "gif":
            if self.content_mismatch == "reject":
                yield reject(
                    row,
                    self.name,
                    "image_in_video_file",
                    f"the .{ext} file holds a still {found['codec']} image, not a video "
                    "(set quality.content_mismatch=by_content to curate it as an image)",
                )
                return
        yield row
