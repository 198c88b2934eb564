"""Custom layers saved inside the model, written with `keras.ops` only (any backend).

Registered as serializable so a saved `.keras` file loads with Keras' safe mode on
(no Lambda layers, no pickled Python code).
"""

from __future__ import annotations

import keras
from keras import ops

# Per-channel means of ImageNet in BGR order, the "caffe" convention of VGG and ResNet50.
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


@keras.saving.register_keras_serializable(package="genderclf")
class BackbonePreprocess(keras.layers.Layer):
    """Map raw RGB pixels in [0, 255] to what a backbone expects.

    Modes (as `keras.applications.*.preprocess_input`):
      * `caffe`: RGB -> BGR, subtract the ImageNet channel means (VGG16/19, ResNet50).
      * `tf`: scale to [-1, 1] (MobileNetV2).
      * `unit`: scale to [0, 1] (the small CNN trained from scratch).

    Kept inside the model so inference needs no separate preprocessing; never stack a
    `rescale=1/255` on top of it (the classic VGG16 notebook bug).
    """

    def __init__(self, mode: str = "caffe", **kwargs):
        super().__init__(**kwargs)
        if mode not in ("caffe", "tf", "unit"):
            raise ValueError(f"BackbonePreprocess mode must be caffe, tf or unit; got {mode!r}")
        self.mode = mode

    def call(self, x):
        x = ops.cast(x, self.compute_dtype)
        if self.mode == "caffe":
            x = ops.flip(x, axis=-1)  # RGB -> BGR
            return x - ops.convert_to_tensor(_CAFFE_MEAN_BGR, dtype=self.compute_dtype)
        if self.mode == "tf":
            return x / 127.5 - 1.0
        return x / 255.0

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}
