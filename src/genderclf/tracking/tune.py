"""MLflow for the hyperparameter search (the backbone comparison, a tool, is in compare.py).

A search is a parent run (`tune <key>`): the settings as params, lineage tags, and at the
end the best trial, Optuna's parameter importances and the plots (optimisation history,
importances). Every trial is a run nested under it (`trial <n>`), with the trial's `train.*`
values as params (the same keys as a training run), its per-epoch `train/` and `val/`
curves, and `tune.state` complete, pruned or failed: MLflow's compare and parallel
coordinates views work on the trials of a search. A search that continues after a kill
logs into the same parent run; the trial the kill interrupted is closed as failed.

The calls go through `MlflowClient` with explicit run ids (no active run), so a search
inside a Prefect flow run nests under the flow run's MLflow run (`MLFLOW_RUN_ID`) without
taking it over. A trial's logging never stops the search: the study's journal is the
record, MLflow the view.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from genderclf.config import Paths, Settings
from genderclf.tracking.runs import EPOCH_KEYS, _tracking_failures, rounded
from genderclf.tracking.setup import (
    EXPERIMENT,
    TrackingError,
    configure,
    lineage_tags,
    redact,
)

log = logging.getLogger(__name__)

TRIAL_TAG = "tune.trial"
STATE_TAG = "tune.state"
KIND_TAG = "genderclf.kind"  # search | trial | backbones


class SearchRun:
    """The MLflow runs of one search, as a context manager around the tune stage.

    Entering checks the tracking server (before any trial is spent) and starts the
    parent run, or resumes the one a killed search left in its study folder. It is the
    stage's trial log (`trial_started`, `trial_epoch`, `trial_finished`,
    `trial_abandoned`).
    """

    def __init__(self, settings: Settings, paths: Paths, plan: Any):
        self.settings, self.paths, self.plan = settings, paths, plan
        self.client: Any = None
        self.run_id = ""
        self.experiment_id = ""
        self.trials: dict[int, str] = {}  # trial number -> its run id
        self.val_images = 0

    def __enter__(self) -> SearchRun:
        from mlflow import MlflowClient
        from mlflow.entities import Param

        from genderclf.contracts import PreparedData

        self.uri = configure()
        self.client = MlflowClient()
        self.val_images = PreparedData.read(self.paths.prepared).split("val").images
        run_file = self.plan.folder / "mlflow_run_id"
        try:
            self.experiment_id = self.client.get_experiment_by_name(EXPERIMENT).experiment_id
            resumed = run_file.read_text().strip() if run_file.is_file() else None
            if resumed and self._exists(resumed):
                self.run_id = resumed
                self.client.update_run(resumed, status="RUNNING")
                return self
            t = self.settings.tune
            tags = {
                **lineage_tags(self.paths.params, self.paths.source_file, str(self.paths.prepared)),
                KIND_TAG: "search",
                "tune.study": self.plan.name,
                "tune.engine": self.plan.engine,
                "mlflow.note.content": (
                    f"Hyperparameter search ({self.plan.engine}): {t.trials} trials over "
                    f"train.{', train.'.join(t.space)}, {t.metric} on the validation split "
                    f"({self.val_images} images), TPE seeded with base.seed, {t.pruner} "
                    "pruning. Each trial is a nested run; the winner goes to params/tuned.yaml."
                ),
            }
            if os.environ.get("MLFLOW_RUN_ID"):  # inside a flow run: nest under its run
                tags["mlflow.parentRunId"] = os.environ["MLFLOW_RUN_ID"]
            run = self.client.create_run(
                self.experiment_id, run_name=f"tune {self.plan.key[:8]}", tags=tags
            )
            self.run_id = run.info.run_id
            self.plan.folder.mkdir(parents=True, exist_ok=True)
            run_file.write_text(self.run_id)
            flat = self.settings.flat()
            params = [
                Param(k, str(v)[:500]) for k, v in flat.items() if k.split(".")[0] != "predict"
            ]
            for i in range(0, len(params), 100):
                self.client.log_batch(self.run_id, params=params[i : i + 100])
            self.client.log_batch(
                self.run_id, params=[Param("data.val_images", str(self.val_images))]
            )
        except _tracking_failures() as err:
            raise TrackingError(
                f"MLflow tracking server at {self.uri} failed before the search started: "
                f"{redact(str(err))[:300]}. No trial ran; run the stage again when it answers."
            ) from None
        return self

    def _exists(self, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_run(run_id).info.lifecycle_stage == "active"
        except MlflowException:
            return False

    def __exit__(self, exc_type, exc, tb) -> None:
        with contextlib.suppress(*_tracking_failures()):
            self.client.set_terminated(self.run_id, "FINISHED" if exc is None else "FAILED")

    # --- the trial log -----------------------------------------------------------------------

    def _safely(self, what: str, fn, *args: Any) -> None:
        try:
            fn(*args)
        except Exception as err:  # the journal is the record; MLflow must not stop the search
            log.warning("could not log %s to MLflow (%s: %s)", what, type(err).__name__, err)

    def trial_started(self, number: int, params: dict[str, Any]) -> None:
        """A nested run for the trial, with its train.* values as params."""
        self._safely(f"trial {number}", self._start, number, params)

    def _start(self, number: int, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        from genderclf.model.tune import trial_settings

        run = self.client.create_run(
            self.experiment_id,
            run_name=f"trial {number}",
            tags={
                "mlflow.parentRunId": self.run_id,
                KIND_TAG: "trial",
                TRIAL_TAG: str(number),
                STATE_TAG: "running",
                "tune.study": self.plan.name,
                "tune.searched": ",".join(f"train.{k}" for k in sorted(params)),
            },
        )
        self.trials[number] = run.info.run_id
        train = trial_settings(self.settings, params).train.model_dump()
        self.client.log_batch(
            run.info.run_id,
            params=[Param(f"train.{k}", str(v)) for k, v in train.items()]
            + [Param("data.val_images", str(self.val_images))],
        )

    def trial_epoch(self, number: int, row: dict[str, Any]) -> None:
        """One epoch's train/ and val/ metrics at step = epoch."""
        self._safely(f"an epoch of trial {number}", self._epoch, number, row)

    def _epoch(self, number: int, row: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        if number not in self.trials:
            return
        now = int(time.time() * 1000)
        step = int(row["epoch"])
        metrics = [
            Metric(EPOCH_KEYS[k], rounded(v), now, step)
            for k, v in row.items()
            if k in EPOCH_KEYS and v is not None
        ]
        self.client.log_batch(self.trials[number], metrics=metrics)

    def trial_finished(self, outcome: Any) -> None:
        """The trial's value, its validation accuracy and loss at the kept epoch, its state."""
        self._safely(f"the end of trial {outcome.number}", self._finish, outcome)

    def _finish(self, outcome: Any) -> None:
        from mlflow.entities import Metric

        from genderclf.model.tune import objective_so_far

        run_id = self.trials.pop(outcome.number, None)
        if run_id is None:
            return
        now = int(time.time() * 1000)
        values = {
            "tune/value": outcome.value,
            "tune/val_accuracy": objective_so_far(outcome.history, "val_accuracy"),
            "tune/val_loss": objective_so_far(outcome.history, "val_loss"),
            "tune/epochs": len(outcome.history),
            "tune/seconds": outcome.seconds,
        }
        metrics = [Metric(k, rounded(v), now, 0) for k, v in values.items() if v is not None]
        self.client.log_batch(run_id, metrics=metrics)
        self.client.set_tag(run_id, STATE_TAG, outcome.state)
        if outcome.node:
            self.client.set_tag(run_id, "tune.node", outcome.node)
        if outcome.error:
            self.client.set_tag(run_id, "tune.error", redact(outcome.error)[:500])
        self.client.set_terminated(run_id, "FAILED" if outcome.state == "failed" else "FINISHED")

    def trial_abandoned(self, number: int) -> None:
        """A trial a killed search left running: its run is closed as failed."""
        self._safely(f"abandoned trial {number}", self._abandon, number)

    def _abandon(self, number: int) -> None:
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=(
                f"tags.`mlflow.parentRunId` = '{self.run_id}' and tags.`{TRIAL_TAG}` = '{number}'"
            ),
        )
        for run in runs:
            if run.info.status == "RUNNING":
                self.client.set_tag(run.info.run_id, STATE_TAG, "failed")
                self.client.set_tag(run.info.run_id, "tune.error", "the search was killed")
                self.client.set_terminated(run.info.run_id, "FAILED")

    # --- the end -----------------------------------------------------------------------------

    def log_search(self, report: Any) -> None:
        """The parent run's summary: best trial and values, importances, plots, the files."""
        from mlflow.entities import Metric, Param

        from genderclf.model.tune import direction, plot_history, plot_importances

        best = report.best
        metric = self.settings.tune.metric
        now = int(time.time() * 1000)
        values = {
            f"tune/best_{metric}": best["value"],
            f"tune/start_{metric}": report.metrics["start_value"],
            **{f"tune/trials_{k}": v for k, v in report.metrics["trials"].items()},
            **{f"importance/{k}": v for k, v in report.importances.items()},
        }
        self.client.log_batch(
            self.run_id,
            metrics=[Metric(k, rounded(v), now, 0) for k, v in values.items() if v is not None],
        )
        logged = self.client.get_run(self.run_id).data.params
        best_params = [
            Param(f"best.train.{k}", str(v))
            for k, v in sorted(best["params"].items())
            if f"best.train.{k}" not in logged
        ]
        if best_params:
            self.client.log_batch(self.run_id, params=best_params)
        self.client.set_tag(self.run_id, "tune.best_trial", str(best["number"]))
        with contextlib.suppress(*_tracking_failures()):
            self._mark_best(best["number"])
        maximize = direction(self.settings.tune) == "maximize"
        with tempfile.TemporaryDirectory(prefix="genderclf-tune-") as tmp:
            folder = Path(tmp)
            plot_history(report.trials, metric, maximize, folder / "optimization_history.png")
            plot_importances(report.importances, folder / "param_importances.png")
            _write_trials_csv(report.trials, folder / "trials.csv")
            self.client.log_artifacts(self.run_id, str(folder), "plots")
        for f in (self.paths.tuned_params, self.paths.tune_metrics):
            self.client.log_artifact(self.run_id, str(f), "tune")

    def _mark_best(self, number: int) -> None:
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=(
                f"tags.`mlflow.parentRunId` = '{self.run_id}' and tags.`{TRIAL_TAG}` = '{number}'"
                " and attributes.status = 'FINISHED'"
            ),
        )
        for run in runs:
            self.client.set_tag(run.info.run_id, "tune.best", "true")


def _write_trials_csv(trials: list[dict[str, Any]], path: Path) -> None:
    keys = sorted({k for t in trials for k in t["params"]})
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["trial", "state", "value", *(f"train.{k}" for k in keys)])
        for t in trials:
            w.writerow([t["number"], t["state"], t["value"], *(t["params"].get(k) for k in keys)])
