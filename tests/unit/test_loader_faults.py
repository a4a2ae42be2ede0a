"""Training input under bad data: malformed samples are skipped and counted, a deleted shard is counted, and the
loader stops with a clear error past ``max_bad_fraction``. Real shards, really rewritten or deleted."""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

import pytest

from pipelines import loader, schema


def _rewrite_json(tar_path: Path, every: bool) -> None:
    """Replace the json of the first sample (or of every sample) by one of the wrong shape."""
    members = []
    with tarfile.open(tar_path) as tin:
        for m in tin.getmembers():
            data = tin.extractfile(m).read()
            if m.name.endswith(".json") and (every or not any(n.endswith(".json") for n, _ in members)):
                data = b'{"kind": 5, "num_frames": "eight", "labels": [1]}'
            members.append((m.name, data))
    with tarfile.open(tar_path, "w") as tout:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tout.addfile(info, io.BytesIO(data))


def _copy(shards: Path, tmp_path: Path) -> Path:
    out = tmp_path / "data"
    shutil.copytree(shards, out)
    return out


def _spec(data: Path, **kw) -> loader.LoaderSpec:
    return loader.LoaderSpec(data=[str(data)], image_batch=2, video_batch=0, height=16, width=16, **kw)


def test_a_sample_whose_json_has_the_wrong_type_is_skipped_and_counted(shards, tmp_path):
    data = _copy(shards, tmp_path)
    _rewrite_json(sorted(schema.shard_dir(data, "image").glob("*.tar"))[0], every=False)
    stream = loader.TrainLoader(_spec(data, max_bad_fraction=0.5))
    try:
        batches = [next(stream) for _ in range(4)]
    finally:
        stream.close()
    assert all(len(b.image) == 2 for b in batches)
    assert stream.health.metrics()["data_skipped_samples"] >= 1


def test_past_max_bad_fraction_training_stops_with_a_clear_error(shards, tmp_path):
    data = _copy(shards, tmp_path)
    for tar in schema.shard_dir(data, "image").glob("*.tar"):
        _rewrite_json(tar, every=True)
    stream = loader.TrainLoader(_spec(data))
    with pytest.raises(loader.DataError, match="max_bad_fraction"):
        next(stream)
    stream.close()


def test_a_deleted_shard_is_counted_and_past_the_fraction_stops_training(shards, tmp_path):
    data = _copy(shards, tmp_path)
    tars = sorted(schema.shard_dir(data, "image").glob("*.tar"))
    assert len(tars) >= 2
    tars[0].unlink()  # its index stays: the loader was told it exists

    stream = loader.TrainLoader(_spec(data, max_bad_fraction=0.6))
    try:
        batches = [next(stream) for _ in range(4)]  # more than an epoch
    finally:
        stream.close()
    assert all(len(b.image) == 2 for b in batches)
    assert stream.health.metrics()["data_missing_shards"] == 1

    stream = loader.TrainLoader(_spec(data))  # the default fraction, 0.05: half the shards gone is too many
    with pytest.raises(loader.DataError, match=r"1 of \d+ shards cannot be read"):
        next(stream)
    stream.close()
