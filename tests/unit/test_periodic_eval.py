"""Evaluation during training without Ray: the evaluator keeps to its share of the wall time, and its settings are
checked (what it logs into a real MLflow run: tests/integration/test_experiments.py)."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch

from pipelines import settings, tracking
from pipelines.settings import ConfigError
from pipelines.training.config import TrainConfig
from pipelines.training.periodic_eval import PeriodicEvalConfig, PeriodicEvaluator


@pytest.fixture
def exporter(small_model):
    """What the evaluator uses of training's Exporter: gathered EMA weights and a model to load them into."""
    from model.registry import get_config
    from model.text_to_video import TextToVideo

    torch.manual_seed(0)
    model = TextToVideo.build(get_config("tiny", small_model))
    return SimpleNamespace(model=model, gather=lambda ema: model.unet.state_dict())


def test_an_evaluation_beyond_its_share_of_the_wall_time_is_skipped(exporter, caplog):
    cfg = PeriodicEvalConfig(every_steps=1, num_prompts=1, sample_steps=1, clip_model="", max_share=0.1)
    evaluator = PeriodicEvaluator(cfg, rank=0, world_size=1, tracker=tracking.NullTracker())
    evaluator.start()
    evaluator.run(exporter, 1)  # every second so far went into this evaluation
    with caplog.at_level("INFO", logger="t2v.train"):
        assert not evaluator.due(2, last=False)
    assert evaluator.skipped == 1 and "over max_share 10%" in caplog.text
    evaluator.t0 = time.perf_counter() - 100 * evaluator.spent  # much training later: within the share again
    assert evaluator.due(3, last=False)


def test_a_skipped_timed_evaluation_comes_due_again_one_interval_later(caplog):
    cfg = PeriodicEvalConfig(every_minutes=1, num_prompts=1, sample_steps=1, clip_model="", max_share=0.1)
    evaluator = PeriodicEvaluator(cfg, rank=0, world_size=1, tracker=tracking.NullTracker())
    evaluator.start()
    evaluator.t0 -= 120  # two minutes in, one of them evaluating: over the share
    evaluator.last -= 61
    evaluator.spent = 60
    with caplog.at_level("INFO", logger="t2v.train"):
        assert [evaluator.due(step, last=False) for step in range(5, 10)] == [False] * 5
    assert evaluator.skipped == 1 and caplog.text.count("skipped") == 1  # said once, not at every step
    evaluator.last -= 61
    evaluator.t0 -= 6000  # much training later: within the share, and the interval has passed
    assert evaluator.due(10, last=False)


def test_settings_are_checked_and_off_by_default():
    assert not TrainConfig().periodic_eval.enabled
    cfg = settings.load(TrainConfig, overrides=["periodic_eval.every_minutes=5"])
    assert cfg.periodic_eval.enabled and cfg.periodic_eval.every_minutes == 5
    for bad, words in (
        ("periodic_eval.max_share=0", "max_share"),
        ("periodic_eval.prompts=/no/such/prompts.txt", "no such file"),
        ("periodic_eval.fvd_network=i3d.pt", "fvd_reference"),
        ("periodic_eval.every_steps=-1", "every_steps"),
    ):
        with pytest.raises(ConfigError, match=words):
            settings.load(TrainConfig, overrides=[bad])
