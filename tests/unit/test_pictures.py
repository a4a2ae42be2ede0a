"""Contact sheets and metric plots: the PNGs the main job and the comparisons show."""

import numpy as np
import pytest
from PIL import Image

from pipelines import pictures


def _video(colour, frames=8, side=16):
    v = np.zeros((frames, side, side, 3), np.uint8)
    v[..., :] = colour
    return v


def test_contact_sheet_has_one_row_per_video_and_frames_across(tmp_path):
    videos = [_video((255, 0, 0)), _video((0, 0, 255), frames=4)]
    path = pictures.contact_sheet(videos, ["a red square moving left", "a blue circle"], tmp_path / "s.png")
    sheet = np.asarray(Image.open(path).convert("RGB"))
    side = pictures.MIN_FRAME_SIDE  # 16-pixel frames are enlarged 4x
    assert sheet.shape[0] == 2 * (side + 2)
    assert sheet.shape[1] == pictures.LABEL_WIDTH + 8 * (side + 2)
    first_frame = (slice(0, side), slice(pictures.LABEL_WIDTH, pictures.LABEL_WIDTH + side))
    assert (sheet[first_frame] == (255, 0, 0)).all()
    second_row = sheet[side + 2 : 2 * side + 2, pictures.LABEL_WIDTH :]
    assert (second_row == (0, 0, 255)).all(axis=-1).sum() == 4 * side * side  # 4 frames, the rest blank
    assert (sheet[:, : pictures.LABEL_WIDTH] < 128).any()  # label text drawn


def test_contact_sheet_rejects_mismatched_inputs(tmp_path):
    with pytest.raises(ValueError, match="2 videos but 1 labels"):
        pictures.contact_sheet([_video(0), _video(0)], ["one"], tmp_path / "s.png")
    with pytest.raises(ValueError, match="every video must be"):
        pictures.contact_sheet([_video(0), _video(0, side=8)], ["a", "b"], tmp_path / "s.png")
    assert not (tmp_path / "s.png").exists()


def test_line_plot_writes_a_png(tmp_path):
    path = pictures.line_plot(
        {"loss": ([0, 10, 20], [1.0, 0.5, 0.3]), "ema": ([0, 20], [1.0, 0.4])}, tmp_path / "l.png", "loss"
    )
    image = Image.open(path)
    assert image.size == (640, 360)
    with pytest.raises(ValueError, match="no series"):
        pictures.line_plot({}, tmp_path / "e.png", "empty")
