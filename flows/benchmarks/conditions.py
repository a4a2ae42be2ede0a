"""t2v bench conditions [--minutes 10] [--samples 24] [--output runs/bench_conditions]

Do structure conditions steer generation? Curates the shapes corpus (the main job's recipe, with paths anywhere in
the frame) with motion vectors and edge maps, trains the tiny model with a condition encoder for a time budget
(the real training job: Ray Train + DeepSpeed), then generates held-out combinations from prompts without the
direction word ("a red circle"), three ways: text only, text + the motion vectors of a reference clip, text + the
edge maps of a reference clip whose path runs beside the centre. The detector reads direction (against the
reference's; chance 0.25) and where the shape sits (IoU of its box with the edge map's box, per frame), so the
conditioned figures sit next to the unconditioned ones of the same model, seeds and prompts. Guidance contrasts
prompt + conditions with neither (``guide_conditions``); 30% of the corpus' captions leave the motion out, as real
captions often do, so the model has a reason to read it from the motion vectors. Targets: direction
>= 0.9 with motion, IoU >= 0.5 with the edge map. Writes ``<output>/bench_conditions-<minutes>min.json``.

    t2v bench conditions --minutes 10
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from flows.benchmarks.shapes_bench import main_for, reference_clip, train_and_report
from flows.demo import DEMO_CORPUS, DEMO_FLOW, FRAMES, SIDE
from pipelines import settings
from pipelines.curation.config import CurateConfig
from pipelines.settings import check
from pipelines.shapes import CorpusConfig
from pipelines.training.config import TrainConfig

KINDS = ["motion", "sketch"]
OFFSETS = (-0.6, 0.6)  # reference paths beside the centre line, alternately


def _corpus() -> CorpusConfig:
    # shapes anywhere: position is the sketch's to tell; some captions without the motion: direction is the motion
    # vectors' to tell (with every caption naming it, a prompt without it only ever meant a still image)
    return CorpusConfig(**{**DEMO_CORPUS, "path_offset": 0.8, "motionless_caption_fraction": 0.3})


def _curate() -> CurateConfig:
    return settings.from_dict(CurateConfig, settings.merge(DEMO_FLOW["curate"], {"conditions": {"kinds": KINDS}}))


def _train() -> TrainConfig:
    conditions = {"kinds": KINDS, "hidden": 32, "p_all_zero": 0.1, "p_all_keep": 0.4, "p_each": 0.5}
    overrides = {"unet.extra_in_channels": 8, "unet.conditions": conditions}
    return settings.from_dict(
        TrainConfig, settings.merge(DEMO_FLOW["train"], {"steps": 10**6, "model_overrides": overrides})
    )


@dataclass
class ConditionsBenchConfig:
    output: str = "runs/bench_conditions"
    minutes: float = 10.0  # training time budget (start-up excluded)
    samples: int = 24  # held-out videos per way of generating
    steps: int = 25  # DDIM steps
    guidance: float = 7.0
    guide_conditions: bool = True  # guidance contrasts text + conditions with neither (the sampler's option)
    seed: int = 0
    direction_target: float = 0.9
    iou_target: float = 0.5
    corpus: CorpusConfig = field(default_factory=_corpus)
    curate: CurateConfig = field(default_factory=_curate)
    train: TrainConfig = field(default_factory=_train)

    def __post_init__(self) -> None:
        check(self.minutes > 0, "minutes must be > 0")
        check(self.samples >= 1 and self.steps >= 1, "samples and steps must be >= 1")


def references(n: int, fps: float) -> list[dict[str, Any]]:
    """Held-out combinations as the model sees clips, with the conditions curation would store for them."""
    from pipelines import shapes
    from pipelines.curation.stages.conditions import edge_map, motion_field

    out = []
    for i, (_, colour, shape, direction) in enumerate(shapes.heldout_prompts(n)):
        clip, mp4 = reference_clip(colour, shape, direction, _corpus(), OFFSETS[i % 2], fps)
        out.append(
            {
                "prompt": shapes.caption_for(colour, shape),  # no direction word
                "colour": colour,
                "direction": direction,
                "motion": motion_field(mp4, FRAMES, SIDE, SIDE),
                "sketch": edge_map(clip),
            }
        )
    return out


def evaluate(checkpoint: str, cfg: ConditionsBenchConfig) -> dict[str, dict[str, float]]:
    """Direction accuracy, colour accuracy and sketch IoU of the three ways of generating."""
    import torch

    from model.conditions import normalise
    from model.text_to_video import TextToVideo
    from pipelines.metrics import condition_metrics
    from pipelines.shapes import detect

    model = TextToVideo.from_checkpoint(checkpoint)
    refs = references(cfg.samples, model.config.fps)
    rows = {}
    for way, kinds in (("text only", ()), ("text + motion", ("motion",)), ("text + edge map", ("sketch",))):
        videos = []
        for i, ref in enumerate(refs):
            given = {
                k: normalise(k, torch.from_numpy(ref[k].astype(np.float32))).permute(1, 0, 2, 3)[None] for k in kinds
            }
            video = model.generate(
                [ref["prompt"]],
                steps=cfg.steps,
                guidance=cfg.guidance,
                seed=cfg.seed + i,
                conditions=given or None,
                guide_conditions=cfg.guide_conditions,
            )[0]
            videos.append(video)
        found = [detect(v) for v in videos]
        figures = condition_metrics(videos, [{"motion": r["motion"], "sketch": r["sketch"]} for r in refs])
        rows[way] = {
            "direction_accuracy": float(np.mean([f.direction == r["direction"] for f, r in zip(found, refs)])),
            "colour_accuracy": float(np.mean([f.colour == r["colour"] for f, r in zip(found, refs)])),
            "sketch_iou": figures.get("sketch_iou", 0.0),
        }
    return rows


def render(rows: dict[str, dict[str, float]], cfg: ConditionsBenchConfig, steps: int) -> str:
    from flows.compare import markdown_table

    table = [
        [
            "generated from",
            f"direction (target with motion >= {cfg.direction_target:g})",
            "colour",
            f"edge-map IoU (target with edge map >= {cfg.iou_target:g})",
        ]
    ]
    for way, r in rows.items():
        table.append([way, f"{r['direction_accuracy']:.2f}", f"{r['colour_accuracy']:.2f}", f"{r['sketch_iou']:.2f}"])
    intro = (
        f"tiny model with a motion + edge-map encoder, {steps} steps in {cfg.minutes:g} min; {cfg.samples} held-out "
        "videos per row from prompts without the direction word; chance for direction 0.25"
    )
    return intro + "\n" + markdown_table(table)


def run(cfg: ConditionsBenchConfig) -> dict[str, Any]:
    return train_and_report("conditions", cfg, evaluate, render)


def main(argv: list[str] | None = None) -> int:
    return main_for("conditions", __doc__, ConditionsBenchConfig, run, "held-out videos per way of generating", argv)


if __name__ == "__main__":
    sys.exit(main())
