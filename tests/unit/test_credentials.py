"""Credentials never reach a command line, a log, MLflow params or Prefect: URIs with user info or signed queries
and the usual secret key names are redacted, and refused where a value cannot be redacted (job command lines, the
flow's config)."""

from __future__ import annotations

import logging

import pytest

from flows import jobs, retrain
from pipelines import logs, settings
from pipelines.settings import REDACTED, ConfigError


@pytest.mark.parametrize(
    "uri, kept",
    [
        ("http://user:pw@mlflow:5000/api", "http://***redacted***@mlflow:5000/api"),
        ("https://ghp_TOKEN@github.com/x.git", "https://***redacted***@github.com/x.git"),
        ("postgresql://u:p@db/mlflow", "postgresql://***redacted***@db/mlflow"),
        (
            "https://b.s3.amazonaws.com/k.mp4?X-Amz-Expires=60&X-Amz-Credential=AKIA%2F1&X-Amz-Signature=abc",
            "https://b.s3.amazonaws.com/k.mp4?X-Amz-Expires=60&X-Amz-Credential=***redacted***"
            "&X-Amz-Signature=***redacted***",
        ),
        ("https://a.blob.core.windows.net/c/v.mp4?sv=2024&sig=SECRET&se=x", None),
        ("https://storage.googleapis.com/b/o?X-Goog-Signature=s&page=2", None),
        ("sqlite:////runs/mlflow.db", "sqlite:////runs/mlflow.db"),
        ("http://host/path?page=2&sort=asc", "http://host/path?page=2&sort=asc"),
    ],
)
def test_uris_lose_user_info_and_signed_query_values(uri, kept):
    out = settings.redact_uri(uri)
    if kept is not None:
        assert out == kept
    assert "SECRET" not in out and "=s&" not in out and "pw" not in out.split("@")[0]


def test_the_usual_secret_key_names_are_redacted():
    cfg = {
        "sentry_dsn": "https://k@sentry/1",
        "auth": "Bearer x",
        "db": {"connection_string": "Server=x;Password=y"},
        "api_key": "k",
        "author": "Ada",  # a word that only contains "auth"
        "keyframes": 3,
    }
    flat = settings.flatten(cfg)
    assert flat["sentry_dsn"] == flat["auth"] == flat["db.connection_string"] == flat["api_key"] == REDACTED
    assert flat["author"] == "Ada" and flat["keyframes"] == 3
    assert sorted(settings.credentials_in(cfg)) == ["api_key", "auth", "db.connection_string", "sentry_dsn"]


def test_job_command_lines_refuse_credentials_in_values():
    with pytest.raises(ConfigError, match="mlflow.tracking_uri"):
        jobs.set_arguments({"mlflow": {"tracking_uri": "http://u:secret@mlflow:5000"}})
    with pytest.raises(ConfigError, match="input"):
        jobs.set_arguments({"input": "https://b/m.csv?X-Amz-Signature=abc"})
    assert jobs.set_arguments({"mlflow": {"tracking_uri": "http://mlflow:5000"}})


def test_the_flow_refuses_a_config_with_credentials_before_prefect_sees_it(monkeypatch):
    cfg = retrain.load_config(None, ["input=runs/in.csv", "mlflow.tracking_uri=http://u:secret@mlflow:5000"])
    with pytest.raises(ConfigError, match="MLFLOW_TRACKING_PASSWORD"):
        retrain.validate(cfg)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://u:secret@mlflow:5000")  # the same, from the environment
    with pytest.raises(ConfigError, match="MLFLOW_TRACKING_URI"):
        retrain.validate(retrain.load_config(None, ["input=runs/in.csv"]))


def test_log_lines_never_show_credentials(capsys):
    logs.setup()
    logging.getLogger("t2v.test").info("tracking to %s", "http://u:secret@mlflow:5000")
    logging.getLogger("t2v.test").warning("fetch failed: https://b/k?X-Amz-Signature=abc")
    out = capsys.readouterr()
    assert "secret" not in out.out and "abc" not in out.err
    assert REDACTED in out.out and REDACTED in out.err
