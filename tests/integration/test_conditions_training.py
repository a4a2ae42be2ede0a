"""Structure conditions end to end on real Ray: curation extracts motion vectors and edge maps into the shards
(a Ray Data stage), and a 2-worker ZeRO-2 run trains the condition encoder on them and logs which conditions
each branch saw."""

from __future__ import annotations

import math

import pytest
import webdataset as wds

from pipelines import schema, settings
from pipelines.curation import job as curate
from pipelines.training import job as train

pytestmark = pytest.mark.slow


def test_curated_conditions_train_the_encoder_and_mlflow_says_what_each_branch_saw(
    ray_session, shapes_corpus, train_config, small_model, mlflow_uri, tmp_path
):
    from mlflow import MlflowClient

    sets = ["clips.width=16", "clips.height=16", "clips.num_frames=4", "clips.fps=8", "quality.min_side=16"]
    sets += ["quality.motion_max=1", "progress=false", "conditions.kinds=[motion,sketch]"]
    cfg = settings.load(curate.CurateConfig, None, sets)
    summary = curate.run(cfg, str(shapes_corpus), str(tmp_path / "curated"))
    assert summary["accepted"] > 0
    sample = next(iter(wds.WebDataset(schema.shard_urls(tmp_path / "curated", "video_text"), shardshuffle=False)))
    decoded = schema.decode_sample(sample)
    assert decoded.arrays["motion"].shape == (4, 2, 16, 16) and decoded.arrays["sketch"].shape == (4, 1, 16, 16)

    conditions = {"kinds": ["motion", "sketch"], "hidden": 16}
    overrides = {**small_model, "unet.extra_in_channels": 8, "unet.conditions": conditions}
    run_cfg = train_config(
        tmp_path / "curated",
        tmp_path / "run",
        mlflow_uri,
        zero_stage=2,
        steps=3,
        model_overrides=overrides,
        log_model=False,
    )
    result = train.run(run_cfg)
    assert result["steps"] == 3 and math.isfinite(result["final_loss"])
    metrics = MlflowClient(mlflow_uri).get_run(result["run_id"]).data.metrics
    seen = {k: v for k, v in metrics.items() if k.startswith("conditions/")}
    # videos carry motion and sketch, images only a sketch: the content branch never sees motion
    assert set(seen) == {
        "conditions/content/motion",
        "conditions/content/sketch",
        "conditions/motion/motion",
        "conditions/motion/sketch",
    }
    assert seen["conditions/content/motion"] == 0.0
    assert all(0.0 <= v <= 1.0 for v in seen.values())
