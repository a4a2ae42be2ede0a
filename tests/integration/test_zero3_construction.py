"""ZeRO-3 construction (pipelines/training/sharded.py) on 2 gloo ranks in forked processes: each rank holds about
half of the UNet's parameters from construction on, and the partitions gathered back are the weights a plain seeded
build gives (zero-initialised output layers included), or those of ``init_from``."""

from __future__ import annotations

import multiprocessing
import os

import pytest
import torch

pytestmark = pytest.mark.slow


def _rank(rank: int, port: int, cfgs: list[dict], out: str, queue) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed

        from pipelines import settings
        from pipelines.training import sharded
        from pipelines.training.config import TrainConfig
        from pipelines.training.worker import _skip_inference_shm_op, deepspeed_config, resolve_model_config

        _skip_inference_shm_op()
        deepspeed.init_distributed(dist_backend="gloo")
        held, whole, states = [], [], []
        for cfg_dict in cfgs:
            cfg = settings.from_dict(TrainConfig, cfg_dict)
            ds_config = deepspeed_config(cfg, world_size=2, branches=2)
            model = sharded.build_model(
                cfg, torch.device("cpu"), ds_config, resolve_model_config(cfg), cfg.init_from is not None
            )
            held.append(sharded.local_parameter_bytes(model.unet))
            whole.append(max(p.data.numel() for p in model.unet.parameters()))  # kept outside the partitions
            state = {}
            for name, p in model.unet.named_parameters():
                with deepspeed.zero.GatheredParameters([p]):
                    state[name] = p.data.clone()
            states.append(state)
        if rank == 0:
            torch.save(states, out)  # a file: tensors sent through the queue would die with this process
        queue.put((rank, held, whole))
    except BaseException as e:  # the parent reports it; a silent child would only time out
        queue.put((rank, repr(e), None))
        raise


def test_each_rank_holds_half_the_unet_from_construction(shards, train_config, free_port, tmp_path):
    from model.unet import UNet3D
    from pipelines import settings
    from pipelines.training.worker import build_model

    cfg = train_config(shards, tmp_path, None, zero_stage=3)
    plain = build_model(cfg, torch.device("cpu")).unet
    start_model = build_model(cfg, torch.device("cpu"))
    with torch.no_grad():  # other weights than the seed gives, saved as a TextToVideo checkpoint to start from
        for p in start_model.unet.parameters():
            p.add_(0.5)
    init_from = train_config(
        shards, tmp_path, None, zero_stage=3, init_from=str(start_model.save(tmp_path / "start.pt"))
    )
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    port = free_port()
    gathered_file = str(tmp_path / "gathered.pt")
    cfgs = [settings.to_dict(c) for c in (cfg, init_from)]
    procs = [ctx.Process(target=_rank, args=(r, port, cfgs, gathered_file, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = {}
    for _ in procs:
        rank, held, whole = queue.get(timeout=240)
        assert isinstance(held, list), f"rank {rank} failed: {held}"
        results[rank] = (held, whole)
    for p in procs:
        p.join(timeout=60)

    assert isinstance(plain, UNet3D)
    full = sum(p.numel() * p.element_size() for p in plain.parameters())
    for rank, (held, whole) in results.items():
        # half each, up to the padding of odd-sized parameters to an even split
        assert held == [pytest.approx(full / 2, rel=0.01)] * 2, rank
        assert whole == [0, 0]  # outside its partition no parameter keeps data
    gathered, started = torch.load(gathered_file, weights_only=True)
    for name, value in plain.state_dict().items():
        torch.testing.assert_close(gathered[name], value, msg=name)
        torch.testing.assert_close(started[name], value + 0.5, msg=name)
    assert float(gathered["out.2.weight"].abs().max()) == 0.0  # the zero-initialised output layer stays zero
