"""Training over mixed buckets: Ray Train with 2 workers and DeepSpeed ZeRO-2, one bucket per batch, each rank on
its own clip length (VGen's frame_lens), fps conditioning on, and the bucket histogram read back from MLflow."""

from __future__ import annotations

import json
import math

import pytest

from pipelines.training import job as train

pytestmark = pytest.mark.slow


def test_zero2_trains_over_mixed_buckets_and_logs_the_bucket_histogram(
    ray_session, bucket_shards, bucket_names, train_config, small_model, mlflow_uri, tmp_path
):
    from mlflow import MlflowClient

    cfg = train_config(
        bucket_shards,
        tmp_path / "run",
        mlflow_uri,
        zero_stage=2,
        steps=4,
        shapes="buckets",
        frame_mixing="per_rank",
        frame_lens=[4, 8],
        model_overrides={**small_model, "unet.use_fps_condition": True},
        log_model=False,
    )
    result = train.run(cfg)
    assert result["steps"] == 4 and math.isfinite(result["final_loss"])

    client = MlflowClient(mlflow_uri)
    run = client.get_run(result["run_id"])
    histogram = {k.split("/", 1)[1]: v for k, v in run.data.metrics.items() if k.startswith("data_bucket/")}
    sizes = {shape.split("_")[0] for shape in histogram}
    assert sizes == set(bucket_names)  # every bucket of the data is a key (zero when not drawn)
    trained = {k for k, v in histogram.items() if v > 0}
    assert any(k.endswith("_4f") for k in trained) and any(k.endswith("_8f") for k in trained)  # rank 0 and 1
    assert any(k.endswith("_1f") for k in trained)  # the image branch
    [artifact] = [a.path for a in client.list_artifacts(run.info.run_id, "data")]
    local = client.download_artifacts(run.info.run_id, artifact, str(tmp_path))
    assert json.loads(open(local, encoding="utf-8").read())["samples_per_bucket"] == histogram
