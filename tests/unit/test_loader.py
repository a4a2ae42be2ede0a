"""Training input: shards written in the schema format are read back split across ranks, shuffled, batched,
resumed exactly, and bad samples are skipped. No Ray here."""

from __future__ import annotations

import dataclasses
import io
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import loader, schema


def _keys(stream, n):
    it = iter(stream)
    return [next(it)[0]["__key__"] for _ in range(n)]


def test_ranks_read_disjoint_samples_that_cover_each_epoch(shards):
    urls, counts = loader.urls_by_kind(loader.find_shard_sets([str(shards)]))["video_text"]
    total = sum(counts)
    per_rank = []
    for rank in range(2):
        stream = loader.KindStream("video_text", urls, counts, rank, 2, seed=3)
        per_rank.append(_keys(stream, total // 2))
    assert not set(per_rank[0]) & set(per_rank[1])
    assert len(set(per_rank[0]) | set(per_rank[1])) == total
    # fewer shards than ranks: samples (not shards) are split, still disjoint
    one = loader.KindStream("video", urls[:1], counts[:1], 0, 2, seed=3)
    other = loader.KindStream("video", urls[:1], counts[:1], 1, 2, seed=3)
    a, b = _keys(one, 1), _keys(other, 1)
    assert a != b


def test_stream_is_seeded_shuffled_and_endless(shards):
    urls, counts = loader.urls_by_kind(loader.find_shard_sets([str(shards)]))["image"]
    n = sum(counts)
    first = _keys(loader.KindStream("image", urls, counts, 0, 1, seed=1), 3 * n)
    again = _keys(loader.KindStream("image", urls, counts, 0, 1, seed=1), 3 * n)
    other = _keys(loader.KindStream("image", urls, counts, 0, 1, seed=2), 3 * n)
    assert first == again  # deterministic
    assert first != other  # the seed matters
    assert sorted(first[:n]) == sorted(first[n : 2 * n])  # every epoch covers every sample once
    assert first[:n] != first[n : 2 * n]  # ... in a new order


def test_resume_continues_exactly_where_the_batch_left_off(shards):
    spec = loader.LoaderSpec(
        data=[str(shards)],
        image_batch=2,
        video_batch=2,
        text_free_fraction=0.5,
        num_frames=4,
        height=16,
        width=16,
        seed=5,
        prefetch=2,
    )
    full = loader.TrainLoader(spec)
    batches = [next(full) for _ in range(5)]
    full.close()
    resumed = loader.TrainLoader(spec, state=batches[1].position)
    again = [next(resumed) for _ in range(3)]
    resumed.close()
    keys = lambda b: [it.key for it in b.image + b.video]  # noqa: E731
    assert [keys(b) for b in again] == [keys(b) for b in batches[2:5]]


def test_batches_mix_kinds_at_the_model_size(shards):
    spec = loader.LoaderSpec(
        data=[str(shards)], image_batch=3, video_batch=4, text_free_fraction=0.5, num_frames=4, height=16, width=24
    )
    data = loader.TrainLoader(spec)
    batch = next(data)
    data.close()
    assert [it.kind for it in batch.image] == ["image"] * 3
    assert sorted(it.kind for it in batch.video) == ["video", "video", "video_text", "video_text"]
    assert all(it.caption is None for it in batch.video if it.kind == "video")
    frames = loader.collate_frames(batch.video)
    assert tuple(frames.shape) == (4, 4, 16, 24, 3)
    assert batch.image[0].frames.shape == (1, 16, 24, 3)
    assert batch.video[0].cond_frame.shape == (16, 24, 3)
    assert set(batch.position) == {"image", "video", "video_text"}


def test_frames_are_spread_over_the_clip_or_strided():
    rng = np.random.default_rng(0)
    assert loader.frame_indices(24, 8, 0, rng).tolist() == [0, 3, 7, 10, 13, 16, 20, 23]
    strided = loader.frame_indices(24, 4, 2, rng)
    assert np.all(np.diff(strided) == 2) and strided.max() < 24
    assert loader.frame_indices(3, 4, 2, rng).max() == 2  # short clip: last frame repeats


def test_pre_encoded_latents_are_used_when_the_encoders_match(shapes_corpus, write_shards, tmp_path):
    identity = {"first_stage": "identity", "clip_model": "t2v-tiny-clip"}
    out = write_shards(shapes_corpus, tmp_path / "enc", pre_encode=identity)
    spec = loader.LoaderSpec(
        data=[str(out)],
        image_batch=0,
        video_batch=2,
        num_frames=4,
        height=32,
        width=32,
        latent_hw=(32, 32),
        expected_encoders=identity,
    )
    data = loader.TrainLoader(spec)
    batch = next(data)
    data.close()
    assert all(it.latent_mean is not None and it.latent_mean.shape == (3, 4, 32, 32) for it in batch.video)
    assert all(it.frames is None and it.cond_frame is not None for it in batch.video)
    # other encoders wrote them: ignored, decoded from the mp4 instead
    spec = dataclasses.replace(spec, expected_encoders={**identity, "clip_model": "ViT-H-14"})
    data = loader.TrainLoader(spec)
    batch = next(data)
    data.close()
    assert all(it.latent_mean is None and it.frames.shape == (4, 32, 32, 3) for it in batch.video)
    assert data.decoder.stats["encoder_mismatch"] >= 1
    # a stamp written before the word code existed (no word_code_gain key) means gain 0: not the tiny model's 2
    for gain, usable in ((2.0, False), (0.0, True)):
        data = loader.TrainLoader(dataclasses.replace(spec, expected_encoders={**identity, "word_code_gain": gain}))
        batch = next(data)
        data.close()
        assert all((it.latent_mean is not None) == usable for it in batch.video), gain


def test_corrupt_media_is_skipped_and_counted(shards, tmp_path):
    bad = tmp_path / "bad"
    schema.shard_dir(bad, "image").mkdir(parents=True)
    tar_path = Path(schema.shard_pattern(bad, "image") % 0)
    src = sorted(schema.shard_dir(shards, "image").glob("*.tar"))[0]
    with tarfile.open(src) as tin, tarfile.open(tar_path, "w") as tout:
        for m in tin.getmembers():
            data = tin.extractfile(m).read()
            if m.name.endswith(".jpg") and not tout.getmembers():
                data = b"not a jpeg"  # the first sample's picture is broken
            info = tarfile.TarInfo(m.name)
            info.size = len(data)
            tout.addfile(info, io.BytesIO(data))
    pq.write_table(pa.table({"key": ["a", "b", "c"]}), schema.index_path(tar_path))
    data = loader.TrainLoader(loader.LoaderSpec(data=[str(bad)], image_batch=2, video_batch=0, height=16, width=16))
    batch = next(data)
    data.close()
    assert len(batch.image) == 2
    assert data.decoder.stats["skipped"] >= 1


def test_bad_data_settings_say_what_to_do(shards, tmp_path):
    with pytest.raises(loader.DataError, match="does not exist"):
        loader.find_shard_sets([str(tmp_path / "missing")])
    with pytest.raises(loader.DataError, match="no finished shards"):
        loader.find_shard_sets([str(tmp_path)])
    spec = loader.LoaderSpec(data=[str(shards)], image_batch=2, video_batch=2)
    sets = [s for s in loader.find_shard_sets([str(shards)]) if s.kind != "image"]
    with pytest.raises(loader.DataError, match="image_batch=0"):
        loader.TrainLoader(spec, shard_sets=sets)
    tiny = [s for s in loader.find_shard_sets([str(shards)]) if s.kind == "video"]
    stream = loader.KindStream("video", tiny[0].urls[:1], [1], rank=1, world_size=2, seed=0)
    with pytest.raises(loader.DataError, match="fewer workers"):
        next(iter(stream))


def test_image_condition_frame_is_the_middle_or_first_frame(shards):
    # One raw video sample as the shard reader hands it to the decoder: {"__key__", "<ext>": bytes}.
    tar_path = next(p for kind in ("video_text", "video") for p in sorted(schema.shard_dir(shards, kind).glob("*.tar")))
    raw: dict = {}
    with tarfile.open(tar_path) as tar:
        for m in tar.getmembers():
            key, _, ext = m.name.partition(".")
            if raw and raw["__key__"] != key:
                break
            raw["__key__"] = key
            raw[ext] = tar.extractfile(m).read()
    items = {
        frame: loader.Decoder(4, 16, 16, image_frame=frame)(raw) for frame in ("middle", "first")
    }  # 4 frames of the clip
    for frame, item in items.items():
        assert item is not None and item.frames.shape == (4, 16, 16, 3)
        expected = item.frames[0] if frame == "first" else item.frames[2]
        np.testing.assert_array_equal(item.cond_frame, expected)
    assert not np.array_equal(items["middle"].cond_frame, items["first"].cond_frame)  # the shapes move


def test_data_position_arithmetic_across_world_sizes():
    sizes = {0: [3, 2], 1: [2, 2], 2: [4, 1]}  # one rank's plan sizes per epoch
    at = loader.Position(epoch=2, shard=1, offset=1)
    assert loader.samples_taken(at, sizes.__getitem__) == 5 + 4 + 4 + 1
    # the old ranks took 23 samples of a 10-sample epoch: epoch 2, 3 used; a rank holding 6 of them skips 6 * 3 // 10
    assert loader.resharded_position(23, 10, lambda e: [4, 2], "f") == loader.Position(2, 0, 1, "f")
    # one rank holds the whole epoch: it skips exactly what was used, across shard boundaries
    assert loader.resharded_position(7, 10, lambda e: [4, 6], "f") == loader.Position(0, 1, 3, "f")
    assert loader.resharded_position(10, 10, lambda e: [4, 6], "f") == loader.Position(1, 0, 0, "f")


def test_a_resharded_stream_continues_the_epoch_instead_of_replaying_it(shards):
    urls, counts = loader.urls_by_kind(loader.find_shard_sets([str(shards)]))["video_text"]
    n = sum(counts)

    def positions(stream, k):
        it = iter(stream)
        return [next(it)[1] for _ in range(k)]

    # 2 workers took 2 samples each; 1 worker reads the other n - 4 of epoch 0, then epoch 1
    old = [positions(loader.KindStream("video_text", urls, counts, r, 2, seed=3), 2)[-1] for r in range(2)]
    one = loader.KindStream("video_text", urls, counts, 0, 1, seed=3, resharded_from=old)
    assert [p.epoch for p in positions(one, n - 3)] == [0] * (n - 4) + [1]
    # 1 worker took 3 samples; the 2 new workers together read the other n - 3 (to rounding) of epoch 0
    old = [positions(loader.KindStream("video_text", urls, counts, 0, 1, seed=3), 3)[-1]]
    left = []
    for r in range(2):
        stream = loader.KindStream("video_text", urls, counts, r, 2, seed=3, resharded_from=old)
        left.append(sum(p.epoch == 0 for p in positions(stream, n)))
    assert n - 3 <= sum(left) <= n - 3 + 2
