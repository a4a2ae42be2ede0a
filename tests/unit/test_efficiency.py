"""Live efficiency figures (pipelines/training/efficiency.py): the per-step figures and the peak table
(tests/integration/test_efficiency_flops.py checks the FLOP count itself)."""

from __future__ import annotations

import pytest
import torch


def test_figures_and_progress_line():
    from pipelines.training.efficiency import Efficiency, StepFlops

    flops = StepFlops(image_sample=1e12, video_sample=4e12, image_batch=2, video_batch=3)  # 14 TFLOP per step
    eff = Efficiency(flops, world_size=2, peak_flops=100e12, device=torch.device("cpu"))
    fig = eff.figures(step_time=0.5, data_wait=0.1)
    assert fig["eff/tflops_per_device"] == pytest.approx(28.0)
    assert fig["eff/mfu"] == pytest.approx(0.28)
    assert fig["eff/clips_per_s"] == pytest.approx(12.0)  # 3 clips x 2 ranks per 0.5 s
    assert fig["eff/data_wait_fraction"] == pytest.approx(0.2)
    assert fig["eff/peak_memory_gib"] > 0  # the test process's peak resident set
    line = Efficiency.progress(fig)
    assert "12.00 clips/s" in line and "MFU 28.0%" in line
    assert "2.8 TFLOP/sample" in eff.describe()
    # without a known peak (a CPU, no device_peak_tflops) there is no MFU, and the start line says how to get one
    cpu = Efficiency(flops, 1, None, torch.device("cpu"))
    assert "eff/mfu" not in cpu.figures(0.5, 0.0) and "device_peak_tflops" in cpu.describe()
    assert "MFU" not in Efficiency.progress(cpu.figures(0.5, 0.0))


def test_peak_by_device_name_and_configured_override(monkeypatch):
    from pipelines import run_facts

    gpu = torch.device("cuda")  # only its name is read, through device_kind (no GPU is touched)
    for name, tflops in (("NVIDIA H200", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H100 80GB HBM3", 989)):
        monkeypatch.setattr(run_facts, "device_kind", lambda device, name=name: name)
        assert run_facts.peak_flops(gpu, bf16=True) == tflops * 1e12, name
    assert run_facts.peak_flops(gpu, bf16=False) is None  # the table is bf16 peaks
    monkeypatch.setattr(run_facts, "device_kind", lambda device: "NVIDIA B200")
    assert run_facts.peak_flops(gpu, bf16=True) is None
    assert run_facts.peak_flops(gpu, bf16=True, configured_tflops=2250) == 2250e12


def test_flops_count_the_fps_and_condition_paths_the_run_uses():
    from model.registry import get_config
    from pipelines.training.efficiency import unet_sample_flops

    base = {"unet.model_channels": 8, "unet.num_groups": 4, "num_frames": 4, "height": 16, "width": 16}
    plain = unet_sample_flops(get_config("tiny", base), 4)
    fps = unet_sample_flops(get_config("tiny", {**base, "unet.use_fps_condition": True}), 4)
    cond = {"unet.extra_in_channels": 8, "unet.conditions": {"kinds": ["motion", "sketch"], "hidden": 16}}
    conditioned = unet_sample_flops(get_config("tiny", {**base, **cond}), 4)
    assert plain < fps < conditioned  # the fps MLP, then the condition encoder, add their work
