"""Evaluation with scikit-learn: metrics, threshold, calibration, slices and plots.

The decision threshold is chosen on the validation split (max F1) and applied to the
test split, so the test numbers are not tuned on the test data.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)


class ModelLoadError(ValueError):
    """A model file that is not a loadable (safe) Keras model."""


def _safe_mode():
    """Force Keras safe mode on for one load.

    `load_model(safe_mode=True)` alone is not enough: once anything in the process has
    called `keras.config.enable_unsafe_deserialization()`, Keras 3 lets that global switch
    override the argument and would run a lambda's bytecode from the file.
    """
    import contextlib

    try:
        from keras.src.saving.serialization_lib import SafeModeScope
    except ImportError:  # pragma: no cover - a Keras without it: the argument alone
        return contextlib.nullcontext()
    return SafeModeScope(True)


def load_model(path: str | Path):
    """Load a `.keras` model with Keras' safe mode on.

    Raises:
        ModelLoadError: the file is not a Keras model or needs unsafe deserialization.
    """
    import zipfile

    import keras

    import genderclf.model.layers  # noqa: F401  (registers the custom layers)

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `dvc repro train`")
    if not zipfile.is_zipfile(path):  # Keras would say "File not found" for a file that exists
        raise ModelLoadError(
            f"{path} is not a loadable Keras model: not a .keras (zip) file; run `dvc repro train`"
        )
    try:
        with _safe_mode():
            return keras.saving.load_model(str(path), safe_mode=True)
    except Exception as err:  # Keras raises many types for a bad file; one clear message
        if "safe_mode" in str(err):
            raise ModelLoadError(
                f"{path} was refused: loading it needs unsafe deserialization (Python code "
                "such as a lambda layer), which Keras safe mode forbids. Nothing was executed; "
                "re-train with `dvc repro train` rather than loading an untrusted model."
            ) from None
        raise ModelLoadError(f"{path} is not a loadable Keras model: {err}") from None


def predict_split(model: Any, prepared_dir: Path, split: str, batch_size: int):
    """Probabilities for one prepared split, in record order (originals only for val/test).

    Returns:
        (paths: list[str], labels: np.ndarray[int], probs: np.ndarray[float])
    """
    import keras

    from genderclf.data.tfrecords import make_dataset

    want = model.inputs[0].shape[1]
    paths, ys, ps = [], [], []
    for images, labels, p in make_dataset(prepared_dir, split, batch_size, with_path=True):
        if images.shape[1] != want:  # e.g. a champion trained at another image size
            images = keras.ops.image.resize(images, (want, want))
        prob = model.predict_on_batch(images)
        ps.append(np.asarray(keras.ops.convert_to_numpy(prob)).reshape(-1))
        ys.append(np.asarray(labels).astype(int))
        paths.extend(x.decode() for x in np.asarray(p))
    return paths, np.concatenate(ys), np.concatenate(ps).astype(np.float64)


def choose_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """The probability threshold that maximises F1 on (validation) data."""
    from sklearn.metrics import precision_recall_curve

    precision, recall, thresholds = precision_recall_curve(y, p)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    if len(thresholds) == 0:
        return 0.5
    return float(thresholds[int(np.argmax(f1[:-1]))])


def expected_calibration_error(
    y: np.ndarray, p: np.ndarray, bins: int
) -> tuple[float, pd.DataFrame]:
    """ECE over equal-width probability bins; also the per-bin table for the plot."""
    edges = np.linspace(0, 1, bins + 1)
    idx = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
    rows, ece = [], 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            conf, acc = float(p[m].mean()), float(y[m].mean())
            ece += m.mean() * abs(conf - acc)
            rows.append({"bin": b, "confidence": conf, "observed": acc, "count": int(m.sum())})
    return float(ece), pd.DataFrame(rows)


def compute_metrics(
    y: np.ndarray, p: np.ndarray, threshold: float, bins: int = 10
) -> dict[str, Any]:
    from sklearn import metrics as M

    pred = (p >= threshold).astype(int)
    both = len(np.unique(y)) > 1
    ece, _ = expected_calibration_error(y, p, bins)
    return {
        "accuracy": float(M.accuracy_score(y, pred)),
        "precision": float(M.precision_score(y, pred, zero_division=0)),
        "recall": float(M.recall_score(y, pred, zero_division=0)),
        "f1": float(M.f1_score(y, pred, zero_division=0)),
        "roc_auc": float(M.roc_auc_score(y, p)) if both else None,
        "average_precision": float(M.average_precision_score(y, p)) if both else None,
        "ece": ece,
        "threshold": float(threshold),
        "confusion_matrix": M.confusion_matrix(y, pred, labels=[0, 1]).tolist(),
        "n": len(y),
    }


def slice_metrics(frame: pd.DataFrame, correct: np.ndarray, attrs: list[str]) -> dict[str, Any]:
    """Accuracy with and without each attribute, and the worst-slice gap.

    Returns:
        {"by_attribute": {attr: {"with": {...}, "without": {...}}}, "worst_slice": name,
         "worst_slice_accuracy": acc, "worst_slice_gap": overall - worst}
    """
    overall = float(correct.mean())
    out: dict[str, Any] = {"by_attribute": {}}
    worst = ("overall", overall)
    for a in attrs:
        if a not in frame.columns:
            continue
        col = pd.to_numeric(frame[a], errors="coerce").to_numpy()
        entry = {}
        for name, mask in (("with", col == 1), ("without", col == 0)):
            n = int(mask.sum())
            acc = float(correct[mask].mean()) if n else None
            entry[name] = {"n": n, "accuracy": acc}
            if acc is not None and n >= 5 and acc < worst[1]:
                worst = (f"{a}={name}", acc)
        out["by_attribute"][a] = entry
    out["worst_slice"], out["worst_slice_accuracy"] = worst
    out["worst_slice_gap"] = overall - worst[1]
    return out


# --- plots ------------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_plots(y: np.ndarray, p: np.ndarray, m: dict[str, Any], calib: pd.DataFrame,
                slices: dict[str, Any] | None, plots_dir: Path) -> list[Path]:  # fmt: skip
    """PNG plots plus the CSV data DVC renders (`dvc plots show`)."""
    from sklearn.metrics import precision_recall_curve, roc_curve

    plt = _plt()
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
    ax.set_title(f"confusion matrix (threshold {m['threshold']:.2f})")
    files.append(_save(fig, plots_dir / "confusion_matrix.png", plt))

    if len(np.unique(y)) > 1:
        fpr, tpr, _ = roc_curve(y, p)
        pd.DataFrame({"fpr": fpr, "tpr": tpr}).to_csv(plots_dir / "roc.csv", index=False)
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.plot(fpr, tpr, label=f"AUC {m['roc_auc']:.3f}")
        ax.plot([0, 1], [0, 1], "--", color="grey")
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.set_title("ROC (male = positive)")
        ax.legend()
        files.append(_save(fig, plots_dir / "roc.png", plt))
        prec, rec, _ = precision_recall_curve(y, p)
        pd.DataFrame({"recall": rec, "precision": prec}).to_csv(plots_dir / "pr.csv", index=False)
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.plot(rec, prec, label=f"AP {m['average_precision']:.3f}")
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.set_title("precision-recall (male = positive)")
        ax.legend()
        files.append(_save(fig, plots_dir / "pr.png", plt))

    calib.to_csv(plots_dir / "calibration.csv", index=False)
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect")
    ax.plot(calib["confidence"], calib["observed"], "o-", label=f"model (ECE {m['ece']:.3f})")
    ax.set_xlabel("predicted probability of male")
    ax.set_ylabel("observed fraction male")
    ax.set_title("reliability")
    ax.legend()
    files.append(_save(fig, plots_dir / "calibration.png", plt))

    if slices and slices["by_attribute"]:
        names, accs = [], []
        for a, e in slices["by_attribute"].items():
            for k in ("with", "without"):
                if e[k]["accuracy"] is not None:
                    names.append(f"{a}={'1' if k == 'with' else '0'} (n={e[k]['n']})")
                    accs.append(e[k]["accuracy"])
        fig, ax = plt.subplots(figsize=(6, 0.35 * len(names) + 1))
        ax.barh(names, accs, color="tab:blue")
        ax.axvline(m["accuracy"], color="black", ls="--", lw=1, label="overall")
        ax.set_xlim(max(0.0, min(accs) - 0.05), 1.0)
        ax.set_xlabel("accuracy")
        ax.set_title("accuracy per slice")
        ax.legend()
    else:
        fig, ax = plt.subplots(figsize=(4, 1.2))
        ax.text(0.5, 0.5, "no attribute columns in this dataset:\nno sliced metrics", ha="center",
                va="center")  # fmt: skip
        ax.axis("off")
    files.append(_save(fig, plots_dir / "slices.png", plt))
    return files


def _save(fig, path: Path, plt) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def mistakes_grid(prepared_dir: Path, paths: list[str], y: np.ndarray, p: np.ndarray,
                  threshold: float, k: int, out_png: Path) -> int:  # fmt: skip
    """A grid of the `k` most confident mistakes on the test split. Returns how many."""
    from genderclf.data.tfrecords import make_dataset

    pred = (p >= threshold).astype(int)
    wrong = np.flatnonzero(pred != y)
    conf = np.abs(p[wrong] - 0.5)
    top = wrong[np.argsort(-conf)][:k]
    plt = _plt()
    if len(top) == 0 or k == 0:
        fig, ax = plt.subplots(figsize=(4, 1.2))
        ax.text(0.5, 0.5, "no mistakes on the test split", ha="center", va="center")
        ax.axis("off")
        _save(fig, out_png, plt)
        return 0
    want = {paths[i]: i for i in top}
    images: dict[str, np.ndarray] = {}
    for batch, _, bp in make_dataset(prepared_dir, "test", 256, with_path=True):
        for img, pth in zip(np.asarray(batch), np.asarray(bp), strict=True):
            name = pth.decode()
            if name in want:
                images[name] = img.astype(np.uint8)
        if len(images) == len(want):
            break
    cols = min(8, len(top))
    rows = -(-len(top) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.9 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, i in zip(axes.ravel(), top, strict=False):
        ax.imshow(images[paths[i]])
        truth = "male" if y[i] == 1 else "female"
        ax.set_title(f"true {truth}\np(male)={p[i]:.2f}", fontsize=7)
    fig.suptitle("most confident mistakes (test)", fontsize=9)
    _save(fig, out_png, plt)
    return len(top)


def write_predictions(paths: list[str], y: np.ndarray, p: np.ndarray, threshold: float,
                      out_csv: Path) -> None:  # fmt: skip
    """Per-image predictions; DVC's confusion template reads `actual`/`predicted`."""
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    with open(out_csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "actual", "predicted", "prob_male"])
        for path, a, q in zip(paths, y, p, strict=True):
            w.writerow(
                [
                    path,
                    "male" if a else "female",
                    "male" if q >= threshold else "female",
                    f"{q:.6f}",
                ]
            )


def run_evaluate(settings, prepared_dir: Path, splits_dir: Path, model_file: Path,
                 run_file: Path, metrics_file: Path, plots_dir: Path) -> dict[str, Any]:  # fmt: skip
    """The evaluate stage: metrics on test (threshold from val), plots, slices, MLflow.

    Returns:
        The dict written to `metrics/eval.json`.
    """
    import json

    from genderclf.data.fsutil import write_json
    from genderclf.data.split import read_split

    cfg = settings.evaluate
    model = load_model(model_file)
    batch = settings.train.batch_size * 2
    _, yv, pv = predict_split(model, prepared_dir, "val", batch)
    threshold = choose_threshold(yv, pv) if cfg.threshold == "val_f1" else 0.5
    paths, y, p = predict_split(model, prepared_dir, "test", batch)
    m = compute_metrics(y, p, threshold, cfg.calibration_bins)
    m["val_accuracy_at_threshold"] = float(((pv >= threshold).astype(int) == yv).mean())
    test = read_split(splits_dir, "test").set_index("path")
    frame = test.reindex(paths)
    correct = ((p >= threshold).astype(int) == y).astype(float)
    slices = slice_metrics(frame, correct, list(cfg.slices)) if any(
        a in frame.columns for a in cfg.slices) else None  # fmt: skip
    if slices:
        m["slices"] = slices
        m["worst_slice_gap"] = slices["worst_slice_gap"]
    _, calib = expected_calibration_error(y, p, cfg.calibration_bins)
    files = write_plots(y, p, m, calib, slices, plots_dir)
    n_mistakes = mistakes_grid(prepared_dir, paths, y, p, threshold, cfg.mistakes_grid,
                               plots_dir / "mistakes.png")  # fmt: skip
    files.append(plots_dir / "mistakes.png")
    write_predictions(paths, y, p, threshold, plots_dir / "predictions.csv")
    write_json(metrics_file, m)
    log.info("evaluate: accuracy %.4f f1 %.4f auc %s (threshold %.3f, %d mistakes shown)",
             m["accuracy"], m["f1"], m["roc_auc"], threshold, n_mistakes)  # fmt: skip

    if run_file.is_file():
        import mlflow

        from genderclf.tracking.setup import configure

        configure()
        run_id = json.loads(run_file.read_text())["run_id"]
        with mlflow.start_run(run_id=run_id):
            mlflow.log_metrics({f"test_{k}": float(v) for k, v in m.items()
                                if isinstance(v, (int, float)) and v is not None})  # fmt: skip
            if slices:
                for a, e in slices["by_attribute"].items():
                    for k in ("with", "without"):
                        if e[k]["accuracy"] is not None:
                            mlflow.log_metric(f"slice_{a}_{k}_accuracy", e[k]["accuracy"])
            mlflow.log_artifact(str(metrics_file), "metrics")
            for f in files:
                mlflow.log_artifact(str(f), "plots")
            mlflow.set_tag("stage.evaluate", "done")
    else:
        log.warning("%s missing: metrics not logged to MLflow", run_file)
    return m
