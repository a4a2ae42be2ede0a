"""The re-training flow and its registry logic.

- registry: register / aliases / promotion decisions against a real MLflow SQLite store, with a small pyfunc model;
- the flow: one cycle in-process under Prefect's test harness on tiny settings (curate -> train -> evaluate ->
  register @challenger -> promote @champion), then the champion loads with
  ``mlflow.pyfunc.load_model("models:/<name>@champion")`` and generates a video; a second cycle on new data
  resumes from the records, trains from the champion and decides on promotion.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from flows import registry

# ---------------------------------------------------------------------------------------------------------------
# Registry against a real SQLite store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    import mlflow
    from mlflow import MlflowClient

    tmp_path = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("registry-test", artifact_location=(tmp_path / "artifacts").as_uri())

    class Constant(mlflow.pyfunc.PythonModel):
        def load_context(self, context):
            self.value = float(Path(context.artifacts["value"]).read_text())

        def predict(self, context, model_input, params=None):
            return [self.value] * len(model_input)

    def log_model(value: float) -> tuple[str, str]:
        """One training run that logs a pyfunc model; returns (run_id, model_uri)."""
        from pipelines.tracking import tracking_uri_set

        run = client.create_run(exp)
        weights = tmp_path / f"value_{value}.txt"
        weights.write_text(str(value))
        with tracking_uri_set(uri):
            with mlflow.start_run(run_id=run.info.run_id):
                info = mlflow.pyfunc.log_model(
                    name="model", python_model=Constant(), pip_requirements=[], artifacts={"value": str(weights)}
                )  # no slow inference
        client.set_terminated(run.info.run_id)
        return run.info.run_id, info.model_uri

    # logged once for the module (logging a pyfunc model takes seconds); each test registers its own name
    models = [log_model(float(v)) for v in (1, 2, 3)]
    return uri, client, models


def test_register_is_idempotent_and_aliases_point_at_versions(store):
    uri, client, models = store
    (run_id, model_uri), (run2, uri2) = models[0], models[1]
    assert registry.get_alias(client, "m", registry.CHAMPION) is None  # no model yet: None, not an error
    mv = registry.register(client, "m", model_uri, run_id, tags={"t2v.cycle": "0001"})
    again = registry.register(client, "m", model_uri, run_id)
    assert again.version == mv.version and again.tags["t2v.cycle"] == "0001"
    assert len(client.search_model_versions("name='m'")) == 1
    registry.set_alias(client, "m", registry.CHALLENGER, mv.version)
    assert registry.get_alias(client, "m", registry.CHALLENGER).version == mv.version
    assert registry.get_alias(client, "m", registry.CHAMPION) is None
    # a runs:/ URI of a run resolves to the model it logged
    mv2 = registry.register(client, "m", f"runs:/{run2}/model", run2)
    assert mv2.version != mv.version and mv2.source == uri2


def test_promotion_gate_and_champion_loads_by_alias(store):
    import mlflow

    uri, client, models = store
    first = registry.register(client, "p", models[0][1], models[0][0])
    registry.record_evaluation(client, "p", first.version, {"shapes_accuracy": 0.25, "fvd": 900.0}, "sig-a")
    decision = registry.decide("shapes_accuracy", {"shapes_accuracy": 0.25}, None)
    assert decision.promote and "first model" in decision.reason
    registry.apply_decision(client, "p", first.version, decision)

    second = registry.register(client, "p", models[1][1], models[1][0])
    champion = client.get_model_version_by_alias("p", registry.CHAMPION)
    assert registry.recorded_evaluation(champion, "sig-other") is None  # other settings: not comparable
    recorded = registry.recorded_evaluation(champion, "sig-a")
    assert recorded == {"shapes_accuracy": 0.25, "fvd": 900.0}

    worse = registry.decide("shapes_accuracy", {"shapes_accuracy": 0.20}, recorded, champion_version=first.version)
    assert not worse.promote and "does not beat" in worse.reason
    registry.apply_decision(client, "p", second.version, worse)
    assert client.get_model_version_by_alias("p", registry.CHAMPION).version == first.version
    assert client.get_model_version("p", second.version).tags["promotion"] == "rejected"

    better = registry.decide("fvd", {"fvd": 700.0}, recorded)  # FVD: lower wins
    assert better.promote
    registry.apply_decision(client, "p", second.version, better)
    assert client.get_model_version_by_alias("p", registry.CHAMPION).version == second.version

    from pipelines.tracking import tracking_uri_set

    with tracking_uri_set(uri):
        model = mlflow.pyfunc.load_model("models:/p@champion")
    assert model.predict(pd.DataFrame({"prompt": ["a", "b"]})) == [2.0, 2.0]

    with pytest.raises(ValueError, match="has no 'clipsim'"):
        registry.decide("clipsim", {"fvd": 1.0}, None)


def test_download_checkpoint_says_what_is_missing(store, tmp_path):
    uri, client, models = store
    model_uri = models[2][1]
    with pytest.raises(FileNotFoundError, match="no t2v-platform checkpoint"):
        registry.download_checkpoint(model_uri, tmp_path / "dl", uri)


# ---------------------------------------------------------------------------------------------------------------
# The flow, in-process, under Prefect's test harness


def _tiny_flow_settings(tmp_path: Path, manifest: Path) -> dict:
    return {
        "input": str(manifest),
        "state_dir": str(tmp_path / "flow"),
        "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "t2v-test"},
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
    tmp_path, shapes_corpus, monkeypatch, request
):
    import mlflow
    import ray
    from prefect.testing.utilities import prefect_test_harness

    from flows import retrain
    from pipelines import pyfunc, settings, shapes
    from pipelines.tracking import tracking_uri_set

    given = _tiny_flow_settings(tmp_path, shapes_corpus)
    cfg = settings.from_dict(retrain.RetrainConfig, given)
    uri = given["mlflow"]["tracking_uri"]
    # One local Ray for every cycle of this test (the steps use a running Ray instead of starting their own).
    ray.init(num_cpus=2, include_dashboard=False)
    request.addfinalizer(ray.shutdown)
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


def test_schedule_serves_the_flow_with_its_config(tmp_path, shapes_corpus, capsys):
    from flows import retrain
    from pipelines import settings

    cfg = settings.from_dict(
        retrain.RetrainConfig, {**_tiny_flow_settings(tmp_path, shapes_corpus), "cron": "*/30 * * * *"}
    )
    dep = retrain.deployment(cfg)
    assert dep.name == "t2v-retrain" and dep.schedules[0].schedule.cron == "*/30 * * * *"
    assert settings.from_dict(retrain.RetrainConfig, dep.parameters["config"]) == cfg
    assert retrain.main(["serve", "--input", str(shapes_corpus), "--cron", "0 4 * * 1", "--dry-run"]) == 0
    assert "cron: 0 4 * * 1" in capsys.readouterr().out
    with pytest.raises(Exception, match="five cron fields"):
        settings.from_dict(retrain.RetrainConfig, {"cron": "daily"})


def test_bench_dispatches_by_name(capsys):
    from flows import benchmarks as bench

    assert bench.main([]) == 0 and "curate" in capsys.readouterr().out
    assert bench.main(["nope"]) == 2 and "unknown benchmark 'nope'" in capsys.readouterr().err
    assert set(bench.BENCHMARKS) == {"model", "curate", "train", "learn"}
