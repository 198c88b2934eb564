"""One process of the all-reduce check: the project's model trained for a few steps on
global batches that do not depend on the process count.

    python tests/helpers/data_parallel_check.py PARAMS PREPARED OUT.npy

Run with Keras' distribution variables (as `genderclf.model.launch` sets them) by each of
N processes, or without them as one process. The train split is read in its file order
(no shuffle); every global batch of `train.batch_size` is the same records whatever N is,
process i taking its i-th slice of it (what `keras.distribution.DataParallel` puts
together again). So two processes and one see the same global batches, seeds,
augmentation and dropout draws, and their weights may differ only by the order in which
the gradients are summed. Each process saves its weights (flattened) after the first step
and at the end, to OUT.npy with `.step1.<process id>` / `.<process id>` before the suffix.
"""

from __future__ import annotations

import sys
from pathlib import Path

STEPS = 3


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
    # Plain SGD: an update proportional to the gradient (Adam divides by the gradient's
    # running scale, turning rounding in a near-zero gradient into a whole step).
    model.compile(keras.optimizers.SGD(0.05), "binary_crossentropy", jit_compile=True)

    def flat(m: keras.Model) -> np.ndarray:
        return np.concatenate([np.asarray(w, dtype="float64").ravel() for w in m.get_weights()])

    class AfterFirstStep(keras.callbacks.Callback):
        def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
            if batch == 0:
                np.save(out.with_suffix(f".step1.{i}.npy"), flat(self.model))

    model.fit(ds, epochs=1, verbose=0, callbacks=[AfterFirstStep()])
    np.save(out.with_suffix(f".{i}.npy"), flat(model))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
