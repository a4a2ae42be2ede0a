"""Tracking without a store: the null tracker mirrors the MLflow tracker, tracking URIs resolve and are checked, and
``tracking_uri_set`` puts the caller's URI back. tests/integration/test_mlflow_store.py reads runs back from a store."""

from __future__ import annotations

import inspect
import os

import pytest

from pipelines import settings, tracking


def test_null_tracker_has_every_tracker_method():
    public = {n for n, v in inspect.getmembers(tracking.MlflowTracker, inspect.isfunction) if not n.startswith("_")}
    missing = {n for n in public if not hasattr(tracking.NullTracker, n)}
    assert not missing
    tracking.NullTracker().log_metrics({"loss": 1.0}, step=1)  # and they do nothing


def test_tracking_uri_defaults_and_checks(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert tracking.default_tracking_uri() == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    assert tracking.default_tracking_uri() == "http://tracking:5000"
    assert tracking.resolve_tracking_uri("sqlite:///rel/m.db") == f"sqlite:///{tmp_path / 'rel' / 'm.db'}"
    assert (tmp_path / "rel").is_dir()
    with pytest.raises(settings.ConfigError, match="sqlite"):
        tracking.resolve_tracking_uri("some/folder")


def test_tracking_uri_set_restores_the_callers_setting(monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////tmp/caller.db")
    with tracking.tracking_uri_set("sqlite:////tmp/other.db"):
        assert mlflow.get_tracking_uri() == "sqlite:////tmp/other.db"
    assert mlflow.get_tracking_uri() == "sqlite:////tmp/caller.db"
    assert os.environ["MLFLOW_TRACKING_URI"] == "sqlite:////tmp/caller.db"
