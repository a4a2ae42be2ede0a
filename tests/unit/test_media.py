"""ffmpeg media I/O: playable H.264 out, frames back, clear errors on garbage."""

import numpy as np
import pytest

from pipelines import media


def test_mp4_round_trip_keeps_frames_close(tmp_path):
    rng = np.random.default_rng(0)
    frames = np.zeros((6, 24, 32, 3), np.uint8)
    for i in range(6):
        frames[i, 4:12, 2 + 3 * i : 10 + 3 * i] = (200, 60, 30)
    data = media.encode_mp4(frames, fps=8)
    path = tmp_path / "v.mp4"
    path.write_bytes(data)
    stream = media.probe(path)["streams"][0]
    assert stream["codec_name"] == "h264" and stream["pix_fmt"] == "yuv420p"
    back = media.decode_mp4(data)  # in-process (PyAV)
    assert back.shape == frames.shape
    np.testing.assert_array_equal(back, media.decode_video_file(path))  # the same pixels as the ffmpeg command
    assert np.abs(back.astype(int) - frames.astype(int)).mean() < 6  # lossy but faithful
    gif = media.write_gif(frames, tmp_path / "v.gif", fps=8)
    assert gif.read_bytes()[:6] in (b"GIF89a", b"GIF87a")
    del rng


def test_garbage_raises_media_error(tmp_path):
    fake = tmp_path / "fake.mp4"
    fake.write_text("this is not a video")
    with pytest.raises(media.MediaError, match="cannot"):
        media.decode_video_file(fake)
    with pytest.raises(media.MediaError, match="cannot decode"):
        media.decode_mp4(b"this is not a video")
    clip = media.encode_mp4(np.full((8, 16, 16, 3), 128, np.uint8), fps=8)
    with pytest.raises(media.MediaError, match="cannot decode"):
        media.decode_mp4(clip[: len(clip) // 2])  # truncated
    with pytest.raises(media.MediaError):
        media.decode_image(b"\x00\x01not an image")
    with pytest.raises(ValueError, match="uint8"):
        media.encode_mp4(np.zeros((2, 8, 8, 3), np.float32), fps=8)
