"""Comparing experiments in MLflow, against real stores: evaluation during training as step metrics of the run, the
facts a fair comparison needs on every training run, and ``t2v sweep`` as a parent run with a child per variant."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from pipelines import tracking
from pipelines.training.periodic_eval import PeriodicEvalConfig, PeriodicEvaluator

pytestmark = pytest.mark.slow


@pytest.fixture
def exporter(small_model):
    """What the evaluator uses of training's Exporter: gathered EMA weights and a model to load them into."""
    from model.registry import get_config
    from model.text_to_video import TextToVideo

    torch.manual_seed(0)
    model = TextToVideo.build(get_config("tiny", small_model))
    return SimpleNamespace(model=model, gather=lambda ema: model.unet.state_dict())


def test_evaluation_logs_step_metrics_and_a_contact_sheet(exporter, shapes_corpus, mlflow_uri, fvd_network):
    tracker = tracking.MlflowTracker(mlflow_uri, "test-periodic")
    cfg = PeriodicEvalConfig(
        every_steps=2,
        num_prompts=3,
        sample_steps=2,
        sheet_videos=2,
        max_share=1.0,
        fvd_network=str(fvd_network),
        fvd_reference=str(shapes_corpus),
        fvd_size=16,
    )
    evaluator = PeriodicEvaluator(cfg, rank=0, world_size=1, tracker=tracker)
    evaluator.start()
    assert not evaluator.due(1, last=False)
    assert evaluator.due(2, last=False)
    seconds = evaluator.run(exporter, 2)
    assert evaluator.due(3, last=True)  # the final step is always scored
    evaluator.run(exporter, 3)

    run = tracker.client.get_run(tracker.run_id)
    expected = {"colour_accuracy", "direction_accuracy", "shapes_accuracy", "clipsim", "frame_consistency", "fvd"}
    expected |= {"time_s", "share", "train_minutes"}
    assert {f"val/{k}" for k in expected} <= set(run.data.metrics)
    steps = [m.step for m in tracker.client.get_metric_history(tracker.run_id, "val/colour_accuracy")]
    assert steps == [2, 3]
    assert 0 <= run.data.metrics["val/colour_accuracy"] <= 1
    assert seconds > 0 and run.data.metrics["val/time_s"] > 0
    sheets = [a.path for a in tracker.client.list_artifacts(tracker.run_id, "val/contact_sheet")]
    assert sheets == ["val/contact_sheet/step_000002.png", "val/contact_sheet/step_000003.png"]


def test_sweep_is_a_parent_run_with_a_child_per_variant(ray_session, shards, small_model, mlflow_uri, tmp_path, capsys):
    """A sweep over the worker count (1 and 2: with 2, rank 0 decides when to evaluate and the other rank follows),
    2 steps each, evaluated every step: each child has its evaluation curve and the facts a comparison needs, the
    parent the comparison."""
    import json

    from mlflow import MlflowClient

    from flows import sweep

    sets = {
        "model": "tiny",
        "model_overrides": small_model,
        "steps": 2,
        "image_batch_size": 2,
        "video_batch_size": 2,
        "warmup_steps": 1,
        "checkpoint_every": 2,
        "log_model": False,
        "periodic_eval": {"every_steps": 1, "num_prompts": 2, "sample_steps": 1, "sheet_videos": 2, "max_share": 1.0},
        "mlflow": {"tracking_uri": mlflow_uri, "experiment": "sweep-test", "system_metrics_s": 0},
    }
    argv = ["--data", str(shards), "--output", str(tmp_path / "sweep"), "--set", "num_workers=[1,2]"]
    argv += [a for k, v in sets.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    assert sweep.main(argv) == 0
    printed = capsys.readouterr().out
    assert "| train.num_workers" in printed and "val/shapes_accuracy" in printed

    client = MlflowClient(mlflow_uri)
    parent_id = json.loads((tmp_path / "sweep" / sweep.PARENT_FILE).read_text())["run_id"]
    parent = client.get_run(parent_id)
    assert parent.data.tags["t2v.kind"] == "parent" and parent.info.status == "FINISHED"
    names = {a.path for a in client.list_artifacts(parent_id, "comparison")}
    assert {"comparison/comparison.md", "comparison/val_colour_accuracy-step.png"} <= names
    assert "comparison/val_colour_accuracy-minutes.png" in names

    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    assert sorted(c.info.run_name for c in children) == ["num_workers=1", "num_workers=2"]
    for child in children:
        run_id = child.info.run_id
        assert [m.step for m in client.get_metric_history(run_id, "val/shapes_accuracy")] == [1, 2]
        assert {"val/clipsim", "val/frame_consistency", "val/time_s", "val/train_minutes"} <= set(child.data.metrics)
        sheets = [a.path for a in client.list_artifacts(run_id, "val/contact_sheet")]
        assert sheets == ["val/contact_sheet/step_000001.png", "val/contact_sheet/step_000002.png"]

    tags = next(c for c in children if c.info.run_name == "num_workers=2").data.tags
    assert len(tags["mlflow.source.git.commit"]) == 40
    assert tags["t2v.model_config"] == "tiny" and tags["t2v.workers"] == "2"
    assert tags["t2v.device"].startswith("CPU") and tags["t2v.device_count"] == "2"
    assert len(tags["t2v.data_digest"]) == 16 and "video_text" in tags["t2v.data_digests"]
    assert float(tags["t2v.throughput_samples_per_s"]) > 0 and float(tags["t2v.tflops_per_device"]) > 0
    assert "t2v.mfu" not in tags  # no peak is known for a CPU
