"""The re-training flow, one cycle in-process under Prefect's test harness on tiny settings (curate -> train ->
evaluate -> register @challenger -> promote @champion); then the champion loads with
``mlflow.pyfunc.load_model("models:/<name>@champion")`` and generates a video; a second cycle on new data resumes from
the records, trains from the champion and decides on promotion. And the flow's schedule: its deployment carries the
config and the cron (importing Prefect alone takes seconds, too slow for the unit tier)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest


@pytest.fixture
def tiny_flow_settings(shapes_corpus, mlflow_uri, tmp_path) -> dict:
    """Re-training flow settings (as a dict) for one quick cycle on the shapes corpus: tiny clips, 2 training steps,
    2 prompts of evaluation; state and MLflow store in the test's temp dir."""
    return {
        "input": str(shapes_corpus),
        "state_dir": str(tmp_path / "flow"),
        "mlflow": {"tracking_uri": mlflow_uri, "experiment": "t2v-test"},
        "model_name": "t2v-test",
        "metric": "colour_accuracy",
        "retries": 1,
        "retry_delay_s": 0.0,
        "curate": {
            "clips": {"width": 32, "height": 32, "num_frames": 8, "fps": 8.0},
            "quality": {"min_side": 32},
            "num_cpus": 2,
            "progress": False,
        },
        "train": {
            "model": "tiny",
            "steps": 2,
            "image_batch_size": 2,
            "video_batch_size": 1,
            "warmup_steps": 1,
            "checkpoint_every": 2,
            "sample_every": 0,
            "mlflow": {"system_metrics_s": 0.0},
        },
        "evaluate": {"num_prompts": 2, "steps": 2, "clip_model": "t2v-tiny-clip", "num_samples": 1, "batch_size": 2},
    }


@pytest.mark.slow
def test_flow_runs_once_in_process_then_champion_generates_and_cycles_resume(
    ray_session, tiny_flow_settings, mlflow_uri, tmp_path, monkeypatch
):
    import mlflow
    from prefect.testing.utilities import prefect_test_harness

    from flows import retrain
    from pipelines import pyfunc, settings, shapes
    from pipelines.tracking import tracking_uri_set

    given = tiny_flow_settings
    cfg = settings.from_dict(retrain.RetrainConfig, given)
    uri = given["mlflow"]["tracking_uri"]
    # the steps use the session's Ray instead of starting their own, and leave it running
    with prefect_test_harness(server_startup_timeout=120):
        flow = retrain.retrain_flow()
        first = flow(settings.to_dict(cfg))
        assert first["status"] == "done" and first["cycle"] == "0001"
        assert first["decision"]["promote"] and "first model" in first["decision"]["reason"]
        assert first["registered"]["version"] == "1" and first["train"]["init_from"] is None

        # The same input again: the ledger has everything, so the cycle stops after curation.
        again = flow(settings.to_dict(cfg))
        assert again["status"] == "no-new-data" and again["cycle"] == "0002"

        # New data; training fails once (a transient error) and the task retry finishes the cycle from the champion.
        more = shapes.generate(
            shapes.CorpusConfig(num_videos=4, num_images=2, width=32, height=32, fps=12, seconds=2.0, seed=11),
            tmp_path / "more",
            progress=False,
        )
        from pipelines.training import job as train_mod

        real_run, calls = train_mod.run, []

        def flaky_run(train_cfg):
            calls.append(train_cfg.init_from)
            if len(calls) == 1:
                raise RuntimeError("simulated transient failure")
            return real_run(train_cfg)

        monkeypatch.setattr(train_mod, "run", flaky_run)
        cfg2 = settings.from_dict(retrain.RetrainConfig, {**given, "input": str(more)})
        second = flow(settings.to_dict(cfg2))
    assert len(calls) == 2 and calls[1] == second["champion_before"]["checkpoint"]
    assert second["status"] == "done" and second["curate"]["new_since_last_training"] == 6
    assert second["registered"]["version"] == "2"
    decision = second["decision"]
    assert decision["champion_version"] == "1" and "champion" in decision["reason"]

    from mlflow import MlflowClient

    client = MlflowClient(uri)
    champion = client.get_model_version_by_alias("t2v-test", "champion")
    assert str(client.get_model_version_by_alias("t2v-test", "challenger").version) == "2"
    assert str(champion.version) == ("2" if decision["promote"] else "1")
    assert client.get_model_version("t2v-test", "2").tags["promotion"] == (
        "promoted" if decision["promote"] else "rejected"
    )
    # the evaluation went into the training run, samples included
    run = client.get_run(second["train"]["run_id"])
    assert "eval/colour_accuracy" in run.data.metrics and "eval/clipsim" in run.data.metrics
    assert Path(second["evaluation"]["samples"][0]).is_file()

    # A re-run after an interruption resumes: only the missing step runs again.
    cycle = Path(second["cycle_dir"])
    (cycle / retrain.DONE_FILE).unlink()
    (cycle / "promote.json").unlink()
    monkeypatch.setattr(train_mod, "run", lambda c: pytest.fail("a finished step ran again"))
    resumed = retrain.run_cycle(cfg2)
    assert resumed["cycle"] == second["cycle"] and resumed["decision"]["promote"] == decision["promote"]

    # The champion serves: load it by alias and generate a video from a prompt.
    with tracking_uri_set(uri):
        model = mlflow.pyfunc.load_model("models:/t2v-test@champion")
    out = model.predict(pd.DataFrame({"prompt": ["a red circle moving left"]}), params={"steps": 2, "seed": 0})
    video = pyfunc.frames_from_predictions(out)[0]
    assert video.dtype == np.uint8 and video.shape == (8, 32, 32, 3)
    assert len(out["mp4_base64"][0]) > 100


def test_schedule_serves_the_flow_with_its_config(tiny_flow_settings, shapes_corpus, capsys):
    from flows import retrain
    from pipelines import settings

    cfg = settings.from_dict(retrain.RetrainConfig, {**tiny_flow_settings, "cron": "*/30 * * * *"})
    dep = retrain.deployment(cfg)
    assert dep.name == "t2v-retrain" and dep.schedules[0].schedule.cron == "*/30 * * * *"
    assert settings.from_dict(retrain.RetrainConfig, dep.parameters["config"]) == cfg
    assert dep.concurrency_limit == 1  # a scheduled run waits for the one still running
    assert retrain.main(["serve", "--input", str(shapes_corpus), "--cron", "0 4 * * 1", "--dry-run"]) == 0
    assert "cron: 0 4 * * 1" in capsys.readouterr().out
    with pytest.raises(Exception, match="five cron fields"):
        settings.from_dict(retrain.RetrainConfig, {"cron": "daily"})
