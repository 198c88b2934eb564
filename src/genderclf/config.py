"""Settings and paths: `params.yaml` loaded once into typed, validated settings.

Every number the pipeline uses lives in `params.yaml`; this module gives it types and
ranges so that a bad value fails at start with a message naming the key, instead of
deep inside a stage. Every path the stages share is defined here, once.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

# --- Paths (relative to the repository root, where `dvc repro` runs the stages) -----------
PARAMS_FILE = Path("params.yaml")
DATA_DIR = Path("data")
RAW_DIR = DATA_DIR / "raw"
SOURCE_FILE = RAW_DIR / "SOURCE.json"
VALIDATED_DIR = DATA_DIR / "validated"
MANIFEST_FILE = VALIDATED_DIR / "manifest.csv"
SPLITS_DIR = DATA_DIR / "splits"
PREPARED_DIR = DATA_DIR / "prepared"
REPORTS_DIR = Path("reports")
VALIDATION_REPORT_DIR = REPORTS_DIR / "validation"
REJECTED_FILE = VALIDATION_REPORT_DIR / "rejected.csv"
VALIDATION_METRICS = Path("metrics") / "validation.json"
AUGMENT_PREVIEW = REPORTS_DIR / "augment_preview.png"
REGISTER_REPORT = REPORTS_DIR / "register.json"
MODELS_DIR = Path("models")
MODEL_FILE = MODELS_DIR / "model.keras"
RUN_FILE = MODELS_DIR / "run.json"
METRICS_DIR = Path("metrics")
PLOTS_DIR = Path("plots")

SPLITS = ("train", "val", "test")


class SettingsError(ValueError):
    """Raised when `params.yaml` is missing, unreadable or holds an invalid value."""


class _Section(BaseModel):
    # extra="forbid": a misspelt key is an error, not a silently ignored setting.
    model_config = ConfigDict(extra="forbid", frozen=True)


Probability = Annotated[float, Field(ge=0.0, le=1.0)]


class BaseSettings(_Section):
    seed: int = Field(42, ge=0, le=2**31 - 1)
    image_size: int = Field(64, ge=16, le=512, description="square side in pixels")


class SampleSource(_Section):
    num_images: int = Field(3000, ge=20, le=1_000_000)
    images_per_identity: int = Field(10, ge=1, le=100)
    male_fraction: Probability = 0.42
    cue_flip_fraction: Probability = Field(
        0.03, description="share of faces drawn with the other class's cues (label noise)"
    )
    workers: int = Field(0, ge=0, le=256, description="0 = one per CPU core")


class KaggleSource(_Section):
    slug: str = Field("jessicali9530/celeba-dataset", pattern=r"^[\w.-]+/[\w.-]+(/\d+)?$")
    retries: int = Field(4, ge=0, le=20)
    backoff_seconds: float = Field(2.0, ge=0.0, le=600.0)


class DirSource(_Section):
    path: str | None = None


class S3Source(_Section):
    uri: str | None = Field(None, pattern=r"^s3://[a-z0-9.\-]{3,63}(/.*)?$")
    endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint; falls back to AWS_ENDPOINT_URL"
    )
    retries: int = Field(4, ge=0, le=20)


class DataSettings(_Section):
    source: Literal["sample", "kaggle", "dir", "s3"] = "sample"
    layout: Literal["auto", "celeba", "class_folders"] = "auto"
    sample: SampleSource = SampleSource()
    kaggle: KaggleSource = KaggleSource()
    dir: DirSource = DirSource()
    s3: S3Source = S3Source()

    @model_validator(mode="after")
    def _source_has_location(self) -> DataSettings:
        if self.source == "dir" and not self.dir.path:
            raise ValueError("data.source is 'dir' but data.dir.path is empty: set it to a folder")
        if self.source == "s3" and not self.s3.uri:
            raise ValueError("data.source is 's3' but data.s3.uri is empty: set s3://bucket/prefix")
        return self


class ValidateSettings(_Section):
    min_rows: int = Field(100, ge=1)
    min_side: int = Field(32, ge=1, le=4096)
    male_fraction_min: Probability = 0.2
    male_fraction_max: Probability = 0.8
    max_reject_fraction: Probability = 0.05
    allow_format_mismatch: bool = False
    workers: int = Field(0, ge=0, le=256, description="0 = one per CPU core")

    @model_validator(mode="after")
    def _bounds_ordered(self) -> ValidateSettings:
        if self.male_fraction_min > self.male_fraction_max:
            raise ValueError(
                "validate.male_fraction_min must be <= validate.male_fraction_max "
                f"(got {self.male_fraction_min} > {self.male_fraction_max})"
            )
        return self


class SplitSettings(_Section):
    strategy: Literal["official", "stratified", "group"] = "official"
    val_fraction: float = Field(0.1, gt=0.0, lt=0.5)
    test_fraction: float = Field(0.1, gt=0.0, lt=0.5)


class AugmentSettings(_Section):
    copies: int = Field(1, ge=0, le=20, description="extra augmented variants per train image")
    flip: bool = True
    rotation_deg: float = Field(10.0, ge=0.0, le=45.0)
    zoom: float = Field(0.1, ge=0.0, le=0.5)
    shift: float = Field(0.05, ge=0.0, le=0.3)
    brightness: float = Field(0.15, ge=0.0, le=0.9)
    contrast: float = Field(0.15, ge=0.0, le=0.9)
    resize: Literal["center_crop", "stretch"] = "center_crop"
    jpeg_quality: int = Field(95, ge=50, le=100)
    shard_size: int = Field(2000, ge=16, le=100_000, description="records per TFRecord shard")
    workers: int = Field(0, ge=0, le=256, description="0 = one per CPU core")


class TrainSettings(_Section):
    backbone: Literal["vgg16", "vgg19", "resnet50", "mobilenet_v2", "simple_cnn"] = "vgg16"
    weights: Literal["imagenet"] | None = None
    batch_size: int = Field(32, ge=1, le=4096)
    epochs_head: int = Field(3, ge=0, le=1000)
    epochs_finetune: int = Field(3, ge=0, le=1000)
    lr_head: float = Field(1e-3, gt=0.0, le=1.0)
    lr_finetune: float = Field(1e-4, gt=0.0, le=1.0)
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    finetune_blocks: int = Field(1, ge=0, le=10)
    dropout: float = Field(0.3, ge=0.0, lt=1.0)
    online_augment: bool = True
    aug_rotation: float = Field(0.03, ge=0.0, le=0.5, description="fraction of a full turn")
    aug_zoom: float = Field(0.1, ge=0.0, le=0.5)
    aug_contrast: float = Field(0.1, ge=0.0, le=0.9)
    early_stopping_patience: int = Field(3, ge=1, le=100)
    reduce_lr_patience: int = Field(2, ge=1, le=100)
    mixed_precision: Literal["auto", "on", "off"] = "auto"
    class_weights: Literal["auto", "off"] = "auto"

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_on_off(cls, v: Any) -> Any:
        # YAML 1.1 reads unquoted on/off as booleans (and `dvc exp run -S` drops the quotes).
        if isinstance(v, bool):
            return "on" if v else "off"
        return v

    @field_validator("epochs_finetune")
    @classmethod
    def _some_epochs(cls, v: int, info: Any) -> int:
        if v == 0 and info.data.get("epochs_head") == 0:
            raise ValueError("train.epochs_head and train.epochs_finetune are both 0")
        return v


class EvaluateSettings(_Section):
    slices: list[str] = ["Young", "Eyeglasses", "Pale_Skin", "Wearing_Hat", "Heavy_Makeup"]
    calibration_bins: int = Field(10, ge=2, le=100)
    mistakes_grid: int = Field(16, ge=0, le=256)
    threshold: Literal["val_f1", "fixed"] = "val_f1"


class RegisterSettings(_Section):
    min_accuracy: Probability = 0.9
    min_improvement: float = Field(0.0, ge=0.0, le=1.0)
    retries: int = Field(3, ge=0, le=20)


class PredictSettings(_Section):
    """`genderclf predict`: face detection (OpenCV's bundled Haar cascade) and cropping."""

    cascade: str = Field("haarcascade_frontalface_default.xml",
                         description="a cascade file bundled with OpenCV (cv2.data.haarcascades)")  # fmt: skip
    scale_factor: float = Field(1.1, gt=1.0, le=2.0)
    min_neighbors: int = Field(5, ge=1, le=50)
    min_face: int = Field(40, ge=8, le=4096, description="smallest face side in pixels")
    detect_max_side: int = Field(1024, ge=128, le=16384,
                                 description="detect on a copy at most this big (speed)")  # fmt: skip
    # How CelebA's aligned crops frame a face: the square training crop is about 1.7x the
    # detector's box and centred 0.1 box-widths above the box centre (measured on the sample).
    crop_scale: float = Field(1.7, ge=1.0, le=4.0)
    crop_shift_y: float = Field(-0.1, ge=-1.0, le=1.0)
    max_pixels: int = Field(50_000_000, ge=10_000, le=1_000_000_000,
                            description="refuse bigger images (decompression bombs)")  # fmt: skip
    batch_size: int = Field(64, ge=1, le=4096)


class Settings(_Section):
    base: BaseSettings = BaseSettings()
    data: DataSettings = DataSettings()
    validate_: ValidateSettings = Field(ValidateSettings(), alias="validate")
    split: SplitSettings = SplitSettings()
    augment: AugmentSettings = AugmentSettings()
    train: TrainSettings = TrainSettings()
    evaluate: EvaluateSettings = EvaluateSettings()
    register_: RegisterSettings = Field(RegisterSettings(), alias="register")
    predict: PredictSettings = PredictSettings()

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

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
        out: dict[str, Any] = {}

        def walk(prefix: str, obj: Any) -> None:
            if isinstance(obj, dict):
                for k, v in obj.items():
                    walk(f"{prefix}.{k}" if prefix else k, v)
            else:
                out[prefix] = obj

        walk("", self.model_dump(by_alias=True))
        return out


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"{source}: {err.error_count()} invalid setting(s)"]
    for e in err.errors():
        key = ".".join(str(p).rstrip("_") for p in e["loc"])
        msg = e["msg"]
        ctx = e.get("ctx") or {}
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see params.yaml for the allowed keys)"
        elif e["type"] == "literal_error" and "expected" in ctx:
            msg = f"allowed values are {ctx['expected']}"
        got = e.get("input")
        shown = "" if e["type"] in ("extra_forbidden", "missing") else f" (got {got!r})"
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


def load_settings(path: str | os.PathLike[str] = PARAMS_FILE) -> Settings:
    """Read and validate `params.yaml`.

    Raises:
        SettingsError: the file is missing, is not YAML, or holds an invalid value.
    """
    p = Path(path)
    if not p.is_file():
        raise SettingsError(
            f"{p}: settings file not found; run from the repository root or pass --params"
        )
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except OSError:
        raise
    # Not only YAMLError: PyYAML's scalar constructors raise ValueError, IndexError, KeyError
    # or AttributeError on bad input (`seed: 2024-13-45`, `!!int`, `!!bool x`).
    except Exception as err:
        raise SettingsError(f"{p}: not valid YAML: {err}") from None
    return parse_settings(raw, str(p))


def cpu_workers(requested: int) -> int:
    """Resolve a `workers: 0` setting to the number of usable CPU cores."""
    if requested > 0:
        return requested
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)
