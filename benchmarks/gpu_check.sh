#!/usr/bin/env bash
# The GPU check of issue 16, in one run of under 8 minutes on one GPU host (JAX backend):
#   1. the bare model (VGG16 at 224 px, mixed_float16, XLA): images/s and MFU;
#   2. the pipeline model (the same plus its fused online augmentation): images/s and
#      its ratio to the bare one (benchmarks/train_throughput.py, both built by the
#      project's build_model);
#   3. one timed epoch of the real train stage over TFRecords (benchmarks/train_stage.py:
#      sample data -> augment stage -> genderclf.stages.train.run), its own images/s.
# Targets on an H100-class GPU: 2 >= 90% of 1; 3 >= 3,000 images/s; 1 >= 50% of the dense
# 16-bit peak.
#
# What it needs, and how to install it (docs/scaling-out.md, "A GPU worker on JAX"):
#   * parts 1-2: JAX with CUDA, Keras, pydantic and PyYAML (no TensorFlow). On a host
#     with a package index: `uv sync --frozen --no-dev` (the lockfile: Keras, TensorFlow
#     and the rest) then `uv pip install "jax[cuda12]"` on top (JAX is in no lockfile).
#     Offline, put the wheels in a folder and pass it: --wheelhouse DIR (installed with
#     `pip install --no-index --no-deps --target`, nothing else is fetched). For a Python
#     that has JAX, NumPy, h5py, ml-dtypes, rich, absl-py and PyYAML but no Keras, the
#     folder needs the versions uv.lock pins of: keras, namex, optree, pydantic,
#     pydantic-core, annotated-types, typing-inspection (`pip download --no-deps
#     --only-binary=:all: --python-version 3.12 --platform manylinux_2_17_x86_64 ...`).
#   * part 3 also needs what the stages import: TensorFlow (tf.data, the TFRecord
#     reader; CPU-only is enough, it is kept off the GPU), pandas, Pillow. Without an
#     importable TensorFlow part 3 is skipped with a message.
#
# Usage: benchmarks/gpu_check.sh [--cpu-smoke] [--wheelhouse DIR] [--out DIR]
#   --cpu-smoke  tiny sizes on any host (a dry run of every part, no targets meaningful)
#   PYTHON=...   the interpreter (default python3); KERAS_BACKEND defaults to jax
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
smoke=0 wheelhouse="" out="${OUT:-/tmp/gpu_check}"
while (($#)); do
  case "$1" in
    --cpu-smoke) smoke=1 ;;
    --wheelhouse) wheelhouse="$2"; shift ;;
    --out) out="$2"; shift ;;
    -h | --help) sed -n '2,28p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done
PY="${PYTHON:-python3}"
export KERAS_BACKEND="${KERAS_BACKEND:-jax}" PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
export PYTHONPATH="$here/src${PYTHONPATH:+:$PYTHONPATH}"
# JAX takes 75% of the GPU memory up front by default; the reader's TensorFlow gets none.
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-true}"
mkdir -p "$out"

if [[ -n "$wheelhouse" ]]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/gpu_check_site "$wheelhouse"/*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/gpu_check_site"
fi

started=$SECONDS
echo "== host: $(nproc) cores; $(nvidia-smi -L 2>/dev/null | head -1 || echo 'no nvidia-smi')"
"$PY" - <<'EOF'
import keras
print(f"python ok: keras {keras.__version__}, backend {keras.config.backend()}")
if keras.config.backend() == "jax":
    import jax
    print(f"jax {jax.__version__}: {jax.devices()}")
EOF

if ((smoke)); then
  tput=(--backbone vgg16 --image-size 32 --batch-size 8 --steps 2 --warmup 1 --rounds 1)
  stage=(--num-images 300 --image-size 32 --batch-size 16 --target 0)
else
  tput=(--backbone vgg16 --image-size 224 --batch-size 256 --steps 20 --warmup 3 --rounds 3)
  stage=(--num-images 30000 --image-size 224 --batch-size 256 --target 3000)
fi

echo "== 1-2. bare vs pipeline model, mixed_float16, XLA"
timeout 300 "$PY" benchmarks/train_throughput.py "${tput[@]}" --policies mixed_float16 \
  --json "$out/throughput.json" 2>&1 | tee "$out/throughput.log" | grep -v '^[IWE]0000 ' || true

echo "== 3. one timed epoch of the train stage over TFRecords ($KERAS_BACKEND)"
if "$PY" -c "import tensorflow, pandas, PIL" 2>/dev/null; then
  left=$((470 - (SECONDS - started)))
  timeout "$((left > 60 ? left : 60))" "$PY" benchmarks/train_stage.py "${stage[@]}" \
    --json "$out/stage.json" 2>&1 | tee "$out/stage.log" | grep -v '^[IWE]0000 ' || true
else
  echo "skipped: the train stage reads TFRecords with tf.data, and TensorFlow (or pandas," \
    "Pillow) is not importable here: install the lockfile's packages (uv sync --frozen" \
    "--no-dev) or tensorflow-cpu"
fi
echo "== done in $((SECONDS - started))s; logs and JSON in $out"
