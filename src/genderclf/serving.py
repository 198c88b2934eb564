"""The registered model: an MLflow pyfunc that takes image bytes and returns label + probability.

`mlflow models serve -m models:/gender-classifier@champion --env-manager local` serves it.
A request is a table with one column, `image`, holding each image file's bytes
base64-encoded (the signature types the column as `binary`, so MLflow's scoring server
decodes the base64 before the model sees it):

    POST /invocations
    {"dataframe_split": {"columns": ["image"], "data": [["/9j/4AAQSkZJRg..."], ...]}}

    -> {"predictions": [{"label": "male", "probability": 0.97, "p_male": 0.97,
                          "error": null}, ...]}

Each image is fitted to the model input exactly as `genderclf predict --no-detect` does
(whole image, no face detection), with the threshold evaluation chose. A bad image gives
that row an `error` and null label instead of failing the request.
"""

from __future__ import annotations

import base64
import binascii
import tempfile
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd

from genderclf.predict import SERVING_CONFIG, ServingConfig

KERAS_ARTIFACT = "keras_model"
# Serving refuses bigger images, as `predict.max_pixels` does for the CLI.
MAX_PIXELS = 50_000_000


def _as_bytes(value: Any) -> bytes:
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if isinstance(value, str):  # direct pyfunc calls may pass the base64 text itself
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("image is neither bytes nor base64 text") from None
    raise ValueError(f"image must be bytes or base64 text, got {type(value).__name__}")


class GenderClassifierModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper around the trained `.keras` file and its `serving.json`."""

    def load_context(self, context) -> None:
        from genderclf.predict import Classifier, load_keras

        cfg = ServingConfig.read(context.artifacts["serving_config"])
        self.clf = Classifier(load_keras(context.artifacts[KERAS_ARTIFACT]), cfg, "pyfunc")

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None):
        from genderclf.predict import ImageError, open_rgb

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if "image" not in frame.columns:
            raise ValueError("the request needs a column named 'image' (base64 image bytes)")
        rows: list[dict[str, Any]] = []
        crops, where = [], []
        for i, value in enumerate(frame["image"].tolist()):
            try:
                im = open_rgb(_as_bytes(value), MAX_PIXELS)
            except (ImageError, ValueError) as err:
                rows.append({"label": None, "probability": None, "p_male": None,
                             "error": str(err)})  # fmt: skip
                continue
            rows.append({"label": None, "probability": None, "p_male": None, "error": None})
            crops.append(self.clf.fit(im))
            where.append(i)
        for i, q in zip(where, self.clf.p_male(crops), strict=True):
            label, prob = self.clf.label(float(q))
            rows[i].update(label=label, probability=prob, p_male=float(q))
        return pd.DataFrame(rows, columns=["label", "probability", "p_male", "error"])


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("binary", "image")]),
        outputs=Schema([ColSpec("string", "label"), ColSpec("double", "probability"),
                        ColSpec("double", "p_male"), ColSpec("string", "error", required=False)]),
    )  # fmt: skip


def log_serving_model(keras_file: Path, config: ServingConfig, artifact_path: str = "model") -> str:
    """Log the pyfunc serving model to the active run; returns `runs:/<run_id>/<path>`.

    The package source goes with the model (`code_paths`), so the model loads wherever
    its pip requirements are installed, not only where genderclf is.
    """
    import genderclf
    from genderclf.model.train import runtime_requirements

    with tempfile.TemporaryDirectory() as tmp:
        cfg = config.write(Path(tmp) / SERVING_CONFIG)
        local = Path(tmp) / "model"
        mlflow.pyfunc.save_model(
            str(local),
            python_model=GenderClassifierModel(),
            artifacts={KERAS_ARTIFACT: str(keras_file), "serving_config": str(cfg)},
            signature=signature(),
            code_paths=[str(Path(genderclf.__file__).parent)],
            pip_requirements=[
                *runtime_requirements(),
                *_requirements("pillow", "pandas", "mlflow"),
            ],
        )
        mlflow.log_artifacts(str(local), artifact_path)
    return f"runs:/{mlflow.active_run().info.run_id}/{artifact_path}"


def _requirements(*pkgs: str) -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for p in pkgs:
        try:
            out.append(f"{p}=={version(p)}")
        except PackageNotFoundError:
            continue
    return out
