"""The model card of a registered version (`reports/model_card.md`, and its registry entry).

Every fact comes from a stage's hand-off (`genderclf.contracts`): the data from
`PreparedData` and SOURCE.json, the training from `TrainedModel`, the numbers from
`Evaluation`, the verdict from `Decision`; none from the settings of the day.
"""

from __future__ import annotations

import json
from pathlib import Path

from genderclf.catalog import location
from genderclf.config import SPLITS
from genderclf.contracts import Decision, Evaluation, PreparedData, TrainedModel
from genderclf.model.scoring import slice_name


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _ci(ci: list[float] | None) -> str:
    return "" if not ci else f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def _num(x: float | None, digits: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def model_card(
    source_file: Path,
    decision: Decision,
    evaluation: Evaluation,
    model: TrainedModel,
    data: PreparedData,
) -> str:
    """Markdown: intended and out-of-scope use, data, training, metrics with intervals,
    operating point, slices, known limits, and the promotion gate's verdict."""
    t, size = model.train, model.input.image_size
    src = json.loads(source_file.read_text()) if source_file.is_file() else {}
    ev, cal = evaluation, evaluation.calibration
    lines = [
        f"# Model card: {decision.model_name} version {decision.version}",
        "",
        f"**Decision: {decision.decision}** (champion now: version {decision.champion_after}).",
        f"Training run `{decision.run_id}`; registered {decision.at}.",
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
        if m := data.splits.get(s):
            lines.append(f"| {s} | {m.images} | {_pct(m.male / max(1, m.images))} |")
    lines += [
        "",
        "## Training",
        "",
        f"- Backbone `{t['backbone']}`, weights `{t['weights']}`, {size}x{size} px "
        f"(`{model.input.resize}`), {t['epochs_head']} head epochs + {t['epochs_finetune']} "
        f"fine-tuning epochs (top {t['finetune_blocks']} blocks), optimizer `{t['optimizer']}`"
        f", learning rates {t['lr_head']} / {t['lr_finetune']}, batch {t['batch_size']}, "
        f"dropout {t['dropout']}, class weights `{t['class_weights']}`, online augmentation "
        f"`{t['online_augment']}`, seed {model.seed}.",
        "",
        f"## Metrics (test split, n={ev.n}, 95% intervals)",
        "",
        "| metric | value |",
        "|---|---|",
        f"| accuracy | {_pct(ev.accuracy)}{_ci(ev.accuracy_ci)} |",
        f"| F1 | {_pct(ev.f1)}{_ci(ev.f1_ci)} |",
        f"| ROC-AUC | {_num(ev.roc_auc)}"
        + ("" if not ev.roc_auc_ci else f" [{ev.roc_auc_ci[0]:.4f}, {ev.roc_auc_ci[1]:.4f}]")
        + " |",
        f"| precision / recall | {_pct(ev.precision)} / {_pct(ev.recall)} |",
        f"| expected calibration error | {_num(ev.ece)} (before calibration {_num(cal.ece_raw)}) |",
        "",
        f"Operating point: `evaluate.threshold: {ev.threshold_rule}`; calibration "
        f"{cal.method} (a={_num(cal.a, 3)}, b={_num(cal.b, 3)}). Threshold "
        f"{ev.threshold_calibrated:.4f} on the calibrated P(male) (the metrics above) = "
        f"{ev.threshold_raw:.4f} on the model's raw output (what serving applies). Both "
        "travel with the registered model.",
        "",
    ]
    slices = ev.slices
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
            for k in ("with", "without"):
                r = e[k]
                note = "too small" if r.get("too_small") else ""
                lines.append(
                    f"| {slice_name(a, k == 'with')} | {r['n']} | "
                    f"{_pct(r['accuracy'])}{_ci(r.get('ci'))} | {note} |"
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
            f"| {c.name} | {'pass' if c.passed else '**FAIL**'} | {c.summary} |"
            for c in decision.checks
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
