"""Hostile and unlucky inputs against the probe and decode stages, without Ray: time limits that hold inside the
decoder, the frame cap, size limits, FFmpeg's format whitelist and plain names, and a real full temp disk."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from fractions import Fraction

import numpy as np
import pytest

from pipelines import media, settings, shapes
from pipelines.curation.config import CurateConfig
from pipelines.curation.stages import TRANSIENT, new_row
from pipelines.curation.stages.decode import ClipDecoder
from pipelines.curation.stages.probe import Probe


def _cfg(*sets: str) -> CurateConfig:
    base = ["clips.width=32", "clips.height=32", "clips.num_frames=4", "clips.fps=8", "quality.min_side=16"]
    return settings.load(CurateConfig, None, [*base, *sets])


def _input(path) -> dict:
    return new_row(source=str(path), given=str(path), origin="dir", uri=str(path))


def _probe_decode(cfg, path) -> dict:
    rows = Probe(cfg)([_input(path)]).to_pylist()
    if rows[0]["status"] == "ok":
        rows = ClipDecoder(cfg)(rows).to_pylist()
    return rows[0]


def _gap_video(path, gap_s: float) -> None:
    """A small mkv: 8 frames, then a timestamp jump of ``gap_s`` seconds, then 8 more frames."""
    import av

    frames = shapes.render_video("red", "circle", "right", 32, 32, 16)
    with av.open(str(path), "w", format="matroska") as out:
        stream = out.add_stream("libx264", rate=12)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 12)
        for i, f in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(f, format="rgb24")
            frame.pts, frame.time_base = i + (int(gap_s * 12) if i >= 8 else 0), Fraction(1, 12)
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))


def test_a_timestamp_gap_cannot_outrun_the_time_limit_or_the_frame_cap(tmp_path):
    _gap_video(tmp_path / "gap.mkv", gap_s=200_000)  # the fps filter would fill the gap with 1.6M frames
    cfg = _cfg("clips.timeout_s=1", "quality.max_duration_s=3600")
    started = time.monotonic()
    row = ClipDecoder(cfg)(Probe(cfg)([_input(tmp_path / "gap.mkv")])).to_pylist()[0]
    assert time.monotonic() - started < 5
    assert (row["status"], row["stage"]) == ("rejected", "decode")
    assert row["reason"] in ("decode_timeout", "too_long"), row["detail"]


@pytest.mark.parametrize("decoder", ["pyav", "ffmpeg"])
def test_the_frame_cap_stops_a_video_whose_header_gives_no_duration(tmp_path, decoder):
    path = tmp_path / "v.mp4"
    media.write_mp4(shapes.render_video("red", "circle", "right", 32, 32, 36), path, 12)  # 3 s
    cfg = _cfg("quality.max_duration_s=1", f"clips.decoder={decoder}")
    # the header's duration is gone (as in a stream without one): only the frame cap can stop it
    row = dict(Probe(cfg)([_input(path)]).to_pylist()[0], duration=float("nan"))
    out = ClipDecoder(cfg)([row]).to_pylist()
    assert [(r["status"], r["reason"]) for r in out] == [("rejected", "too_long")]


def test_inputs_over_the_size_limit_are_rejected_before_they_are_read(tmp_path):
    path = tmp_path / "big.mp4"
    media.write_mp4(shapes.render_video("red", "circle", "right", 32, 32, 12), path, 12)
    row = Probe(_cfg("inputs.max_bytes=100"))([_input(path)]).to_pylist()[0]
    assert (row["status"], row["reason"]) == ("rejected", "too_big")
    # a member of a tar: its length says it, before a byte is fetched
    member = new_row(source="x.tar#a.mp4", given="x", origin="tar", uri=str(tmp_path / "absent.tar"), offset=0)
    member["length"] = 10_000
    row = Probe(_cfg("inputs.max_bytes=100"))([member]).to_pylist()[0]
    assert (row["status"], row["reason"]) == ("rejected", "too_big")


def test_ffmpeg_opens_no_playlist_concat_list_or_image_pattern(tmp_path):
    video = tmp_path / "real.mp4"
    media.write_mp4(shapes.render_video("red", "circle", "right", 32, 32, 24), video, 12)
    # small text files that would make FFmpeg read media no manifest names
    (tmp_path / "list.mp4").write_text(f"ffconcat version 1.0\nfile '{video}'\n")
    (tmp_path / "play.mp4").write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:2,\n{video}\n#EXT-X-ENDLIST\n")
    (tmp_path / "img1.png").write_bytes(media.encode_jpg(np.full((32, 32, 3), 200, np.uint8)))
    (tmp_path / "img%d.png").write_text("not an image\n")  # as a pattern, it would name img1.png
    for probe in ("pyav", "ffprobe"):
        cfg = _cfg(f"clips.probe={probe}")
        for name in ("list.mp4", "play.mp4", "img%d.png"):
            row = _probe_decode(cfg, tmp_path / name)
            assert row["status"] == "rejected" and row["stage"] == "probe", (probe, name, row["detail"])
        assert _probe_decode(cfg, video)["status"] == "ok"


def test_odd_file_names_mean_nothing_to_ffmpeg(tmp_path):
    for name in ("-i.mp4", "concat:a.mp4", "x%03d.mp4", "file:y.mp4"):
        path = tmp_path / name
        media.write_mp4(shapes.render_video("red", "circle", "right", 32, 32, 12), path, 12)
        for decoder in ("pyav", "ffmpeg"):
            row = _probe_decode(_cfg(f"clips.decoder={decoder}"), path)
            assert row["status"] == "ok", (name, decoder, row["detail"])


@pytest.fixture
def full_temp_disk(tmp_path, monkeypatch):
    """A real, tiny, full file system as the temp directory (a tmpfs; needs root)."""
    mount = tmp_path / "full"
    mount.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(mount)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode()}")
    monkeypatch.setattr(tempfile, "tempdir", str(mount))
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_a_full_temp_disk_is_a_transient_fault_never_a_rejection(tmp_path, full_temp_disk):
    path = tmp_path / "v.mp4"
    media.write_mp4(shapes.render_video("red", "circle", "right", 64, 64, 24), path, 12)
    cfg = _cfg("clips.width=256", "clips.height=256", "transient_retries=1")
    decoder = ClipDecoder(cfg)
    decoder.transient_backoff_s = 0.01
    row = Probe(cfg)([_input(path)]).to_pylist()[0]
    out = decoder([row]).to_pylist()
    assert [r["status"] for r in out] == [TRANSIENT], out[0]["detail"]
    assert "No space left" in out[0]["detail"] or "ENOSPC" in out[0]["detail"] or "space" in out[0]["detail"]
