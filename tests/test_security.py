"""Safety of what the project starts and stores: servers bind 127.0.0.1, checkpoints load without running pickled
code, and credential-like values never reach MLflow params, tags, artifacts or logs."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch

from pipelines import settings

ROOT = Path(__file__).resolve().parent.parent
SECRET = "s3cr3t-Value-42"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_mlflow_server_script_listens_on_loopback_only(tmp_path):
    import psutil

    port = _free_port()
    env = dict(os.environ, MLFLOW_PORT=str(port), T2V_MLFLOW_DIR=str(tmp_path), T2V_VENV=str(ROOT / ".venv"))
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


class _Payload:
    def __reduce__(self):  # what a malicious pickle does: run code when loaded
        return (os.system, (f"touch {self.marker}",))


def test_checkpoints_load_with_weights_only(tmp_path):
    from flows.registry import find_checkpoint
    from model.text_to_video import TextToVideo

    marker = tmp_path / "pwned"
    payload = _Payload()
    payload.marker = marker
    bad = tmp_path / "model" / "model.pt"
    bad.parent.mkdir()
    torch.save({"format": "t2v-platform/1", "config": {}, "unet": payload}, bad)
    with pytest.raises(ValueError, match="not a t2v-platform checkpoint"):
        TextToVideo.from_checkpoint(bad)
    with pytest.raises(FileNotFoundError, match="no t2v-platform checkpoint"):
        find_checkpoint(bad.parent)
    assert not marker.exists(), "loading a checkpoint ran pickled code"


def test_credentials_in_configs_are_redacted_from_mlflow_and_logs(tmp_path, capsys, shapes_corpus):
    """A config with credential-like values: they reach neither MLflow (params, tags, artifacts) nor the output."""
    from mlflow import MlflowClient

    from flows import evaluate, retrain
    from model.registry import get_config
    from model.text_to_video import TextToVideo

    # evaluation, logging into MLflow: a credential-like key inside the settings
    ckpt = TextToVideo.build(get_config("tiny")).save(tmp_path / "model.pt")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = settings.from_dict(
        evaluate.EvalConfig,
        {
            "checkpoint": str(ckpt),
            "num_prompts": 1,
            "steps": 1,
            "clip_model": "t2v-tiny-clip",
            "num_samples": 1,
            "output": str(tmp_path / "eval"),
            "fvd_kwargs": {"api_token": SECRET},
            "mlflow": {"tracking_uri": uri},
        },
    )
    result = evaluate.run(cfg)
    client = MlflowClient(uri)
    run = client.get_run(result["mlflow_run_id"])
    assert run.data.params["eval.fvd_kwargs.api_token"] == settings.REDACTED
    assert SECRET not in json.dumps({**run.data.params, **run.data.tags})
    for artifact in ("eval/eval.yaml", "eval/metrics.json"):
        local = client.download_artifacts(run.info.run_id, artifact, str(tmp_path / "dl"))
        assert SECRET not in Path(local).read_text()

    # the flow: a password in the tracking URI and a secret environment variable for the cluster
    flow = settings.from_dict(
        retrain.RetrainConfig,
        {
            "input": str(shapes_corpus),
            "state_dir": str(tmp_path / "flow"),
            "mlflow": {"tracking_uri": f"http://alice:{SECRET}@mlflow.example:5000"},
            "cluster": {"env_vars": {"MLFLOW_TRACKING_PASSWORD": SECRET}},
        },
    )
    assert (
        retrain.main(
            [
                "run-once",
                "--input",
                str(shapes_corpus),
                "--set",
                f"mlflow.tracking_uri=http://a:{SECRET}@h:1",
                "--set",
                f"cluster.env_vars.AWS_SECRET_ACCESS_KEY={SECRET}",
                "--dry-run",
            ]
        )
        == 0
    )
    cycle = retrain.open_cycle(flow)  # records the cycle's config on disk
    assert SECRET not in (cycle / "cycle.json").read_text()
    assert SECRET not in settings.dump(flow)
    out = capsys.readouterr()
    assert SECRET not in out.out + out.err
