"""t2v bench gpu on a GPU (flows/benchmarks/gpu.py): the small size, a few steps, reports MFU against the device's
peak and a step-time ratio. Skipped where there is no CUDA GPU (tests/unit/test_gpu_bench.py checks the refusal)."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.gpu]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="t2v bench gpu trains on a CUDA GPU")
def test_small_size_reports_clips_mfu_memory_and_ratio(ray_session):
    from flows.benchmarks.gpu import GpuBenchConfig, run

    results = run(GpuBenchConfig(models=["small"], steps=2, warmup=1, samples=8, cpus=1, peak_tflops=989.0))
    small = results["models"]["small"]
    assert small["clips_per_s"] > 0 and small["tflop_per_step"] > 0
    assert 0 < small["mfu"] < 1 and 0 < small["plain_mfu"] < 1
    assert 0 < small["plain_peak_gib"] and 0 < small["ds_peak_gib"] < torch.cuda.get_device_properties(0).total_memory
    assert 0.5 < small["ratio"] < 3
