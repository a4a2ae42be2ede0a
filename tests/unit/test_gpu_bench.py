"""t2v bench gpu (flows/benchmarks/gpu.py) where no GPU is: it stops at once with the reason, and the pre-encoded
shards it generates are what training reads as they are (no decoding, no encoder). The run itself needs a GPU."""

from __future__ import annotations

import pytest
import torch


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a CUDA GPU")
def test_stops_on_cpu_with_the_reason(capsys):
    from flows.benchmarks import main

    assert main(["gpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["t2v bench gpu: no CUDA GPU here (torch.cuda.is_available() is False); run it on a GPU machine"]


def test_generated_pre_encoded_shards_are_used_as_they_are(shards, train_config, tmp_path):
    from flows.benchmarks.gpu import write_pre_encoded
    from pipelines import loader
    from pipelines.training.worker import build_model, loader_spec

    cfg = train_config(shards, tmp_path, None, num_workers=1)
    model = build_model(cfg, torch.device("cpu"))
    data = write_pre_encoded(model.config, tmp_path / "data", samples=3)
    cfg = train_config(data, tmp_path, None, num_workers=1, image_batch_size=2, video_batch_size=2)
    reader = loader.TrainLoader(loader_spec(cfg, model))
    try:
        batch = next(reader)
    finally:
        reader.close()
    mc = model.config
    assert [it.latent_mean.shape for it in batch.video] == [(3, mc.num_frames, mc.height, mc.width)] * 2
    assert [it.latent_mean.shape for it in batch.image] == [(3, 1, mc.height, mc.width)] * 2
    assert all(it.text_emb is not None and it.frames is None for it in batch.video + batch.image)
    assert reader.decoder.stats["decoded"] == 0 and reader.decoder.stats["encoder_mismatch"] == 0
