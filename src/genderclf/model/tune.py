"""The hyperparameter search: Optuna's study, the search space, one trial's fit, pruning.

* The search space is `tune.space` (train.* keys only), as Optuna distributions.
* The sampler is TPE seeded with `base.seed`; the pruner (median or successive halving)
  reads each trial's validation metric after every epoch.
* The study lives in a journal file (`JournalStorage`) below `.cache/tune/<key>/`, outside
  DVC's outputs: a killed search continues where it stopped. `StudyHost` is its only
  writer: trials ask it for params, report their epochs to it and are told back to it,
  whether they run in this process or as Ray tasks (where it is a Ray actor).
* A trial is the train stage's two-phase fit (`model.fit.fit_phases`) on the train split,
  scored on the validation split. `trial_datasets` is the one place that picks the split
  files a trial reads, and it refuses any split but train and val: the search never sees
  the test split.

The objective is the validation metric of the epoch the train stage would keep (the lowest
validation loss): its validation accuracy (`tune.metric: val_accuracy`, maximised) or that
loss itself (`val_loss`, minimised).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from genderclf.config import GenderclfError, SearchRange, Settings, TrainSettings, TuneSettings
from genderclf.contracts import PreparedData
from genderclf.io import sha256_file

log = logging.getLogger(__name__)

TRIAL_SPLITS = ("train", "val")  # the only splits a trial may read
STATES = ("complete", "pruned", "failed")


class TuneError(GenderclfError, RuntimeError):
    """The search cannot go on (too many failed trials, the time guard, a bad study)."""


class Pruned(Exception):  # a signal, like optuna.TrialPruned
    """Raised inside a trial's fit when the pruner stops it."""


class TimeUp(Exception):  # a signal
    """Raised inside a trial's fit when the search's time guard has passed."""


TIME_UP = "stopped by the time guard (tune.timeout_minutes)"


# --- the search space ------------------------------------------------------------------------


def distributions(tune: TuneSettings) -> dict[str, Any]:
    """`tune.space` as Optuna distributions, keyed by the train key (`lr_head`)."""
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    out: dict[str, Any] = {}
    for key, dim in tune.space.items():
        if isinstance(dim, SearchRange):
            if TrainSettings.model_fields[key].annotation is int:
                out[key] = IntDistribution(int(dim.low), int(dim.high), log=dim.log)
            else:
                out[key] = FloatDistribution(dim.low, dim.high, log=dim.log)
        else:
            out[key] = CategoricalDistribution(dim.choices)
    return out


def starting_point(settings: Settings) -> dict[str, Any]:
    """params.yaml's own values of the searched keys that lie inside the space.

    The search's first trial uses them (others are sampled), so its winner is never
    worse on validation than the params as they are.
    """
    values = settings.train.model_dump()
    out = {}
    for key, dim in settings.tune.space.items():
        value = values[key]
        if isinstance(dim, SearchRange):
            inside = isinstance(value, int | float) and dim.low <= value <= dim.high
        else:
            inside = value in dim.choices
        if inside:
            out[key] = value
    return out


def trial_settings(settings: Settings, params: dict[str, Any]) -> Settings:
    """`settings` with a trial's train values in place (validated like params.yaml)."""
    train = TrainSettings.model_validate({**settings.train.model_dump(), **params})
    return settings.model_copy(update={"train": train})


def direction(tune: TuneSettings) -> str:
    return "minimize" if tune.metric == "val_loss" else "maximize"


def make_sampler(settings: Settings):
    """TPE seeded with `base.seed`: the same trials in the same order, the same params."""
    import optuna

    return optuna.samplers.TPESampler(
        seed=settings.base.seed, n_startup_trials=settings.tune.startup_trials
    )


def make_pruner(tune: TuneSettings):
    """`tune.pruner` over the per-epoch objective (an epoch is a step)."""
    import optuna

    # Steps are epochs counted from 1, and a pruner may stop a trial at step n_warmup_steps
    # (median) or min_resource (successive halving): the first prunable epoch is warmup + 1.
    first = tune.warmup_epochs + 1
    if tune.pruner == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=tune.startup_trials, n_warmup_steps=first
        )
    if tune.pruner == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=first, reduction_factor=tune.reduction_factor
        )
    return optuna.pruners.NopPruner()


# --- which study: the settings and the data it searches over ----------------------------------


def data_digest(prepared: Path) -> str:
    """sha256 over meta.json and the train and validation shards (the data a trial sees)."""
    data = PreparedData.read(prepared)
    h = hashlib.sha256(json.dumps(data.to_json(), sort_keys=True).encode())
    for split in TRIAL_SPLITS:
        for shard in data.split(split).shards:
            h.update(f"{split}/{shard}:{sha256_file(prepared / shard)}".encode())
    return h.hexdigest()


# What decides how many trials run, for how long and how many at once: not what a trial
# computes or what the sampler proposes. Raising the budget continues the same study.
NOT_IN_KEY = {"trials", "timeout_minutes", "parallel_trials"}


def study_key(settings: Settings, digest: str) -> str:
    """A study per search: the tune settings (but the budget, the time guard and the
    parallelism), the train and base settings, and the data's digest.

    A journal left by other settings or data is never continued by mistake.
    """
    key = json.dumps(
        {
            "tune": settings.tune.model_dump(exclude=NOT_IN_KEY),
            "train": settings.train.model_dump(),
            "base": settings.base.model_dump(),
            "data": digest,
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(key.encode()).hexdigest()[:16]


# --- the study ---------------------------------------------------------------------------------


@dataclass
class TrialOutcome:
    """What one trial did: its state, objective value, per-epoch history, and why it failed."""

    number: int
    params: dict[str, Any]
    state: str  # complete | pruned | failed
    value: float | None
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None
    node: str | None = None  # the Ray node it ran on (None: in the search's own process)


class StudyHost:
    """The Optuna study of one search, in a journal file; its one writer.

    Opening it continues a study left by a killed search: trials it left running are
    recorded as failed and their params queued again, so the search repeats them.
    A new study's first trial is `starting_point` (params.yaml's values).
    """

    def __init__(self, journal: str, name: str, settings: Settings):
        import optuna
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        Path(journal).parent.mkdir(parents=True, exist_ok=True)
        self.settings = settings
        self.dists = distributions(settings.tune)
        storage = JournalStorage(JournalFileBackend(journal))
        self.study = optuna.create_study(
            study_name=name,
            storage=storage,
            sampler=make_sampler(settings),
            pruner=make_pruner(settings.tune),
            direction=direction(settings.tune),
            load_if_exists=True,
        )
        self._live: dict[int, Any] = {}
        running = optuna.trial.TrialState.RUNNING
        self.abandoned = [t.number for t in self.study.trials if t.state == running]
        for t in self.study.trials:
            if t.state == running:
                self.study.tell(t.number, state=optuna.trial.TrialState.FAIL)
                self.study.enqueue_trial(t.params, user_attrs={"repeats": t.number})
        self.resumed = bool(self.study.trials)
        if not self.resumed:
            self.study.enqueue_trial(starting_point(settings), user_attrs={"start": True})

    def opening(self) -> dict[str, Any]:
        """How the study was found: resumed or new, the trials a killed search left running
        (now failed, queued again), and the counts."""
        return {"resumed": self.resumed, "abandoned": self.abandoned, "counts": self.counts()}

    def summary(self) -> dict[str, Any]:
        """The study's outcome: best trial, every trial, counts, importances."""
        return {
            "best": self.best(),
            "trials": self.trials(),
            "counts": self.counts(),
            "importances": self.importances(),
            "resumed": self.resumed,
        }

    def counts(self) -> dict[str, int]:
        """Trials by state: complete, pruned, failed (killed ones count as failed)."""
        states = [t.state.name.lower() for t in self.study.trials]
        out = {s: states.count(s) for s in STATES}
        out["failed"] += states.count("fail")
        return out

    def finished(self) -> int:
        """Trials that count toward the budget: complete and pruned."""
        c = self.counts()
        return c["complete"] + c["pruned"]

    def ask(self) -> tuple[int, dict[str, Any]]:
        """A new trial: (its number, its params)."""
        trial = self.study.ask(self.dists)
        self._live[trial.number] = trial
        return trial.number, dict(trial.params)

    def report(self, number: int, step: int, value: float) -> bool:
        """Record a trial's objective after epoch `step`; True when the pruner stops it."""
        trial = self._live[number]
        trial.report(value, step)
        return bool(trial.should_prune())

    def tell(self, number: int, state: str, value: float | None, node: str | None = None) -> None:
        """Close a trial: complete (with its value), pruned or failed; `node`: the Ray node
        it ran on, kept with the trial."""
        from optuna.trial import TrialState

        trial = self._live.pop(number, None)
        if node is not None and trial is not None:
            trial.set_user_attr("node", node)
        if state == "complete":
            self.study.tell(number, value)
        else:
            self.study.tell(
                number, state=TrialState.PRUNED if state == "pruned" else TrialState.FAIL
            )

    def trials(self) -> list[dict[str, Any]]:
        """Every trial as a plain record: number, state, params, value, curve, origin."""
        out = []
        for t in self.study.trials:
            state = t.state.name.lower()
            out.append(
                {
                    "number": t.number,
                    "state": "failed" if state == "fail" else state,
                    "params": dict(t.params),
                    "value": t.value,
                    "curve": {int(k): float(v) for k, v in sorted(t.intermediate_values.items())},
                    "start": bool(t.user_attrs.get("start")),
                    "repeats": t.user_attrs.get("repeats"),
                    "node": t.user_attrs.get("node"),
                }
            )
        return out

    def best(self) -> dict[str, Any] | None:
        """The best complete trial (number, params, value), or None."""
        done = [t for t in self.trials() if t["state"] == "complete" and t["value"] is not None]
        if not done:
            return None
        sign = 1 if direction(self.settings.tune) == "maximize" else -1
        # the earliest of equal values: deterministic, and the params.yaml trial wins ties
        return max(done, key=lambda t: (sign * t["value"], -t["number"]))

    def importances(self) -> dict[str, float]:
        """Optuna's parameter importances (fANOVA, seeded) over the complete trials; empty
        when there are too few of them to say."""
        import optuna

        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=self.settings.base.seed)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                imp = optuna.importance.get_param_importances(self.study, evaluator=evaluator)
        except (RuntimeError, ValueError):  # fewer than two complete trials, or one value
            return {}
        return {k: round(float(v), 6) for k, v in sorted(imp.items(), key=lambda kv: -kv[1])}


# --- one trial ---------------------------------------------------------------------------------


def trial_datasets(prepared: PreparedData | Path, batch_size: int, seed: int, deterministic: bool):
    """(train, val) datasets for a trial: the only split files a trial opens."""
    from genderclf.data.tfrecords import make_dataset

    data = PreparedData.of(prepared)

    def split(name: str, **kw: Any):
        if name not in TRIAL_SPLITS:  # the search is scored on val; test stays unseen
            raise TuneError(f"a trial may read {TRIAL_SPLITS} only, not {name!r}")
        return make_dataset(data, name, batch_size, **kw)

    train = split("train", shuffle=True, seed=seed, deterministic=deterministic)
    return train, split("val")


def objective_so_far(history: list[dict[str, Any]], metric: str) -> float | None:
    """The objective of the epoch the train stage keeps (lowest finite val_loss) so far."""
    rows = [
        r
        for r in history
        if r.get("val_loss") is not None and math.isfinite(r["val_loss"])
        if metric == "val_loss" or r.get("val_accuracy") is not None
    ]
    if not rows:
        return None
    best = min(rows, key=lambda r: r["val_loss"])  # the first of equal losses, as Keras keeps
    return float(best["val_loss"] if metric == "val_loss" else best["val_accuracy"])


def run_trial(
    settings: Settings,
    prepared: Path,
    workdir: Path,
    number: int,
    params: dict[str, Any],
    report: Callable[[int, float], bool],
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    deadline: float | None = None,
) -> TrialOutcome:
    """Fit the model with a trial's params on train, score every epoch on val.

    After each epoch the objective so far goes to `report(epoch, value)`; when that
    answers True the fit stops and the trial is pruned. A trial whose params the backbone
    cannot take (a `ModelConfigError`) or that never gets a finite validation loss fails;
    any other error is raised (a bug, not a bad trial).

    Args:
        workdir: the trial's backup folder (emptied before and after).
        on_epoch: called with each epoch's history row (e.g. to log it).
        deadline: the time guard (`time.time()`): past it the trial stops after its epoch
            and fails (`TIME_UP`), so a search never runs more than an epoch past it.
    """
    import keras

    from genderclf.model.backbones import ModelConfigError
    from genderclf.model.fit import (
        class_weights,
        fit_phases,
        reproducible,
        use_deterministic,
        use_mixed_precision,
    )

    t0 = time.monotonic()
    history: list[dict[str, Any]] = []
    metric = settings.tune.metric

    def epoch_done(row: dict[str, Any]) -> None:
        history.append(row)
        if on_epoch is not None:
            on_epoch(row)
        value = objective_so_far(history, metric)
        if value is not None and report(int(row["epoch"]), value):
            raise Pruned
        if deadline is not None and time.time() > deadline:
            raise TimeUp

    def outcome(state: str, value: float | None, error: str | None = None) -> TrialOutcome:
        return TrialOutcome(
            number, params, state, value, history, round(time.monotonic() - t0, 1), error
        )

    shutil.rmtree(workdir, ignore_errors=True)
    try:
        s = trial_settings(settings, params)
        t = s.train
        data = PreparedData.read(prepared)
        tr = data.split("train")
        deterministic = use_deterministic(t.deterministic)
        keras.mixed_precision.set_global_policy(
            "mixed_float16" if use_mixed_precision(t.mixed_precision) else "float32"
        )
        with reproducible(s.base.seed, deterministic):
            train_ds, val_ds = trial_datasets(data, t.batch_size, s.base.seed, deterministic)
            fit_phases(
                s,
                train_ds,
                val_ds,
                workdir,
                image_size=data.image_size,
                weights=class_weights(tr.male, tr.images, t.class_weights),
                on_epoch=epoch_done,
                train_records=tr.records,
                deterministic=deterministic,
            )
    except Pruned:
        return outcome("pruned", objective_so_far(history, metric))
    except TimeUp:
        return outcome("failed", None, TIME_UP)
    except ModelConfigError as err:
        return outcome("failed", None, str(err))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        keras.backend.clear_session()  # trials one after another: free the last model's graph
    value = objective_so_far(history, metric)
    if value is None:
        return outcome("failed", None, "no epoch ended with a finite validation loss")
    return outcome("complete", value)


# --- Ray: trials as tasks, the study as an actor -----------------------------------------------


def pack_trial_data(prepared: Path) -> dict[str, bytes]:
    """The files a trial reads (train and val shards, and a meta.json listing only those),
    for the Ray object store: the test split is not even shipped."""
    data = PreparedData.read(prepared)
    meta = data.to_json()
    meta["splits"] = {s: meta["splits"][s] for s in TRIAL_SPLITS}
    files = {PreparedData.FILE: json.dumps(meta, sort_keys=True).encode()}
    for split in TRIAL_SPLITS:
        for shard in data.split(split).shards:
            files[shard] = (prepared / shard).read_bytes()
    return files


def ray_trial(
    settings: Settings,
    files: dict[str, bytes],
    number: int,
    params: dict[str, Any],
    host: Any,
    deadline: float | None = None,
) -> TrialOutcome:
    """One trial in a Ray worker: the shipped data in a temporary folder, epochs reported
    to the study's actor (`host`), which answers whether to prune."""
    import tempfile

    import ray

    with tempfile.TemporaryDirectory(prefix=f"genderclf-trial-{number}-") as tmp:
        prepared = Path(tmp) / "prepared"
        prepared.mkdir()
        for name, data in files.items():
            (prepared / name).write_bytes(data)
        outcome = run_trial(
            settings,
            prepared,
            Path(tmp) / "backup",
            number,
            params,
            lambda step, value: ray.get(host.report.remote(number, step, value)),
            deadline=deadline,
        )
    outcome.node = ray.get_runtime_context().get_node_id()
    return outcome


# --- plots -------------------------------------------------------------------------------------


def plot_history(trials: list[dict[str, Any]], metric: str, maximize: bool, out: Path) -> Path:
    """The optimisation history: each trial's value (pruned ones at their last reported
    value), and the best so far."""
    from genderclf.io import atomic_file
    from genderclf.model.plots import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    style = {"complete": ("o", "tab:blue"), "pruned": ("x", "tab:gray")}
    for state, (marker, color) in style.items():
        pts = [
            (t["number"], t["value"])
            for t in trials
            if t["state"] == state and t["value"] is not None
        ]
        if pts:
            ax.scatter(*zip(*pts, strict=True), marker=marker, color=color, label=state, zorder=3)
    best, xs, ys = None, [], []
    for t in sorted(trials, key=lambda t: t["number"]):
        if t["state"] == "complete" and t["value"] is not None:
            v = t["value"]
            best = v if best is None else (max(best, v) if maximize else min(best, v))
        if best is not None:
            xs.append(t["number"])
            ys.append(best)
    if xs:
        ax.step(xs, ys, where="post", color="tab:red", label="best so far")
    start = [t for t in trials if t.get("start") and t["value"] is not None]
    if start:
        ax.axhline(start[0]["value"], color="tab:green", ls=":", label="params.yaml (trial 0)")
    ax.set_xlabel("trial")
    ax.set_ylabel(metric.replace("_", " "))
    ax.set_title("optimisation history (validation)")
    ax.legend(loc="best", fontsize="small")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_file(out) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return out


def plot_importances(importances: dict[str, float], out: Path) -> Path:
    """Optuna's parameter importances (fANOVA) as horizontal bars."""
    from genderclf.io import atomic_file
    from genderclf.model.plots import pyplot

    plt = pyplot()
    names = list(importances)[::-1]
    fig, ax = plt.subplots(figsize=(6.4, 0.4 * max(len(names), 3) + 1.2))
    if names:
        ax.barh([f"train.{n}" for n in names], [importances[n] for n in names], color="tab:blue")
        ax.set_xlabel("importance (share of the objective's variance)")
    else:
        ax.text(0.5, 0.5, "too few complete trials", ha="center", va="center")
        ax.set_axis_off()
    ax.set_title("parameter importances (fANOVA)")
    fig.tight_layout()
    with atomic_file(out) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return out
