"""The shard format round-trips through real WebDataset tars."""

import json

import numpy as np
import pytest
import webdataset as wds

from pipelines import schema


def test_samples_round_trip_through_a_tar(tmp_path):
    pattern = schema.shard_pattern(tmp_path, "video_text")
    schema.shard_dir(tmp_path, "video_text").mkdir(parents=True)
    latent = np.random.default_rng(0).standard_normal((4, 2, 3, 3)).astype(np.float16)
    written = []
    with wds.ShardWriter(pattern, maxcount=2, verbose=0) as sink:
        for i in range(3):
            key = schema.sample_key(f"/data/v{i}.mp4", clip_index=i)
            meta = schema.SampleMeta(
                source=f"/data/v{i}.mp4",
                kind="video_text",
                num_frames=8,
                fps=8.0,
                width=32,
                height=32,
                clip_index=i,
                caption=f"caption {i}",
                scores={"motion": 0.5 + i},
            )
            sink.write(
                schema.encode_sample(
                    key, meta, b"mp4-bytes-%d" % i, arrays={"latent_mean": latent}, encoders={"first_stage": "identity"}
                )
            )
            written.append((key, meta))
    tars = sorted(schema.shard_dir(tmp_path, "video_text").glob("*.tar"))
    assert len(tars) == 2  # maxcount=2
    read = [schema.decode_sample(s) for s in wds.WebDataset([str(t) for t in tars], shardshuffle=False)]
    assert [s.key for s in read] == [k for k, _ in written]
    for sample, (_key, meta) in zip(read, written):
        assert sample.meta == meta and sample.caption == meta.caption
        assert sample.media.startswith(b"mp4-bytes")
        np.testing.assert_array_equal(sample.arrays["latent_mean"], latent)
        assert sample.encoders == {"first_stage": "identity"}
    assert json.loads(read[0].meta.to_json())["scores"]["motion"] == 0.5


def test_keys_are_stable_and_dot_free():
    key = schema.sample_key("s3://bucket/a.b.c.mp4", 3)
    assert key == schema.sample_key("s3://bucket/a.b.c.mp4", 3) and "." not in key and key.endswith("_003")
    assert key != schema.sample_key("s3://bucket/a.b.c.mp4", 4)


def test_invalid_samples_are_refused():
    meta = schema.SampleMeta(source="x", kind="video_text", num_frames=8, fps=8, width=8, height=8, caption=None)
    with pytest.raises(ValueError, match="needs a caption"):
        schema.encode_sample("k", meta, b"")
    with pytest.raises(ValueError, match="kind="):
        schema.SampleMeta(source="x", kind="clip", num_frames=8, fps=8, width=8, height=8)
    ok = schema.SampleMeta(source="x", kind="video", num_frames=8, fps=8, width=8, height=8)
    with pytest.raises(ValueError, match="contains a dot"):
        schema.encode_sample("a.b", ok, b"")
