"""ZeRO-3 construction (pipelines/training/sharded.py) on 2 gloo ranks in forked processes: each rank holds about
half of the UNet's parameters from construction on, and the partitions gathered back are the weights a plain seeded
build gives (zero-initialised output layers included)."""

from __future__ import annotations

import multiprocessing
import os

import pytest
import torch

pytestmark = pytest.mark.slow


def _rank(rank: int, port: int, cfg_dict: dict, out: str, queue) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed

        from pipelines import settings
        from pipelines.training import sharded
        from pipelines.training.config import TrainConfig
        from pipelines.training.worker import _skip_inference_shm_op, deepspeed_config

        _skip_inference_shm_op()
        deepspeed.init_distributed(dist_backend="gloo")
        cfg = settings.from_dict(TrainConfig, cfg_dict)
        model = sharded.build_model(cfg, torch.device("cpu"), deepspeed_config(cfg, world_size=2, branches=2))
        held = sharded.local_parameter_bytes(model.unet)
        whole = max(p.data.numel() for p in model.unet.parameters())  # what each parameter keeps outside ZeRO
        state = {}
        for name, p in model.unet.named_parameters():
            with deepspeed.zero.GatheredParameters([p]):
                state[name] = p.data.clone()
        if rank == 0:
            torch.save(state, out)  # a file: tensors sent through the queue would die with this process
        queue.put((rank, held, whole))
    except BaseException as e:  # the parent reports it; a silent child would only time out
        queue.put((rank, repr(e), None))
        raise


def test_each_rank_holds_half_the_unet_from_construction(shards, train_config, free_port, tmp_path):
    from model.unet import UNet3D
    from pipelines import settings
    from pipelines.training.worker import build_model

    cfg = train_config(shards, tmp_path, None, zero_stage=3)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    port = free_port()
    gathered_file = str(tmp_path / "gathered.pt")
    procs = [ctx.Process(target=_rank, args=(r, port, settings.to_dict(cfg), gathered_file, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = {}
    for _ in procs:
        rank, held, whole = queue.get(timeout=240)
        assert isinstance(held, int), f"rank {rank} failed: {held}"
        results[rank] = (held, whole)
    for p in procs:
        p.join(timeout=60)

    plain = build_model(cfg, torch.device("cpu")).unet
    assert isinstance(plain, UNet3D)
    full = sum(p.numel() * p.element_size() for p in plain.parameters())
    for rank, (held, whole) in results.items():
        # half each, up to the padding of odd-sized parameters to an even split
        assert held == pytest.approx(full / 2, rel=0.01), rank
        assert whole == 0  # outside its partition no parameter keeps data
    gathered = torch.load(gathered_file, weights_only=True)
    for name, value in plain.state_dict().items():
        torch.testing.assert_close(gathered[name], value, msg=name)
    assert float(gathered["out.2.weight"].abs().max()) == 0.0  # the zero-initialised output layer stays zero
