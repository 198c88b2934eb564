"""The GPU image (docker/Dockerfile.gpu), built once and TensorFlow imported in it.

`tensorflow[and-cuda]` brings CUDA, cuDNN and the rest as pip wheels, so the image is the
CPU recipe on the same base with the `gpu` extra: no CUDA base image. The image is about
twice the CPU one (docs/docker.md has the numbers), too large for CI: these tests carry
the `docker_gpu` marker too, and only `make test-docker-gpu` runs them. This machine has no
GPU: what is checked is that the image is a CUDA build of TensorFlow whose CUDA libraries
are in it and load, and that it is exactly uv.lock with the `gpu` extra.
"""

from __future__ import annotations

import json

import pytest
from tests.docker.lockfile import INSTALLED_PY, differences, locked_packages, normalize
from tests.docker.pipeline_repo import IMAGE_UID

pytestmark = [pytest.mark.docker, pytest.mark.docker_gpu]

PROBE = (
    INSTALLED_PY
    + r"""
import ctypes, glob, json, os
import tensorflow as tf
info = tf.sysconfig.get_build_info()
site = os.path.dirname(os.path.dirname(tf.__file__))
loaded = []
for pattern in ("nvidia/cuda_runtime/lib/libcudart.so.*", "nvidia/cudnn/lib/libcudnn.so.*",
                "nvidia/cublas/lib/libcublas.so.*"):
    path = sorted(glob.glob(os.path.join(site, pattern)))[0]
    ctypes.CDLL(path)
    loaded.append(os.path.basename(path))
print(json.dumps({
    "uid": os.getuid(), "tf": tf.__version__, "cuda_build": tf.test.is_built_with_cuda(),
    "cuda": info.get("cuda_version"), "cudnn": info.get("cudnn_version"),
    "gpus": len(tf.config.list_physical_devices("GPU")), "loaded": loaded, **installed,
}))
"""
)


def test_gpu_image_imports_a_cuda_tensorflow_with_its_cuda_wheels(engine, gpu_image):
    config = engine.inspect(gpu_image)["Config"]
    assert config["User"] == f"{IMAGE_UID}:{IMAGE_UID}"
    assert {"NVIDIA_VISIBLE_DEVICES=all", "NVIDIA_DRIVER_CAPABILITIES=compute,utility"} <= set(
        config["Env"]
    )
    probe = json.loads(engine.run(gpu_image, "python", "-c", PROBE).stdout)
    assert probe["uid"] == IMAGE_UID
    assert probe["cuda_build"] is True and probe["cuda"] and probe["cudnn"], probe
    assert [name.split(".so")[0] for name in probe["loaded"]] == [
        "libcudart",
        "libcudnn",
        "libcublas",
    ]
    installed = {normalize(k): v for k, v in probe["dists"].items()}
    installed.pop("genderclf")
    expected = locked_packages(probe["markers"], "server", "gpu")
    assert installed == expected, differences(installed, expected)
    assert any(k.startswith("nvidia-cudnn") for k in installed)
    print(
        f"\nGPU image: TensorFlow {probe['tf']}, CUDA {probe['cuda']}, cuDNN {probe['cudnn']}, "
        f"{probe['gpus']} GPU(s) visible here"
    )
