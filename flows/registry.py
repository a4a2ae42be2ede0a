"""The MLflow model registry side of the re-training flow: register, alias, compare, promote.

Models are registered under one name; aliases (MLflow 3 replaces stages with them) mark the roles:
- ``challenger``: the newest trained and evaluated version;
- ``champion``: the version in service, loaded with ``mlflow.pyfunc.load_model("models:/<name>@champion")``.

A version carries its evaluation as tags (``eval/<metric>``, ``eval.signature``: a hash of the evaluation
settings), and the promotion decision as tags (``promotion``, ``promotion.reason``). A challenger becomes
champion only when it beats the champion on the configured metric, evaluated with the same settings; the first
version becomes champion. Every function here is idempotent: re-running a step finds what it did before.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
EVAL_TAG_PREFIX = "eval/"
SIGNATURE_TAG = "eval.signature"


def client(tracking_uri: str):
    """An MlflowClient whose registry is the tracking store (SQLite or an MLflow server)."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def get_alias(mlflow_client, name: str, alias: str):
    """The ModelVersion behind ``name@alias``, or None when the model or the alias does not exist yet."""
    from mlflow.exceptions import MlflowException

    try:
        return mlflow_client.get_model_version_by_alias(name, alias)
    except MlflowException as e:
        if "RESOURCE_DOES_NOT_EXIST" in str(e.error_code) or "not found" in str(e).lower():
            return None
        raise


def find_version(mlflow_client, name: str, run_id: str, source: str | None = None):
    """The version of ``name`` already registered from this training run (and model source), if any."""
    try:
        versions = mlflow_client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
    except Exception:  # the registered model does not exist yet
        return None
    for mv in sorted(versions, key=lambda v: int(v.version)):
        if source is None or mv.source == source or source.endswith(mv.source) or mv.source.endswith(source):
            return mv
    return None


def register(mlflow_client, name: str, model_uri: str, run_id: str, tags: dict[str, str] | None = None):
    """Register ``model_uri`` (runs:/ID/model or models:/m-ID) as a new version of ``name`` (idempotent:
    a second call for the same run returns the version the first made) and tag it."""
    from mlflow.exceptions import MlflowException

    existing = find_version(mlflow_client, name, run_id)
    if existing is not None:
        log.info("model %s version %s is already registered from run %s", name, existing.version, run_id)
        mv = existing
    else:
        try:
            mlflow_client.create_registered_model(name)
        except MlflowException as e:
            if "RESOURCE_ALREADY_EXISTS" not in str(e.error_code):
                raise
        from pipelines.tracking import tracking_uri_set

        source, model_id = _source(mlflow_client, model_uri, run_id)
        # MLflow's SQL registry looks the logged model up through the *global* tracking URI (an MLflow TODO):
        # point it at this client's store for the call.
        with tracking_uri_set(mlflow_client.tracking_uri):
            mv = mlflow_client.create_model_version(name, source, run_id=run_id, model_id=model_id)
    for key, value in (tags or {}).items():
        mlflow_client.set_model_version_tag(name, mv.version, key, str(value))
    return mlflow_client.get_model_version(name, mv.version)


def _source(mlflow_client, model_uri: str, run_id: str) -> tuple[str, str | None]:
    """The source a model version records for ``model_uri`` (MLflow 3 logged models: models:/<model id>)."""
    if model_uri.startswith("models:/m-"):
        return model_uri, model_uri.removeprefix("models:/").split("/")[0]
    if model_uri.startswith("runs:/"):
        # MLflow 3 logs models as LoggedModels; a runs:/ID/NAME URI names one of the run's outputs.
        artifact = model_uri.split("/", 3)[-1] if model_uri.count("/") >= 3 else "model"
        try:
            experiment_id = mlflow_client.get_run(run_id).info.experiment_id
            models = mlflow_client.search_logged_models([experiment_id], filter_string=f"source_run_id = '{run_id}'")
            for m in models:
                if m.name == artifact:
                    return f"models:/{m.model_id}", m.model_id
        except Exception:  # older stores without logged models: fall back to the run artifact path
            pass
    return model_uri, None


def set_alias(mlflow_client, name: str, alias: str, version: str | int) -> None:
    mlflow_client.set_registered_model_alias(name, alias, str(version))


# ---------------------------------------------------------------------------------------------------------------
# Evaluation records and the promotion decision


def record_evaluation(mlflow_client, name: str, version: str | int, metrics: dict[str, float], signature: str) -> None:
    """Store an evaluation on the version (tags ``eval/<metric>`` and ``eval.signature``)."""
    for key, value in metrics.items():
        mlflow_client.set_model_version_tag(name, str(version), f"{EVAL_TAG_PREFIX}{key}", repr(float(value)))
    mlflow_client.set_model_version_tag(name, str(version), SIGNATURE_TAG, signature)


def recorded_evaluation(mv, signature: str | None = None) -> dict[str, float] | None:
    """A version's stored metrics; None if it has none or they were measured with other settings."""
    tags = dict(mv.tags or {})
    if signature is not None and tags.get(SIGNATURE_TAG) != signature:
        return None
    metrics = {k[len(EVAL_TAG_PREFIX) :]: float(v) for k, v in tags.items() if k.startswith(EVAL_TAG_PREFIX)}
    return metrics or None


@dataclasses.dataclass
class Decision:
    promote: bool
    reason: str
    metric: str
    challenger: float
    champion: float | None  # None: there was no champion
    champion_version: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def decide(
    metric: str,
    challenger: dict[str, float],
    champion: dict[str, float] | None,
    min_delta: float = 0.0,
    champion_version: str | None = None,
) -> Decision:
    """Promote when there is no champion, or the challenger beats it on ``metric`` by more than ``min_delta``."""
    from pipelines.metrics import higher_is_better, is_better

    if metric not in challenger:
        raise ValueError(
            f"the evaluation has no {metric!r} (it has {sorted(challenger)}); choose a promotion "
            "metric the evaluation produces (shapes_accuracy needs prompts=shapes, fvd a network)"
        )
    value = float(challenger[metric])
    if champion is None:
        return Decision(True, "no champion yet: the first model becomes champion", metric, value, None)
    if metric not in champion:
        return Decision(True, f"the champion has no {metric!r} figure to defend", metric, value, None, champion_version)
    old = float(champion[metric])
    better = "higher" if higher_is_better(metric) else "lower"
    if is_better(metric, value, old, min_delta):
        reason = f"{metric} {value:.4f} beats the champion's {old:.4f} ({better} is better"
    else:
        reason = f"{metric} {value:.4f} does not beat the champion's {old:.4f} ({better} is better"
    reason += f", margin {min_delta:g})" if min_delta else ")"
    promote = is_better(metric, value, old, min_delta)
    if not math.isfinite(value):
        reason = f"{metric} is not a finite number ({value}); not promoted"
    return Decision(promote, reason, metric, value, old, champion_version)


def apply_decision(mlflow_client, name: str, version: str | int, decision: Decision) -> None:
    """Tag the version with the decision; move ``champion`` to it when promoted."""
    version = str(version)
    mlflow_client.set_model_version_tag(name, version, "promotion", "promoted" if decision.promote else "rejected")
    mlflow_client.set_model_version_tag(name, version, "promotion.reason", decision.reason)
    if decision.promote:
        set_alias(mlflow_client, name, CHAMPION, version)


# ---------------------------------------------------------------------------------------------------------------
# Getting a registered model's checkpoint back


def download_checkpoint(model_uri: str, dst: str | Path, tracking_uri: str) -> Path:
    """Download a registered/logged model's artifacts and return its TextToVideo checkpoint (the model.pt the
    pyfunc model carries). Used to evaluate a registered model and to fine-tune from the champion."""
    import mlflow.artifacts

    from pipelines.tracking import tracking_uri_set

    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    with tracking_uri_set(tracking_uri):  # models:/ URIs resolve through the global registry URI
        local = Path(
            mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst), tracking_uri=tracking_uri)
        )
    return find_checkpoint(local, model_uri)


def find_checkpoint(folder: Path, what: str = "") -> Path:
    """The t2v-platform checkpoint file inside a downloaded model folder (prefers EMA weights when both exist)."""
    from model.text_to_video import read_checkpoint

    candidates = sorted(folder.rglob("*.pt"), key=lambda p: ("ema" not in p.name, len(str(p)), str(p)))
    for path in candidates:
        try:
            read_checkpoint(path)
        except ValueError:
            continue
        return path
    raise FileNotFoundError(
        f"no t2v-platform checkpoint (*.pt) inside {what or folder}; was it logged by "
        "`t2v train` (pipelines/pyfunc.py)?"
    )
