"""The served model's code file (MLflow "models from code").

MLflow runs this file to build the pyfunc model when it loads a registered version, so no
Python object is pickled into the model (no CloudPickle warning, nothing opaque stored).

`mlflow models serve` runs it first thing in the server's process, so TensorFlow is
started here the quiet way (its C++ start-up notices, such as `E0000 ... failed call to
cuInit` on a machine without a GPU, filtered out) before the model's code imports it.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import mlflow

from genderclf.console import quiet_tensorflow

quiet_tensorflow()

from genderclf.tracking.serving import GenderClassifierModel  # noqa: E402

mlflow.models.set_model(GenderClassifierModel())
