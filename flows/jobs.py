"""Run a flow step as a Ray job on a cluster (``ray.job_submission``) and wait for it, showing its logs.

    t2v flow run-once --set cluster.address=http://127.0.0.1:8265   # steps become Ray jobs

A step's job is the project's own command line (``python -m flows.cli <command> ... --set key=value ...``)
run with the project as the job's working directory, so the cluster runs exactly the code of this checkout.
Submission is idempotent: each step has a stable submission id, so a re-run of the flow re-attaches to a job
that is still running (or already succeeded) instead of starting a second copy, and re-submits (with a new
suffix) only after a failure.

Authentication: Ray clusters may require a token (Ray's token auth). The token is read, in this order, from
``RAY_AUTH_TOKEN``, the file named by ``RAY_AUTH_TOKEN_PATH``, or ``~/.ray/auth_token`` and sent as a bearer
header; it is never printed or logged.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from pipelines.settings import ConfigError, check, credentials_in, is_secret_key

ROOT = Path(__file__).resolve().parent.parent

# Never shipped to the cluster: build outputs, local state and VCS data (the .gitignore applies as well).
DEFAULT_EXCLUDES = [".git", ".venv", "runs", "mlruns", "*.pt", "__pycache__"]


@dataclasses.dataclass
class ClusterConfig:
    """Where flow steps run."""

    address: str | None = None  # None: in-process on local Ray; "http://HOST:8265": submit Ray jobs there
    working_dir: str | None = None  # what the job runs in; None = this project checkout
    env_vars: dict = dataclasses.field(default_factory=dict)  # extra environment for the job
    runtime_env: dict = dataclasses.field(default_factory=dict)  # merged into the job's runtime_env (pip, ...)
    excludes: list[str] = dataclasses.field(default_factory=lambda: list(DEFAULT_EXCLUDES))
    python: str = "python"  # interpreter on the cluster that has the project's dependencies
    tracking_uri: str | None = None  # MLflow as the cluster reaches it (None: the flow's tracking_uri)
    entrypoint_num_cpus: float = 0.0  # the driver only orchestrates; workers request their own resources
    entrypoint_num_gpus: float = 0.0
    poll_s: float = 2.0  # how often to poll status and fetch new log lines
    timeout_s: float = 24 * 3600.0  # stop waiting (and stop the job) after this long

    def __post_init__(self) -> None:
        if self.address is not None:
            check(
                self.address.startswith(("http://", "https://")),
                f"cluster.address={self.address!r}: give the Ray dashboard (job server) URL, e.g. "
                "http://127.0.0.1:8265, or leave it unset to run steps in-process",
            )
        check(self.poll_s > 0, "cluster.poll_s must be > 0 seconds")
        check(self.timeout_s > 0, "cluster.timeout_s must be > 0 seconds")
        check(
            self.entrypoint_num_cpus >= 0 and self.entrypoint_num_gpus >= 0,
            "cluster.entrypoint_num_cpus/gpus must be >= 0",
        )
        for key in self.env_vars:
            check(
                isinstance(key, str) and key.isidentifier(),
                f"cluster.env_vars key {key!r} is not a valid environment variable name",
            )


class JobFailed(RuntimeError):
    """A Ray job ended in FAILED or STOPPED (or timed out); the message carries its status and last log lines."""


@dataclasses.dataclass
class JobResult:
    submission_id: str
    status: str
    logs: str


# ---------------------------------------------------------------------------------------------------------------
# Building entrypoints


def set_arguments(config: dict[str, Any], prefix: str = "") -> list[str]:
    """A nested config dict -> ``["--set", "a.b=VALUE", ...]`` where VALUE is YAML (what settings.load reads).

    Unlike ``settings.flatten`` nothing is redacted: these are the job's real settings, and Ray shows a
    job's entrypoint in its logs and dashboard. So a secret-looking setting with a value is refused: pass secrets
    to the cluster as environment variables (``cluster.env_vars`` or the cluster's own secret store).
    """
    out: list[str] = []
    for key, value in config.items():
        name = f"{prefix}{key}"
        if (is_secret_key(str(key)) and value not in (None, "") and not isinstance(value, dict)) or (
            not isinstance(value, dict) and credentials_in(value)
        ):
            raise ConfigError(
                f"{name} looks like a secret or carries credentials (a password or token in a URI, a signed "
                "query); a Ray job's command line is logged, so it cannot carry it. Set it as an environment "
                "variable on the cluster (cluster.env_vars; MLFLOW_TRACKING_USERNAME/PASSWORD for MLflow) instead"
            )
        if isinstance(value, dict) and value:
            out += set_arguments(value, name + ".")
        else:
            text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30).strip()
            text = text.removesuffix("...").strip()  # safe_dump ends a lone scalar document with "..."
            out += ["--set", f"{name}={text}"]
    return out


def cli_entrypoint(command: str, args: list[str], python: str = "python") -> str:
    """The shell command a job runs: ``python -m flows.cli <command> <args>`` with every argument quoted."""
    return " ".join(shlex.quote(part) for part in [python, "-m", "flows.cli", command, *args])


# ---------------------------------------------------------------------------------------------------------------
# Submitting and waiting


def auth_headers() -> dict[str, str]:
    """Bearer header for Ray token auth, if a token is configured (RAY_AUTH_MODE=disabled turns it off)."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return {}
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token:
        for candidate in (os.environ.get("RAY_AUTH_TOKEN_PATH"), str(Path.home() / ".ray" / "auth_token")):
            if candidate and Path(candidate).is_file():
                token = Path(candidate).read_text(encoding="utf-8").strip()
                break
    return {"Authorization": f"Bearer {token}"} if token else {}


def client(address: str):
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address, headers=auth_headers())
    except Exception as e:  # connection refused, bad version, auth: all say where and what to check
        raise ConnectionError(
            f"cannot reach the Ray job server at {address}: {e}. Check the address (the Ray dashboard URL, port "
            "8265 by default; port-forward it from Kubernetes: kubectl port-forward svc/<cluster>-head-svc "
            "8265:8265) and that the cluster has the dashboard (ray[default]) running"
        ) from None


def runtime_env(cfg: ClusterConfig, env_vars: dict[str, str] | None = None) -> dict[str, Any]:
    env = dict(cfg.runtime_env)
    env["working_dir"] = str(Path(cfg.working_dir).resolve()) if cfg.working_dir else str(ROOT)
    env["excludes"] = sorted(set(env.get("excludes", [])) | set(cfg.excludes))
    merged = {
        **dict(env.get("env_vars", {})),
        **{k: str(v) for k, v in cfg.env_vars.items()},
        **{k: str(v) for k, v in (env_vars or {}).items()},
    }
    merged.setdefault("PYTHONUNBUFFERED", "1")
    env["env_vars"] = merged
    return env


def _attempt_ids(client_, submission_id: str) -> tuple[str, Any | None]:
    """The id to use for this run of a step: the existing job if it is still useful, else the next free retry id."""
    attempt = 0
    while True:
        sid = submission_id if attempt == 0 else f"{submission_id}-retry{attempt}"
        try:
            info = client_.get_job_info(sid)
        except RuntimeError:  # "Job ... does not exist"
            return sid, None
        if not str(info.status).endswith(("FAILED", "STOPPED")):
            return sid, info  # pending, running or succeeded: re-attach
        attempt += 1


def submit_and_wait(
    cfg: ClusterConfig,
    entrypoint: str,
    submission_id: str,
    env_vars: dict[str, str] | None = None,
    log: Callable[[str], None] | None = None,
) -> JobResult:
    """Submit ``entrypoint`` as a Ray job (or re-attach to the one with this id) and wait until it ends.

    New log lines are passed to ``log`` (default: printed) as they appear, with the job's status changes.
    Raises JobFailed if the job fails, is stopped, or runs past ``cfg.timeout_s`` (then it is stopped).
    """
    from ray.job_submission import JobStatus

    check(cfg.address is not None, "submit_and_wait needs cluster.address (the Ray job server URL)")
    log = log or (lambda line: print(line, flush=True))
    jobs = client(cfg.address)
    sid, existing = _attempt_ids(jobs, submission_id)
    if existing is None:
        jobs.submit_job(
            entrypoint=entrypoint,
            submission_id=sid,
            runtime_env=runtime_env(cfg, env_vars),
            entrypoint_num_cpus=cfg.entrypoint_num_cpus or None,
            entrypoint_num_gpus=cfg.entrypoint_num_gpus or None,
            metadata={"t2v_step": submission_id},
        )
        log(f"[job {sid}] submitted to {cfg.address}: {entrypoint}")
    else:
        log(f"[job {sid}] already {existing.status} on {cfg.address}; waiting for it instead of submitting again")

    start, shown, status = time.monotonic(), 0, None
    while True:
        new_status = jobs.get_job_status(sid)
        logs = jobs.get_job_logs(sid)
        for line in logs[shown:].splitlines():
            log(f"[job {sid}] {line}")
        shown = len(logs)
        if new_status != status:
            log(f"[job {sid}] status {new_status}")
            status = new_status
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            break
        if time.monotonic() - start > cfg.timeout_s:
            jobs.stop_job(sid)
            raise JobFailed(
                f"job {sid} ran longer than cluster.timeout_s={cfg.timeout_s:.0f}s and was stopped; "
                f"last log lines:\n{_tail(logs)}"
            )
        time.sleep(cfg.poll_s)

    if status != JobStatus.SUCCEEDED:
        info = jobs.get_job_info(sid)
        reason = (info.message or "").splitlines()[0] if info.message else ""
        raise JobFailed(f"job {sid} {status}: {reason}\nlast log lines:\n{_tail(logs)}")
    return JobResult(sid, str(status), logs)


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.splitlines()[-lines:])


def run_cli_step(
    cfg: ClusterConfig,
    command: str,
    args: list[str],
    submission_id: str,
    env_vars: dict[str, str] | None = None,
    log: Callable[[str], None] | None = None,
) -> JobResult:
    """Run ``t2v <command> <args>`` as a Ray job on ``cfg.address`` (the flow's job mode for one step)."""
    return submit_and_wait(cfg, cli_entrypoint(command, args, cfg.python), submission_id, env_vars, log)
