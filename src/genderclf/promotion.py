"""The promotion gate: pure checks over two evaluations, and the registry it promotes in.

A candidate becomes champion only if every check passes (`register` settings):

1. **floor**: test accuracy at least `register.min_accuracy`;
2. **paired**: against the champion on the same test images, the accuracy difference is
   more than zero and at least `register.min_improvement`, and (when `register.alpha` is
   set) McNemar's exact test on the per-image correctness is significant at that level;
   an equal score keeps the champion (no churn);
3. **slices**: no slice of at least `evaluate.min_slice_n` images loses more than
   `register.max_slice_drop` accuracy against the champion;
4. **calibration**: expected calibration error at most `register.max_ece`;
5. **serving**: the version as registered, loaded back from the registry in a fresh
   process through MLflow's pyfunc loader, answers like the evaluated model.

The checks (`floor_check` ... `serving_check`) are plain functions of the two models'
answers (`Scores`) and the settings: no registry, no MLflow, no files. `gate` gathers their
inputs (the champion re-scored on this workspace's test split, the served answers) through
a `Registry`, the protocol `genderclf.tracking.registry.MlflowRegistry` implements. The
register stage and `genderclf promote` (`genderclf.services`) both call `gate`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import pandas as pd

from genderclf.config import RegisterSettings, Settings
from genderclf.contracts import Check, Evaluation, PreparedData, TrainedModel, TrainingRun
from genderclf.model.scoring import slice_name
from genderclf.model.stats import Platt, paired_comparison, wilson

if TYPE_CHECKING:
    from genderclf.inference import ServingConfig

# Accuracies are ratios of counts; in binary floating point 0.94 - 0.92 is 0.0199999...
# Compare with a tolerance far below one image, so "at least" means at least.
TOLERANCE = 1e-9


# --- the accuracy policy ---------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """The accuracy policy's answer: the floor and the comparison, each judged once."""

    promote: bool
    reasons: list[str]  # the one reason that decided
    meets_floor: bool
    beats: bool  # beats the champion (True when there is none)
    comparison: str  # the comparison with the champion, in words


def decide(
    candidate_acc: float, champion_acc: float | None, min_accuracy: float, min_improvement: float
) -> Verdict:
    """The accuracy policy (floor, then beat the champion) as a pure function."""
    meets_floor = candidate_acc >= min_accuracy
    floor = (
        f"accuracy {candidate_acc:.4f} is below register.min_accuracy {min_accuracy:.4f}"
        if not meets_floor
        else ""
    )
    if champion_acc is None:
        beats = True
        comparison = (
            f"no champion yet and accuracy {candidate_acc:.4f} meets the floor {min_accuracy:.4f}"
            if meets_floor
            else "no champion yet"
        )
    else:
        delta = candidate_acc - champion_acc
        beats = delta > TOLERANCE and delta >= min_improvement - TOLERANCE
        comparison = (
            f"accuracy {candidate_acc:.4f} beats the champion's {champion_acc:.4f} "
            f"by {delta:+.4f} (>= register.min_improvement={min_improvement})"
            if beats
            else f"accuracy {candidate_acc:.4f} does not beat the champion's "
            f"{champion_acc:.4f} by more than 0 and at least "
            f"register.min_improvement={min_improvement} (delta {delta:+.4f})"
        )
    return Verdict(meets_floor and beats, [floor or comparison], meets_floor, beats, comparison)


# --- the answers the checks compare ----------------------------------------------------------


@dataclass
class Scores:
    """A model's answers on the test split, by image."""

    paths: list[str]
    y: np.ndarray  # 1 = male
    p: np.ndarray  # calibrated P(male)
    cut: float  # the decision cut on `p`

    @property
    def correct(self) -> np.ndarray:
        return (self.p >= self.cut).astype(int) == self.y

    @property
    def accuracy(self) -> float:
        return float(self.correct.mean())

    def on(self, paths: list[str]) -> Scores:
        """The same answers in the order of `paths`."""
        index = {p: i for i, p in enumerate(self.paths)}
        order = [index[p] for p in paths]
        return Scores(list(paths), self.y[order], self.p[order], self.cut)


# --- the checks: pure functions --------------------------------------------------------------


def floor_check(cand: Scores, verdict: Verdict, cfg: RegisterSettings) -> Check:
    """1. The candidate's accuracy against `register.min_accuracy` (as `decide` judged it)."""
    ok = verdict.meets_floor
    return Check(
        "floor",
        ok,
        f"accuracy {cand.accuracy:.4f} {'meets' if ok else 'is below'} "
        f"register.min_accuracy {cfg.min_accuracy:.4f}",
        {"accuracy": cand.accuracy, "interval": wilson(int(cand.correct.sum()), len(cand.y))},
    )


def paired_check(
    cand: Scores,
    champ: Scores,
    champion_version: str,
    verdict: Verdict,
    cfg: RegisterSettings,
    bootstrap_samples: int,
    seed: int,
) -> Check:
    """2. The candidate against the champion on the same images: better by at least
    `register.min_improvement`, and significantly so (McNemar) when `register.alpha` is set."""
    champ = champ.on(cand.paths)
    pc = paired_comparison(cand.correct, champ.correct, bootstrap_samples, seed)
    significant = cfg.alpha is None or pc.p_value < cfg.alpha
    ci = (
        ""
        if pc.interval is None
        else f", 95% interval [{pc.interval[0]:+.4f}, {pc.interval[1]:+.4f}]"
    )
    test = (
        "no significance test (register.alpha is null)"
        if cfg.alpha is None
        else f"McNemar exact p={pc.p_value:.4g} ({pc.only_a} images only the candidate gets "
        f"right, {pc.only_b} only the champion) {'<' if significant else '>='} "
        f"register.alpha={cfg.alpha}"
    )
    return Check(
        "paired",
        verdict.beats and significant,
        f"against version {champion_version}: {verdict.comparison}{ci}; {test}",
        {**asdict(pc), "candidate_accuracy": cand.accuracy, "champion_accuracy": champ.accuracy},
    )


def slices_check(
    cand: Scores,
    champ: Scores,
    test: pd.DataFrame,
    slices: list[str],
    min_slice_n: int,
    cfg: RegisterSettings,
) -> Check:
    """3. No slice of at least `min_slice_n` test images (`test`: the test split's table,
    by path) loses more than `register.max_slice_drop` accuracy against the champion."""
    frame = test.reindex(cand.paths)
    champ = champ.on(cand.paths)
    rows: list[dict[str, Any]] = []
    worst = None
    for attr in slices:
        if attr not in frame.columns:
            continue
        col = pd.to_numeric(frame[attr], errors="coerce").to_numpy()
        for has, mask in ((True, col == 1), (False, col == 0)):
            n = int(mask.sum())
            if n < min_slice_n:
                continue
            a, b = float(cand.correct[mask].mean()), float(champ.correct[mask].mean())
            rows.append(
                {
                    "slice": slice_name(attr, has),
                    "n": n,
                    "candidate": a,
                    "champion": b,
                    "drop": b - a,
                }
            )
            if worst is None or b - a > worst["drop"]:
                worst = rows[-1]
    if worst is None:
        return Check(
            "slices",
            True,
            f"no slice has {min_slice_n} or more images to compare",
            {"slices": rows},
        )
    ok = worst["drop"] <= cfg.max_slice_drop + TOLERANCE
    return Check(
        "slices",
        ok,
        f"largest slice drop {worst['drop']:+.4f} on {worst['slice']} "
        f"(n={worst['n']}) {'<=' if ok else '>'} register.max_slice_drop="
        f"{cfg.max_slice_drop}",
        {"slices": rows, "worst": worst},
    )


def calibration_check(ece: float, cfg: RegisterSettings) -> Check:
    """4. The expected calibration error against `register.max_ece`."""
    ok = ece <= cfg.max_ece + TOLERANCE
    return Check(
        "calibration",
        ok,
        f"expected calibration error {ece:.4f} {'<=' if ok else '>'} register.max_ece="
        f"{cfg.max_ece}",
        {"ece": ece},
    )


def gap_text(gap: float) -> str:
    """A difference between two probabilities in words: `< 1e-6`, `0.0023`, `inf`."""
    if not np.isfinite(gap):
        return "inf (a different number of answers)"
    return "< 1e-6" if gap < 1e-6 else f"{gap:.2g}"


def serving_check(
    version: str, want: np.ndarray, got: np.ndarray | str, cfg: RegisterSettings
) -> Check:
    """5. The registered version's answers (`got`, or why it gave none) against the
    evaluated model's (`want`), within `register.serving_tolerance`."""
    if isinstance(got, str):
        return Check(
            "serving",
            False,
            f"version {version} did not load and answer through MLflow's pyfunc loader: "
            f"{got[:500]}",
        )
    gap = float(np.max(np.abs(got - want))) if len(got) == len(want) else float("inf")
    ok = gap <= cfg.serving_tolerance
    return Check(
        "serving",
        ok,
        f"the registered version, loaded in a fresh process, answers {len(want)} test "
        f"images within {gap_text(gap)} of the evaluated model "
        f"({'<=' if ok else '>'} register.serving_tolerance={cfg.serving_tolerance})",
        {"images": len(want), "max_abs_difference": gap},
    )


# --- the registry, and gathering the checks' inputs through it --------------------------------


class Version(Protocol):
    version: str
    threshold: float  # the version's own cut on its raw output
    calibration: tuple[float, float]  # Platt (a, b) of its probabilities


class Registry(Protocol):
    """What promotion needs from a model registry (`tracking.registry.MlflowRegistry`)."""

    name: str  # the registered model

    def training_run(self, model: TrainedModel, record: Path) -> TrainingRun:
        """The run that logged `model` (`record`: models/run.json, when it names it)."""

    def register(
        self, run: TrainingRun, evaluation: Evaluation, serving: ServingConfig, example: bytes
    ) -> tuple[str, bool, str]:
        """Add the run's servable model as a version (once per run); point `challenger`
        at it. Returns (version, newly registered, the registered model's URI)."""

    def champion(self) -> Version | None:
        """The version `champion` points at, or None when there is none."""

    def version(self, version: str) -> Version:
        """Any version's threshold and calibration."""

    def load(self, version: str) -> Any:
        """The version's Keras model."""

    def serve(self, version: str, images: list[bytes]) -> list[float]:
        """P(male) of each image from the version loaded through the pyfunc loader in a
        fresh process. Raises on a model that does not load or answer."""

    def promote(self, version: str, expected: str | None, reason: str) -> dict[str, Any] | None:
        """Move `champion` to `version` if it still points at `expected` (None: nowhere).
        Returns the recorded move, or None when the champion changed meanwhile."""

    def record(
        self,
        run_id: str,
        version: str,
        decision: str,
        reasons: list[str],
        report_file: Any,
        description: str,
        card_file: Any,
        reference_file: Any = None,
    ) -> None:
        """Keep the decision with the version (tags, `description`, the card) and the run;
        the reference statistics of `genderclf drift` go into the run, named on the version."""


def version_scores(registry: Registry, version: str, data: PreparedData, batch: int) -> Scores:
    """A registered version scored on the prepared test split, at its own operating point."""
    from genderclf.model.scoring import predict_split

    v = registry.version(version)
    names, y, raw = predict_split(registry.load(version), data, "test", batch)
    platt = Platt(*v.calibration)
    return Scores(names, y, platt.apply(raw), platt.apply(np.array([v.threshold]))[0])


def served_answers(
    registry: Registry, version: str, data: PreparedData, cand: Scores, n: int
) -> tuple[np.ndarray, np.ndarray | str]:
    """(the evaluated answers, the registered version's answers or why there are none) on
    the first `n` test images."""
    from genderclf.data.tfrecords import read_records

    records = read_records(data, "test", n)
    want = cand.on([r[2] for r in records]).p
    try:
        return want, np.asarray(registry.serve(version, [r[0] for r in records]), dtype=float)
    except Exception as err:  # the served model did not load or answer: that is the finding
        return want, str(err)


def gate(
    settings: Settings,
    data: PreparedData,
    splits: Path,
    registry: Registry,
    version: str,
    cand: Scores,
    ece: float,
    champion: Version | None,
) -> list[Check]:
    """Every check of the promotion gate for candidate `version` against `champion`.

    Args:
        data: the prepared data (the champion is scored on its test split).
        splits: the split tables' folder (the test split's attributes: the slices).
        cand: the candidate's answers; ece: its expected calibration error.
    """
    from genderclf.data.split import read_split

    cfg, ev = settings.registry, settings.evaluate
    batch = settings.train.batch_size * 2
    rival = champion is not None and champion.version != version
    champ = version_scores(registry, champion.version, data, batch) if rival else None
    verdict = decide(
        cand.accuracy, champ.accuracy if champ else None, cfg.min_accuracy, cfg.min_improvement
    )
    checks = [floor_check(cand, verdict, cfg)]
    if champ is not None:
        checks += [
            paired_check(
                cand,
                champ,
                champion.version,
                verdict,
                cfg,
                ev.bootstrap_samples,
                settings.base.seed,
            ),
            slices_check(
                cand,
                champ,
                read_split(splits, "test").set_index("path"),
                list(ev.slices),
                ev.min_slice_n,
                cfg,
            ),
        ]
    elif champion is None:
        checks.append(Check("paired", verdict.beats, verdict.comparison))
    else:
        checks.append(Check("paired", True, f"version {version} is already the champion"))
    checks.append(calibration_check(ece, cfg))
    if cfg.serving_check_images == 0:
        checks.append(Check("serving", True, "skipped (register.serving_check_images is 0)"))
    else:
        want, got = served_answers(registry, version, data, cand, cfg.serving_check_images)
        checks.append(serving_check(version, want, got, cfg))
    return checks


def summary(checks: list[Check]) -> str:
    """Every check's summary, in one line (the reason kept with an alias move)."""
    return "; ".join(c.summary for c in checks)
