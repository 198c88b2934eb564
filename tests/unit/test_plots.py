"""The plots as drawn: what a reader sees in each figure (legend, labels, ticks, grid).

`_save` is wrapped so each figure can be inspected before it is written and closed; the
PNGs are still written, by the real code.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from genderclf.model import plots
from genderclf.model.scoring import compute_metrics, expected_calibration_error, slice_metrics


@pytest.fixture
def figures(monkeypatch) -> dict:
    """{file name: the figure} of every plot saved while the test runs."""
    seen: dict = {}
    real = plots._save

    def save(fig, path, plt):
        fig.canvas.draw()  # lay out text, so extents are final
        seen[path.name] = {
            "axes": [
                {
                    "legend": ax.get_legend(),
                    "texts": [(t.get_text(), t.get_window_extent()) for t in ax.texts],
                    "bars": [b.get_window_extent() for b in ax.patches],
                    "xticks": [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t],
                    "xlim": ax.get_xlim(),
                    "title_size": ax.title.get_fontsize(),
                    "images": len(ax.images),
                }
                for ax in fig.axes
            ]
        }
        return real(fig, path, plt)

    monkeypatch.setattr(plots, "_save", save)
    return seen


def _evaluation(n: int = 400, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p = np.clip(0.5 + (y - 0.5) * rng.uniform(0.0, 1.0, n), 0.0, 1.0)
    m = compute_metrics(y, p, 0.5, 10)
    _, calib = expected_calibration_error(y, p, 10)
    correct = ((p >= 0.5).astype(int) == y).astype(float)
    frame = pd.DataFrame({"Young": rng.integers(0, 2, n), "Eyeglasses": rng.integers(0, 2, n)})
    return y, p, m, calib, slice_metrics(frame, correct, ["Young", "Eyeglasses"], 30)


def test_the_overall_accuracy_is_named_where_no_bar_is(tmp_path, figures):
    y, p, m, calib, slices = _evaluation()
    plots.write_plots(y, p, m, calib, slices, tmp_path)
    (ax,) = figures["slices.png"]["axes"]
    assert ax["legend"] is None  # a legend inside the axes sat on a bar
    (label,) = [box for text, box in ax["texts"] if text.startswith("overall")]
    assert ax["bars"] and not any(label.overlaps(bar) for bar in ax["bars"])


def test_the_reliability_plot_says_how_many_images_each_bin_holds(tmp_path, figures):
    y, p, m, calib, slices = _evaluation()
    plots.write_plots(y, p, m, calib, slices, tmp_path)
    _curve, hist = figures["calibration.png"]["axes"]
    counts = [text for text, _ in hist["texts"]]
    assert counts == [str(n) for n in calib["count"]] and sum(calib["count"]) == len(y)
    assert len(hist["bars"]) == len(calib)


def test_training_curves_tick_whole_epochs(tmp_path, figures):
    history = [
        {"epoch": e, "phase": 1 if e <= 2 else 2, "loss": 1 / e, "val_loss": 1.1 / e}
        | {"accuracy": 0.5 + e / 10, "val_accuracy": 0.5 + e / 12}
        for e in (1, 2, 3)
    ]
    plots.plot_history(history, tmp_path / "curves.png")
    for ax in figures["curves.png"]["axes"]:
        ticks = [t for t in ax["xticks"] if t <= ax["xlim"][1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks


@pytest.mark.parametrize("n", range(1, 17))
def test_the_mistakes_grid_is_sized_to_the_mistakes(n):
    rows, cols = plots.grid_shape(n)
    assert rows * cols >= n and rows * cols - n < cols  # never a whole empty row
    assert cols <= 4 or rows > 1
    assert plots.grid_shape(9) == (3, 3) and plots.grid_shape(16) == (4, 4)
    assert plots.grid_shape(8) == (2, 4) and plots.grid_shape(10) == (2, 5)


def test_the_mistakes_grid_has_no_empty_row_and_readable_titles(prepared, tmp_path, figures):
    from genderclf.data.tfrecords import make_dataset

    paths = [
        p.decode()
        for _, _, batch in make_dataset(prepared, "test", 256, with_path=True)
        for p in np.asarray(batch)
    ]
    y = np.zeros(len(paths), dtype=int)
    p = np.full(len(paths), 0.1)
    p[:9] = np.linspace(0.6, 0.95, 9)  # nine confident mistakes, as in the demo
    shown = plots.mistakes_grid(prepared, paths, y, p, 0.5, 16, tmp_path / "mistakes.png")
    assert shown == 9
    axes = figures["mistakes.png"]["axes"]
    assert len(axes) == 9 and sum(ax["images"] for ax in axes) == 9
    assert min(ax["title_size"] for ax in axes) >= 9
