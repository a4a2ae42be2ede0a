"""Evaluation during training: every N steps and/or minutes, the EMA weights generate videos for a fixed prompt set
with fixed seeds, and their metrics become step metrics of the training run (``val/<metric>``).

    t2v train ... --set periodic_eval.every_steps=200 --set periodic_eval.max_share=0.2

Measured with ``pipelines/metrics.py``, as ``t2v evaluate`` measures: shapes accuracy (colour, direction, both)
when the prompts are the labelled ``shapes`` set, CLIPSIM and frame consistency with ``clip_model``, FVD when a
feature network and reference videos are given. Each evaluation also logs a contact sheet of its videos
(``val/contact_sheet/step_XXXXXX.png``), its cost (``val/time_s``) and the minutes spent training so far without
evaluations (``val/train_minutes``, the time axis of ``t2v compare``). Evaluations take at most ``max_share`` of
the wall time: one that falls due beyond it is skipped (and said so); evaluation time does not count against
``time_limit_minutes``. The post-training evaluation of ``t2v evaluate`` logs ``eval/<metric>`` instead, with its
own settings, so the two curves are never mixed.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.settings import check

log = logging.getLogger("t2v.train")

PREFIX = "val/"


@dataclass
class PeriodicEvalConfig:
    """The ``periodic_eval`` section of ``t2v train``: off unless ``every_steps`` or ``every_minutes`` is set."""

    every_steps: int = 0  # evaluate every N optimizer steps (0: not by steps)
    every_minutes: float = 0.0  # evaluate when N minutes passed since the last one (0: not by time)
    final: bool = True  # also evaluate the last step, so every curve ends at the exported weights
    prompts: str = "shapes"  # "shapes" (held-out shapes prompts, labelled: adds accuracy) or a prompt file
    num_prompts: int = 8  # videos per evaluation (the shapes set is cycled to this many)
    seed: int = 0  # the same noise every evaluation: curves move only with the weights
    sample_steps: int = 10  # DDIM steps
    guidance: float = 4.0
    batch_size: int = 16
    clip_model: str = "t2v-tiny-clip"  # open_clip name for CLIPSIM / frame consistency; "" skips them
    clip_pretrained: str | None = None  # local open_clip weights; None: random weights (figures only compare runs)
    fvd_network: str | None = None  # local TorchScript video network; with fvd_reference adds FVD
    fvd_reference: str | None = None  # real videos: manifest.csv, a folder, or a list file
    fvd_size: int | None = 224
    max_reference: int = 64
    max_share: float = 0.2  # evaluations may take at most this share of the wall time so far
    sheet_videos: int = 8  # rows of each contact sheet

    def __post_init__(self) -> None:
        check(self.every_steps >= 0, "periodic_eval.every_steps must be >= 0 (0: not by steps)")
        check(self.every_minutes >= 0, "periodic_eval.every_minutes must be >= 0 (0: not by time)")
        check(self.num_prompts >= 1, "periodic_eval.num_prompts must be >= 1")
        check(self.sample_steps >= 1 and self.batch_size >= 1, "periodic_eval.sample_steps and batch_size must be >= 1")
        check(
            0 < self.max_share <= 1,
            f"periodic_eval.max_share={self.max_share}: must be within (0, 1], the share of wall time evaluations "
            "may take",
        )
        check(self.sheet_videos >= 0, "periodic_eval.sheet_videos must be >= 0 (0: no contact sheet)")
        check(bool(self.prompts), "periodic_eval.prompts is empty: use 'shapes' or a file with one prompt per line")
        check(
            self.prompts == "shapes" or Path(self.prompts).is_file(),
            f"periodic_eval.prompts={self.prompts!r}: not 'shapes' and no such file (one prompt per line)",
        )
        check(
            (self.fvd_network is None) == (self.fvd_reference is None),
            "periodic_eval: FVD needs both fvd_network (a TorchScript file) and fvd_reference (real videos)",
        )

    @property
    def enabled(self) -> bool:
        return self.every_steps > 0 or self.every_minutes > 0


class PeriodicEvaluator:
    """Decides when an evaluation is due (rank 0 decides, every rank learns it: gathering ZeRO-3 weights is
    collective) and runs it on rank 0 with the exporter's copy of the model."""

    def __init__(self, cfg: PeriodicEvalConfig, rank: int, world_size: int, tracker: Any):
        self.cfg, self.rank, self.world_size, self.tracker = cfg, rank, world_size, tracker
        self.spent = 0.0  # seconds of evaluation since start()
        self.t0 = self.last = time.perf_counter()
        self.skipped = 0
        self._setup: dict[str, Any] | None = None

    def start(self) -> None:
        self.t0 = self.last = time.perf_counter()

    def due(self, step: int, last: bool) -> bool:
        if not self.cfg.enabled:
            return False
        want = False
        if self.rank == 0:
            now = time.perf_counter()
            by_steps = self.cfg.every_steps > 0 and step % self.cfg.every_steps == 0
            by_time = self.cfg.every_minutes > 0 and now - self.last >= self.cfg.every_minutes * 60
            want = by_steps or by_time or (last and self.cfg.final)
            if want and not last and self.spent > self.cfg.max_share * (now - self.t0):
                self.skipped += 1
                log.info(
                    "evaluation at step %d skipped: evaluations took %.0fs of %.0fs, over max_share %.0f%%",
                    step,
                    self.spent,
                    now - self.t0,
                    100 * self.cfg.max_share,
                )
                want = False
                self.last = now  # a timed evaluation comes due again one interval later, not at every step
        return bool(_from_rank0(float(want), self.world_size))

    def run(self, exporter, step: int) -> float:
        """Evaluate the EMA weights at ``step``; returns its seconds (on every rank, to keep time limits equal)."""
        t0 = time.perf_counter()
        state = exporter.gather(ema=True)  # collective under ZeRO-3
        if self.rank == 0:
            exporter.model.unet.load_state_dict(state)
            self._evaluate(exporter.model, step, t0)
        seconds = time.perf_counter() - t0
        self.last = time.perf_counter()
        return _from_rank0(seconds, self.world_size)

    # -- rank 0 ------------------------------------------------------------------------------------------------

    def _prepare(self, model) -> dict[str, Any]:
        """Prompts, CLIP and FVD reference features, made once (the first evaluation pays for them)."""
        if self._setup is not None:
            return self._setup
        from pipelines import metrics

        prompts, labels = metrics.prompt_set(self.cfg.prompts, 0)
        n = self.cfg.num_prompts
        setup: dict[str, Any] = {
            "prompts": [prompts[i % len(prompts)] for i in range(n)],
            "labels": None if labels is None else [labels[i % len(labels)] for i in range(n)],
            "scorer": None,
            "fvd": None,
        }
        if self.cfg.clip_model:
            setup["scorer"] = metrics.load_clip_scorer(self.cfg.clip_model, self.cfg.clip_pretrained, 0, model.device)
        if self.cfg.fvd_network:
            net = metrics.VideoFeatureNet(self.cfg.fvd_network, size=self.cfg.fvd_size, device=model.device)
            mc = model.config
            real = metrics.read_reference(
                metrics.reference_videos(self.cfg.fvd_reference, self.cfg.max_reference),
                mc.num_frames,
                mc.height,
                mc.width,
                float(mc.fps),
            )
            setup["fvd"] = (net, net(real, self.cfg.batch_size))
        self._setup = setup
        return setup

    def _evaluate(self, model, step: int, t0: float) -> None:
        import numpy as np
        import torch

        from pipelines import metrics, pictures

        setup = self._prepare(model)
        prompts = setup["prompts"]
        videos: list[np.ndarray] = []
        with torch.inference_mode():
            for b in range(0, len(prompts), self.cfg.batch_size):
                videos += list(
                    model.generate(
                        prompts[b : b + self.cfg.batch_size],
                        steps=self.cfg.sample_steps,
                        guidance=self.cfg.guidance,
                        seed=self.cfg.seed + b,
                    )
                )
        found: dict[str, float] = {}
        if setup["labels"] is not None:
            found.update(metrics.shapes_metrics(videos, setup["labels"]))
        if setup["scorer"] is not None:
            found.update(metrics.clip_metrics(setup["scorer"], videos, prompts))
        if setup["fvd"] is not None:
            net, real = setup["fvd"]
            found["fvd"] = metrics.fvd_from_features(real, net(np.stack(videos), self.cfg.batch_size))
        if self.cfg.sheet_videos:
            with tempfile.TemporaryDirectory() as d:
                k = self.cfg.sheet_videos
                sheet = pictures.contact_sheet(videos[:k], prompts[:k], Path(d) / f"step_{step:06d}.png")
                self.tracker.log_artifact(sheet, f"{PREFIX}contact_sheet")
        seconds = time.perf_counter() - t0
        self.spent += seconds
        wall = time.perf_counter() - self.t0
        share = self.spent / max(wall, 1e-9)
        self.tracker.log_metrics(
            {
                **{PREFIX + k: v for k, v in found.items()},
                PREFIX + "time_s": seconds,
                PREFIX + "share": share,
                PREFIX + "train_minutes": (wall - self.spent) / 60,
            },
            step,
        )
        log.info(
            "evaluation at step %d: %s; took %.1fs (evaluations %.0f%% of the wall time, bounded at %.0f%%)",
            step,
            ", ".join(f"{k} {v:.3f}" for k, v in found.items()),
            seconds,
            100 * share,
            100 * self.cfg.max_share,
        )


def _from_rank0(value: float, world_size: int) -> float:
    """Rank 0's ``value`` on every rank."""
    if world_size == 1:
        return value
    import torch
    import torch.distributed as dist

    device = "cuda" if dist.get_backend() == "nccl" else "cpu"  # NCCL moves only GPU tensors
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(t, src=0)
    return float(t.item())
