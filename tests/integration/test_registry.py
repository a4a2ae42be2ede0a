"""The model registry against a real MLflow SQLite store with small pyfunc models: register, aliases, promotion
decisions, loading the champion by alias, and what a model without a project checkpoint says."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from flows import registry


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    import mlflow
    from mlflow import MlflowClient

    tmp_path = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("registry-test", artifact_location=(tmp_path / "artifacts").as_uri())

    class Constant(mlflow.pyfunc.PythonModel):
        def load_context(self, context):
            self.value = float(Path(context.artifacts["value"]).read_text())

        def predict(self, context, model_input, params=None):
            return [self.value] * len(model_input)

    def log_model(value: float) -> tuple[str, str]:
        """One training run that logs a pyfunc model; returns (run_id, model_uri)."""
        from pipelines.tracking import tracking_uri_set

        run = client.create_run(exp)
        weights = tmp_path / f"value_{value}.txt"
        weights.write_text(str(value))
        with tracking_uri_set(uri):
            with mlflow.start_run(run_id=run.info.run_id):
                info = mlflow.pyfunc.log_model(
                    name="model", python_model=Constant(), pip_requirements=[], artifacts={"value": str(weights)}
                )  # no slow inference
        client.set_terminated(run.info.run_id)
        return run.info.run_id, info.model_uri

    # logged once for the module (logging a pyfunc model takes seconds); each test registers its own name
    models = [log_model(float(v)) for v in (1, 2, 3)]
    return uri, client, models


def test_register_is_idempotent_and_aliases_point_at_versions(store):
    uri, client, models = store
    (run_id, model_uri), (run2, uri2) = models[0], models[1]
    assert registry.get_alias(client, "m", registry.CHAMPION) is None  # no model yet: None, not an error
    mv = registry.register(client, "m", model_uri, run_id, tags={"t2v.cycle": "0001"})
    again = registry.register(client, "m", model_uri, run_id)
    assert again.version == mv.version and again.tags["t2v.cycle"] == "0001"
    assert len(client.search_model_versions("name='m'")) == 1
    registry.set_alias(client, "m", registry.CHALLENGER, mv.version)
    assert registry.get_alias(client, "m", registry.CHALLENGER).version == mv.version
    assert registry.get_alias(client, "m", registry.CHAMPION) is None
    # a runs:/ URI of a run resolves to the model it logged
    mv2 = registry.register(client, "m", f"runs:/{run2}/model", run2)
    assert mv2.version != mv.version and mv2.source == uri2


def test_promotion_gate_and_champion_loads_by_alias(store):
    import mlflow

    uri, client, models = store
    first = registry.register(client, "p", models[0][1], models[0][0])
    registry.record_evaluation(client, "p", first.version, {"shapes_accuracy": 0.25, "fvd": 900.0}, "sig-a")
    decision = registry.decide("shapes_accuracy", {"shapes_accuracy": 0.25}, None)
    assert decision.promote and "first model" in decision.reason
    registry.apply_decision(client, "p", first.version, decision)

    second = registry.register(client, "p", models[1][1], models[1][0])
    champion = client.get_model_version_by_alias("p", registry.CHAMPION)
    assert registry.recorded_evaluation(champion, "sig-other") is None  # other settings: not comparable
    recorded = registry.recorded_evaluation(champion, "sig-a")
    assert recorded == {"shapes_accuracy": 0.25, "fvd": 900.0}

    worse = registry.decide("shapes_accuracy", {"shapes_accuracy": 0.20}, recorded, champion_version=first.version)
    assert not worse.promote and "does not beat" in worse.reason
    registry.apply_decision(client, "p", second.version, worse)
    assert client.get_model_version_by_alias("p", registry.CHAMPION).version == first.version
    assert client.get_model_version("p", second.version).tags["promotion"] == "rejected"

    better = registry.decide("fvd", {"fvd": 700.0}, recorded)  # FVD: lower wins
    assert better.promote
    registry.apply_decision(client, "p", second.version, better)
    assert client.get_model_version_by_alias("p", registry.CHAMPION).version == second.version

    from pipelines.tracking import tracking_uri_set

    with tracking_uri_set(uri):
        model = mlflow.pyfunc.load_model("models:/p@champion")
    assert model.predict(pd.DataFrame({"prompt": ["a", "b"]})) == [2.0, 2.0]

    with pytest.raises(ValueError, match="has no 'clipsim'"):
        registry.decide("clipsim", {"fvd": 1.0}, None)


def test_download_checkpoint_says_what_is_missing(store, tmp_path):
    uri, client, models = store
    model_uri = models[2][1]
    with pytest.raises(FileNotFoundError, match="no t2v-platform checkpoint"):
        registry.download_checkpoint(model_uri, tmp_path / "dl", uri)
