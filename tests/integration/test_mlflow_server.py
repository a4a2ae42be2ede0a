"""The local MLflow server script (clusters/local/mlflow-server.sh) starts a server that listens on 127.0.0.1 only."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_mlflow_server_script_listens_on_loopback_only(free_port, tmp_path):
    import psutil

    port = free_port()
    # the venv running the tests (a git worktree has no .venv of its own)
    env = dict(os.environ, MLFLOW_PORT=str(port), T2V_MLFLOW_DIR=str(tmp_path), T2V_VENV=sys.prefix)
    env.pop("MLFLOW_HOST", None)
    proc = subprocess.Popen(
        ["bash", str(ROOT / "clusters" / "local" / "mlflow-server.sh"), "--workers", "1"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        listening = []
        while not listening and time.monotonic() < deadline:
            assert proc.poll() is None, "mlflow server exited"
            listening = [
                c
                for c in psutil.net_connections(kind="inet")
                if c.status == psutil.CONN_LISTEN and c.laddr.port == port
            ]
            time.sleep(0.5)
        assert listening, "mlflow server did not start listening"
        assert {c.laddr.ip for c in listening} == {"127.0.0.1"}
        assert (tmp_path / "mlflow.db").exists()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
