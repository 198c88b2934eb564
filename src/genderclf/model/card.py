"""The model card of a registered version (`reports/model_card.md`, and its registry entry)."""

from __future__ import annotations

import json
from typing import Any

from genderclf.config import SPLITS, Paths, Settings
from genderclf.data.sources import location


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _ci(ci: list[float] | None) -> str:
    return "" if not ci else f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def _num(x: float | None, digits: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def model_card(
    settings: Settings, paths: Paths, report: dict[str, Any], metrics: dict[str, Any]
) -> str:
    """Markdown: intended and out-of-scope use, data, training, metrics with intervals,
    operating point, slices, known limits, and the promotion gate's verdict."""
    t, b = settings.train, settings.base
    src = json.loads(paths.source_file.read_text()) if paths.source_file.is_file() else {}
    meta_file = paths.prepared / "meta.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {"splits": {}}
    cal = metrics.get("calibration", {})
    lines = [
        f"# Model card: {report['model_name']} version {report['version']}",
        "",
        f"**Decision: {report['decision']}** (champion now: version {report['champion_after']}).",
        f"Training run `{report['run_id']}`; registered {report['at']}.",
        "",
        "## Intended use",
        "",
        "Estimates P(male) for a face photo: a binary label of *presented appearance* as "
        "annotated in CelebA's `Male` attribute (`1` = male). It is **not** anyone's gender "
        "identity or sex. Intended for research on retraining pipelines and for "
        "non-consequential uses such as aggregate statistics over consenting collections.",
        "",
        "**Out of scope:** decisions about people (access, hiring, credit, policing, "
        "health, benefits); inferring gender identity, sex or anything else about a person; "
        "surveillance or use on people who have not agreed to it; images that are not "
        "photographs of one frontal face (detect and crop first: `genderclf predict`).",
        "",
        "## Data",
        "",
        f"- Source: `{src.get('source', 'unknown')}` ({location(src)[0]})"
        f", checksum `{src.get('checksum', 'unknown')}`, {src.get('file_count', '?')} files.",
        "",
        "| split | images | male fraction |",
        "|---|---|---|",
    ]
    for s in SPLITS:
        m = meta["splits"].get(s)
        if m:
            lines.append(f"| {s} | {m['images']} | {_pct(m['male'] / max(1, m['images']))} |")
    lines += [
        "",
        "## Training",
        "",
        f"- Backbone `{t.backbone}`, weights `{t.weights}`, {b.image_size}x{b.image_size} px, "
        f"{t.epochs_head} head epochs + {t.epochs_finetune} fine-tuning epochs (top "
        f"{t.finetune_blocks} blocks), optimizer `{t.optimizer}`, learning rates {t.lr_head} "
        f"/ {t.lr_finetune}, batch {t.batch_size}, dropout {t.dropout}, class weights "
        f"`{t.class_weights}`, online augmentation `{t.online_augment}`, seed {b.seed}.",
        "",
        f"## Metrics (test split, n={metrics.get('n', '?')}, 95% intervals)",
        "",
        "| metric | value |",
        "|---|---|",
        f"| accuracy | {_pct(metrics.get('accuracy'))}{_ci(metrics.get('accuracy_ci'))} |",
        f"| F1 | {_pct(metrics.get('f1'))}{_ci(metrics.get('f1_ci'))} |",
        f"| ROC-AUC | {_num(metrics.get('roc_auc'))}"
        + (
            ""
            if not metrics.get("roc_auc_ci")
            else f" [{metrics['roc_auc_ci'][0]:.4f}, {metrics['roc_auc_ci'][1]:.4f}]"
        )
        + " |",
        f"| precision / recall | {_pct(metrics.get('precision'))} / "
        f"{_pct(metrics.get('recall'))} |",
        f"| expected calibration error | {_num(metrics.get('ece'))} (before calibration "
        f"{_num(cal.get('ece_raw'))}) |",
        "",
        f"Operating point: `evaluate.threshold: {settings.evaluate.threshold}`; calibration "
        f"{cal.get('method', 'none')} (a={_num(cal.get('a'), 3)}, b={_num(cal.get('b'), 3)}), "
        f"cut {cal.get('cut', 0.5)} on the calibrated probability = {metrics['threshold']:.4f} "
        "on the raw output. Both travel with the registered model.",
        "",
    ]
    slices = metrics.get("slices")
    if slices:
        lines += [
            "## Slices (CelebA attributes)",
            "",
            f"Slices under {slices['min_n']} images are listed but not ranked.",
            "",
            "| slice | n | accuracy [95% Wilson] | note |",
            "|---|---|---|---|",
        ]
        for a, e in slices["by_attribute"].items():
            for k, flag in (("with", 1), ("without", 0)):
                r = e[k]
                note = "too small" if r.get("too_small") else ""
                lines.append(
                    f"| {a}={flag} | {r['n']} | {_pct(r['accuracy'])}{_ci(r.get('ci'))} | {note} |"
                )
        lines += [
            "",
            f"Worst ranked slice: {slices['worst_slice']} (gap {_num(slices['worst_slice_gap'])}).",
            "",
        ]
    lines += [
        "## Promotion gate",
        "",
        "| check | verdict | detail |",
        "|---|---|---|",
        *(
            f"| {c['name']} | {'pass' if c['passed'] else '**FAIL**'} | {c['summary']} |"
            for c in report["checks"]
        ),
        "",
        "## Known limits",
        "",
        "- CelebA is celebrity photos: mostly young, light-skinned, well lit, posed and "
        "frontal. Accuracy on other populations, ages, lighting and poses is unmeasured "
        "here; the slice table above is the only breakdown.",
        "- The label is an annotator's reading of presented appearance; it is wrong for "
        "many people, and the model inherits its errors and biases.",
        "- Intervals are over this test split only; a different population moves them.",
        "- The bundled sample dataset is synthetic (drawn faces): a model trained on it says "
        "nothing about real faces.",
        "",
    ]
    return "\n".join(lines)
