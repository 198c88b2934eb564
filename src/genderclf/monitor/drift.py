"""`genderclf drift`: is a new batch of images still what the champion was evaluated on?

The batch (a folder or an S3 prefix) is profiled by the champion exactly as the evaluate
stage profiled its reference sample of the test split (`genderclf.monitor.profile`), and
the two profiles are compared in three views (`genderclf.monitor.stats`: KS per image
statistic with Bonferroni, MMD on the embeddings with a permutation test, the predicted
male fraction and mean confidence). The batch drifts when any view does.

Outputs, replaced together (one atomic folder): `reports/drift/drift.json` (every number),
`summary.md` (the verdict in one paragraph, then a table per view) and `drift.png`
(reference vs batch histograms, the MMD null distribution with the observed statistic).
Files that cannot be read are listed with their reasons; they are not fatal.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from genderclf.config import DriftSettings, Settings
from genderclf.inference import Classifier
from genderclf.io import atomic_dir
from genderclf.monitor.batch import BatchError, list_images, sources
from genderclf.monitor.profile import FEATURES, Profile, ReferenceError, profile
from genderclf.monitor.stats import ks_per_feature, mean_drop, mmd_test, two_proportions

log = logging.getLogger(__name__)

# `genderclf drift` exits with this when the batch drifts (1 stays "the check failed").
DRIFT_EXIT_CODE = 3
VIEWS = ("image", "embeddings", "predictions")


@dataclass
class DriftReport:
    result: dict[str, Any]  # what drift.json holds
    files: list[Path]  # drift.json, summary.md, drift.png

    @property
    def drifted(self) -> bool:
        return bool(self.result["drifted"])

    @property
    def summary(self) -> str:
        return str(self.result["summary"])


def read_batch(location: str, settings: Settings, clf: Classifier) -> tuple[Profile, dict]:
    """The champion's profile of the batch (a seeded sample of `drift.max_images` when
    bigger) and what was listed.

    Raises:
        BatchError: the location is missing or unlistable, or it holds fewer than
            `drift.min_images` usable images.
    """
    cfg = settings.drift
    s3 = settings.data.s3
    entries, other = list_images(location, s3.endpoint_url, s3.retries)
    names = [e.name for e in entries]
    if len(names) > cfg.max_images:
        pick = np.random.default_rng(settings.base.seed).choice(
            len(names), cfg.max_images, replace=False
        )
        names = [names[i] for i in np.sort(pick)]
    listing = {
        "location": location,
        "listed": len(entries),
        "non_images": other,
        "sampled": len(names),
    }
    if len(names) < cfg.min_images:
        raise BatchError(
            f"{location}: {len(entries)} image files ({other} other files left out)"
            f"; a drift check needs at least drift.min_images={cfg.min_images}: "
            "point it at a folder or prefix that holds the new images"
        )
    batch = profile(
        sources(location, names, s3.endpoint_url, s3.retries),
        clf,
        settings.predict.max_pixels,
        settings.predict.batch_size,
    )
    if len(batch) < cfg.min_images:
        reasons = "; ".join(f"{n}: {r}" for n, r in batch.failed[:5])
        raise BatchError(
            f"{location}: only {len(batch)} of {len(names)} images are usable, "
            f"fewer than drift.min_images={cfg.min_images} (e.g. {reasons})"
        )
    return batch, listing


def compare(reference: Profile, batch: Profile, cfg: DriftSettings, seed: int) -> dict[str, Any]:
    """The three views of the batch against the reference, each with its verdict.

    Raises:
        ReferenceError: fewer than `drift.min_images` reference images, or embeddings of
            another size (a reference of another model).
    """
    if len(reference) < cfg.min_images:
        raise ReferenceError(
            f"the reference holds {len(reference)} images, fewer than "
            f"drift.min_images={cfg.min_images}: no test says anything on so "
            "few; evaluate on a larger test split (split.test_fraction, "
            "drift.reference_images) and register again"
        )
    if reference.embeddings.shape[1] != batch.embeddings.shape[1]:
        raise ReferenceError(
            f"the reference has {reference.embeddings.shape[1]}-dimensional "
            f"embeddings, the model gives {batch.embeddings.shape[1]}: the "
            "reference is not this model's"
        )
    feats = ks_per_feature(reference.features, batch.features, FEATURES, cfg.alpha)
    image = {
        "test": "Kolmogorov-Smirnov per feature, Bonferroni",
        "alpha": cfg.alpha,
        "level": cfg.alpha / len(FEATURES),
        "features": [asdict(f) for f in feats],
        "drifted": any(f.drifted for f in feats),
    }
    mmd = mmd_test(reference.embeddings, batch.embeddings, cfg.permutations, cfg.alpha, seed)
    emb = {
        "test": "MMD (RBF kernel, median heuristic), permutation test",
        "mmd2": mmd.statistic,
        "p_value": mmd.p_value,
        "bandwidth": mmd.bandwidth,
        "permutations": cfg.permutations,
        "alpha": cfg.alpha,
        "null_quantile_95": float(np.quantile(mmd.null, 0.95)),
        "drifted": mmd.drifted,
    }
    k1, n1, k2, n2 = int(reference.male.sum()), len(reference), int(batch.male.sum()), len(batch)
    delta, p = two_proportions(k1, n1, k2, n2)
    conf_ref, conf_new = float(reference.confidence.mean()), float(batch.confidence.mean())
    drop, p_conf = mean_drop(reference.confidence, batch.confidence)
    male_drift = abs(delta) > cfg.max_male_fraction_delta and p < cfg.alpha
    conf_drift = drop > cfg.max_confidence_drop and p_conf < cfg.alpha
    pred = {
        "reference_male_fraction": k1 / n1,
        "batch_male_fraction": k2 / n2,
        "male_fraction_delta": delta,
        "p_value": p,
        "alpha": cfg.alpha,
        "max_male_fraction_delta": cfg.max_male_fraction_delta,
        "male_fraction_drifted": male_drift,
        "reference_mean_confidence": conf_ref,
        "batch_mean_confidence": conf_new,
        "confidence_drop": drop,
        "confidence_p_value": p_conf,
        "max_confidence_drop": cfg.max_confidence_drop,
        "confidence_drifted": conf_drift,
        "drifted": male_drift or conf_drift,
    }
    views = {"image": image, "embeddings": emb, "predictions": pred}
    return {"drifted": any(v["drifted"] for v in views.values()), "views": views, "null": mmd.null}


def summarize(result: dict[str, Any], location: str, champion: str) -> str:
    """The verdict as one paragraph: which views moved, with their key numbers."""
    v = result["views"]
    parts = []
    moved = [f for f in v["image"]["features"] if f["drifted"]]
    if moved:
        parts.append(
            "image statistics moved ("
            + ", ".join(
                f"{f['name']} median {f['reference_median']:.3g} -> {f['batch_median']:.3g}, KS "
                f"D={f['statistic']:.2f}, p={f['p_value']:.2g}"
                for f in moved  # every one drift.json marks drifted (at most the 8)
            )
            + f"; each tested at {v['image']['level']:.3g})"
        )
    e = v["embeddings"]
    if e["drifted"]:
        parts.append(
            f"the champion's embeddings differ (MMD^2={e['mmd2']:.3g}, permutation "
            f"p={e['p_value']:.3g} < {e['alpha']})"
        )
    p = v["predictions"]
    if p["male_fraction_drifted"]:
        parts.append(
            f"the predicted male fraction moved {p['reference_male_fraction']:.2f} -> "
            f"{p['batch_male_fraction']:.2f} ({p['male_fraction_delta']:+.2f}, more "
            f"than drift.max_male_fraction_delta={p['max_male_fraction_delta']}, "
            f"p={p['p_value']:.2g})"
        )
    if p["confidence_drifted"]:
        parts.append(
            f"mean confidence fell {p['reference_mean_confidence']:.3f} -> "
            f"{p['batch_mean_confidence']:.3f} (more than drift.max_confidence_drop="
            f"{p['max_confidence_drop']}, Welch p={p['confidence_p_value']:.2g})"
        )
    b = result["batch"]
    head = (
        f"{b['images']} images of {location} against the reference of {champion} "
        f"({result['reference']['images']} test images)"
    )
    bad = (
        f"; {len(b['failed'])} files could not be read (listed in the report)"
        if b["failed"]
        else ""
    )
    if not result["drifted"]:
        return (
            f"No drift: {head}. No view crossed its threshold (image statistics: largest "
            f"KS D={max(f['statistic'] for f in v['image']['features']):.2f}; embeddings: "
            f"MMD p={e['p_value']:.3g}; predicted male fraction "
            f"{p['reference_male_fraction']:.2f} -> {p['batch_male_fraction']:.2f}, mean "
            f"confidence {p['reference_mean_confidence']:.3f} -> "
            f"{p['batch_mean_confidence']:.3f}){bad}."
        )
    n = sum(v[k]["drifted"] for k in VIEWS)
    return (
        f"DRIFT in {n} of 3 views: {head}. " + "; ".join(parts) + f"{bad}. Retrain on data "
        "that includes such images, or check the source of the batch."
    )


def markdown(result: dict[str, Any]) -> str:
    """summary.md: the paragraph, then one table per view."""
    v = result["views"]
    lines = [
        "# Drift check",
        "",
        result["summary"],
        "",
        "## Image statistics (KS, Bonferroni)",
        "",
        "| feature | reference median | batch median | D | p | drift |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {f['name']} | {f['reference_median']:.4g} | {f['batch_median']:.4g} | "
        f"{f['statistic']:.3f} | {f['p_value']:.3g} | {'yes' if f['drifted'] else 'no'} |"
        for f in v["image"]["features"]
    ]
    e, p = v["embeddings"], v["predictions"]
    lines += [
        "",
        "## Embeddings (MMD, permutation test)",
        "",
        f"MMD^2 {e['mmd2']:.4g}, p {e['p_value']:.3g} over {e['permutations']} "
        f"permutations (null 95% quantile {e['null_quantile_95']:.4g}), RBF bandwidth "
        f"{e['bandwidth']:.4g}: {'drift' if e['drifted'] else 'no drift'}.",
        "",
        "## Predictions",
        "",
        "| | reference | batch |",
        "|---|---|---|",
        f"| male fraction | {p['reference_male_fraction']:.3f} | {p['batch_male_fraction']:.3f} |",
        f"| mean confidence | {p['reference_mean_confidence']:.3f} | "
        f"{p['batch_mean_confidence']:.3f} |",
    ]
    failed = result["batch"]["failed"]
    if failed:
        lines += ["", f"## Files not read ({len(failed)})", ""]
        lines += [f"- `{f['file']}`: {f['reason']}" for f in failed[:200]]
    return "\n".join(lines) + "\n"


def check(
    location: str,
    clf: Classifier,
    reference: Profile,
    settings: Settings,
    out_dir: Path,
    champion: dict[str, Any] | None = None,
) -> DriftReport:
    """Profile the batch, compare it with the reference, write the report folder.

    Args:
        location: a folder or s3://bucket/prefix.
        clf: the champion (the model the reference was made with).
        reference: its reference profile.
        champion: what identifies the champion in the report (version, run id, model id).

    Raises:
        BatchError: too few usable images, or the location cannot be listed.
        ReferenceError: the reference does not belong to this model.
    """
    from genderclf.monitor.plots import drift_figure

    batch, listing = read_batch(location, settings, clf)
    result = compare(reference, batch, settings.drift, settings.base.seed)
    null = result.pop("null")
    champion = dict(champion or {})
    name = f"version {champion['version']}" if champion.get("version") else "the model"
    result.update(
        at=datetime.now(UTC).isoformat(timespec="seconds"),
        champion=champion,
        batch={
            **listing,
            "images": len(batch),
            "failed": [{"file": f, "reason": r} for f, r in batch.failed],
        },
        reference={"images": len(reference), **reference.meta},
        thresholds=settings.drift.model_dump(),
        exit_code=0,
    )
    result["exit_code"] = DRIFT_EXIT_CODE if result["drifted"] else 0
    result["summary"] = summarize(result, location, name)
    with atomic_dir(out_dir) as tmp:
        (tmp / "drift.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        (tmp / "summary.md").write_text(markdown(result), encoding="utf-8")
        drift_figure(
            reference, batch, result, null, settings.drift.histogram_bins, tmp / "drift.png"
        )
    log.debug("drift: %s", result["summary"])  # the CLI and the monitor flow print it
    return DriftReport(result, [out_dir / f for f in ("drift.json", "summary.md", "drift.png")])


__all__ = ["BatchError", "DriftReport", "ReferenceError", "check", "compare"]
