"""t2v bench train (flows/benchmarks/train.py): the figure it prints for the CPU that Ray's other processes use while
the Ray job trains counts this process's descendants and leaves the training worker out. Two busy child processes
stand in for Ray's: one named like Ray Train's worker, one like any other Ray process."""

from __future__ import annotations

import subprocess
import sys
import time

BUSY = "import time\nt = time.time()\nwhile time.time() - t < 3:\n    pass\n"


def test_ray_cpu_counts_descendants_except_the_training_worker():
    from flows.benchmarks.train import RayCpu

    t0 = time.time()
    with RayCpu(every=0.2) as ray_cpu:
        other = subprocess.Popen([sys.executable, "-c", BUSY])
        worker = subprocess.Popen([sys.executable, "-c", BUSY, "RayTrainWorker"])
        assert other.wait(timeout=30) == 0 and worker.wait(timeout=30) == 0
    seen = set().union(*(used for _, used in ray_cpu.samples))
    assert other.pid in seen
    assert worker.pid not in seen
    # the busy process alone: about one core when the machine is free, never the two of both children
    cores = ray_cpu.cores(t0 + 0.5, t0 + 2.5)
    assert cores is not None and 0.2 < cores < 1.3
    assert ray_cpu.cores(t0 + 0.5, t0 + 0.6) is None  # fewer than two samples: no figure rather than a wrong one
