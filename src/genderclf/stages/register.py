"""The register stage: add the candidate to the model registry; promote it only through the gate.

The gate (`register` params), every check recorded with its numbers and verdict:

1. **floor**: test accuracy at least `register.min_accuracy`;
2. **paired**: against the champion on the same test images, the accuracy difference is
   more than zero and at least `register.min_improvement`, and (when `register.alpha` is
   set) McNemar's exact test on the per-image correctness is significant at that level;
   an equal score keeps the champion (no churn);
3. **slices**: no slice of at least `evaluate.min_slice_n` images loses more than
   `register.max_slice_drop` accuracy against the champion;
4. **calibration**: expected calibration error at most `register.max_ece`;
5. **serving**: the version as registered, loaded back from the registry in a fresh process
   through MLflow's pyfunc loader, answers like the evaluated model on test images.

The first model that passes becomes champion; `challenger` always points at the newest
candidate. With `register.approval: manual` a passing candidate waits as challenger for a
person (the Prefect flow pauses for it; `genderclf promote` does it by hand).

The registry itself (MLflow) is given as an object (`genderclf.tracking.registry`), so the
policy reads in one place and imports no MLflow.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import numpy as np
import pandas as pd

from genderclf.config import Paths, Settings
from genderclf.data.split import read_split
from genderclf.data.tfrecords import first_record, read_records
from genderclf.io import atomic_write, read_json, write_json
from genderclf.model.card import model_card
from genderclf.model.scoring import expected_calibration_error, predict_split
from genderclf.model.stats import Platt, paired_comparison, wilson

log = logging.getLogger(__name__)

# Accuracies are ratios of counts; in binary floating point 0.94 - 0.92 is 0.0199999...
# Compare with a tolerance far below one image, so "at least" means at least.
_TOLERANCE = 1e-9


@dataclass
class Decision:
    promote: bool
    reasons: list[str] = field(default_factory=list)


def decide(
    candidate_acc: float, champion_acc: float | None, min_accuracy: float, min_improvement: float
) -> Decision:
    """The accuracy policy (floor, then beat the champion) as a pure function."""
    if candidate_acc < min_accuracy:
        return Decision(
            False,
            [f"accuracy {candidate_acc:.4f} is below register.min_accuracy {min_accuracy:.4f}"],
        )
    if champion_acc is None:
        return Decision(
            True,
            [
                f"no champion yet and accuracy {candidate_acc:.4f} meets the floor "
                f"{min_accuracy:.4f}"
            ],
        )
    delta = candidate_acc - champion_acc
    if delta <= _TOLERANCE or delta < min_improvement - _TOLERANCE:
        return Decision(
            False,
            [
                f"accuracy {candidate_acc:.4f} does not beat the champion's "
                f"{champion_acc:.4f} by more than 0 and at least "
                f"register.min_improvement={min_improvement} (delta {delta:+.4f})"
            ],
        )
    return Decision(
        True,
        [
            f"accuracy {candidate_acc:.4f} beats the champion's {champion_acc:.4f} "
            f"by {delta:+.4f} (>= register.min_improvement={min_improvement})"
        ],
    )


class Version(Protocol):
    version: str
    threshold: float  # the version's own cut on its raw output
    calibration: tuple[float, float]  # Platt (a, b) of its probabilities


class Registry(Protocol):
    """What the stage needs from a model registry (`tracking.registry.MlflowRegistry`)."""

    name: str  # the registered model

    def register(
        self, run: dict[str, Any], metrics: dict[str, Any], serving: dict[str, Any]
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


# --- scores and checks -----------------------------------------------------------------------


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


def evaluated_scores(paths: Paths, metrics: dict[str, Any]) -> Scores:
    """The candidate's answers as the evaluate stage recorded them (plots/predictions.csv)."""
    f = paths.plots / "predictions.csv"
    if not f.is_file():
        raise FileNotFoundError(f"{f} not found: run `dvc repro evaluate`")
    rows = pd.read_csv(f)
    cut = float(metrics.get("calibration", {}).get("cut", metrics["threshold"]))
    return Scores(
        rows["path"].tolist(),
        (rows["actual"] == "male").to_numpy().astype(int),
        rows["prob_male"].to_numpy(dtype=float),
        cut,
    )


def version_scores(registry: Registry, version: str, paths: Paths, batch: int) -> Scores:
    """A registered version scored on the prepared test split, at its own operating point."""
    v = registry.version(version)
    names, y, raw = predict_split(registry.load(version), paths.prepared, "test", batch)
    platt = Platt(*v.calibration)
    return Scores(names, y, platt.apply(raw), platt.apply(np.array([v.threshold]))[0])


@dataclass
class Check:
    name: str
    passed: bool
    summary: str  # the verdict with its numbers, in words
    numbers: dict[str, Any] = field(default_factory=dict)


def _slice_drops(settings: Settings, paths: Paths, cand: Scores, champ: Scores) -> Check:
    cfg = settings.registry
    frame = read_split(paths.splits, "test").set_index("path").reindex(cand.paths)
    champ = champ.on(cand.paths)
    rows, worst = [], None
    for attr in settings.evaluate.slices:
        if attr not in frame.columns:
            continue
        col = pd.to_numeric(frame[attr], errors="coerce").to_numpy()
        for flag, mask in (("1", col == 1), ("0", col == 0)):
            n = int(mask.sum())
            if n < settings.evaluate.min_slice_n:
                continue
            a, b = float(cand.correct[mask].mean()), float(champ.correct[mask].mean())
            rows.append(
                {"slice": f"{attr}={flag}", "n": n, "candidate": a, "champion": b, "drop": b - a}
            )
            if worst is None or b - a > worst["drop"]:
                worst = rows[-1]
    if worst is None:
        return Check(
            "slices",
            True,
            f"no slice has {settings.evaluate.min_slice_n} or more images to compare",
            {"slices": rows},
        )
    ok = worst["drop"] <= cfg.max_slice_drop + _TOLERANCE
    return Check(
        "slices",
        ok,
        f"largest slice drop {worst['drop']:+.4f} on {worst['slice']} "
        f"(n={worst['n']}) {'<=' if ok else '>'} register.max_slice_drop="
        f"{cfg.max_slice_drop}",
        {"slices": rows, "worst": worst},
    )


def _paired(settings: Settings, cand: Scores, champ: Scores, version: str) -> Check:
    cfg = settings.registry
    champ = champ.on(cand.paths)
    pc = paired_comparison(
        cand.correct, champ.correct, settings.evaluate.bootstrap_samples, settings.base.seed
    )
    d = decide(cand.accuracy, champ.accuracy, cfg.min_accuracy, cfg.min_improvement)
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
        d.promote and significant,
        f"against version {version}: {d.reasons[0]}{ci}; {test}",
        {**asdict(pc), "candidate_accuracy": cand.accuracy, "champion_accuracy": champ.accuracy},
    )


def _serving(
    settings: Settings, paths: Paths, registry: Registry, version: str, cand: Scores
) -> Check:
    cfg = settings.registry
    if cfg.serving_check_images == 0:
        return Check("serving", True, "skipped (register.serving_check_images is 0)")
    records = read_records(paths.prepared, "test", cfg.serving_check_images)
    want = cand.on([r[2] for r in records]).p
    try:
        got = np.asarray(registry.serve(version, [r[0] for r in records]), dtype=float)
    except Exception as err:  # the served model did not load or answer: that is the finding
        return Check(
            "serving",
            False,
            f"version {version} did not load and answer through "
            f"MLflow's pyfunc loader: {str(err)[:500]}",
        )
    gap = float(np.max(np.abs(got - want))) if len(got) == len(want) else float("inf")
    ok = gap <= cfg.serving_tolerance
    return Check(
        "serving",
        ok,
        f"the registered version, loaded in a fresh process, answers "
        f"{len(records)} test images within {gap:.2g} of the evaluated model "
        f"({'<=' if ok else '>'} register.serving_tolerance={cfg.serving_tolerance})",
        {"images": len(records), "max_abs_difference": gap},
    )


def gate(
    settings: Settings,
    paths: Paths,
    registry: Registry,
    version: str,
    cand: Scores,
    ece: float,
    champion: Version | None,
) -> list[Check]:
    """Every check of the promotion gate for candidate `version` (see module docstring)."""
    cfg = settings.registry
    floor = cand.accuracy >= cfg.min_accuracy
    checks = [
        Check(
            "floor",
            floor,
            f"accuracy {cand.accuracy:.4f} "
            f"{'meets' if floor else 'is below'} register.min_accuracy "
            f"{cfg.min_accuracy:.4f}",
            {"accuracy": cand.accuracy, "interval": wilson(int(cand.correct.sum()), len(cand.y))},
        )
    ]
    if champion is not None and champion.version != version:
        champ = version_scores(registry, champion.version, paths, settings.train.batch_size * 2)
        checks += [
            _paired(settings, cand, champ, champion.version),
            _slice_drops(settings, paths, cand, champ),
        ]
    elif champion is None:
        d = decide(cand.accuracy, None, cfg.min_accuracy, cfg.min_improvement)
        checks.append(Check("paired", d.promote, d.reasons[0]))
    else:
        checks.append(Check("paired", True, f"version {version} is already the champion"))
    ok = ece <= cfg.max_ece + _TOLERANCE
    checks.append(
        Check(
            "calibration",
            ok,
            f"expected calibration error {ece:.4f} "
            f"{'<=' if ok else '>'} register.max_ece={cfg.max_ece}",
            {"ece": ece},
        )
    )
    checks.append(_serving(settings, paths, registry, version, cand))
    return checks


# --- the stage -------------------------------------------------------------------------------


def run(
    settings: Settings, paths: Paths, registry: Registry, max_rechecks: int = 3
) -> dict[str, Any]:
    """Register the trained model, run the gate, move the aliases; write
    `reports/register.json` and `reports/model_card.md`.

    Returns:
        The report (version, decision, every check, champion before and after, moves).

    Raises:
        FileNotFoundError: run.json, eval.json or the predictions missing (names the stage).
    """
    cfg = settings.registry
    run_info = read_json(paths.run, "run `dvc repro train`")
    metrics = read_json(paths.eval_metrics, "run `dvc repro evaluate`")
    cand = evaluated_scores(paths, metrics)
    cal = metrics.get("calibration", {})
    serving = {
        "image_size": int(run_info.get("image_size", settings.base.image_size)),
        "resize": str(run_info.get("resize", settings.augment.resize)),
        "threshold": float(metrics["threshold"]),
        "predict": settings.predict.model_dump(),
        "calibration": [float(cal.get("a", 1.0)), float(cal.get("b", 0.0))],
        "example": first_record(paths.prepared, "test")[0],
    }  # a real test image
    version, created, model_uri = registry.register(run_info, metrics, serving)
    bins = settings.evaluate.calibration_bins
    ece = float(metrics.get("ece", expected_calibration_error(cand.y, cand.p, bins)[0]))
    moves: list[dict[str, Any]] = []
    champ = None
    checks: list[Check] = []
    for _ in range(max_rechecks):
        champ = registry.champion()
        checks = gate(settings, paths, registry, version, cand, ece, champ)
        passed = all(c.passed for c in checks)
        if not passed or (champ is not None and champ.version == version):
            break
        if cfg.approval == "manual":
            break  # a person decides (`genderclf promote`, or the Prefect flow's pause)
        move = registry.promote(version, champ.version if champ else None, _why(checks))
        if move is None:
            log.info("register: champion changed during evaluation; re-checking")
            continue
        moves.append(move)
        # A concurrent register that passed its own re-check may have moved the alias
        # just after us: decide again against that one.
        now = registry.champion()
        if (now.version if now else None) != version:
            log.info("register: champion moved by another run right after ours; re-checking")
            continue
        break
    passed = all(c.passed for c in checks)
    already = champ is not None and champ.version == version and not moves
    label = (
        "champion"
        if already and passed
        else "promoted"
        if moves
        else "pending_approval"
        if passed and cfg.approval == "manual"
        else "rejected"
    )
    after = registry.champion()
    report = {
        "model_name": registry.name,
        "version": version,
        "newly_registered": created,
        "run_id": run_info["run_id"],
        "model_uri": model_uri,
        "decision": label,
        "reasons": [c.summary for c in checks if not c.passed] or [_why(checks)],
        "checks": [asdict(c) for c in checks],
        "candidate": {
            "version": version,
            "accuracy": cand.accuracy,
            "f1": metrics["f1"],
            "roc_auc": metrics.get("roc_auc"),
            "threshold": metrics["threshold"],
            "ece": ece,
        },
        "champion_before": {
            "version": champ.version if champ else None,
            "accuracy": _champion_accuracy(checks, champ, version, cand),
        },
        "champion_after": after.version if after else None,
        "alias_moves": moves,
        "policy": {
            k: getattr(cfg, k)
            for k in (
                "min_accuracy",
                "min_improvement",
                "alpha",
                "max_slice_drop",
                "max_ece",
                "approval",
            )
        },
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    write_json(paths.register_report, report)
    card = model_card(settings, paths, report, metrics)
    atomic_write(paths.model_card, card)
    reference = paths.reference if paths.reference.is_file() else None
    if reference is None:
        log.warning(
            "register: %s missing: `genderclf drift` will have no reference for "
            "version %s (run `dvc repro evaluate`)",
            paths.reference,
            version,
        )
    registry.record(
        run_info["run_id"],
        version,
        label,
        report["reasons"],
        paths.register_report,
        describe(report) + "\n\n" + card,
        paths.model_card,
        reference,
    )
    return report


def _why(checks: list[Check]) -> str:
    return "; ".join(c.summary for c in checks)


def _champion_accuracy(
    checks: list[Check], champ: Version | None, version: str, cand: Scores
) -> float | None:
    if champ is None:
        return None
    if champ.version == version:
        return cand.accuracy
    paired = next((c for c in checks if c.name == "paired"), None)
    return paired.numbers.get("champion_accuracy") if paired else None


def describe(report: dict[str, Any]) -> str:
    """The version's description: what was decided, and each check with its numbers."""
    verdict = {
        "promoted": "Promoted to champion",
        "champion": "Champion (unchanged)",
        "pending_approval": "Passed the gate; waiting for approval (challenger)",
        "rejected": "Not promoted (challenger)",
    }[report["decision"]]
    lines = [f"**{verdict}.**", ""]
    lines += [
        f"- {'pass' if c['passed'] else 'FAIL'} {c['name']}: {c['summary']}"
        for c in report["checks"]
    ]
    return "\n".join(lines)


def promote(
    settings: Settings,
    paths: Paths,
    registry: Registry,
    version: str,
    reason: str,
    force: bool = False,
    by: str = "",
) -> dict[str, Any]:
    """`genderclf promote` and an approval: run the gate for `version` against the current
    champion (scored on this workspace's test split) and move `champion` if it passes, or
    with `force` regardless (recorded as forced). Returns {moved, checks, move}."""
    cand = version_scores(registry, version, paths, settings.train.batch_size * 2)
    ece = expected_calibration_error(cand.y, cand.p, settings.evaluate.calibration_bins)[0]
    champ = registry.champion()
    checks = gate(settings, paths, registry, version, cand, ece, champ)
    passed = all(c.passed for c in checks)
    who = f" by {by}" if by else ""
    if not (passed or force) or (champ is not None and champ.version == version):
        return {"moved": False, "checks": [asdict(c) for c in checks], "move": None}
    label = "promoted" if passed else "forced (gate failed)"
    move = registry.promote(
        version, champ.version if champ else None, f"{label}{who}: {reason}. {_why(checks)}"
    )
    return {"moved": move is not None, "checks": [asdict(c) for c in checks], "move": move}
