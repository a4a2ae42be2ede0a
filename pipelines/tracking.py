"""Experiment tracking for training: one MLflow run per training output, written by rank 0 only.

    tracker = MlflowTracker(default_tracking_uri(), "t2v-train", run_name="tiny")   # or NullTracker()
    tracker.log_params(settings.to_dict(cfg))        # flattened to dotted keys, secrets redacted
    tracker.log_metrics({"loss": 0.3, "lr": 1e-4}, step=10)
    tracker.log_artifact("sample.mp4", "samples/step_000010")
    tracker.finish()

``Tracker`` is the protocol; ``MlflowTracker`` writes to any MLflow tracking URI through ``MlflowClient``
(never the fluent global state, so an MLflow run the caller has active is left alone); ``NullTracker`` has the
same methods and does nothing (every rank but 0 gets one). The default store is a local SQLite database
(``default_tracking_uri``): MLflow 3 refuses the old file store.

Secrets never reach MLflow: params go through ``settings.flatten`` (values under secret-looking keys are
redacted) and tags and URIs through ``settings.redact``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

from pipelines import settings
from pipelines.settings import check

log = logging.getLogger(__name__)

# MLflow limits (sqlite store): a param value holds at most 6000 characters; one log_batch call at most 1000
# metrics and 100 params.
MAX_PARAM_CHARS = 6000
MAX_BATCH_PARAMS = 100


@dataclass
class TrackingConfig:
    """Where and how a run is tracked: the ``mlflow`` section of ``t2v train``, ``t2v evaluate`` and ``t2v flow``."""

    enabled: bool = True
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/runs/mlflow.db
    experiment: str = "t2v"
    run_name: str | None = None
    run_id: str | None = None  # log into this existing run (evaluation into the model's training run)
    tags: dict[str, Any] = field(default_factory=dict)
    system_metrics_s: float = 10.0  # system metrics sampling interval; 0 turns them off

    MOVED_SETTINGS: ClassVar[dict[str, str]] = {
        "log_model": "set log_model in the training settings (beside mlflow, not under it)",
        "model_name": "set logged_model_name in the training settings (beside mlflow, not under it)",
        "model_weights": "set logged_model_weights in the training settings (beside mlflow, not under it)",
    }

    def __post_init__(self) -> None:
        check(bool(self.experiment), "mlflow.experiment is empty: name an MLflow experiment, e.g. t2v-train")
        check(self.system_metrics_s >= 0, "mlflow.system_metrics_s must be >= 0 seconds (0 turns it off)")


def default_tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI`` if set, else a SQLite database ``runs/mlflow.db`` under the working directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'runs' / 'mlflow.db'}"


def resolve_tracking_uri(uri: str | None) -> str:
    """A URI every process of the job can use: SQLite paths made absolute (Ray workers run in other working
    directories) and their folder created; a bare path is refused (the MLflow 3 file store is deprecated)."""
    uri = uri or default_tracking_uri()
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///") :])
        path = path if path.is_absolute() else Path.cwd() / path
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{path}"
    if "://" not in uri and not uri.startswith(("databricks", "file:")):
        raise settings.ConfigError(
            f"tracking URI {uri!r} is a bare path: MLflow 3 deprecates the file store; use sqlite:///{uri}/mlflow.db "
            "or an http(s):// tracking server"
        )
    return uri


def artifact_location(tracking_uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside a SQLite database (MLflow's default is ./mlruns of
    whatever directory the process runs in); the server's default for any other store."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return (Path(tracking_uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()


def ensure_experiment(tracking_uri: str, name: str) -> str:
    """The id of experiment ``name``, created (artifacts per ``artifact_location``) if it does not exist."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location(tracking_uri))
    except Exception:  # another process created it between our two calls
        return client.get_experiment_by_name(name).experiment_id


@contextlib.contextmanager
def tracking_uri_set(uri: str) -> Iterator[None]:
    """Temporarily point MLflow's global tracking URI at ``uri`` (for the few MLflow calls that read it, such as
    ``Model.log``), restoring the caller's URI afterwards."""
    import mlflow
    from mlflow.tracking._tracking_service import utils

    # set_tracking_uri also writes $MLFLOW_TRACKING_URI; put back exactly what the caller had.
    before_global, before_env = utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before_global) if before_global is not None else None
        utils._tracking_uri = before_global
        if before_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = before_env


class Tracker(Protocol):
    """What training logs. Every method is safe to call on every rank through ``NullTracker``."""

    run_id: str | None

    def log_params(self, params: dict[str, Any]) -> None: ...
    def set_tags(self, tags: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def log_text(self, text: str, artifact_file: str) -> None: ...
    def log_dataset(
        self, df: Any, name: str, source: str, digest: str | None = None, context: str = "training"
    ) -> None: ...
    def finish(self, status: str = "FINISHED") -> None: ...
    def pause(self) -> None: ...


class NullTracker:
    """A tracker that records nothing (ranks other than 0, and runs with tracking switched off)."""

    run_id: str | None = None

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def set_tags(self, tags: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def log_text(self, text: str, artifact_file: str) -> None:
        pass

    def log_dataset(
        self, df: Any, name: str, source: str, digest: str | None = None, context: str = "training"
    ) -> None:
        pass

    def finish(self, status: str = "FINISHED") -> None:
        pass

    def pause(self) -> None:
        pass


class MlflowTracker:
    """Logs to one MLflow run: a new one, or an existing one (``run_id``) to continue after a resume.

    ``system_metrics_s`` > 0 samples CPU/memory/disk/network (and GPU when present) every that many seconds into
    ``system/*`` metrics of the run (needs psutil).
    """

    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment: str = "t2v-train",
        *,
        run_id: str | None = None,
        run_name: str | None = None,
        tags: dict[str, Any] | None = None,
        system_metrics_s: float = 0.0,
    ):
        from mlflow import MlflowClient

        self.tracking_uri = resolve_tracking_uri(tracking_uri)
        self.client = MlflowClient(self.tracking_uri)
        if run_id is None:
            experiment_id = self._experiment_id(experiment)
            run = self.client.create_run(experiment_id, run_name=run_name, tags=_safe_tags(tags or {}))
            self.run_id = run.info.run_id
        else:
            run = self.client.get_run(run_id)  # raises if the run does not exist in this store
            self.run_id = run_id
            if run.info.status != "RUNNING":
                self.client.update_run(run_id, status="RUNNING")
            if tags:
                self.set_tags(tags)
        self._monitor = None
        if system_metrics_s > 0:
            self._start_system_metrics(system_metrics_s)

    def _experiment_id(self, name: str) -> str:
        return ensure_experiment(self.tracking_uri, name)

    def _start_system_metrics(self, interval_s: float) -> None:
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(
                self.run_id,
                sampling_interval=interval_s,
                samples_before_logging=1,
                resume_logging=True,
                tracking_uri=self.tracking_uri,
            )
            self._monitor.start()
        except Exception as e:  # psutil missing or the store refuses: tracking must never stop training
            log.warning("system metrics are not logged: %s", e)
            self._monitor = None

    # -- Tracker ------------------------------------------------------------------------------------------------

    def log_params(self, params: dict[str, Any]) -> None:
        """Log params not yet on the run. A value that differs from one already logged (a resumed run with a
        changed setting) cannot be changed in MLflow; it is recorded as tag ``changed_param.<key>`` instead."""
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        safe = settings.flatten(params)  # nested dicts -> dotted keys, secrets redacted
        new, changed = [], {}
        for key, value in safe.items():
            text = _param_text(key, value)
            if key not in existing:
                new.append(Param(key, text))
            elif existing[key] != text:
                changed[f"changed_param.{key}"] = text
        for i in range(0, len(new), MAX_BATCH_PARAMS):
            self.client.log_batch(self.run_id, params=new[i : i + MAX_BATCH_PARAMS], synchronous=True)
        if changed:
            self.set_tags(changed)

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        safe = _safe_tags(tags)
        if safe:
            self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in safe.items()], synchronous=True)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric
        from mlflow.utils.time import get_current_time_millis

        now = get_current_time_millis()
        batch = [
            Metric(k, float(v), now, int(step)) for k, v in metrics.items() if v is not None and math.isfinite(float(v))
        ]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch, synchronous=True)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_dataset(
        self, df: Any, name: str, source: str, digest: str | None = None, context: str = "training"
    ) -> None:
        """Record a dataset (a pandas DataFrame describing it, e.g. a shard index) as an input of the run."""
        import mlflow.data
        from mlflow.entities import DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        # The schema is inferred lazily (in _to_mlflow_entity too); its hint about integer columns concerns model
        # inputs at inference time, not a record of what a run read.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer", category=UserWarning)
            warnings.filterwarnings("ignore", message=".*source.*", category=UserWarning)
            entity = mlflow.data.from_pandas(df, source=source, name=name, digest=digest)._to_mlflow_entity()
        self.client.log_inputs(
            self.run_id, datasets=[DatasetInput(entity, tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])]
        )

    def finish(self, status: str = "FINISHED") -> None:
        """Stop system metrics and mark the run ``status`` (FINISHED | FAILED | KILLED)."""
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None
        self.client.set_terminated(self.run_id, status=status)

    def pause(self) -> None:
        """Stop system metrics but leave the run RUNNING (another process continues it)."""
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None


def metric_history(tracking_uri: str, run_id: str, keys: list[str]) -> dict[str, tuple[list[int], list[float]]]:
    """``{key: (steps, values)}`` of each metric in ``keys`` that the run logged, in step order."""
    from mlflow import MlflowClient

    client = MlflowClient(resolve_tracking_uri(tracking_uri))
    history = {}
    for key in keys:
        points = sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
        if points:
            history[key] = ([m.step for m in points], [m.value for m in points])
    return history


def _param_text(key: str, value: Any) -> str:
    text = "" if value is None else str(value)
    if len(text) > MAX_PARAM_CHARS:
        log.warning("param %s is %d characters long; MLflow keeps the first %d", key, len(text), MAX_PARAM_CHARS)
        text = text[:MAX_PARAM_CHARS]
    return text


def _safe_tags(tags: dict[str, Any]) -> dict[str, str]:
    safe = settings.redact({str(k): v for k, v in tags.items()})
    return {k: _param_text(k, v) for k, v in safe.items() if v is not None}
