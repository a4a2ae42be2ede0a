"""Pictures a user looks at: a contact sheet of sample videos and metric curves, written as PNG files."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

LABEL_WIDTH = 220  # pixels of text column left of each row
MIN_FRAME_SIDE = 64  # small frames are enlarged (nearest neighbour) so a 16x16 sample is still visible


def contact_sheet(
    videos: Sequence[np.ndarray], labels: Sequence[str], path: str | Path, max_frames: int = 8, gap: int = 2
) -> Path:
    """One row per video (uint8 ``[f, h, w, 3]``), its label on the left and up to ``max_frames`` frames across,
    evenly spaced over the clip."""
    if len(videos) == 0:
        raise ValueError("contact_sheet needs at least one video")
    if len(labels) != len(videos):
        raise ValueError(f"contact_sheet got {len(videos)} videos but {len(labels)} labels")
    f, h, w, _ = videos[0].shape
    scale = max(1, -(-MIN_FRAME_SIDE // min(h, w)))
    fh, fw = h * scale, w * scale
    cols = min(max_frames, max(v.shape[0] for v in videos))
    sheet = Image.new("RGB", (LABEL_WIDTH + cols * (fw + gap), len(videos) * (fh + gap)), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for row, (video, label) in enumerate(zip(videos, labels, strict=True)):
        if video.ndim != 4 or video.shape[-1] != 3 or video.shape[1:3] != (h, w):
            raise ValueError(f"video {row} has shape {video.shape}; every video must be [frames, {h}, {w}, 3]")
        top = row * (fh + gap)
        draw.text((4, top + fh // 2 - 6), _fit(draw, font, label), fill="black", font=font)
        for col, t in enumerate(np.linspace(0, video.shape[0] - 1, min(cols, video.shape[0])).round().astype(int)):
            frame = Image.fromarray(np.ascontiguousarray(video[t])).resize((fw, fh), Image.NEAREST)
            sheet.paste(frame, (LABEL_WIDTH + col * (fw + gap), top))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def _fit(draw: ImageDraw.ImageDraw, font, text: str) -> str:
    """``text`` shortened with an ellipsis to fit the label column."""
    if draw.textlength(text, font=font) <= LABEL_WIDTH - 8:
        return text
    while text and draw.textlength(text + "...", font=font) > LABEL_WIDTH - 8:
        text = text[:-1]
    return text + "..."


def line_plot(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: str | Path,
    title: str,
    xlabel: str = "step",
    ylabel: str = "",
) -> Path:
    """One line per entry of ``series`` (name -> (x values, y values)) in one PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a cluster node
    import matplotlib.pyplot as plt

    if not series:
        raise ValueError(f"line_plot '{title}' got no series to draw")
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    try:
        for name, (xs, ys) in series.items():
            ax.plot(list(xs), list(ys), label=name, linewidth=1.2)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize="small")
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path
