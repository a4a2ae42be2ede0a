"""t2v bench masked [--minutes 15] [--samples 24] [--output runs/bench_masked]

Does masked conditioning do what it promises? Curates the shapes corpus with the main job's recipe, trains the tiny
model with Lumiere's masked conditioning (image-to-video, inpainting and cinemagraph samples among the text ones) for
a time budget (the real training job: Ray Train + DeepSpeed), then, through the inputs ``t2v sample`` reads (a png
first frame, an mp4 and a png mask), generates from held-out combinations: (1) image-to-video from the first frame
of a reference clip with the full prompt, next to the same prompts text only (same model and seeds): colour and
direction as the detector reads them in the frames after the first (it reads no shape); (2) inpainting of a box
around the reference's path with a prompt naming another colour: PSNR of the pixels outside the box against the
input, of the model's own output (before the given pixels are pasted back) and of what a user gets (pasted back,
through H.264), and whether the detected colour inside the box is the prompt's, with guidance (which acts only
inside the box) and without. Targets: colour >= 0.9, direction >= 0.7, PSNR >= 30 dB, box colour >= 0.9.
Writes ``<output>/bench_masked-<minutes>min.json``.

    t2v bench masked --minutes 15
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from flows.benchmarks.shapes_bench import main_for, reference_clip, train_and_report
from flows.demo import DEMO_CORPUS, DEMO_FLOW
from pipelines import settings
from pipelines.curation.config import CurateConfig
from pipelines.settings import check
from pipelines.shapes import CorpusConfig
from pipelines.training.config import TrainConfig

WAYS = ("text only", "first frame + text", "inpainting", "inpainting, no guidance")


def _train() -> TrainConfig:
    # box_max 1: the evaluation's box spans the frame along the path, wider than the default training boxes
    rates = {"image_to_video": 0.3, "inpaint": 0.3, "cinemagraph": 0.1, "box_max": 1.0}
    overrides = {"masked": rates, "unet.extra_in_channels": 4}
    return settings.from_dict(
        TrainConfig, settings.merge(DEMO_FLOW["train"], {"steps": 10**6, "model_overrides": overrides})
    )


@dataclass
class MaskedBenchConfig:
    output: str = "runs/bench_masked"
    # training time budget (start-up excluded); the model keeps the given pixels by itself to >= 30 dB from ~15 min
    minutes: float = 15.0
    samples: int = 24  # held-out videos per way of generating
    steps: int = 25  # DDIM steps
    guidance: float = 7.0
    seed: int = 0
    colour_target: float = 0.9  # image-to-video keeps the first frame's colour; the box takes the prompt's
    direction_target: float = 0.7
    psnr_target: float = 30.0  # dB, pixels outside the inpainting box against the input
    margin: int = 1  # pixels around the reference's path in the inpainting box
    corpus: CorpusConfig = field(default_factory=lambda: CorpusConfig(**DEMO_CORPUS))
    curate: CurateConfig = field(default_factory=lambda: settings.from_dict(CurateConfig, DEMO_FLOW["curate"]))
    train: TrainConfig = field(default_factory=_train)

    def __post_init__(self) -> None:
        check(self.minutes > 0, "minutes must be > 0")
        check(self.samples >= 1 and self.steps >= 1, "samples and steps must be >= 1")
        check(self.margin >= 0, "margin must be >= 0 pixels")


# ---------------------------------------------------------------------------------------------------------------
# Scores


def psnr(video: np.ndarray, reference: np.ndarray, keep: np.ndarray | None = None) -> float:
    """PSNR in dB of uint8 [f, h, w, 3] ``video`` against ``reference`` over the pixels where ``keep`` ([h, w] or
    [f, h, w] bool) is set (all pixels when None); inf when they are equal."""
    diff = video.astype(np.float64) - reference.astype(np.float64)  # [f, h, w, 3]
    if keep is not None:
        diff = diff[np.broadcast_to(keep, diff.shape[:3])]
    mse = float(np.mean(diff**2))
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def region_colour(frames: np.ndarray, region: np.ndarray) -> str | None:
    """The palette colour of the foreground inside ``region`` ([h, w] bool) of uint8 [f, h, w, 3] frames, the
    background read from the whole frame's border (``shapes.foreground``); None when the region has no
    foreground."""
    from pipelines.shapes import foreground, nearest_colour

    inside = foreground(frames) & region[None]  # [f, h, w]
    if not inside.any():
        return None
    return nearest_colour(frames[inside].astype(np.float32).mean(axis=0))


def path_box(clip: np.ndarray, margin: int) -> np.ndarray:
    """bool [h, w]: the box around every frame's foreground of a uint8 [f, h, w, 3] clip, ``margin`` pixels wider."""
    from pipelines.shapes import foreground

    seen = foreground(clip).any(axis=0)  # [h, w]
    rows, cols = np.flatnonzero(seen.any(axis=1)), np.flatnonzero(seen.any(axis=0))
    box = np.zeros_like(seen)
    box[
        max(rows[0] - margin, 0) : rows[-1] + margin + 1,
        max(cols[0] - margin, 0) : cols[-1] + margin + 1,
    ] = True
    return box


# ---------------------------------------------------------------------------------------------------------------
# Evaluation


def references(n: int, fps: float, corpus: CorpusConfig, margin: int) -> list[dict[str, Any]]:
    """Held-out combinations as the model sees clips, with the inpainting box and the other colour it is given."""
    from pipelines import shapes

    names = list(shapes.COLOURS)
    out = []
    for colour, shape, direction in (p[1:] for p in shapes.heldout_prompts(n)):
        clip, mp4 = reference_clip(colour, shape, direction, corpus, 0.0, fps)
        other = names[(names.index(colour) + 1) % len(names)]
        out.append(
            {
                "prompt": shapes.caption_for(colour, shape, direction),
                "colour": colour,
                "direction": direction,
                "clip": clip,
                "mp4": mp4,
                "box": path_box(clip, margin),
                "inpaint_prompt": shapes.caption_for(other, shape, direction),
                "inpaint_colour": other,
            }
        )
    return out


def _png(image: np.ndarray, path: Path) -> str:
    from PIL import Image

    Image.fromarray(image).save(path)
    return str(path)


def evaluate(checkpoint: str, cfg: MaskedBenchConfig) -> dict[str, dict[str, float]]:
    """Colour and direction accuracy of text only and image-to-video; PSNR outside the box and the box's colour
    accuracy of inpainting."""
    from flows.masked_inputs import masked_concat
    from model.text_to_video import TextToVideo
    from pipelines import media
    from pipelines.shapes import detect

    model = TextToVideo.from_checkpoint(checkpoint)
    fps = model.config.fps
    refs = references(cfg.samples, fps, cfg.corpus, cfg.margin)
    rows: dict[str, dict[str, float]] = {}

    def gen(prompt: str, i: int, concat, composite: bool = True, guidance: float | None = None) -> np.ndarray:
        g = cfg.guidance if guidance is None else guidance
        return model.generate(
            [prompt], steps=cfg.steps, guidance=g, seed=cfg.seed + i, concat=concat, composite=composite
        )[0]

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        for way in WAYS[:2]:
            found = []
            for i, r in enumerate(refs):
                first = _png(r["clip"][0], d / f"first{i}.png") if way != "text only" else None
                video = gen(r["prompt"], i, masked_concat(model, first, None, None, None))
                found.append(detect(video[1:]))  # the given first frame alone would tell the direction
            rows[way] = {
                "colour_accuracy": float(np.mean([f.colour == r["colour"] for f, r in zip(found, refs)])),
                "direction_accuracy": float(np.mean([f.direction == r["direction"] for f, r in zip(found, refs)])),
            }
        concats = []
        for i, r in enumerate(refs):
            video = d / f"input{i}.mp4"
            video.write_bytes(r["mp4"])
            mask = _png(np.repeat(r["box"][..., None] * np.uint8(255), 3, axis=-1), d / f"mask{i}.png")
            concats.append(masked_concat(model, None, str(video), None, mask))
        for way, guidance in zip(WAYS[2:], (cfg.guidance, 1.0)):
            raw_db, user_db, right = [], [], []
            for i, (r, concat) in enumerate(zip(refs, concats)):
                raw = gen(r["inpaint_prompt"], i, concat, composite=False, guidance=guidance)
                user = media.decode_mp4(media.encode_mp4(gen(r["inpaint_prompt"], i, concat, guidance=guidance), fps))
                raw_db.append(psnr(raw, r["clip"], ~r["box"]))
                user_db.append(psnr(user, r["clip"], ~r["box"]))
                right.append(region_colour(user, r["box"]) == r["inpaint_colour"])
            rows[way] = {
                "psnr_raw_db": float(np.mean(raw_db)),
                "psnr_user_db": float(np.mean(user_db)),
                "box_colour_accuracy": float(np.mean(right)),
            }
    return rows


def render(rows: dict[str, dict[str, float]], cfg: MaskedBenchConfig, steps: int) -> str:
    from flows.compare import markdown_table

    def f(row: dict[str, float], key: str, fmt: str = ".2f") -> str:
        return format(row[key], fmt) if key in row else "-"

    table = [
        [
            "generated from",
            f"colour (target >= {cfg.colour_target:g})",
            f"direction (target >= {cfg.direction_target:g})",
            f"PSNR outside the box, model output (target >= {cfg.psnr_target:g} dB)",
            "PSNR outside the box, pasted back + mp4",
            f"box in the prompt's colour (target >= {cfg.colour_target:g})",
        ]
    ]
    for way, r in rows.items():
        table.append(
            [
                way,
                f(r, "colour_accuracy"),
                f(r, "direction_accuracy"),
                f(r, "psnr_raw_db", ".1f"),
                f(r, "psnr_user_db", ".1f"),
                f(r, "box_colour_accuracy"),
            ]
        )
    intro = (
        f"tiny model with masked conditioning, {steps} steps in {cfg.minutes:g} min; {cfg.samples} held-out videos "
        "per row, prompts with the direction word (inpainting: another colour than the input's); the detector "
        "reads colour and direction, not shape; chance for direction 0.25, for colour 0.25"
    )
    return intro + "\n" + markdown_table(table)


def run(cfg: MaskedBenchConfig) -> dict[str, Any]:
    return train_and_report("masked", cfg, evaluate, render)


def main(argv: list[str] | None = None) -> int:
    return main_for("masked", __doc__, MaskedBenchConfig, run, "held-out videos per way of generating", argv)


if __name__ == "__main__":
    sys.exit(main())
