"""The plots people look at: evaluation curves, reliability, slices, mistakes, training curves.

Each PNG is written atomically; the CSV data beside them is what `dvc plots show` renders.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from genderclf.io import atomic_file
from genderclf.model.scoring import slice_name


def write_csv(frame: pd.DataFrame, path: Path) -> Path:
    """A table for `dvc plots`, written atomically."""
    with atomic_file(path) as tmp:
        frame.to_csv(tmp, index=False)
    return path


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_plots(
    y: np.ndarray,
    p: np.ndarray,
    m: dict[str, Any],
    calib: pd.DataFrame,
    slices: dict[str, Any] | None,
    plots_dir: Path,
    raw_threshold: float | None = None,
) -> list[Path]:
    """PNG plots plus the CSV data DVC renders (`dvc plots show`).

    `p` is the calibrated P(male) and `m["threshold"]` the cut on it; `raw_threshold` is
    the same cut on the model's raw output, named beside it on the confusion matrix.
    """
    from sklearn.metrics import precision_recall_curve, roc_curve

    plt = pyplot()
    plots_dir.mkdir(parents=True, exist_ok=True)
    files = []
    cm = np.array(m["confusion_matrix"])
    fig, ax = plt.subplots(figsize=(4, 3.6))
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(
            j, i, str(v), ha="center", va="center", color="black" if v < cm.max() / 2 else "white"
        )
    ax.set_xticks([0, 1], ["female", "male"])
    ax.set_yticks([0, 1], ["female", "male"])
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    raw = "" if raw_threshold is None else f"\n= raw output >= {raw_threshold:.3f}"
    ax.set_title(f"confusion matrix\n(calibrated P(male) >= {m['threshold']:.2f}{raw})")
    files.append(_save(fig, plots_dir / "confusion_matrix.png", plt))

    if len(np.unique(y)) > 1:
        fpr, tpr, _ = roc_curve(y, p)
        write_csv(pd.DataFrame({"fpr": fpr, "tpr": tpr}), plots_dir / "roc.csv")
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.plot(fpr, tpr, label=f"AUC {m['roc_auc']:.3f}")
        ax.plot([0, 1], [0, 1], "--", color="grey")
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.set_title("ROC (male = positive)")
        ax.legend()
        files.append(_save(fig, plots_dir / "roc.png", plt))
        prec, rec, _ = precision_recall_curve(y, p)
        write_csv(pd.DataFrame({"recall": rec, "precision": prec}), plots_dir / "pr.csv")
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.plot(rec, prec, label=f"AP {m['average_precision']:.3f}")
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.set_title("precision-recall (male = positive)")
        ax.legend()
        files.append(_save(fig, plots_dir / "pr.png", plt))

    write_csv(calib, plots_dir / "calibration.csv")
    # Under the curve, how many test images each point stands on: a bin of 3 says little,
    # one of 300 a lot (the classic reliability diagram's histogram).
    fig, (ax, hist) = plt.subplots(
        2, 1, figsize=(4.4, 5.4), sharex=True, gridspec_kw={"height_ratios": [3, 1.1]}
    )
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect")
    ax.plot(calib["confidence"], calib["observed"], "o-", label=f"model (ECE {m['ece']:.3f})")
    ax.set_ylabel("observed fraction male")
    ax.set_title("reliability")
    ax.legend(loc="upper left")
    hist.bar(calib["confidence"], calib["count"], width=0.05, color="tab:blue", alpha=0.6)
    for x, n in zip(calib["confidence"], calib["count"], strict=True):
        hist.annotate(
            f"{n}", (x, n), textcoords="offset points", xytext=(0, 2), ha="center", fontsize=8
        )
    hist.set_ylim(0, max(calib["count"], default=1) * 1.35)
    hist.set_ylabel("test images")
    hist.set_xlabel("calibrated P(male)")
    files.append(_save(fig, plots_dir / "calibration.png", plt))

    if slices and slices["by_attribute"]:
        rows = [
            (f"{slice_name(a, k == 'with')}  (n={e[k]['n']})", e[k])
            for a, e in slices["by_attribute"].items()
            for k in ("with", "without")
            if e[k]["accuracy"] is not None
        ]
        acc = np.array([r["accuracy"] for _, r in rows])
        lo = np.array([r["ci"][0] for _, r in rows])
        hi = np.array([r["ci"][1] for _, r in rows])
        small = np.array([r["too_small"] for _, r in rows])
        fig, ax = plt.subplots(figsize=(6.5, 0.38 * len(rows) + 1.3))
        ypos = np.arange(len(rows))
        ax.barh(ypos, acc, color=np.where(small, "lightgrey", "tab:blue"))
        # a Wilson bound at 0 or 1 can land a rounding error inside the point estimate
        err = np.clip([acc - lo, hi - acc], 0.0, None)
        ax.errorbar(acc, ypos, xerr=err, fmt="none", ecolor="black", capsize=3, lw=1)
        ax.set_yticks(ypos, [name + ("  too small" if r["too_small"] else "") for name, r in rows])
        ax.invert_yaxis()
        ax.axvline(m["accuracy"], color="black", ls="--", lw=1)
        left = max(0.0, float(lo.min()) - 0.05)
        # a little room past 1.0, so a bar and an interval at 1.0 show their ends (no tick
        # past 1.0: accuracy stops there)
        ax.set_xlim(left, 1.0 + 0.02 * (1.0 - left))
        ax.set_xticks([t for t in ax.get_xticks() if left <= t <= 1.0 + 1e-9])
        # The overall line is named above the axes, where no bar can be under its label,
        # on the side of the line that has room (accuracy is usually near the right edge).
        right_half = m["accuracy"] > (left + 1.0) / 2
        ax.text(
            m["accuracy"],
            1.01,
            f"overall {m['accuracy']:.3f} " if right_half else f" overall {m['accuracy']:.3f}",
            transform=ax.get_xaxis_transform(),
            ha="right" if right_half else "left",
            va="bottom",
            fontsize=8,
        )
        ax.set_xlabel(
            f"accuracy, with 95% Wilson intervals\n(grey: fewer than "
            f"{slices['min_n']} images, not ranked)"
        )
        ax.set_title("accuracy per slice", pad=16)
    else:
        fig, ax = plt.subplots(figsize=(4, 1.2))
        ax.text(
            0.5,
            0.5,
            "no attribute columns in this dataset:\nno sliced metrics",
            ha="center",
            va="center",
        )
        ax.axis("off")
    files.append(_save(fig, plots_dir / "slices.png", plt))
    return files


def _save(fig, path: Path, plt) -> Path:
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return path


def mistakes_grid(
    prepared: Any,
    paths: list[str],
    y: np.ndarray,
    p: np.ndarray,
    threshold: float,
    k: int,
    out_png: Path,
) -> int:
    """A grid of the `k` most confident mistakes on the test split (`prepared`: the
    PreparedData, or its folder); `p` is the calibrated P(male), `threshold` the cut on
    it. Returns how many."""
    from genderclf.data.tfrecords import make_dataset

    pred = (p >= threshold).astype(int)
    wrong = np.flatnonzero(pred != y)
    conf = np.abs(p[wrong] - 0.5)
    top = wrong[np.argsort(-conf)][:k]
    plt = pyplot()
    if len(top) == 0 or k == 0:
        fig, ax = plt.subplots(figsize=(4, 1.2))
        ax.text(0.5, 0.5, "no mistakes on the test split", ha="center", va="center")
        ax.axis("off")
        _save(fig, out_png, plt)
        return 0
    want = {paths[i]: i for i in top}
    images: dict[str, np.ndarray] = {}
    for batch, _, bp in make_dataset(prepared, "test", 256, with_path=True):
        for img, pth in zip(np.asarray(batch), np.asarray(bp), strict=True):
            name = pth.decode()
            if name in want:
                images[name] = img.astype(np.uint8)
        if len(images) == len(want):
            break
    rows, cols = grid_shape(len(top))
    # Room under each row for a two-line caption, so captions never run into the row above.
    fig, axes = plt.subplots(rows, cols, figsize=(2.3 * cols, 2.9 * rows + 0.5), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, i in zip(axes.ravel(), top, strict=False):
        ax.imshow(images[paths[i]])
        truth = "male" if y[i] == 1 else "female"
        said = "male" if p[i] >= threshold else "female"
        cmp = ">=" if p[i] >= threshold else "<"
        # Three decimals: at two, p(male)=0.53 against a threshold of 0.53 reads as right.
        ax.set_title(
            f"true {truth}, said {said}\nP(male) {p[i]:.3f} {cmp} {threshold:.3f}", fontsize=9
        )
    fig.suptitle(f"the {len(top)} most confident mistakes (test split)", fontsize=11)
    fig.subplots_adjust(hspace=0.45, wspace=0.15)
    _save(fig, out_png, plt)
    return len(top)


def grid_shape(n: int) -> tuple[int, int]:
    """(rows, columns) for `n` images: one row up to 4, else close to square with the
    fewest empty cells (8 -> 2x4, 9 -> 3x3, 10 -> 2x5), never a whole empty row."""
    if n <= 4:
        return 1, max(n, 1)
    square = int(np.ceil(np.sqrt(n)))
    cols = min((square, square + 1), key=lambda c: (-n % c, c))
    return -(-n // cols), cols


def plot_history(history: list[dict[str, Any]], out_png: Path) -> None:
    """training_curves.png: loss and accuracy per epoch, train and val, phases marked."""
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()
    ep = [r["epoch"] for r in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key in zip(axes, ("loss", "accuracy"), strict=True):
        ax.plot(ep, [r.get(key) for r in history], "o-", label=f"train {key}")
        ax.plot(ep, [r.get(f"val_{key}") for r in history], "s-", label=f"val {key}")
        switch = [r["epoch"] for r in history if r["phase"] == 2]
        if switch and len(switch) < len(ep):
            ax.axvline(min(switch) - 0.5, color="grey", ls="--", lw=1, label="fine-tune starts")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        ax.set_title(key)
        ax.grid(alpha=0.3)
        ax.legend()
    _save(fig, out_png, plt)


def write_predictions(
    paths: list[str], y: np.ndarray, p: np.ndarray, threshold: float, out_csv: Path
) -> Path:
    """Per-image predictions; DVC's confusion template reads `actual`/`predicted`."""
    names = np.array(["female", "male"])
    return write_csv(
        pd.DataFrame(
            {
                "path": paths,
                "actual": names[np.asarray(y, dtype=int)],
                "predicted": names[(p >= threshold).astype(int)],
                "prob_male": [f"{q:.6f}" for q in p],
            }
        ),
        out_csv,
    )
