"""The files one stage hands to the next: one typed contract each.

| file                    | contract       | written by | read by                                  |
|-------------------------|----------------|------------|------------------------------------------|
| data/prepared/meta.json | `PreparedData` | augment    | train, evaluate, register, promote       |
| models/model.json       | `TrainedModel` | train      | evaluate, register, predict              |
| models/run.json         | `TrainingRun`  | train      | evaluate, register (through `tracking`)  |
| metrics/eval.json       | `Evaluation`   | evaluate   | register, the flow's artifacts           |
| reports/register.json   | `Decision`     | register   | the flow (artifacts, approval), CI       |

Each is a frozen dataclass with `write(path)` and `read(path)`. The stage that produces a
file writes it once; every reader goes through `read` and never falls back to the
settings for a fact the producer recorded (the model's image size and resize mode, the
threshold and calibration, the run and model ids). If I change the image size, one
place decides it: the augment stage, which records it in `PreparedData`.

Every file carries a `schema` ("<kind>/<version>"). A file without one (written before
these contracts existed) or with another version is refused with a `ContractError` that
names the file and the stage that writes it again; `dvc repro` re-runs that stage anyway,
because the commands changed with the contracts.

`models/run.json` is the one hand-off outside DVC's outputs: the MLflow run and model ids
change with every training, so a file DVC hashed would make the pipeline stale after an
identical re-run. It is keyed by the model's content hash (`model_md5`, DVC's own hash of
`models/model.keras`), so a record of another model is never used (see
`genderclf.tracking.runs.training_run`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from genderclf.config import GenderclfError
from genderclf.io import write_json

C = TypeVar("C", bound="Contract")


class ContractError(GenderclfError, FileNotFoundError):
    """A hand-off file is missing, unreadable, or written by another version of genderclf;
    the message names the stage that writes it again."""


class PreparedDataError(ContractError):
    """Prepared data is missing, incomplete, or at another image size."""


def _plain(value: Any) -> Any:
    """A dataclass (nested ones too) as JSON-ready values; fields marked `json: False` are
    left out."""
    if is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: _plain(getattr(value, f.name))
            for f in fields(value)
            if f.metadata.get("json", True)
        }
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):  # a NumPy scalar
        return value.item()
    return value


@dataclass(frozen=True)
class Contract:
    """Base of the hand-off files: the schema check, `write` and `read`."""

    KIND: ClassVar[str] = ""
    VERSION: ClassVar[int] = 1
    WRITER: ClassVar[str] = ""  # the stage that writes the file
    ERROR: ClassVar[type[ContractError]] = ContractError
    MISSING: ClassVar[str] = ""  # said before "run `dvc repro <writer>`" for a missing file

    @classmethod
    def schema(cls) -> str:
        return f"{cls.KIND}/{cls.VERSION}"

    @classmethod
    def file(cls, path: str | Path) -> Path:
        """The JSON file behind `path` (a contract on a folder overrides this)."""
        return Path(path)

    def to_json(self) -> dict[str, Any]:
        """The file's content: every field, and the schema."""
        return {"schema": self.schema(), **_plain(self)}

    def write(self, path: str | Path) -> Path:
        """Write the file atomically (keys sorted, so the same facts give the same bytes)."""
        return write_json(self.file(path), self.to_json())

    @classmethod
    def read(cls: type[C], path: str | Path) -> C:
        """Read and check the file.

        Raises:
            ContractError (the contract's own subclass): the file is missing, not JSON,
                written before the contracts existed, of another schema, or invalid; the
                message names the file and the stage to re-run.
        """
        from pydantic import TypeAdapter, ValidationError

        p = cls.file(path)
        fix = f"run `dvc repro {cls.WRITER}`"
        if not p.is_file():
            raise cls.ERROR(f"{p} not found: {cls.MISSING}{fix}")
        try:
            raw = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise cls.ERROR(f"{p} is not readable JSON ({err}): {fix}") from None
        if not isinstance(raw, dict) or "schema" not in raw:
            raise cls.ERROR(
                f"{p} was written before genderclf's typed hand-offs (it has no `schema`): "
                f"{fix} to write it again"
            )
        if raw["schema"] != cls.schema():
            raise cls.ERROR(
                f"{p} holds {raw['schema']!r} but this genderclf reads {cls.schema()!r}: "
                f"{fix} to write it again"
            )
        body = {k: v for k, v in raw.items() if k != "schema"}
        try:
            value = TypeAdapter(cls).validate_python(body)
        except ValidationError as err:
            e = err.errors()[0]
            where = ".".join(map(str, e["loc"])) or "<root>"
            raise cls.ERROR(
                f"{p} is not a valid {cls.KIND} file ({where}: {e['msg']}): {fix}"
            ) from None
        return value._located(path)

    def _located(self: C, path: str | Path) -> C:
        return self


# --- augment -> train, evaluate, register ----------------------------------------------------


@dataclass(frozen=True)
class SplitShards:
    """One split of the prepared data."""

    images: int  # source images
    records: int  # images x (1 + copies)
    copies: int  # augmented variants per image (train only)
    male: int  # source images labelled male
    shards: list[str]  # TFRecord file names in the folder, in order


@dataclass(frozen=True)
class PreparedData(Contract):
    """`data/prepared/`: sharded TFRecords of each split, described by `meta.json`.

    `read` and `write` take the folder; `meta.json` is written last, so its presence marks
    the data complete. `folder` is where the data was read from (not in the file).
    """

    KIND: ClassVar[str] = "prepared-data"
    WRITER: ClassVar[str] = "augment"
    ERROR: ClassVar[type[ContractError]] = PreparedDataError
    MISSING: ClassVar[str] = "prepared data is missing or incomplete; "
    FILE: ClassVar[str] = "meta.json"

    image_size: int  # every record's square side, in pixels: the model's input size
    resize: str  # how an image was fitted to the square (center_crop | stretch)
    encoding: str  # jpeg
    jpeg_quality: int
    seed: int
    augment: dict[str, Any]  # the augment settings the records were written with
    splits: dict[str, SplitShards]
    folder: Path | None = field(default=None, compare=False, metadata={"json": False})

    @classmethod
    def file(cls, path: str | Path) -> Path:
        return Path(path) / cls.FILE

    def _located(self, path: str | Path) -> PreparedData:
        return replace(self, folder=Path(path))

    @classmethod
    def of(cls, data: PreparedData | str | Path) -> PreparedData:
        """`data` itself, or the prepared data in the folder `data` (read once here)."""
        return data if isinstance(data, PreparedData) else cls.read(data)

    def split(self, name: str) -> SplitShards:
        """One split's entry.

        Raises:
            PreparedDataError: the split is not in the prepared data.
        """
        if name not in self.splits:
            raise PreparedDataError(f"{self.folder}: split {name!r} not in {list(self.splits)}")
        return self.splits[name]

    def shard_files(self, name: str) -> list[Path]:
        """The split's shard files, in order."""
        return [Path(self.folder or ".") / s for s in self.split(name).shards]


# --- train -> evaluate, register, predict -----------------------------------------------------


@dataclass(frozen=True)
class ModelInput:
    """What the model takes: a square of `image_size` pixels, fitted the `resize` way."""

    image_size: int
    resize: str  # center_crop | stretch, as the prepared data was fitted


@dataclass(frozen=True)
class TrainedModel(Contract):
    """`models/model.json`: the facts of `models/model.keras` the later stages need."""

    KIND: ClassVar[str] = "trained-model"
    WRITER: ClassVar[str] = "train"

    input: ModelInput  # from the prepared data it was trained on
    model_md5: str  # of models/model.keras: DVC's hash of it, and the key of its run
    seed: int
    train: dict[str, Any]  # the `train` settings it was trained with (backbone, weights...)

    @property
    def backbone(self) -> str:
        return str(self.train["backbone"])


@dataclass(frozen=True)
class TrainingRun(Contract):
    """`models/run.json` (outside DVC's outputs): the MLflow run and LoggedModel that hold
    the model whose content hash is `model_md5`."""

    KIND: ClassVar[str] = "training-run"
    WRITER: ClassVar[str] = "train"

    model_md5: str
    run_id: str
    experiment_id: str
    tracking_uri: str  # credentials redacted
    keras_model_uri: str  # models:/<model_id>
    model_id: str


# --- evaluate -> register ---------------------------------------------------------------------


@dataclass(frozen=True)
class Calibration:
    """How the model's raw output maps to the calibrated P(male) the metrics are about."""

    method: str  # platt | none
    a: float  # P = sigmoid(a * logit(raw) + b)
    b: float
    ece_raw: float  # expected calibration error of the raw output, before calibration

    @property
    def platt(self) -> tuple[float, float]:
        return (self.a, self.b)


@dataclass(frozen=True)
class Evaluation(Contract):
    """`metrics/eval.json`: the model on the test split at the operating point chosen on
    the validation split. Also a DVC metrics file: its keys are what `dvc metrics show`
    and `dvc exp show` list.

    One operating point, on two scales: `threshold_calibrated` is the cut on the
    calibrated P(male) (what every metric, plot and the card use), `threshold_raw` the
    same cut on the model's raw output (what the served model applies).
    """

    KIND: ClassVar[str] = "evaluation"
    WRITER: ClassVar[str] = "evaluate"

    accuracy: float
    precision: float
    recall: float
    f1: float
    roc_auc: float | None  # None with one class in the test split
    average_precision: float | None
    ece: float  # of the calibrated probabilities
    n: int
    confusion_matrix: list[list[int]]  # rows actual (female, male), columns predicted
    threshold_rule: str  # evaluate.threshold: calibrated | val_f1 | fixed
    threshold_calibrated: float
    threshold_raw: float
    calibration: Calibration
    val_accuracy_at_threshold: float
    accuracy_ci: list[float] | None  # 95% bootstrap intervals
    f1_ci: list[float] | None
    roc_auc_ci: list[float] | None
    slices: dict[str, Any] | None = None  # where the dataset has attributes
    worst_slice_gap: float | None = None


# --- register -> the flow, CI -----------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    """One check of the promotion gate, as recorded."""

    name: str
    passed: bool
    summary: str  # the verdict with its numbers, in words
    numbers: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Candidate:
    version: str
    accuracy: float
    f1: float
    roc_auc: float | None
    threshold_raw: float
    ece: float


@dataclass(frozen=True)
class Standing:
    """The champion before the decision: its version and accuracy on the same test split."""

    version: str | None
    accuracy: float | None


DECISIONS = ("promoted", "champion", "pending_approval", "rejected")


@dataclass(frozen=True)
class Decision(Contract):
    """`reports/register.json`: the registered version, every gate check, the decision."""

    KIND: ClassVar[str] = "decision"
    WRITER: ClassVar[str] = "register"

    model_name: str
    version: str
    newly_registered: bool
    run_id: str
    model_uri: str
    decision: str  # one of DECISIONS
    reasons: list[str]
    checks: list[Check]
    candidate: Candidate
    champion_before: Standing
    champion_after: str | None
    alias_moves: list[dict[str, Any]]
    policy: dict[str, Any]  # the `register` settings the gate applied
    at: str  # when, UTC ISO 8601
