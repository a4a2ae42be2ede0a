"""Training over mixed buckets: Ray Train with 2 workers and DeepSpeed ZeRO-2, one bucket per batch, each rank on
its own clip length (VGen's frame_lens), fps conditioning on, and the bucket histogram read back from MLflow; before
that, sampling at a bucket's shape and pre-encoded shards of every bucket (no Ray, but building the encoders is too
slow for the unit tier)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import webdataset as wds

from model.registry import get_config
from model.text_to_video import TextToVideo
from pipelines import buckets, loader, schema
from pipelines.training import job as train

pytestmark = pytest.mark.slow


def test_sampling_at_a_bucket_shape_and_a_size_the_unet_cannot_take(small_model):
    torch.manual_seed(0)
    model = TextToVideo.build(get_config("tiny", small_model))
    video = model.generate(["a red square"], steps=1, size=(4, 16, 32))
    assert video.shape == (1, 4, 16, 32, 3)
    with pytest.raises(ValueError, match="a 18x18 clip: this model takes heights and widths that are multiples of 4"):
        model.generate(["a red square"], steps=2, size=(4, 18, 18))


def test_pre_encoded_shards_carry_each_buckets_shape_and_the_loader_uses_them(aspect_corpus, curate_buckets, tmp_path):
    out = curate_buckets(aspect_corpus, tmp_path, lengths=(4,), encode=True)
    urls = [u for kind in schema.KINDS for u in schema.shard_urls(out, kind)]
    samples = [schema.decode_sample(raw) for raw in wds.WebDataset(urls, shardshuffle=False)]
    for s in samples:
        w, h = buckets.parse_size(s.meta.bucket, "bucket")
        assert s.arrays["latent_mean"].shape == (3, s.meta.frames, h, w)  # identity first stage: pixels
    assert len({s.meta.shape for s in samples}) == 8  # 4 buckets x (images, 4-frame clips)
    spec = loader.LoaderSpec(
        data=[str(out)],
        image_batch=2,
        video_batch=2,
        num_frames=4,
        height=16,
        width=16,
        shapes="buckets",
        size_multiple=4,
        expected_encoders=samples[0].encoders,  # the identity training computes for the same encoders
    )
    data = loader.TrainLoader(spec)
    try:
        batches = [next(data) for _ in range(4)]
    finally:
        data.close()
    for b in batches:
        assert all(it.latent_mean is not None and it.frames is None for it in b.video)
        assert len({it.latent_mean.shape for it in b.video}) == 1
    assert data.decoder.stats["encoder_mismatch"] == 0


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
