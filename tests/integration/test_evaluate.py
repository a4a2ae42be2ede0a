"""``t2v evaluate`` on a tiny model: metrics (CLIPSIM, frame consistency, FVD with a TorchScript network, shapes
accuracy), sample videos, MLflow logging, prompt files, and evaluating a logged model by URI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows import evaluate
from pipelines import metrics, settings
from pipelines.settings import ConfigError


def _cfg(tmp_path, **kw) -> evaluate.EvalConfig:
    base = {
        "num_prompts": 2,
        "steps": 2,
        "clip_model": "t2v-tiny-clip",
        "num_samples": 2,
        "batch_size": 2,
        "output": str(tmp_path / "eval"),
        "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    }
    return settings.from_dict(evaluate.EvalConfig, {**base, **kw})


def test_evaluate_shapes_prompts_with_fvd_logs_to_mlflow(
    tmp_path, tiny_checkpoint, fvd_network, shapes_corpus, mlflow_uri
):
    from mlflow import MlflowClient

    cfg = _cfg(
        tmp_path,
        checkpoint=str(tiny_checkpoint),
        fvd_network=str(fvd_network),
        fvd_reference=str(shapes_corpus),
        fvd_size=32,
        mlflow={"tracking_uri": mlflow_uri},
    )
    result = evaluate.run(cfg)
    m = result["metrics"]
    assert set(m) == {"clipsim", "frame_consistency", "colour_accuracy", "direction_accuracy", "shapes_accuracy", "fvd"}
    assert -1 <= m["clipsim"] <= 1 and -1 <= m["frame_consistency"] <= 1 and m["fvd"] >= 0
    assert all(0 <= m[k] <= 1 for k in ("colour_accuracy", "direction_accuracy", "shapes_accuracy"))
    assert result["skipped"] == {} and result["num_videos"] == 2
    for sample in result["samples"]:
        assert Path(sample).stat().st_size > 0 and Path(sample).with_suffix(".gif").is_file()
    assert json.loads((Path(cfg.output) / evaluate.METRICS_FILE).read_text())["metrics"] == m

    client = MlflowClient(cfg.mlflow.tracking_uri)
    run = client.get_run(result["mlflow_run_id"])
    assert run.data.metrics["eval/fvd"] == pytest.approx(m["fvd"])
    assert run.data.params["eval.steps"] == "2" and run.data.tags["eval.signature"] == result["signature"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "eval")}
    assert {"eval/metrics.json", "eval/eval.yaml", "eval/samples"} <= artifacts
    assert any(a.path.endswith(".gif") for a in client.list_artifacts(run.info.run_id, "eval/samples"))

    # seeded: the same settings give the same figures
    again = evaluate.run(
        _cfg(
            tmp_path,
            checkpoint=str(tiny_checkpoint),
            fvd_network=str(fvd_network),
            fvd_reference=str(shapes_corpus),
            fvd_size=32,
            mlflow={"enabled": False},
        )
    )
    assert again["metrics"] == pytest.approx(m) and again["signature"] == result["signature"]


def test_prompt_file_cli_and_skipped_fvd(tmp_path, tiny_checkpoint, capsys):
    prompts = tmp_path / "captions.txt"
    prompts.write_text("# MSR-VTT style captions\na man is playing a guitar\n\na dog runs on the beach\n")
    code = evaluate.main(
        [
            "--checkpoint",
            str(tiny_checkpoint),
            "--prompts",
            str(prompts),
            "--output",
            str(tmp_path / "out"),
            "--set",
            "num_prompts=0",
            "--set",
            "steps=2",
            "--set",
            "clip_model=t2v-tiny-clip",
            "--set",
            "num_samples=1",
            "--set",
            "mlflow.enabled=false",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "clipsim" in out and "fvd: skipped" in out and "shapes_accuracy" not in out
    result = json.loads((tmp_path / "out" / evaluate.METRICS_FILE).read_text())
    assert result["num_videos"] == 2 and set(result["metrics"]) == {"clipsim", "frame_consistency"}
    assert len(list((tmp_path / "out" / "samples").glob("*.mp4"))) == 1


def test_evaluate_a_logged_model_by_uri(tmp_path, tiny_checkpoint, mlflow_uri):
    from mlflow import MlflowClient

    from pipelines import pyfunc

    uri = mlflow_uri
    client = MlflowClient(uri)
    exp = client.create_experiment("t", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(exp).info.run_id
    model_uri = pyfunc.log_generation_model(tiny_checkpoint, run_id=run_id, tracking_uri=uri)
    result = evaluate.run(
        _cfg(
            tmp_path, model_uri=model_uri, num_prompts=1, num_samples=0, mlflow={"tracking_uri": uri, "run_id": run_id}
        )
    )
    assert result["mlflow_run_id"] == run_id and "clipsim" in result["metrics"]
    assert "eval/clipsim" in client.get_run(run_id).data.metrics


def test_bad_inputs_say_what_to_do(tmp_path, tiny_checkpoint, capsys):
    with pytest.raises(ConfigError, match="nothing to evaluate: give --checkpoint"):
        evaluate.run(_cfg(tmp_path))
    with pytest.raises(ConfigError, match="not both"):
        _cfg(tmp_path, checkpoint=str(tiny_checkpoint), model_uri="models:/x@champion")
    with pytest.raises(FileNotFoundError, match="one prompt per line"):
        evaluate.run(_cfg(tmp_path, checkpoint=str(tiny_checkpoint), prompts=str(tmp_path / "missing.txt")))
    lonely = tmp_path / "one.csv"
    lonely.write_text("path,kind\nx.mp4,video\n")
    with pytest.raises(ValueError, match="at least 2"):
        metrics.reference_videos(str(lonely), 10)
    assert evaluate.main(["--checkpoint", "m.pt", "--set", "steps=3", "--dry-run"]) == 0
    assert "steps: 3" in capsys.readouterr().out
