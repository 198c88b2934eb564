"""The registered model: an MLflow pyfunc that takes image bytes and returns label + probability.

`mlflow models serve -m models:/gender-classifier@champion --env-manager local` serves it.
A request is a table with one column, `image`, holding each image file's bytes
base64-encoded (the signature types the column as `binary`, so MLflow's scoring server
decodes the base64 before the model sees it):

    POST /invocations
    {"dataframe_split": {"columns": ["image"], "data": [["/9j/4AAQSkZJRg..."], ...]}}

    -> {"predictions": [{"label": "male", "probability": 0.97, "p_male": 0.97,
                          "error": null}, ...]}

Each image goes through `genderclf.inference`, the code `genderclf predict` runs: the
whole image fitted to the model input (as `--no-detect` does), with the threshold
evaluation chose. A bad image gives that row an `error` and null label instead of failing
the request.
"""

from __future__ import annotations

import base64
import binascii
import tempfile
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd

from genderclf.images import ImageError
from genderclf.inference import (
    SERVING_CONFIG,
    Classifier,
    PredictError,
    ServingConfig,
    load_local,
    predict_images,
    with_threshold,
)

KERAS_ARTIFACT = "keras_model"
OUTPUT_COLUMNS = ["label", "probability", "p_male", "error"]
DEFAULT_MODEL_URI = "models:/gender-classifier@champion"


def _as_bytes(value: Any) -> bytes:
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if isinstance(value, str):  # direct pyfunc calls may pass the base64 text itself
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ImageError("not_an_image", "image is neither bytes nor base64 text") from None
    raise ImageError("not_an_image", f"image must be bytes or base64 text, got "
                     f"{type(value).__name__}")  # fmt: skip


class GenderClassifierModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper around the trained `.keras` file and its `serving.json`."""

    def load_context(self, context) -> None:
        self.clf = load_local(context.artifacts[KERAS_ARTIFACT],
                              ServingConfig.read(context.artifacts["serving_config"]), "pyfunc")  # fmt: skip
        self.settings = self.clf.config.predict_settings()
        if self.settings is None:
            raise PredictError(f"{SERVING_CONFIG} holds no `predict` settings: re-register the "
                               "model with `genderclf register`")  # fmt: skip

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None):
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if "image" not in frame.columns:
            raise ValueError("the request needs a column named 'image' (base64 image bytes)")
        items = [(str(i), lambda v=v: _as_bytes(v)) for i, v in enumerate(frame["image"])]
        rows = list(predict_images(items, self.clf, None, self.settings))
        out = pd.DataFrame([{k: r[k] for k in OUTPUT_COLUMNS} for r in rows],
                           columns=OUTPUT_COLUMNS)  # fmt: skip
        return out.astype(object).where(out.notna(), None)


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("binary", "image")]),
        outputs=Schema([ColSpec("string", "label"), ColSpec("double", "probability"),
                        ColSpec("double", "p_male"), ColSpec("string", "error", required=False)]),
    )  # fmt: skip


def log_serving_model(keras_file: Path, config: ServingConfig, example: bytes):
    """Log the pyfunc serving model to the active run as a LoggedModel named `model`.

    The model is built from `pyfunc_model.py` (models from code), its input example is a
    real image (encoded bytes), and the package source goes with it (`code_paths`), so it
    loads wherever its pip requirements are installed, not only where genderclf is.

    Returns:
        The ModelInfo (`model_id`, `model_uri`).
    """
    import genderclf
    from genderclf.tracking.runs import _pinned, runtime_requirements

    with tempfile.TemporaryDirectory() as tmp:
        cfg = config.write(Path(tmp) / SERVING_CONFIG)
        return mlflow.pyfunc.log_model(
            name="model",
            python_model=str(Path(__file__).with_name("pyfunc_model.py")),
            artifacts={KERAS_ARTIFACT: str(keras_file), "serving_config": str(cfg)},
            signature=signature(),
            input_example=pd.DataFrame({"image": [example]}),
            code_paths=[str(Path(genderclf.__file__).parent)],
            pip_requirements=[*runtime_requirements(), *_pinned("pillow", "pandas", "mlflow")],
            model_type="genderclf-serving",
        )


def load_classifier(uri: str = DEFAULT_MODEL_URI, threshold: float | None = None,
                    fallback: ServingConfig | None = None) -> Classifier:  # fmt: skip
    """Load a classifier from a `.keras` file, a model folder or any MLflow model URI.

    For MLflow URIs (`models:/name@alias`, `models:/name/3`, `runs:/id/model`, `s3://...`)
    the tracking server is the configured one (`MLFLOW_TRACKING_URI`, else the repo's
    `sqlite:///mlflow.db`). The threshold is the one evaluation chose, stored with the
    registered model (`serving.json`); `fallback` serves a bare `.keras` file.

    Raises:
        PredictError: the URI does not resolve or holds no loadable genderclf model.
    """
    if Path(uri).exists():
        return with_threshold(load_local(uri, fallback), threshold)
    if "://" not in uri and not uri.startswith("models:/"):
        raise PredictError(f"{uri}: no such model file, and not an MLflow URI "
                           "(models:/name@alias, runs:/<run_id>/model, s3://...)")  # fmt: skip
    from mlflow.exceptions import MlflowException

    from genderclf.tracking.setup import configure, redact

    configure(0)
    tmp = tempfile.mkdtemp(prefix="genderclf-model-")
    try:
        folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp))
    except (MlflowException, OSError) as err:
        hint = (" (no champion yet: run the pipeline first, e.g. `make demo`)"
                if "champion" in uri else "")  # fmt: skip
        raise PredictError(f"cannot load {uri} from {redact(mlflow.get_tracking_uri())}"
                           f"{hint}: {str(err).splitlines()[0][:300]}") from None  # fmt: skip
    return with_threshold(load_local(folder, fallback, uri), threshold)
