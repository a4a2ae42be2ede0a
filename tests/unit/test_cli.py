"""The ``t2v`` command's own logic: ``t2v test`` runs the checks in order and stops at the first failure with a fix,
and ``t2v bench`` dispatches by name. The commands themselves are not run here, except the pytest runner on a
one-line test (its exit code)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from flows import cli


class _Calls(list):
    """The (command, cwd) of each step ``t2v test`` ran; step ``i`` returns ``codes.get(i, 0)``."""

    def __init__(self):
        super().__init__()
        self.codes: dict[int, int] = {}

    def __call__(self, cmd, cwd=None):
        self.append((cmd, cwd))
        return self.codes.get(len(self) - 1, 0)


@pytest.fixture
def calls(monkeypatch):
    """What ``t2v test`` runs, recorded instead of run."""
    recorded = _Calls()
    monkeypatch.setattr(cli.subprocess, "call", recorded)
    return recorded


def test_t2v_test_runs_lint_format_layering_then_pytest(calls, capsys):
    assert cli.main(["test", "-x", "-k", "loader"]) == 0
    cmds = [cmd for cmd, _ in calls]
    assert cmds[0] == [sys.executable, "-m", "ruff", "check", "."]
    assert cmds[1] == [sys.executable, "-m", "ruff", "format", "--check", "."]
    assert cmds[2][0].endswith("lint-imports") and cmds[2][0].startswith(str(Path(sys.executable).parent))
    # the unit tier runs on a process per core, then the integration tier; pytest arguments go to both
    unit = [sys.executable, "-m", "flows.run_pytest", "tests/unit", "-n", str(cli.UNIT_WORKERS), "-x", "-k", "loader"]
    assert cmds[3:] == [unit, [sys.executable, "-m", "flows.run_pytest", "tests/integration", "-x", "-k", "loader"]]
    assert all(cwd == cli.ROOT for _, cwd in calls)  # the project's own settings (pyproject.toml) apply
    assert capsys.readouterr().err == ""


def test_t2v_test_given_a_path_runs_just_that(calls):
    assert cli.main(["test", "tests/unit/test_cli.py::test_bench_dispatches_by_name", "-q"]) == 0
    assert calls[-1][0] == [
        sys.executable,
        "-m",
        "flows.run_pytest",
        "tests/unit/test_cli.py::test_bench_dispatches_by_name",
        "-q",
    ]
    assert len(calls) == 4


@pytest.mark.parametrize("body, code", [("assert True", 0), ("assert False", 1)])
def test_the_pytest_runner_exits_with_pytests_code(tmp_path, body, code):
    (tmp_path / "test_one.py").write_text(f"def test_one():\n    {body}\n")
    done = subprocess.run(
        [sys.executable, "-m", "flows.run_pytest", "-q", "-p", "no:cacheprovider", str(tmp_path / "test_one.py")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == code, done.stdout + done.stderr
    assert ("1 passed" if code == 0 else "1 failed") in done.stdout  # the report was written before the exit


@pytest.mark.parametrize(
    "failing, code, message",
    [
        (0, 1, "ruff check failed (exit 1): run `"),
        (1, 1, "ruff format failed (exit 1): run `"),
        (2, 1, "lint-imports failed (exit 1): an import crosses a layer"),
        (3, 1, "pytest unit failed (exit 1): see the failures above"),
        (4, 1, "pytest integration failed (exit 1): see the failures above"),
        (3, 5, "pytest unit failed (exit 5): no tests were collected"),
    ],
    ids=["ruff-check", "ruff-format", "lint-imports", "pytest-unit", "pytest-integration", "pytest-collected-nothing"],
)
def test_t2v_test_stops_at_the_first_failing_check_and_says_how_to_fix_it(calls, capsys, failing, code, message):
    calls.codes = {failing: code}
    assert cli.main(["test"]) == code
    assert len(calls) == failing + 1  # nothing after the failing step runs
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("t2v test: " + message), err
    if failing == 1:
        assert "ruff format ." in err[0]


def test_t2v_test_names_a_missing_tool(monkeypatch, capsys):
    def call(cmd, cwd=None):
        if cmd[0].endswith("lint-imports"):
            raise FileNotFoundError(cmd[0])
        return 0

    monkeypatch.setattr(cli.subprocess, "call", call)
    assert cli.main(["test"]) == 127
    assert "lint-imports failed (exit 127)" in capsys.readouterr().err


def test_bench_dispatches_by_name(capsys):
    from flows import benchmarks as bench

    assert bench.main([]) == 0 and "curate" in capsys.readouterr().out
    assert bench.main(["nope"]) == 2 and "unknown benchmark 'nope'" in capsys.readouterr().err
    assert set(bench.BENCHMARKS) == {
        "model",
        "curate",
        "train",
        "learn",
        "conditions",
        "masked",
        "scale",
        "buckets",
        "gpu",
    }
