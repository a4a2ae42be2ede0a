"""Poison inputs: an input whose processing ends its worker process (a crash in FFmpeg, the kernel's or Ray's
out-of-memory killer, a hang past the hard time limit) must neither stall the run nor come back on every re-run.

How a run gets there: the pipeline's tasks are retried ``task_retries`` times when their worker dies (Ray Data's
own default is to retry for ever), and a block whose task still fails is dropped (``max_errored_blocks``) so
the rest of the run goes on. The driver then knows which inputs never came back. ``run_alone`` runs each of them
in a task of its own, once, under a wall-clock limit; an input whose own task fails is rejected with the reason
(``worker_crash``, ``out_of_memory``, ``time_limit``) and so reaches the ledger: no re-run tries it again. The
others were bystanders in a poisoned block and come out as usual.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from pipelines.curation.stages import reject, to_table

if TYPE_CHECKING:
    from pipelines.curation.config import CurateConfig

log = logging.getLogger(__name__)

# Reason codes of inputs rejected here (stage "decode": the FFmpeg stages are where a worker can die).
WORKER_CRASH, OUT_OF_MEMORY, TIME_LIMIT = "worker_crash", "out_of_memory", "time_limit"


def _run_stages(stages: list, table: pa.Table):
    yield STARTED  # the driver's clock starts here, not at submission (a new worker may take seconds to start)
    for stage in stages:
        table = stage(table)
    yield table


STARTED = "started"


def run_alone(
    rows: list[dict[str, Any]],
    stages: list,
    cfg: CurateConfig,
    receive: Callable[[list[dict[str, Any]]], None],
) -> list[pa.Table]:
    """Run each of ``rows`` alone through ``stages`` (the CPU stages), one task each, once. Inputs whose task
    fails go to ``receive`` as rejected rows; the tables of the others are returned for the rest of the pipeline.
    """
    import ray
    from ray.exceptions import GetTimeoutError, OutOfMemoryError, RayError, TaskCancelledError

    for stage in stages:
        stage.hard_limit_s = None  # the driver's limit below ends a hung task, and names the reason
    limit = cfg.hard_limit_s
    task = ray.remote(_run_stages).options(
        num_cpus=cfg.task_cpus, max_retries=0, retry_exceptions=False, num_returns="streaming"
    )
    slots = max(1, int(ray.cluster_resources().get("CPU", 1) / cfg.task_cpus))
    stages_ref = ray.put(stages)
    pending = list(rows)
    running: dict[Any, tuple[dict[str, Any], float]] = {}  # generator -> (input row, started or inf)
    finished: list[pa.Table] = []
    log.warning(
        "%d input(s) came back from no task (their tasks' workers died %d time(s) each); running each alone "
        "to find which one is at fault",
        len(rows),
        cfg.task_retries + 1,
    )
    while pending or running:
        while pending and len(running) < slots:
            row = pending.pop()
            running[task.remote(stages_ref, to_table([row]))] = (row, float("inf"))
        ready, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
        for gen in ready:
            row, started = running.pop(gen)
            try:
                item = ray.get(next(gen))
                if isinstance(item, str) and item == STARTED:
                    running[gen] = (row, time.monotonic())
                else:
                    finished.append(item)
            except OutOfMemoryError as e:
                receive([_rejected(row, OUT_OF_MEMORY, f"its worker was killed for using too much memory: {e}")])
            except (GetTimeoutError, TaskCancelledError, StopIteration):
                receive([_rejected(row, TIME_LIMIT, f"it ran past the hard time limit of {limit:.0f} s")])
            except RayError as e:
                receive([_rejected(row, WORKER_CRASH, f"its worker process died while processing it: {e}")])
        now = time.monotonic()
        for gen, (row, started) in list(running.items()):
            if now - started > limit:
                ray.cancel(gen, force=True)  # ends the worker process: a hung FFmpeg call holds no lock of ours
                running.pop(gen)
                receive([_rejected(row, TIME_LIMIT, f"it ran past the hard time limit (input_limit_s={limit:.0f})")])
    return finished


def _rejected(row: dict[str, Any], reason: str, detail: str) -> dict[str, Any]:
    log.error("rejected %s: %s (%s)", row["source"], reason, detail.splitlines()[0][:300])
    return dict(reject(row, "decode", reason, detail), input_rows=1)
