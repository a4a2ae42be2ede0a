"""What a job submission is made of, without a cluster: --set arguments round-trip through the config loader, the
entrypoint quotes its arguments, secrets never go on a command line, and a Ray Client address is refused."""

from __future__ import annotations

import pytest

from flows import jobs
from pipelines.settings import ConfigError


def test_secrets_never_go_on_a_job_command_line():
    with pytest.raises(ConfigError, match="looks like a secret"):
        jobs.set_arguments({"mlflow": {"password": "hunter2"}})
    assert jobs.set_arguments({"mlflow": {"password": None}}) == ["--set", "mlflow.password=null"]


def test_set_arguments_round_trip_through_the_config_loader():
    from pipelines import settings
    from pipelines.shapes import CorpusConfig

    values = {"num_videos": 3, "shape_scale": [0.2, 0.3], "image_format": "png", "fps": 8.5}
    args = jobs.set_arguments(values)
    loaded = settings.load(CorpusConfig, None, args[1::2])
    assert (loaded.num_videos, loaded.shape_scale, loaded.image_format, loaded.fps) == (3, (0.2, 0.3), "png", 8.5)
    assert jobs.cli_entrypoint("curate", ["--input", "a b.csv"]) == "python -m flows.cli curate --input 'a b.csv'"


def test_cluster_config_rejects_a_ray_client_address():
    with pytest.raises(ConfigError, match="dashboard"):
        jobs.ClusterConfig(address="ray://head:10001")
