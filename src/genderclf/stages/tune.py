"""The tune stage: search train.* hyperparameters on the validation split; write the winner.

Between augment and train. It writes `params/tuned.yaml` (the searched keys' chosen values,
a params file the train stage depends on) and `metrics/tune.json` (the search's numbers).

* `tune.enabled: false` (the demo): the searched keys' values in params.yaml go to
  `params/tuned.yaml` as they are, in about a second (`passthrough`: no TensorFlow, no
  MLflow). The pipeline's DAG is the same either way.
* `tune.enabled: true`: an Optuna study over `tune.space` (`model/tune.py`): seeded TPE,
  pruning on the per-epoch validation metric, `tune.trials` finished trials. Locally the
  trials run one after another in this process, so a search repeats exactly. With
  `RAY_ADDRESS` set they run as Ray tasks, `tune.parallel_trials` at once, reporting to the
  study through an actor on this machine (the journal stays here). The study's journal is
  in `.cache/tune/<key>/`: a killed search continues where it stopped.

Only the train and validation splits are read: the test split stays for evaluate.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from genderclf.config import Paths, Settings
from genderclf.contracts import PreparedData, PreparedDataError
from genderclf.io import write_json
from genderclf.model.tuned import TunedParams, as_they_are

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StudyPlan:
    """Which study a search is: its key (settings and data), name, journal, and engine."""

    key: str
    name: str
    folder: Path
    engine: str  # "local" (one trial after another) | "ray" (RAY_ADDRESS set)

    @property
    def journal(self) -> Path:
        return self.folder / "journal.log"


@dataclass
class TuneReport:
    """What the stage did: the values train gets, metrics/tune.json, and the study."""

    enabled: bool
    tuned: TunedParams
    metrics: dict[str, Any]
    plan: StudyPlan | None = None
    trials: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None
    importances: dict[str, float] = field(default_factory=dict)
    resumed: bool = False
    val_images: int = 0


class TrialLog(Protocol):
    """Where the trials are shown as they go (MLflow's nested runs: tracking/tune.py)."""

    def trial_started(self, number: int, params: dict[str, Any]) -> None: ...

    def trial_epoch(self, number: int, row: dict[str, Any]) -> None: ...

    def trial_finished(self, outcome: Any) -> None: ...

    def trial_abandoned(self, number: int) -> None: ...


class _NoLog:
    def trial_started(self, number: int, params: dict[str, Any]) -> None:
        pass

    def trial_epoch(self, number: int, row: dict[str, Any]) -> None:
        pass

    def trial_finished(self, outcome: Any) -> None:
        pass

    def trial_abandoned(self, number: int) -> None:
        pass


def passthrough(settings: Settings, paths: Paths) -> TuneReport:
    """Tuning off: params.yaml's values of the searched keys to params/tuned.yaml."""
    tuned = as_they_are(settings)
    tuned.write(paths.tuned_params, searched=False)
    metrics = {"enabled": False}
    write_json(paths.tune_metrics, metrics)
    return TuneReport(False, tuned, metrics)


def prepare(settings: Settings, paths: Paths) -> StudyPlan:
    """Check the inputs before anything starts; returns the plan of this search.

    Raises:
        PreparedDataError: prepared data missing or at another image size.
        ModelConfigError: a backbone in the space (or train.*) cannot take the settings.
    """
    from genderclf.model.backbones import check_compatible
    from genderclf.model.fit import check_jit_settings
    from genderclf.model.tune import data_digest, study_key

    data = PreparedData.read(paths.prepared)
    if data.image_size != settings.base.image_size:
        raise PreparedDataError(
            f"prepared data is {data.image_size}px but base.image_size="
            f"{settings.base.image_size}: run `dvc repro augment`"
        )
    space = settings.tune.space
    backbones = getattr(space.get("backbone"), "choices", None) or [settings.train.backbone]
    for backbone in backbones:
        check_compatible(
            settings.train.model_copy(update={"backbone": backbone}), settings.base.image_size
        )
    check_jit_settings(settings.train)
    key = study_key(settings, data_digest(paths.prepared))
    engine = "ray" if os.environ.get("RAY_ADDRESS") else "local"
    return StudyPlan(key, f"genderclf-tune-{key}", paths.tune_studies / key, engine)


def run(
    settings: Settings, paths: Paths, plan: StudyPlan, trial_log: TrialLog | None = None
) -> TuneReport:
    """Run (or continue) the search until `tune.trials` trials finished; write the winner.

    Raises:
        TuneError: past `tune.timeout_minutes` (the journal keeps what finished: run again
            to continue), too many failed trials, or no trial completed.
    """
    import keras

    from genderclf.data.tfrecords import reader_on_cpu_only
    from genderclf.model.fit import deterministic_xla_flags
    from genderclf.model.tune import TuneError, direction

    trial_log = trial_log or _NoLog()
    deterministic_xla_flags(settings.train.deterministic)
    if keras.config.backend() != "tensorflow":
        reader_on_cpu_only()
    search = _search_on_ray if plan.engine == "ray" else _search_here
    host = search(settings, paths, plan, trial_log)
    best = host["best"]
    if best is None:
        raise TuneError(
            f"no trial of the search completed ({host['counts']}); see the failed trials' "
            f"errors above and in MLflow, fix tune.space, and run again"
        )
    tuned = TunedParams({k: best["params"][k] for k in settings.tune.space})
    start = next((t for t in host["trials"] if t["start"] and t["state"] == "complete"), None)
    metrics = {
        "enabled": True,
        "metric": settings.tune.metric,
        "best_trial": best["number"],
        "best_value": _rounded(best["value"]),
        "start_value": _rounded(start["value"]) if start else None,  # params.yaml's values
        "trials": host["counts"],
    }
    tuned.write(paths.tuned_params, searched=True)
    write_json(paths.tune_metrics, metrics)
    val_images = PreparedData.read(paths.prepared).split("val").images
    direction_word = direction(settings.tune)
    log.info("tune: best trial %d (%s %s)", best["number"], direction_word, best["value"])
    return TuneReport(
        True,
        tuned,
        metrics,
        plan,
        host["trials"],
        best,
        host["importances"],
        host["resumed"],
        val_images,
    )


def _rounded(v: float | None) -> float | None:
    return None if v is None else float(f"{v:.6g}")


def _guard(settings: Settings, deadline: float, counts: dict[str, int]) -> None:
    """Stop on the time guard, or when failures outnumber the budget."""
    from genderclf.model.tune import TuneError

    t = settings.tune
    done = counts["complete"] + counts["pruned"]
    if time.time() > deadline:
        raise TuneError(
            f"tune.timeout_minutes={t.timeout_minutes} reached after {done} of {t.trials} "
            "trials; the study is kept in .cache/tune/: run the stage again to continue "
            "where it stopped (or lower tune.trials)"
        )
    if counts["failed"] > t.trials:
        raise TuneError(
            f"{counts['failed']} trials failed (more than tune.trials={t.trials}): see their "
            "errors above; fix tune.space and run again"
        )


def _search_here(
    settings: Settings, paths: Paths, plan: StudyPlan, trial_log: TrialLog
) -> dict[str, Any]:
    """Trials one after another in this process: the same search every time."""
    from genderclf.model.tune import StudyHost, run_trial

    host = StudyHost(str(plan.journal), plan.name, settings)
    _opened(host.opening(), plan, trial_log)
    deadline = time.time() + settings.tune.timeout_minutes * 60
    while host.finished() < settings.tune.trials:
        _guard(settings, deadline, host.counts())
        number, params = host.ask()
        trial_log.trial_started(number, params)
        outcome = run_trial(
            settings,
            paths.prepared,
            plan.folder / "trial",
            number,
            params,
            lambda step, value, n=number: host.report(n, step, value),
            lambda row, n=number: trial_log.trial_epoch(n, row),
            deadline,
        )
        host.tell(number, outcome.state, outcome.value)
        _say_trial(outcome, settings)
        trial_log.trial_finished(outcome)
    return host.summary()


def _search_on_ray(
    settings: Settings, paths: Paths, plan: StudyPlan, trial_log: TrialLog
) -> dict[str, Any]:
    """Trials as Ray tasks, `tune.parallel_trials` at once; the study is an actor pinned to
    this machine (its journal stays in .cache/tune/ here), which every trial reports to."""
    from genderclf import engine
    from genderclf.model.tune import (
        StudyHost,
        TrialOutcome,
        pack_trial_data,
        ray_trial,
    )

    ray = engine.connect()  # one line naming the address when the head does not answer
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    host = (
        ray.remote(StudyHost)
        .options(num_cpus=0, scheduling_strategy=here)
        .remote(str(plan.journal.resolve()), plan.name, settings)
    )
    _opened(ray.get(host.opening.remote()), plan, trial_log)
    parallel = settings.tune.parallel_trials
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1) // parallel))
    # one process per trial (TensorFlow's memory goes with it), its threads fitted to its CPUs
    threads = {"OMP_NUM_THREADS": str(cpus), "TF_NUM_INTRAOP_THREADS": str(cpus)}
    task = ray.remote(max_calls=1)(ray_trial).options(
        num_cpus=cpus, runtime_env={"env_vars": threads}
    )
    files = ray.put(pack_trial_data(paths.prepared))
    in_flight: dict[Any, int] = {}
    # wall-clock time: the trials compare it on their own nodes
    deadline = time.time() + settings.tune.timeout_minutes * 60
    print(f"tune: on the Ray cluster, {parallel} trials at once, {cpus} CPUs each", flush=True)
    while True:
        counts = ray.get(host.counts.remote())
        done = counts["complete"] + counts["pruned"]
        while len(in_flight) < parallel and done + len(in_flight) < settings.tune.trials:
            _guard(settings, deadline, counts)
            number, params = ray.get(host.ask.remote())
            trial_log.trial_started(number, params)
            in_flight[task.remote(settings, files, number, params, host, deadline)] = number
        if not in_flight:
            break
        ready, _ = ray.wait(list(in_flight), num_returns=1)
        in_flight.pop(ready[0])
        outcome: TrialOutcome = ray.get(ready[0])
        ray.get(host.tell.remote(outcome.number, outcome.state, outcome.value, outcome.node))
        for row in outcome.history:  # a task's epochs reach MLflow when it returns
            trial_log.trial_epoch(outcome.number, row)
        _say_trial(outcome, settings)
        trial_log.trial_finished(outcome)
    return ray.get(host.summary.remote())


def _opened(opening: dict[str, Any], plan: StudyPlan, trial_log: TrialLog) -> None:
    """Say that a study continues, and close the MLflow runs of the trials it lost."""
    counts = opening["counts"]
    for number in opening["abandoned"]:
        trial_log.trial_abandoned(number)
    if opening["resumed"]:
        print(
            f"tune: continuing study {plan.name} ({counts['complete']} complete, "
            f"{counts['pruned']} pruned, {counts['failed']} failed so far) from {plan.journal}",
            flush=True,
        )


def _say_trial(outcome: Any, settings: Settings) -> None:
    value = "-" if outcome.value is None else f"{outcome.value:.4f}"
    params = ", ".join(f"{k}={_short(v)}" for k, v in sorted(outcome.params.items()))
    why = f" ({outcome.error})" if outcome.error else ""
    print(
        f"tune: trial {outcome.number} {outcome.state}{why}: {settings.tune.metric} {value} "
        f"after {len(outcome.history)} epochs ({outcome.seconds:.0f}s) [{params}]",
        flush=True,
    )


def _short(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)
