"""``t2v compare`` against real MLflow stores: runs written to a SQLite store as training writes them (params,
``val/*`` curves, tags), read back directly and through a real ``mlflow server``; bad input (an unknown run or
experiment, a metric a run lacks, a store that is missing or down) ends with a message and exit status 2."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from flows import compare
from pipelines import tracking


def _run(uri: str, name: str, lr: float, colour: list[float], parent: str | None = None) -> str:
    tags = {"mlflow.parentRunId": parent} if parent else {}
    t = tracking.MlflowTracker(uri, "exp-a", run_name=name, tags={"t2v.model_config": "tiny", **tags})
    t.log_params({"train": {"lr": lr, "steps": 4, "output": f"/tmp/{name}"}})
    for i, value in enumerate(colour):
        step = 2 * (i + 1)
        t.log_metrics({"val/colour_accuracy": value, "val/train_minutes": 0.5 * (i + 1), "loss": 1.0 / step}, step)
    t.finish()
    return t.run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A SQLite store (made once: a new store takes seconds to create) with a parent run and two children."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"
    parent = tracking.MlflowTracker(uri, "exp-a", run_name="sweep lr", tags={"t2v.kind": "parent"})
    a = _run(uri, "lr=0.001", 0.001, [0.25, 0.5, 0.75], parent.run_id)
    b = _run(uri, "lr=0.003", 0.003, [0.5, 1.0, 0.75], parent.run_id)
    parent.finish()
    return uri, a, b, parent.run_id


def test_compare_prints_differing_settings_final_and_best_metrics_and_writes_plots(store, tmp_path, capsys):
    uri, a, b, parent = store
    out = tmp_path / "cmp"
    assert compare.main([a, b, "--tracking-uri", uri, "--output", str(out)]) == 0
    text = capsys.readouterr().out
    assert "train.lr" in text and "0.001" in text and "0.003" in text
    assert "train.steps" not in text and "train.output" not in text  # same on both / not a setting
    row = next(line for line in text.splitlines() if line.startswith("| val/colour_accuracy"))
    assert "0.75 / 0.75 @ 6" in row and "0.75 / 1 @ 4" in row  # final / best @ step, per run
    assert "| loss (lower is better)" in text
    for name in ("val_colour_accuracy-step.png", "val_colour_accuracy-minutes.png", "loss-step.png"):
        assert (out / name).stat().st_size > 1000
    assert (out / "comparison.md").read_text().startswith("| run ")

    # the children of a parent, or a whole experiment (its parent runs left out), give the same comparison
    assert compare.main(["--parent", parent, "--tracking-uri", uri, "--output", str(out)]) == 0
    assert "lr=0.003" in capsys.readouterr().out
    assert compare.main(["--experiment", "exp-a", "--tracking-uri", uri, "--output", str(out)]) == 0
    assert "sweep lr" not in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, words",
    [
        (["0123456789abcdef0123456789abcdef"], "no run '0123456789abcdef0123456789abcdef' in this store"),
        (["--experiment", "nope"], "no experiment 'nope' in this store; experiments there: "),
        (["--metric", "val/fvd"], "has no metric 'val/fvd'; it has: val/colour_accuracy"),
        ([], "name the runs to compare"),
    ],
)
def test_bad_input_says_what_is_wrong_without_a_traceback(store, tmp_path, capsys, args, words):
    uri, a, b, _ = store
    if args and args[0] == "--metric":
        args = [a, b, *args]
    argv = [*args, "--tracking-uri", uri, "--output", str(tmp_path / "cmp")]
    if args:
        assert compare.main(argv) == 2
    else:  # a config error: argparse's usage and message, exit status 2
        with pytest.raises(SystemExit) as exit_:
            compare.main(argv)
        assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err


def test_missing_sqlite_store_is_named(tmp_path, capsys):
    assert compare.main(["abc", "--tracking-uri", f"sqlite:///{tmp_path / 'none.db'}"]) == 2
    assert f"no MLflow store at {tmp_path / 'none.db'}" in capsys.readouterr().err
    assert not (tmp_path / "none.db").exists()


@pytest.mark.slow
def test_compare_through_a_server_and_when_it_is_down(store, free_port, tmp_path, capsys, monkeypatch):
    uri, a, b, _ = store
    port = free_port()
    server = subprocess.Popen(
        [
            os.path.join(os.path.dirname(sys.executable), "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            uri,
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, "mlflow server exited"
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, "mlflow server did not answer"
                time.sleep(0.5)
        assert compare.main([a, b, "--tracking-uri", url, "--output", str(tmp_path / "cmp")]) == 0
        assert "0.75 / 1 @ 4" in capsys.readouterr().out
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    started = time.monotonic()
    assert compare.main([a, "--tracking-uri", url]) == 2
    err = capsys.readouterr().err
    assert f"cannot reach the MLflow store at {url}" in err and "Traceback" not in err
    assert time.monotonic() - started < 30  # one try, not MLflow's minutes of retries
