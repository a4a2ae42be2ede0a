"""Training end to end on CPU: Ray Train with 2 workers and DeepSpeed ZeRO-2 / ZeRO-3 on a tiny model and tiny
shards, resume, a worker killed mid-run, and the MLflow run read back from its SQLite store; before those, ZeRO-0's
gradient norm with DeepSpeed in the test process, and the model built from local pretrained files (no Ray, but
several model builds: too slow for the unit tier).

All runs use the session's Ray (starting Ray is the slowest part) and a shrunken tiny model at 16x16 with 4 frames
(the ``small_model`` and ``train_config`` fixtures), so each run is a few training steps."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from pipelines import settings
from pipelines.training import export
from pipelines.training import job as train

BRANCH_METRICS = {
    "loss",
    "loss_image",
    "loss_video",
    "coherence_loss",
    "diffusion_loss_video",
    "lr",
    "grad_norm",
    "samples_per_s",
    "step_time_s",
    "data_wait_s",
    "eff/clips_per_s",
    "eff/tflops_per_device",
    "eff/data_wait_fraction",
    "eff/peak_memory_gib",
}

pytestmark = pytest.mark.slow


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_zero0_grad_norm_is_the_norm_of_the_accumulated_gradients(
    shards, train_config, free_port, tmp_path, monkeypatch
):
    """ZeRO-0 in fp32 used to log grad_norm 0 (DeepSpeed drops the norm there; the ZeRO-2 run below checks the
    norm DeepSpeed reports). DeepSpeed runs in the test process, as one gloo rank, on a linear layer (once per
    process: DeepSpeed keeps its process groups)."""
    import deepspeed
    import torch.distributed as dist

    from pipelines.training.worker import OptimizerStep, _skip_inference_shm_op, deepspeed_config

    port = free_port()
    for name, value in {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }.items():
        monkeypatch.setenv(name, value)
    _skip_inference_shm_op()
    cfg = train_config(shards, tmp_path, None, zero_stage=0, grad_clip=0.5)
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 3)
    reference = copy.deepcopy(net)
    engine, *_ = deepspeed.initialize(
        model=net, model_parameters=list(net.parameters()), config=deepspeed_config(cfg, world_size=1, branches=2)
    )
    try:
        optimizer_step = OptimizerStep(engine, cfg)
        xs = [torch.randn(5, 4), torch.randn(5, 4)]
        for x in xs:  # two branches = two micro-steps, one optimizer step
            engine.backward(engine(x).pow(2).sum())
            optimizer_step()
        # DeepSpeed averages the gradients over the accumulation steps
        (sum(reference(x).pow(2).sum() for x in xs) / 2).backward()
        expected = float(torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in reference.parameters()])))
        assert expected > cfg.grad_clip  # (so this step was clipped)
        assert optimizer_step.grad_norm == pytest.approx(expected, rel=1e-4)
    finally:
        dist.destroy_process_group()


def test_initialisation_from_local_pretrained_files(shards, train_config, small_model, tmp_path):
    from model.checkpoint import save_unet_weights
    from model.registry import get_config
    from model.text_to_video import TextToVideo
    from model.unet import UNet3D
    from pipelines.training.worker import build_model

    # a ModelScope-style plain UNet state dict (no TF-T2V image MLP: that part starts fresh)
    torch.manual_seed(123)
    released = UNet3D(get_config("tiny", {**small_model, "unet.image_embed_dim": 0}).unet)
    path = save_unet_weights(released, tmp_path / "text2video_pytorch_model.pth")
    model = build_model(train_config(shards, tmp_path, None, init_from=str(path)), torch.device("cpu"))
    for name, value in released.state_dict().items():
        assert torch.equal(model.unet.state_dict()[name], value), name
    # a TextToVideo checkpoint brings its own architecture (here 3 frames instead of the config's 4)
    ckpt = TextToVideo.build(get_config("tiny", {**small_model, "num_frames": 3})).save(tmp_path / "m.pt", step=7)
    model = build_model(train_config(shards, tmp_path, None, init_from=str(ckpt)), torch.device("cpu"))
    assert model.config.num_frames == 3
    with pytest.raises(Exception, match="does not exist"):
        build_model(train_config(shards, tmp_path, None, init_from=str(tmp_path / "missing.pth")), torch.device("cpu"))


def _samples_taken(shards, ckpt, kind: str) -> int:
    """The samples of ``kind`` all ranks of a checkpoint took since the run started (its data position)."""
    from pipelines import loader, schema

    urls, counts = loader.urls_by_kind(loader.find_shard_sets([str(shards)]))[kind]
    world = json.loads((ckpt / export.TRAIN_STATE_FILE).read_text())["world_size"]

    def sizes(rank: int, epoch: int) -> list[int]:
        plan = loader.plan_epoch(urls, counts, rank, world, 0, schema.KINDS.index(kind), epoch)
        return loader.plan_sizes(plan, urls, counts)

    total = 0
    for r in range(world):
        state = torch.load(ckpt / export.worker_state_file(r), weights_only=True)["loader"][kind]
        total += loader.samples_taken(loader.Position(**state), lambda e, r=r: sizes(r, e))
    return total


def test_zero2_run_then_resume_on_one_worker_and_on_two(ray_session, shards, train_config, mlflow_uri, tmp_path):
    import mlflow
    from mlflow import MlflowClient

    from pipelines import pyfunc, tracking
    from pipelines.training.worker import lr_factor

    store = mlflow_uri
    out = tmp_path / "run"
    cfg = train_config(
        shards,
        out,
        store,
        zero_stage=2,
        sample_every=4,
        sample_steps=2,
        mlflow={
            "tracking_uri": store,
            "experiment": "test-train",
            "system_metrics_s": 1.0,
            "tags": {"hub_token": "s3cret-value"},
        },
    )
    result = train.run(cfg)

    # the result and the exported model files
    assert json.loads((out / "result.json").read_text()) == result
    assert result["steps"] == 4 and math.isfinite(result["final_loss"])
    from model.text_to_video import TextToVideo

    model = TextToVideo.from_checkpoint(result["ema_checkpoint"])
    assert model.step == 4 and model.ema and model.config.height == 16
    assert TextToVideo.from_checkpoint(result["checkpoint"]).ema is False
    assert sorted(p.name for p in (out / "ray" / "train").glob("step_*")) == ["step_00000002", "step_00000004"]

    # MLflow, read back from the store
    client = MlflowClient(store)
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["train.zero_stage"] == "2" and params["train.num_workers"] == "2"
    assert params["model_config.unet.model_channels"] == "8" and params["derived.world_size"] == "2"
    assert "s3cret-value" not in json.dumps(params) + json.dumps(run.data.tags)
    assert run.data.tags["hub_token"] == settings.REDACTED
    assert BRANCH_METRICS <= set(run.data.metrics)
    assert [s for s, _ in history(client, run.info.run_id, "loss_video")] == [1, 2, 3, 4]
    assert all(v > 0 for _, v in history(client, run.info.run_id, "grad_norm"))
    # achieved TFLOP/s x step time is the counted FLOPs of one step, the same every step; no known peak on a CPU
    work = [
        a * b
        for (_, a), (_, b) in zip(
            *(history(client, run.info.run_id, k) for k in ("eff/tflops_per_device", "step_time_s"))
        )
    ]
    assert len(work) == 4 and max(work) == pytest.approx(min(work), rel=1e-6) and work[0] > 0
    assert "eff/mfu" not in run.data.metrics
    assert any(k.startswith("system/cpu") for k in run.data.metrics)
    samples = [a.path for a in client.list_artifacts(run.info.run_id, "samples/step_000004")]
    assert any(p.endswith(".mp4") for p in samples) and any(p.endswith(".gif") for p in samples)
    assert [a.path for a in client.list_artifacts(run.info.run_id, "config")] == ["config/train_config.yaml"]
    datasets = {i.dataset.name for i in run.inputs.dataset_inputs}
    assert datasets == {f"{shards.name}/image", f"{shards.name}/video_text", f"{shards.name}/video"}

    # the logged generation model: prompt in, video out
    with tracking.tracking_uri_set(store):
        predictions = mlflow.pyfunc.load_model(result["model_uri"]).predict(
            {"prompt": ["a red circle moving left"]}, params={"steps": 2}
        )
    assert pyfunc.frames_from_predictions(predictions)[0].shape == (4, 16, 16, 3)

    # the same command with more steps and 1 worker resumes: same MLflow run, steps 5-6 only, the step, the LR
    # schedule and the data position carry over; the optimizer restarts (the run says so)
    ckpts = out / "ray" / "train"
    assert _samples_taken(shards, ckpts / "step_00000004", "image") == 2 * 4 * 2  # 2 workers x 4 steps x 2 images
    resume = lambda workers, steps, **extra: train.run(  # noqa: E731
        train_config(
            shards,
            out,
            store,
            zero_stage=2,
            steps=steps,
            num_workers=workers,
            mlflow={"tracking_uri": store, "experiment": "test-train", "tags": {"hub_token": "s3cret-value"}},
            log_model=False,
            **extra,
        )
    )
    one = resume(1, 6)
    assert one["run_id"] == result["run_id"] and one["steps"] == 6
    tags = client.get_run(result["run_id"]).data.tags
    assert tags["resumed_from_workers"] == "2"
    assert tags["reshard"] == "optimizer state restarts: checkpoint was saved by 2 workers, this run has 1"
    assert tags["changed_param.train.steps"] == "6" and run.data.params["train.steps"] == "4"
    # one worker continues the epoch after the 16 images the two took, not from its start
    assert _samples_taken(shards, ckpts / "step_00000006", "image") == 16 + 2 * 2

    # ... and back on 2 workers: they split what is left of the epoch, each skipping its share, rounded down
    two = resume(2, 8)
    assert two["steps"] == 8
    assert client.get_run(result["run_id"]).data.tags["resumed_from_workers"] == "1"
    assert 20 + 8 - 1 <= _samples_taken(shards, ckpts / "step_00000008", "image") <= 20 + 8
    losses = history(client, result["run_id"], "loss")
    assert [s for s, _ in losses] == list(range(1, 9))  # each step once: training went on where it stopped
    assert all(math.isfinite(v) for _, v in losses)
    # the LR schedule goes on from the step (a fresh one would be back in its warm-up at full lr)
    lrs = dict(history(client, result["run_id"], "lr"))
    for step, steps in ((5, 6), (7, 8)):
        cfg = train_config(shards, out, None, steps=steps)
        assert lrs[step] == pytest.approx(cfg.lr * lr_factor(step, cfg)) and lrs[step] < cfg.lr

    # once finished, running it again does nothing
    assert resume(2, 8) == two
    # resuming with settings that change what the checkpoint means is refused
    with pytest.raises(settings.ConfigError, match="model_overrides"):
        train.run(train_config(shards, out, store, zero_stage=2, steps=10, model_overrides={}))


def test_zero3_gathers_partitioned_weights_for_export(ray_session, shards, train_config, small_model, tmp_path):
    from model.text_to_video import TextToVideo

    out = tmp_path / "run3"
    # temporal_heads=8 and none of the tiny extras (pooled text, frame embedding, coordinates) give the tiny UNet
    # a diffusers equivalent, so the diffusers export runs too
    cfg = train_config(
        shards,
        out,
        None,
        zero_stage=3,
        steps=2,
        checkpoint_every=2,
        model_overrides={
            **small_model,
            "unet.temporal_heads": 8,
            "unet.pooled_text_embedding": False,
            "unet.frame_embedding": False,
            "unet.coordinate_channels": False,
        },
    )
    result = train.run(cfg)
    assert result["steps"] == 2 and result["run_id"] is None and result["model_uri"] is None
    exported = TextToVideo.from_checkpoint(result["checkpoint"]).unet.state_dict()
    # the gathered weights equal DeepSpeed's own fp32 consolidation of the ZeRO-3 shards
    offline, _, info = export.state_from_checkpoint(out / "ray" / "train" / "step_00000002")
    assert info["zero_stage"] == 3 and info["world_size"] == 2
    for name, value in offline.items():
        torch.testing.assert_close(exported[name], value, msg=name)
    ema = TextToVideo.from_checkpoint(result["ema_checkpoint"]).unet.state_dict()
    assert any(not torch.equal(ema[k], exported[k]) for k in exported)  # EMA differs from the raw weights
    from diffusers import UNet3DConditionModel

    assert list(UNet3DConditionModel.from_pretrained(result["diffusers"]).config.block_out_channels) == [8, 16, 32]


def test_killed_worker_continues_from_the_last_checkpoint(ray_session, shards, train_config, mlflow_uri, tmp_path):
    from mlflow import MlflowClient

    store = mlflow_uri
    out = tmp_path / "killed"
    # debug_fail_at_step makes the last rank os._exit(1) once after step 3 (a marker file stops it firing after the
    # restart): the same as the process being killed, but at a known step, so the test can check what follows.
    cfg = train_config(
        shards,
        out,
        store,
        zero_stage=1,
        steps=4,
        checkpoint_every=2,
        max_failures=1,
        debug_fail_at_step=3,
        mlflow={"tracking_uri": store, "experiment": "test-train", "system_metrics_s": 0.0},
        log_model=False,
    )
    result = train.run(cfg)
    assert result["steps"] == 4
    assert (out / ".debug_failed_at_3").exists()
    client = MlflowClient(store)
    losses = history(client, result["run_id"], "loss")
    # step 3 ran twice: before the kill, and again after the restart from the step-2 checkpoint
    assert [s for s, _ in losses] == [1, 2, 3, 3, 4]
    first, again = [v for s, v in losses if s == 3]
    # the restarted group repeats step 3 exactly (same weights, optimizer state, data and noise): the curve
    # continues where it left off instead of starting over
    assert again == pytest.approx(first, rel=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (bf16 + NCCL path)")
def test_one_gpu_bf16_run(ray_session, shards, train_config, tmp_path):
    from model.text_to_video import TextToVideo

    result = train.run(
        train_config(
            shards, tmp_path / "gpu", None, num_workers=1, use_gpu=True, zero_stage=2, steps=2, checkpoint_every=2
        )
    )
    assert result["steps"] == 2 and math.isfinite(result["final_loss"])
    assert (
        TextToVideo.from_checkpoint(result["ema_checkpoint"]).unet.state_dict()["out.2.weight"].dtype == torch.float32
    )
