"""Credential-like values in configs reach neither MLflow (params, tags, artifacts) nor the logs or the records a
flow cycle writes."""

from __future__ import annotations

import json
from pathlib import Path

from pipelines import settings

SECRET = "s3cr3t-Value-42"


def test_credentials_in_configs_are_redacted_from_mlflow_and_logs(
    tmp_path, capsys, shapes_corpus, tiny_checkpoint, mlflow_uri
):
    """A config with credential-like values: they reach neither MLflow (params, tags, artifacts) nor the output."""
    from mlflow import MlflowClient

    from flows import evaluate, retrain

    # evaluation, logging into MLflow: a credential-like key inside the settings
    uri = mlflow_uri
    cfg = settings.from_dict(
        evaluate.EvalConfig,
        {
            "checkpoint": str(tiny_checkpoint),
            "num_prompts": 1,
            "steps": 1,
            "clip_model": "t2v-tiny-clip",
            "num_samples": 1,
            "output": str(tmp_path / "eval"),
            "fvd_kwargs": {"api_token": SECRET},
            "mlflow": {"tracking_uri": uri},
        },
    )
    result = evaluate.run(cfg)
    client = MlflowClient(uri)
    run = client.get_run(result["mlflow_run_id"])
    assert run.data.params["eval.fvd_kwargs.api_token"] == settings.REDACTED
    assert SECRET not in json.dumps({**run.data.params, **run.data.tags})
    for artifact in ("eval/eval.yaml", "eval/metrics.json"):
        local = client.download_artifacts(run.info.run_id, artifact, str(tmp_path / "dl"))
        assert SECRET not in Path(local).read_text()

    # the flow: a password in the tracking URI and a secret environment variable for the cluster
    flow = settings.from_dict(
        retrain.RetrainConfig,
        {
            "input": str(shapes_corpus),
            "state_dir": str(tmp_path / "flow"),
            "mlflow": {"tracking_uri": f"http://alice:{SECRET}@mlflow.example:5000"},
            "cluster": {"env_vars": {"MLFLOW_TRACKING_PASSWORD": SECRET}},
        },
    )
    assert (
        retrain.main(
            [
                "run-once",
                "--input",
                str(shapes_corpus),
                "--set",
                f"mlflow.tracking_uri=http://a:{SECRET}@h:1",
                "--set",
                f"cluster.env_vars.AWS_SECRET_ACCESS_KEY={SECRET}",
                "--dry-run",
            ]
        )
        == 0
    )
    cycle = retrain.open_cycle(flow)  # records the cycle's config on disk
    assert SECRET not in (cycle / "cycle.json").read_text()
    assert SECRET not in settings.dump(flow)
    out = capsys.readouterr()
    assert SECRET not in out.out + out.err
