"""The trained model as an MLflow pyfunc "prompt in, video out" model.

    model = mlflow.pyfunc.load_model("models:/t2v@champion")          # or result.json's model_uri
    out = model.predict(pd.DataFrame({"prompt": ["a red circle moving left"]}), params={"steps": 25, "seed": 0})
    videos = frames_from_predictions(out)                              # list of uint8 [f, h, w, 3]

Input: a DataFrame with a ``prompt`` column, or ``{"prompt": "..." | [...]}``. Params (all
optional; defaults come from the training config): ``steps``, ``guidance``, ``eta``, ``seed``, ``fps``,
``negative_prompt``. Output: a DataFrame, one row per prompt, with

    prompt              the prompt
    mp4_base64          the video as a base64-encoded H.264 mp4 (to save or show)
    frames_npy_base64   the exact frames as a base64-encoded .npy of uint8 [f, h, w, 3] (to measure; mp4 is lossy)
    num_frames, height, width, fps

The logged model carries the TextToVideo checkpoint (``model/text_to_video.py`` format) as an artifact and the
project's ``model`` and ``pipelines`` packages as code, so it loads wherever the pinned dependencies exist.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

try:
    import mlflow.pyfunc

    _PythonModel = mlflow.pyfunc.PythonModel
except ImportError:  # pragma: no cover - mlflow is a dependency; keeps model/ importable without it
    _PythonModel = object

ROOT = Path(__file__).resolve().parent.parent
OUTPUT_COLUMNS = ("prompt", "mp4_base64", "frames_npy_base64", "num_frames", "height", "width", "fps")
DEFAULTS = {"steps": 25, "guidance": 9.0, "eta": 0.0, "seed": 0, "fps": 8.0, "negative_prompt": ""}


class TextToVideoModel(_PythonModel):
    """pyfunc wrapper around ``TextToVideo``: see the module docstring for input, params and output."""

    def load_context(self, context) -> None:
        from model.text_to_video import TextToVideo

        self.model = TextToVideo.from_checkpoint(context.artifacts["checkpoint"])
        defaults_path = context.artifacts.get("defaults")
        self.defaults = dict(DEFAULTS)
        if defaults_path:
            self.defaults.update(json.loads(Path(defaults_path).read_text(encoding="utf-8")))

    # A DataFrame hint: MLflow takes the explicit signature and passes the input through unconverted.
    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        from pipelines import media

        prompts = _prompts(model_input)
        p = {**self.defaults, **{k: v for k, v in (params or {}).items() if v is not None}}
        frames = self.model.generate(
            prompts,
            steps=int(p["steps"]),
            guidance=float(p["guidance"]),
            eta=float(p["eta"]),
            seed=int(p["seed"]),
            negative_prompt=str(p["negative_prompt"]),
        )  # [b, f, h, w, 3]
        rows = []
        for prompt, video in zip(prompts, frames):
            rows.append(
                {
                    "prompt": prompt,
                    "mp4_base64": base64.b64encode(media.encode_mp4(video, float(p["fps"]))).decode("ascii"),
                    "frames_npy_base64": base64.b64encode(_npy(video)).decode("ascii"),
                    "num_frames": int(video.shape[0]),
                    "height": int(video.shape[1]),
                    "width": int(video.shape[2]),
                    "fps": float(p["fps"]),
                }
            )
        return pd.DataFrame(rows, columns=list(OUTPUT_COLUMNS))


def _prompts(model_input) -> list[str]:
    if isinstance(model_input, str):
        return [model_input]
    if isinstance(model_input, pd.DataFrame):
        if "prompt" not in model_input.columns:
            raise ValueError(f"input DataFrame needs a 'prompt' column, got columns {list(model_input.columns)}")
        prompts = []
        for cell in model_input["prompt"].tolist():  # MLflow turns {"prompt": [..]} into one row holding a list
            prompts.extend([cell] if isinstance(cell, str) else list(cell))
    elif isinstance(model_input, dict):
        prompts = model_input.get("prompt")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts or [])
    else:
        prompts = list(model_input)
    if not prompts or not all(isinstance(x, str) and x for x in prompts):
        raise ValueError("give one or more non-empty prompt strings, e.g. {'prompt': ['a red circle moving left']}")
    return prompts


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def frames_from_predictions(predictions) -> list[np.ndarray]:
    """The exact uint8 [f, h, w, 3] videos of a ``predict`` result."""
    return [np.load(io.BytesIO(base64.b64decode(s)), allow_pickle=False) for s in predictions["frames_npy_base64"]]


def write_predictions(predictions, out_dir: str | Path) -> list[Path]:
    """Save each predicted video as an mp4 under ``out_dir``; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (prompt, data) in enumerate(zip(predictions["prompt"], predictions["mp4_base64"])):
        stem = "".join(c if c.isalnum() else "_" for c in prompt)[:60]
        path = out / f"{i:03d}_{stem}.mp4"
        path.write_bytes(base64.b64decode(data))
        paths.append(path)
    return paths


def signature(defaults: dict[str, Any]):
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    params = ParamSchema(
        [
            ParamSpec("steps", "long", int(defaults["steps"])),
            ParamSpec("guidance", "double", float(defaults["guidance"])),
            ParamSpec("eta", "double", float(defaults["eta"])),
            ParamSpec("seed", "long", int(defaults["seed"])),
            ParamSpec("fps", "double", float(defaults["fps"])),
            ParamSpec("negative_prompt", "string", str(defaults["negative_prompt"])),
        ]
    )
    outputs = Schema(
        [
            ColSpec("string", "prompt"),
            ColSpec("string", "mp4_base64"),
            ColSpec("string", "frames_npy_base64"),
            ColSpec("long", "num_frames"),
            ColSpec("long", "height"),
            ColSpec("long", "width"),
            ColSpec("double", "fps"),
        ]
    )
    return ModelSignature(inputs=Schema([ColSpec("string", "prompt")]), outputs=outputs, params=params)


def requirements() -> list[str]:
    """Pinned requirements of the serving environment (the installed versions of what the model imports)."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for name in (
        "torch",
        "numpy",
        "pandas",
        "einops",
        "open_clip_torch",
        "ffmpeg-python",
        "pyyaml",
        "pillow",
        "diffusers",
        "safetensors",
        "mlflow",
    ):
        try:
            out.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            continue
    return out


@contextlib.contextmanager
def _experiment_env(experiment_id: str) -> Iterator[None]:
    """Model.log files the logged model under MLflow's current experiment (the default one, whose artifacts go to
    ./mlruns, unless one is set): point it at the run's experiment for the call."""
    before = os.environ.get("MLFLOW_EXPERIMENT_ID")
    os.environ["MLFLOW_EXPERIMENT_ID"] = experiment_id
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
        else:
            os.environ["MLFLOW_EXPERIMENT_ID"] = before


def log_generation_model(
    checkpoint: str | Path,
    *,
    run_id: str,
    tracking_uri: str,
    name: str = "model",
    defaults: dict[str, Any] | None = None,
    config_file: str | Path | None = None,
) -> str:
    """Log ``checkpoint`` as a pyfunc model of run ``run_id``; returns its URI (``models:/<model id>``)."""
    import tempfile

    import mlflow
    from mlflow.models import Model

    from pipelines.tracking import tracking_uri_set

    merged = {**DEFAULTS, **(defaults or {})}
    with tempfile.TemporaryDirectory() as d:
        defaults_path = Path(d) / "defaults.json"
        defaults_path.write_text(json.dumps(merged), encoding="utf-8")
        artifacts = {"checkpoint": str(checkpoint), "defaults": str(defaults_path)}
        if config_file is not None:
            artifacts["train_config"] = str(config_file)
        experiment_id = mlflow.MlflowClient(tracking_uri).get_run(run_id).info.experiment_id
        with tracking_uri_set(tracking_uri), _experiment_env(experiment_id), warnings.catch_warnings():
            # MLflow validates an input example by generating with the model at log time (minutes and a second
            # copy of a large model in the driver); the explicit signature carries the schema instead.
            warnings.filterwarnings("ignore", message=r".*An input example was not provided", category=UserWarning)
            # Model.log (unlike mlflow.pyfunc.log_model) takes the run id, so no fluent run has to be active
            info = Model.log(
                artifact_path=None,
                name=name,
                flavor=mlflow.pyfunc,
                run_id=run_id,
                python_model=str(Path(__file__).with_name("serving.py")),
                artifacts=artifacts,
                signature=signature(merged),
                pip_requirements=requirements(),
                code_paths=[str(ROOT / "model"), str(ROOT / "pipelines")],
            )
    return info.model_uri
