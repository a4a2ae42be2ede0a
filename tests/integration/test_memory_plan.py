"""t2v plan (pipelines/training/memory_plan.py): its model-state figures are DeepSpeed's own estimators', and the
largest batch it prints is the largest that fits its budget. (Integration tier: it imports DeepSpeed.)"""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("gpus_per_node,nodes", [(1, 1), (8, 1), (8, 4), (3, 2)])
def test_model_states_are_deepspeeds_estimates(gpus_per_node, nodes):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    from pipelines.training.memory_plan import model_states

    params, layer = 1_411_233_860, 29_491_200
    for offload in (False, True):
        cpu, gpu = estimate_zero2_model_states_mem_needs(params, gpus_per_node, nodes, cpu_offload=offload)
        ours = model_states(params, layer, 2, "optimizer" if offload else "none", gpus_per_node, nodes)
        assert (ours.gpu, ours.cpu) == (gpu, cpu)
    for offload, offload_params, name in (
        (False, False, "none"),
        (True, False, "optimizer"),
        (True, True, "optimizer+params"),
    ):
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            params, layer, gpus_per_node, nodes, cpu_offload=offload, cpu_offload_params=offload_params, zero_init=True
        )
        ours = model_states(params, layer, 3, name, gpus_per_node, nodes)
        assert (ours.gpu, ours.cpu) == (gpu, cpu), name
    # no ZeRO: every GPU holds all 18 bytes per parameter besides the 16-bit weights; ZeRO-1 keeps whole 16-bit
    # gradients, so it sits between no ZeRO and ZeRO-2
    n = gpus_per_node * nodes
    assert model_states(params, layer, 0, "none", gpus_per_node, nodes).gpu == 20 * params
    assert model_states(params, layer, 1, "none", gpus_per_node, nodes).gpu == 4 * params + int(16 * params / n)


def test_plan_command_prints_every_choice_and_the_largest_batch_that_fits(tmp_path, capsys, small_model):
    import yaml

    from pipelines import settings
    from pipelines.training.config import TrainConfig
    from pipelines.training.memory_plan import GIB, main, plan

    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({"model": "tiny", "model_overrides": small_model, "video_batch_size": 4}))
    assert main(["--config", str(config), "--gpus", "2", "--gpu-memory", "0.05"]) == 0
    out = capsys.readouterr().out
    assert "2 GPU(s) of 0 GiB" in out and "optimizer+params" in out
    assert len([line for line in out.splitlines() if line.strip().startswith(("0 ", "1 ", "2 ", "3 "))]) == 7

    cfg = settings.load(TrainConfig, str(config), [])
    p = plan(cfg, gpus=2, gpu_memory_gib=0.03)
    budget = 0.03 * GIB * 0.9
    per_clip = p["activation_bytes_per_clip"]
    assert per_clip > p["activation_bytes_per_image"] > 0
    for row in p["rows"]:
        fixed = (row.states_gib + row.frozen_gib) * GIB
        n = row.max_video_batch
        assert fixed + n * per_clip <= budget < fixed + (n + 1) * per_clip, (row.stage, row.offload)
    # sharding more leaves more room: ZeRO-3 with everything offloaded fits the most clips
    most = max(r.max_video_batch for r in p["rows"])
    assert [r.max_video_batch for r in p["rows"] if r.offload == "optimizer+params"] == [most]
    assert p["rows"][0].max_video_batch < most  # no ZeRO holds all 20 bytes per parameter
