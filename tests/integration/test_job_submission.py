"""Ray job submission against a real local Ray head that the test starts (bound to 127.0.0.1, token auth on):
a project entry point runs as a job with the project as working directory, re-runs re-attach, failures surface
their logs, and unauthenticated clients are refused. tests/unit/test_job_arguments.py checks the job command lines."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from flows import jobs


@pytest.fixture(scope="module")
def ray_head(free_port):
    """A private Ray head: own temp dir (so no other process's ray.init() finds it), own ports, own token."""
    # Short path: Ray's Unix sockets live under the temp dir and have a ~107 character limit.
    root = Path(tempfile.mkdtemp(prefix="t2vjobs", dir="/tmp"))
    token = root / "auth_token"
    token.write_text(secrets.token_hex(16))
    port = free_port()
    venv_bin = str(Path(sys.executable).parent)
    env = dict(
        os.environ,
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token),
        RAY_USAGE_STATS_ENABLED="0",
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",  # stop at once on SIGTERM (no 30 s drain)
        PATH=venv_bin + os.pathsep + os.environ.get("PATH", ""),
    )  # `python` in a job = this venv's python
    cmd = [
        os.path.join(venv_bin, "ray"),
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        "--port=0",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={port}",
        "--include-dashboard=true",
        "--num-cpus=1",
        f"--ray-client-server-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--temp-dir={root / 'ray'}",
        "--disable-usage-stats",
    ]
    log = open(root / "head.log", "wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{port}"
    old = os.environ.get("RAY_AUTH_TOKEN_PATH")
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(token)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                jobs.client(address)
                break
            except ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log = (root / "head.log").read_text()[-2000:]
                    raise RuntimeError(f"the Ray head did not start: {log}") from None
                time.sleep(0.5)
        yield {"address": address, "port": port, "token": token, "pid": proc.pid}
    finally:
        if old is None:
            os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
        else:
            os.environ["RAY_AUTH_TOKEN_PATH"] = old
        # `ray start --block` stops the processes it started when it gets SIGTERM (never `ray stop`: that would
        # stop every Ray on the machine).
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
        shutil.rmtree(root, ignore_errors=True)


def _cluster(ray_head, **kw) -> jobs.ClusterConfig:
    return jobs.ClusterConfig(address=ray_head["address"], poll_s=0.5, timeout_s=300, **kw)


@pytest.mark.slow
def test_project_entry_point_runs_as_a_job_and_reattaches(ray_head, tmp_path):
    cfg = _cluster(ray_head)
    out = tmp_path / "corpus"
    lines: list[str] = []
    args = [
        "--output",
        str(out),
        *jobs.set_arguments({"num_videos": 2, "num_images": 1, "width": 32, "height": 32, "seconds": 0.5}),
    ]
    sid = f"t2v-test-{secrets.token_hex(3)}"
    result = jobs.run_cli_step(cfg, "corpus", args, sid, env_vars={"T2V_MARK": "1"}, log=lines.append)
    assert result.status == "SUCCEEDED" and result.submission_id == sid
    # the job ran the project's own CLI in a copy of the project and wrote where it was told
    manifest = (out / "manifest.csv").read_text().splitlines()
    assert manifest[0].startswith("path,caption,kind") and len(manifest) == 1 + 3
    assert any("wrote 2 videos and 1 images" in line for line in lines), lines[-10:]
    assert any("status SUCCEEDED" in line for line in lines)

    # the same step again: no second job, the finished one is reported
    client = jobs.client(cfg.address)
    before = len(client.list_jobs())
    again: list[str] = []
    assert jobs.run_cli_step(cfg, "corpus", args, sid, log=again.append).status == "SUCCEEDED"
    assert len(client.list_jobs()) == before
    assert "already SUCCEEDED" in again[0]


@pytest.mark.slow
def test_failed_job_surfaces_status_and_logs_then_retries_under_a_new_id(ray_head):
    cfg = _cluster(ray_head)
    sid = f"t2v-fail-{secrets.token_hex(3)}"
    with pytest.raises(jobs.JobFailed) as err:
        jobs.run_cli_step(cfg, "corpus", ["--set", "num_videos=-1", "--output", "/tmp/unused"], sid, log=lambda s: None)
    assert "FAILED" in str(err.value) and "num_videos" in str(err.value)
    with pytest.raises(jobs.JobFailed):
        jobs.run_cli_step(cfg, "corpus", ["--set", "num_videos=-1", "--output", "/tmp/unused"], sid, log=lambda s: None)
    ids = {j.submission_id for j in jobs.client(cfg.address).list_jobs()}
    assert {sid, f"{sid}-retry1"} <= ids


@pytest.mark.slow
def test_job_server_listens_on_loopback_and_refuses_clients_without_the_token(ray_head, monkeypatch, tmp_path):
    import psutil

    listening = [
        c
        for c in psutil.net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == ray_head["port"]
    ]
    assert listening and all(c.laddr.ip == "127.0.0.1" for c in listening)

    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token either
    assert jobs.auth_headers() == {}
    with pytest.raises(ConnectionError, match="cannot reach the Ray job server"):
        jobs.client(ray_head["address"])


@pytest.mark.slow
def test_flow_step_runs_as_a_job_and_the_flow_reads_its_result(ray_head, tmp_path):
    """The flow's curate step in job mode: submitted to the head, waited for, its output read back."""
    from flows import retrain
    from pipelines import settings, shapes

    corpus = shapes.generate(
        shapes.CorpusConfig(num_videos=2, num_images=1, width=32, height=32, fps=8, seconds=1.0, seed=3),
        tmp_path / "corpus",
        progress=False,
    )
    cfg = settings.from_dict(
        retrain.RetrainConfig,
        {
            "input": str(corpus),
            "state_dir": str(tmp_path / "flow"),
            "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'm.db'}"},
            "cluster": {"address": ray_head["address"], "poll_s": 0.5},
            "curate": {
                "clips": {"width": 32, "height": 32, "num_frames": 8, "fps": 8.0},
                "quality": {"min_side": 32},
                "progress": False,
            },
        },
    )
    cycle = retrain.open_cycle(cfg)
    record = retrain.curate_step(cfg, cycle)
    assert record["accepted_total"] == 3 and record["new_since_last_training"] == 3
    ids = {j.submission_id for j in jobs.client(ray_head["address"]).list_jobs()}
    assert retrain.job_id(cfg, cycle, "curate") in ids
    assert retrain.curate_step(cfg, cycle) == record  # recorded: not submitted again
