"""The served model's code file (MLflow "models from code").

MLflow runs this file to build the pyfunc model when it loads a registered version, so no
Python object is pickled into the model (no CloudPickle warning, nothing opaque stored).
"""

import mlflow

from genderclf.tracking.serving import GenderClassifierModel

mlflow.models.set_model(GenderClassifierModel())
