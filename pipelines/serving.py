"""The file MLflow runs to build the logged pyfunc model (models from code: no pickled object in the artifact)."""

import mlflow.models

from pipelines.pyfunc import TextToVideoModel

mlflow.models.set_model(TextToVideoModel())
