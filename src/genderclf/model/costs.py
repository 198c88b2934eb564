"""What each backbone costs to keep and to run: parameters, size on disk, predict latency.

None of it needs trained weights: each classifier is built as the train stage builds it
(`build_model`, `weights: null`), saved to a temporary `.keras` file and timed on random
pixels on this machine. The numbers are measurements of this machine at this moment:
they go to the console and MLflow (`genderclf compare --backbones`), never into a
DVC-tracked file.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from genderclf.config import TrainSettings


@dataclass(frozen=True)
class BackboneCost:
    backbone: str
    image_size: int
    params: int
    size_bytes: int  # the .keras file
    latency_ms: float  # one image per call (batch 1), median
    batch: int
    batch_ms_per_image: float  # a batch of `batch` images per call, median, per image


def measure(train: TrainSettings, backbone: str, image_size: int, batch: int, repeats: int):
    """Build, save and time one backbone's classifier (weights: null, inference mode).

    Args:
        train: the train settings the classifier is built with (backbone and weights replaced).
        batch: images per call for the throughput figure (e.g. `predict.batch_size`).
        repeats: timed calls per figure (after one warm-up call that builds the graph).
    """
    import keras
    import numpy as np

    from genderclf.model.backbones import build_model
    from genderclf.model.saving import save_model

    t = train.model_copy(update={"backbone": backbone, "weights": None})
    keras.utils.set_random_seed(0)
    model = build_model(t, image_size)
    with tempfile.TemporaryDirectory(prefix="genderclf-cost-") as tmp:
        path = Path(tmp) / f"{backbone}.keras"
        save_model(model, path)
        size = path.stat().st_size
    rng = np.random.default_rng(0)
    one = rng.uniform(0, 255, (1, image_size, image_size, 3)).astype("float32")
    many = rng.uniform(0, 255, (batch, image_size, image_size, 3)).astype("float32")
    latency = _median_seconds(model, one, repeats) * 1000
    per_image = _median_seconds(model, many, repeats) * 1000 / batch
    params = int(model.count_params())
    keras.backend.clear_session()
    return BackboneCost(
        backbone, image_size, params, size, round(latency, 3), batch, round(per_image, 3)
    )


def _median_seconds(model: Any, x: Any, repeats: int) -> float:
    model.predict_on_batch(x)  # warm-up: traces and builds the predict function
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model.predict_on_batch(x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def plot_costs(costs: list[BackboneCost], accuracy: dict[str, dict[str, Any]], out: Path) -> Path:
    """Two panels: each backbone's latency against its size on disk (log scales, labelled
    with its parameters), and validation accuracy with its 95% interval against latency
    for the backbones some run trained."""
    from matplotlib.ticker import FuncFormatter

    from genderclf.io import atomic_file
    from genderclf.model.plots import pyplot

    plt = pyplot()
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    color = {c.backbone: f"C{i}" for i, c in enumerate(costs)}  # the same in both panels
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.4))
    for c in costs:
        left.scatter(c.size_bytes / 1e6, c.latency_ms, s=40, zorder=3, color=color[c.backbone])
        left.annotate(
            f"{c.backbone}\n{c.params / 1e6:.2f}M params",
            (c.size_bytes / 1e6, c.latency_ms),
            textcoords="offset points",
            xytext=(6, -4),
            fontsize=8,
        )
    left.set_xscale("log")
    left.set_yscale("log")
    for axis in (left.xaxis, left.yaxis):
        axis.set_major_formatter(plain)
    left.set_xlabel("size on disk (MB, .keras, log scale)")
    left.set_ylabel("predict latency (ms per image, batch 1, log scale)")
    left.grid(alpha=0.3, which="both")
    left.margins(x=0.35, y=0.2)
    left.set_title(f"cost at {costs[0].image_size}px on this machine")

    trained = [c for c in costs if c.backbone in accuracy]
    for c in trained:
        a = accuracy[c.backbone]
        ci = a.get("interval")
        err = [[a["accuracy"] - ci[0]], [ci[1] - a["accuracy"]]] if ci else None
        right.errorbar(
            c.latency_ms, a["accuracy"], yerr=err, fmt="o", capsize=4, color=color[c.backbone]
        )
        right.annotate(
            c.backbone, (c.latency_ms, a["accuracy"]), textcoords="offset points", xytext=(6, 4)
        )
    untrained = [c.backbone for c in costs if c.backbone not in accuracy]
    if trained:
        right.set_xscale("log")
        right.xaxis.set_major_formatter(plain)
        right.xaxis.set_minor_formatter(plain)
        right.margins(x=0.3)
        right.set_xlabel("ms per image (batch 1, log scale)")
        right.set_ylabel("validation accuracy (95% interval)")
        right.grid(alpha=0.3)
    else:
        right.set_axis_off()
    note = f"not trained yet: {', '.join(untrained)}" if untrained else ""
    right.set_title("accuracy against cost" + (f"\n{note}" if note else ""), fontsize=10)
    fig.tight_layout()
    with atomic_file(out) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return out
