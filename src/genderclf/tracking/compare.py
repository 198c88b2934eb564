"""`genderclf compare`: registered versions (or recent runs) side by side; with
`--backbones`, what each backbone costs against the validation accuracy of those trained."""

from __future__ import annotations

import csv
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from genderclf.config import Settings
from genderclf.console import render_table
from genderclf.tracking.setup import CHAMPION, EXPERIMENT, MODEL_NAME, configure, require_store
from genderclf.tracking.tune import KIND_TAG

METRICS = ("test/accuracy", "test/f1", "test/roc_auc", "test/ece")


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else ("-" if v is None else str(v))


def _differing(param_sets: list[dict[str, str]]) -> list[str]:
    keys = sorted(set().union(*param_sets)) if param_sets else []
    return [k for k in keys if len({p.get(k) for p in param_sets}) > 1]


def _table(lead_headers: list[str], runs: list[Any], lead: list[list[str]]) -> str:
    diff = _differing([r.data.params for r in runs])
    headers = [*lead_headers, *METRICS, "data_checksum", *diff]
    rows = [
        [
            *first,
            *(_fmt(r.data.metrics.get(k)) for k in METRICS),
            r.data.tags.get("data_checksum", "-")[:19],
            *(r.data.params.get(k, "-") for k in diff),
        ]
        for first, r in zip(lead, runs, strict=True)
    ]
    return render_table(headers, rows, right=list(METRICS))


def aliases_by_version(client) -> dict[str, list[str]]:
    """{version: [alias, ...]}. `search_model_versions` leaves `aliases` empty, so the
    registered model's own alias map is the source."""
    model = client.get_registered_model(MODEL_NAME)
    out: dict[str, list[str]] = {}
    for alias, version in sorted((model.aliases or {}).items()):
        out.setdefault(str(version), []).append(alias)
    return out


def compare_versions() -> str:
    """All versions of `gender-classifier`, newest first, the champion marked with `*`."""
    from mlflow import MlflowClient

    require_store("registered versions to compare")
    configure()
    client = MlflowClient()
    versions = sorted(
        client.search_model_versions(f"name='{MODEL_NAME}'"), key=lambda v: -int(v.version)
    )
    if not versions:
        return f"no versions of {MODEL_NAME} registered yet: run `dvc repro` (or `make demo`)"
    aliases = aliases_by_version(client)
    runs = [client.get_run(v.run_id) for v in versions]
    lead = [
        [
            ("*" if CHAMPION in aliases.get(str(v.version), []) else " ") + str(v.version),
            ",".join(aliases.get(str(v.version), [])) or "-",
            v.tags.get("decision", "-"),
        ]
        for v in versions
    ]
    return _table(["version", "aliases", "decision"], runs, lead) + "\n(* = champion)"


def compare_runs(n: int) -> str:
    """The `n` most recent runs of the experiment."""
    import mlflow

    require_store("runs to compare")
    configure()
    exp = mlflow.get_experiment_by_name(EXPERIMENT)
    runs = (
        []
        if exp is None
        else mlflow.search_runs(
            [exp.experiment_id],
            max_results=n,
            order_by=["attributes.start_time DESC"],
            output_format="list",
        )
    )
    # a run no stage logged into (a flow run that failed at once) says nothing
    runs = [r for r in runs if r.data.params or r.data.metrics or "registry.version" in r.data.tags]
    if not runs:
        return f"experiment {EXPERIMENT!r} has no runs yet"
    lead = [
        [r.info.run_id[:8], r.info.status, r.data.tags.get("registry.version", "-")] for r in runs
    ]
    return _table(["run", "status", "version"], runs, lead)


# --- the backbone comparison ---------------------------------------------------------------------


def trained_accuracy(client: Any, experiment_id: str) -> dict[str, dict[str, Any]]:
    """Per backbone, the best validation accuracy among the experiment's runs that trained
    it, with its Wilson 95% interval where the run recorded its validation images.

    Trials give `tune/val_accuracy`; a training run gives the validation accuracy of its
    epoch with the lowest validation loss (the epoch the train stage keeps). The best of
    several runs is an optimistic pick (the count of runs is shown with it).
    """
    from genderclf.model.stats import wilson

    found: dict[str, dict[str, Any]] = {}
    for run in client.search_runs([experiment_id], max_results=5000):
        params, metrics = run.data.params, run.data.metrics
        backbone = params.get("train.backbone")
        if not backbone:
            continue
        if run.data.tags.get(KIND_TAG) == "trial":
            acc = metrics.get("tune/val_accuracy")
        elif "val/loss" in metrics and "val/accuracy" in metrics:
            acc = _kept_epoch_accuracy(client, run.info.run_id)
        else:
            continue
        if acc is None:
            continue
        entry = found.setdefault(backbone, {"runs": 0, "accuracy": -1.0})
        entry["runs"] += 1
        if acc > entry["accuracy"]:
            n = int(params.get("data.val_images", 0) or 0)
            entry.update(
                accuracy=acc,
                n=n or None,
                run_id=run.info.run_id,
                interval=wilson(round(acc * n), n) if n else None,
            )
    return found


def _kept_epoch_accuracy(client: Any, run_id: str) -> float | None:
    losses = {m.step: m.value for m in client.get_metric_history(run_id, "val/loss")}
    accs = {m.step: m.value for m in client.get_metric_history(run_id, "val/accuracy")}
    steps = [s for s in sorted(losses) if s in accs]
    if not steps:
        return None
    return accs[min(steps, key=lambda s: losses[s])]


def compare_backbones(
    settings: Settings, image_size: int, repeats: int, plot: Path | None = None
) -> str:
    """`genderclf compare --backbones`: every backbone's parameters, size on disk and
    predict latency on this machine, with the validation accuracy of those trained.

    The measurements and the plot are logged to MLflow as a `backbone comparison` run
    (they describe this machine now, so they are never DVC outputs).

    Returns:
        The table as text, with where the plot went.
    """
    import platform

    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    from genderclf.console import render_table
    from genderclf.model.backbones import BACKBONES
    from genderclf.model.costs import measure, plot_costs

    configure()
    client = MlflowClient()
    experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    accuracy = trained_accuracy(client, experiment_id)
    batch = settings.predict.batch_size
    costs = []
    for name in BACKBONES:
        print(f"compare: measuring {name} at {image_size}px ...", flush=True)
        costs.append(measure(settings.train, name, image_size, batch, repeats))
    rows = []
    for c in costs:
        a = accuracy.get(c.backbone)
        if a:
            ci = a["interval"]
            acc = f"{a['accuracy']:.4f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
            runs = str(a["runs"])
        else:
            acc, runs = "not trained", "0"
        rows.append(
            [
                c.backbone,
                f"{c.params / 1e6:.2f}M",
                f"{c.size_bytes / 1e6:.1f}",
                f"{c.latency_ms:.2f}",
                f"{c.batch_ms_per_image:.3f}",
                acc,
                runs,
            ]
        )
    headers = [
        "backbone",
        "params",
        "MB on disk",
        "ms/image (batch 1)",
        f"ms/image (batch {batch})",
        "val accuracy [95% CI]",
        "runs",
    ]
    table = render_table(headers, rows, right=headers[1:5])
    with tempfile.TemporaryDirectory(prefix="genderclf-backbones-") as tmp:
        png = plot_costs(costs, accuracy, Path(tmp) / "backbones.png")
        csv_file = Path(tmp) / "backbones.csv"
        with open(csv_file, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["backbone", "params", "size_bytes", "latency_ms", "batch_ms_per_image"])
            for c in costs:
                w.writerow([c.backbone, c.params, c.size_bytes, c.latency_ms, c.batch_ms_per_image])
        run = client.create_run(
            experiment_id,
            run_name="backbone comparison",
            tags={
                KIND_TAG: "backbones",
                "mlflow.note.content": (
                    f"Cost of each backbone at {image_size}px on {platform.node()} "
                    f"({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs): "
                    "parameters, .keras size, predict latency (weights: null, inference mode)."
                ),
            },
        )
        rid = run.info.run_id
        now = int(time.time() * 1000)
        metrics = [
            Metric(f"cost/{c.backbone}/{k}", float(v), now, 0)
            for c in costs
            for k, v in (
                ("params", c.params),
                ("size_mb", round(c.size_bytes / 1e6, 3)),
                ("latency_ms", c.latency_ms),
                ("batch_ms_per_image", c.batch_ms_per_image),
            )
        ]
        client.log_batch(
            rid,
            metrics=metrics,
            params=[
                Param("image_size", str(image_size)),
                Param("batch", str(batch)),
                Param("repeats", str(repeats)),
            ],
        )
        client.log_artifacts(rid, tmp, "plots")
        client.set_terminated(rid)
        where = f"MLflow run {rid} (plots/backbones.png)"
        if plot is not None:
            import shutil

            from genderclf.io import atomic_file

            with atomic_file(plot) as out:
                shutil.copyfile(png, out)
            where += f" and {plot}"
    return f"{table}\nplot: {where}"
