"""`reports/drift/drift.png`: the reference and the batch side by side, per view."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from genderclf.model.plots import pyplot
from genderclf.monitor.profile import FEATURES, Profile

REF, NEW, ALARM = "#4C72B0", "#DD8452", "#C44E52"
LABELS = {
    "width": "width (px)",
    "height": "height (px)",
    "brightness": "brightness (mean luma)",
    "contrast": "contrast (luma std)",
    "saturation": "saturation",
    "red": "mean red",
    "green": "mean green",
    "blue": "mean blue",
}


def _hist(ax, a: np.ndarray, b: np.ndarray, bins: int, title: str, drifted: bool) -> None:
    lo, hi = float(min(a.min(), b.min())), float(max(a.max(), b.max()))
    ax.set_title(
        title,
        fontsize=9,
        color=ALARM if drifted else "black",
        fontweight="bold" if drifted else "normal",
    )
    ax.set_yticks([])
    if hi == lo:  # one value everywhere (e.g. every image 178x218): a histogram says nothing
        ax.text(
            0.5,
            0.5,
            f"every image: {lo:g}\n(reference n={len(a)}, batch n={len(b)})",
            ha="center",
            va="center",
            fontsize=9,
            transform=ax.transAxes,
        )
        ax.set_xticks([])
        return
    edges = np.linspace(lo, hi, bins + 1)
    ax.hist(a, edges, density=True, alpha=0.55, color=REF, label=f"reference (n={len(a)})")
    ax.hist(b, edges, density=True, alpha=0.55, color=NEW, label=f"batch (n={len(b)})")
    ax.tick_params(labelsize=7)


def drift_figure(
    reference: Profile,
    batch: Profile,
    result: dict[str, Any],
    null: np.ndarray,
    bins: int,
    out: Path,
) -> Path:
    """Histograms of each image statistic, of P(male) and of confidence (reference vs
    batch, the drifted ones titled in red), and the MMD permutation null with the observed
    statistic. Written to `out` (the caller makes the folder atomic)."""
    plt = pyplot()
    v = result["views"]
    fig, axes = plt.subplots(3, 4, figsize=(15, 10))
    for ax, f, name in zip(axes.flat[:8], v["image"]["features"], FEATURES, strict=True):
        j = FEATURES.index(name)
        _hist(
            ax,
            reference.features[:, j],
            batch.features[:, j],
            bins,
            f"{LABELS[name]}\nKS D={f['statistic']:.2f} p={f['p_value']:.2g}",
            f["drifted"],
        )
    p = v["predictions"]
    _hist(
        axes[2, 0],
        reference.p_male,
        batch.p_male,
        bins,
        f"P(male)\nmale fraction {p['reference_male_fraction']:.2f} -> "
        f"{p['batch_male_fraction']:.2f}",
        p["male_fraction_drifted"],
    )
    _hist(
        axes[2, 1],
        reference.confidence,
        batch.confidence,
        bins,
        f"confidence of the predicted label\nmean {p['reference_mean_confidence']:.3f} -> "
        f"{p['batch_mean_confidence']:.3f}",
        p["confidence_drifted"],
    )
    axes[0, 2].legend(fontsize=7, loc="upper right")
    gs = axes[2, 2].get_gridspec()
    axes[2, 2].remove()
    axes[2, 3].remove()
    ax = fig.add_subplot(gs[2, 2:])
    e = v["embeddings"]
    ax.hist(
        null,
        bins=max(bins, 30),
        color="#8C8C8C",
        alpha=0.8,
        label=f"MMD$^2$ under {len(null)} permutations",
    )
    ax.axvline(
        e["mmd2"],
        color=ALARM if e["drifted"] else NEW,
        lw=2.5,
        label=f"observed {e['mmd2']:.3g} (p={e['p_value']:.3g})",
    )
    ax.axvline(e["null_quantile_95"], color="black", ls="--", lw=1, label="null 95% quantile")
    ax.set_title(
        "champion's embeddings (pooled layer): MMD permutation test",
        fontsize=9,
        color=ALARM if e["drifted"] else "black",
    )
    ax.legend(fontsize=7)
    ax.tick_params(labelsize=7)
    verdict = "DRIFT" if result["drifted"] else "no drift"
    fig.suptitle(
        f"{verdict}: {result['batch']['location']} ({len(batch)} images) vs the "
        f"reference ({len(reference)} test images)",
        fontsize=12,
        color=ALARM if result["drifted"] else "black",
    )
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
