"""One process of the all-reduce check: the project's model trained for a few steps on
global batches that do not depend on the process count.

    python tests/helpers/data_parallel_check.py PARAMS PREPARED OUT.npy

Run with Keras' distribution variables (as `genderclf.model.launch` sets them) by each of
N processes, or without them as one process. The train split is read in its file order
(no shuffle); every global batch of `train.batch_size` is the same records whatever N is,
process i taking its i-th slice of it (what `keras.distribution.DataParallel` puts
together again). So two processes and one see the same global batches, seeds,
augmentation and dropout draws, and their weights may differ only by the order in which
the gradients are summed (plain SGD, so a rounding difference stays one). Each process
saves its final weights (flattened) to OUT.npy with `.<process id>` before the suffix.
"""

from __future__ import annotations

import sys
from pathlib import Path

STEPS = 6


def main(params: Path, prepared: Path, out: Path) -> None:
    from genderclf.config import load_settings
    from genderclf.model import distributed as D

    settings = load_settings(params)
    cluster = D.from_env() or D.Cluster()
    D.initialize(cluster)
    import keras
    import numpy as np

    from genderclf.data.tfrecords import make_dataset, reader_on_cpu_only
    from genderclf.model.backbones import build_model

    reader_on_cpu_only()
    t = settings.train
    n, i = cluster.processes, cluster.process_id
    local = t.batch_size // n
    ds = make_dataset(prepared, "train", t.batch_size, drop_remainder=True).take(STEPS)
    ds = ds.map(lambda x, y: (x[i * local : (i + 1) * local], y[i * local : (i + 1) * local]))
    keras.utils.set_random_seed(settings.base.seed)
    model = build_model(t, settings.base.image_size)
    # Plain SGD: an update proportional to the gradient. Adam divides by the gradient's
    # running scale, which turns float rounding in a near-zero gradient into a whole
    # learning-rate step of either sign (measured: 2.7e-4 relative, 1.2e-3 at most).
    model.compile(keras.optimizers.SGD(0.05), "binary_crossentropy", jit_compile=True)
    model.fit(ds, epochs=1, verbose=0)
    weights = np.concatenate([np.asarray(w, dtype="float64").ravel() for w in model.get_weights()])
    np.save(out.with_suffix(f".{i}.npy"), weights)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
