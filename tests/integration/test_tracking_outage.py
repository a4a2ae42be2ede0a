"""A real MLflow server that is stopped (SIGSTOP: it holds its port and answers nothing, as a hung or partitioned
server does) in the middle of a run, then continued: tracking calls never block or raise while it is down, and
every metric reaches the run once it is back."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from pipelines import tracking
from pipelines.tracking_buffer import BufferedTracker


def _serve(state: Path, port: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        [
            str(Path(sys.prefix) / "bin" / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{state / 'mlflow.db'}",
            "--artifacts-destination",
            str(state / "mlartifacts"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 240  # a loaded 2-core machine takes minutes to import the server
    while time.monotonic() < deadline:
        assert proc.poll() is None, "mlflow server exited"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                if r.status == 200:
                    return proc
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError("mlflow server did not start")


def _stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


@pytest.mark.slow
def test_an_mlflow_outage_never_stops_training_and_the_run_catches_up(free_port, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail fast, so the test sees the outage soon
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = _serve(tmp_path, port)
    try:
        tracker = BufferedTracker(lambda: tracking.MlflowTracker(uri, "outage"), retry_s=0.5, finish_wait_s=60)
        tracker.log_metrics({"loss": 1.0}, 1)
        assert tracker.flush(30)

        os.killpg(server.pid, signal.SIGSTOP)  # the store stops answering
        started = time.monotonic()
        for step in range(2, 6):
            tracker.log_metrics({"loss": 1.0 / step}, step)  # "training" goes on
        assert time.monotonic() - started < 1.0  # no call waited for the store
        assert not tracker.flush(3) and tracker.down_since is not None

        os.killpg(server.pid, signal.SIGCONT)  # back
        tracker.log_metrics({"loss": 0.1}, 6)
        tracker.finish()
        history = tracking.MlflowTracker(uri, "outage", run_id=tracker.run_id).client.get_metric_history(
            tracker.run_id, "loss"
        )
        assert sorted(m.step for m in history) == [1, 2, 3, 4, 5, 6]
        assert tracker.down_since is None
    finally:
        os.killpg(server.pid, signal.SIGCONT)
        _stop(server)
