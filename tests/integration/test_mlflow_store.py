"""MLflow tracking and the pyfunc generation model, read back from a real SQLite tracking store
(tests/unit/test_tracking.py checks what needs no store)."""

from __future__ import annotations

import importlib
import logging
import warnings

import numpy as np
import pandas as pd
import pytest

from pipelines import media, pyfunc, settings, tracking


def test_params_metrics_tags_and_artifacts_read_back(mlflow_uri, tmp_path):
    from mlflow import MlflowClient

    t = tracking.MlflowTracker(mlflow_uri, "exp-a", run_name="r1", tags={"team": "video", "api_token": "s3cret"})
    t.log_params({"train": {"lr": 1e-4, "mlflow": {"password": "hunter2"}}, "steps": 10})
    t.log_params({"steps": 20, "new_key": "x"})  # a resumed run with a changed value
    for step in (1, 2, 3):
        t.log_metrics({"loss": 1.0 / step, "lr": 0.1, "skipped": float("nan")}, step)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("hello")
    t.log_artifact(tmp_path / "d" / "a.txt", "files")
    t.log_artifact(tmp_path / "d", "folder")
    t.log_text("some text", "notes/n.txt")
    t.finish()

    client = MlflowClient(mlflow_uri)
    run = client.get_run(t.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.lr"] == "0.0001"
    assert run.data.params["train.mlflow.password"] == settings.REDACTED
    assert run.data.params["steps"] == "10" and run.data.tags["changed_param.steps"] == "20"
    assert run.data.params["new_key"] == "x"
    assert run.data.tags["team"] == "video" and run.data.tags["api_token"] == settings.REDACTED
    everything = str(run.data.params) + str(run.data.tags)
    assert "s3cret" not in everything and "hunter2" not in everything
    history = client.get_metric_history(t.run_id, "loss")
    assert [(m.step, round(m.value, 3)) for m in history] == [(1, 1.0), (2, 0.5), (3, 0.333)]
    assert "skipped" not in run.data.metrics
    names = {a.path for a in client.list_artifacts(t.run_id)}
    assert {"files", "folder", "notes"} <= names
    assert client.list_artifacts(t.run_id, "folder")[0].path == "folder/a.txt"

    again = tracking.MlflowTracker(mlflow_uri, "exp-a", run_id=t.run_id)  # continue the same run (resume)
    assert client.get_run(t.run_id).info.status == "RUNNING"
    again.log_metrics({"loss": 0.25}, 4)
    again.finish("KILLED")
    assert client.get_run(t.run_id).info.status == "KILLED"
    assert len(client.get_metric_history(t.run_id, "loss")) == 4


def test_datasets_are_logged_as_run_inputs(mlflow_uri):
    from mlflow import MlflowClient

    t = tracking.MlflowTracker(mlflow_uri, "exp-b")
    df = pd.DataFrame({"key": ["a", "b"], "kind": ["image", "image"]})
    t.log_dataset(df, name="curated/image", source="/data/curated/shards/image", digest="abc123")
    t.finish()
    inputs = MlflowClient(mlflow_uri).get_run(t.run_id).inputs.dataset_inputs
    assert [(i.dataset.name, i.dataset.digest) for i in inputs] == [("curated/image", "abc123")]
    assert '"num_rows": 2' in inputs[0].dataset.profile
    assert inputs[0].tags[0].value == "training"


def test_pyfunc_generation_model_prompt_in_video_out(mlflow_uri, small_model, tmp_path, caplog):
    import mlflow
    import torch

    from model.registry import get_config
    from model.text_to_video import TextToVideo

    torch.manual_seed(0)
    ckpt = TextToVideo.build(get_config("tiny", small_model)).save(tmp_path / "model.pt", step=3)
    t = tracking.MlflowTracker(mlflow_uri, "exp-c")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        importlib.reload(pyfunc)  # defining the model class is where MLflow checks predict's type hints
        uri = pyfunc.log_generation_model(
            ckpt, run_id=t.run_id, tracking_uri=mlflow_uri, defaults={"steps": 2, "fps": 4.0}
        )
    t.finish()
    # logging is quiet: a typed predict, models from code (no pickled object), the signature instead of an example
    assert [str(w.message) for w in caught if "mlflow" in w.filename] == []
    assert not [r for r in caplog.records if r.name.startswith("mlflow") and r.levelno >= logging.WARNING]
    assert uri.startswith("models:/")
    with tracking.tracking_uri_set(mlflow_uri):
        model = mlflow.pyfunc.load_model(uri)
        assert model.metadata.get_params_schema().to_dict()[0]["name"] == "steps"
        out = model.predict(pd.DataFrame({"prompt": ["a red circle moving left", "a blue square"]}), params={"seed": 1})
        again = model.predict({"prompt": "a red circle moving left"}, params={"seed": 1})
    assert list(out.columns) == list(pyfunc.OUTPUT_COLUMNS)
    videos = pyfunc.frames_from_predictions(out)
    assert [v.shape for v in videos] == [(4, 16, 16, 3)] * 2 and videos[0].dtype == np.uint8
    np.testing.assert_array_equal(pyfunc.frames_from_predictions(again)[0], videos[0])  # same seed, same video
    assert out["fps"].tolist() == [4.0, 4.0]
    paths = pyfunc.write_predictions(out, tmp_path / "videos")
    assert media.decode_video_file(paths[0]).shape == (4, 16, 16, 3)
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException, match="prompt"):  # the signature rejects it before the model runs
        model.predict(pd.DataFrame({"text": ["x"]}))
    with pytest.raises(ValueError, match="non-empty prompt"):
        pyfunc._prompts(pd.DataFrame({"prompt": [""]}))
