"""What a fair comparison of runs needs to know besides their settings: the code version, the hardware, and the
throughput and model FLOPs utilisation (MFU) measured while training. Training puts them on its MLflow run as
``t2v.*`` tags (and ``mlflow.source.git.commit``, which the MLflow UI shows as the run's source version)."""

from __future__ import annotations

import contextlib
import json
import logging
import platform
import subprocess
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent

# Dense bf16 tensor-core peak per device, FLOP/s (vendor data sheets; the first key found in the device name wins, so
# PCIe/NVL variants come before their SXM family name); CPUs have no entry: no MFU there (device_peak_tflops sets one).
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
    "L4": 121e12,
}


def code_version(root: Path = ROOT) -> dict[str, str]:
    """The commit the code runs from and whether the work tree has uncommitted changes ("unknown" outside git)."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"mlflow.source.git.commit": "unknown", "t2v.code_dirty": "unknown"}
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {"mlflow.source.git.commit": commit, "t2v.code_dirty": "unknown" if dirty is None else str(bool(dirty))}


def device_kind(device) -> str:
    """``NVIDIA H100 80GB HBM3`` for a GPU, the processor's model name for a CPU."""
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return "CPU " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU " + (platform.processor() or platform.machine())


def hardware_tags(device, world_size: int, cpus_per_worker: int) -> dict[str, str]:
    gpu = getattr(device, "type", str(device)) == "cuda"
    return {
        "t2v.device": device_kind(device),
        "t2v.device_count": str(world_size if gpu else world_size * cpus_per_worker),
        "t2v.device_unit": "GPU" if gpu else "CPU core",
        "t2v.workers": str(world_size),
    }


def peak_flops(device, bf16: bool, configured_tflops: float = 0.0) -> float | None:
    """Peak FLOP/s of one device: the configured figure, else the bf16 table for a known GPU, else None."""
    if configured_tflops > 0:
        return configured_tflops * 1e12
    if not bf16:
        return None
    name = device_kind(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


class Throughput:
    """Step times of one rank, and the FLOPs of one training step counted once (``torch.utils.flop_counter``
    on the first step: matmuls and convolutions, forward and backward, as MFU counts them)."""

    def __init__(self) -> None:
        self.step_times: list[float] = []
        self.samples_per_s: list[float] = []
        self.flops_per_step: float | None = None

    @contextlib.contextmanager
    def counting(self, active: bool) -> Iterator[None]:
        if not active or self.flops_per_step is not None:
            yield
            return
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter:
            yield
        self.flops_per_step = float(counter.get_total_flops())

    def record(self, step_time: float, samples_per_s: float) -> None:
        self.step_times.append(step_time)
        self.samples_per_s.append(samples_per_s)

    def summary(self, peak: float | None) -> dict[str, float]:
        """Medians over the run (the first, counted, step left out when there are others)."""
        import numpy as np

        times = self.step_times[1:] or self.step_times
        rates = self.samples_per_s[1:] or self.samples_per_s
        if not times:
            return {}
        out = {"throughput_samples_per_s": float(np.median(rates)), "median_step_time_s": float(np.median(times))}
        if self.flops_per_step:
            achieved = self.flops_per_step / out["median_step_time_s"]  # per rank: each rank does the same work
            out["tflops_per_device"] = achieved / 1e12
            if peak:
                out["mfu"] = achieved / peak
        return out


def summary_tags(summary: dict[str, float]) -> dict[str, str]:
    """The throughput summary as run tags too: tags show as columns of the MLflow runs table and compare view."""
    return {f"t2v.{k}": f"{v:.4g}" for k, v in summary.items()}


def data_digest(digests: dict[str, str]) -> str:
    """One digest for the whole training data: the shard sets' digests, order-free."""
    import hashlib

    return hashlib.sha256(json.dumps(sorted(digests.items())).encode()).hexdigest()[:16]
