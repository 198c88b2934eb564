"""The tune stage's hand-off: the chosen `train.*` values (`params/tuned.yaml`).

The file is a params file in DVC's sense: the train stage lists it under `params`, so
`dvc exp show` and `dvc params diff` show the values the search chose, and DVC sees the
edge tune -> train. It holds only the searched keys, under `train:` (the same dotted names
as params.yaml), and nothing that varies between runs of the same search (no timings).
With `tune.enabled: false` it holds params.yaml's own values for those keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from genderclf.config import GenderclfError, Paths, Settings, TrainSettings
from genderclf.io import atomic_write

HEADER = (
    "# Written by the tune stage (`genderclf tune`); do not edit: `dvc repro tune` rewrites it.\n"
    "# The train stage uses these train.* values when tune.enabled is true (params.yaml's own\n"
    "# values when it is false, which is what this file then holds). `genderclf tune --apply`\n"
    "# copies them into params.yaml.\n"
)


class TunedParamsError(GenderclfError, ValueError):
    """`params/tuned.yaml` is missing, unreadable, or does not fit the settings."""


@dataclass(frozen=True)
class TunedParams:
    """The `train.*` values the search chose (or passed through), one per searched key."""

    train: dict[str, Any]

    def write(self, path: Path, searched: bool) -> Path:
        """Write the file atomically; the same values give the same bytes.

        Args:
            searched: a search chose the values (else they are params.yaml's own).
        """
        status = "chosen by the search" if searched else "passed through (tune.enabled: false)"
        body = yaml.safe_dump({"train": dict(sorted(self.train.items()))}, sort_keys=False)
        return atomic_write(path, f"{HEADER}# Values {status}.\n{body}")

    @classmethod
    def read(cls, path: Path) -> TunedParams:
        """Read the file.

        Raises:
            TunedParamsError: missing, not YAML, or without a `train:` mapping.
        """
        if not path.is_file():
            raise TunedParamsError(
                f"{path} not found: tune.enabled is true, so train uses the search's values; "
                "run `dvc repro tune` (or `genderclf tune`) first"
            )
        text = path.read_text(encoding="utf-8")
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise TunedParamsError(
                f"{path}: not valid YAML ({err}): run `dvc repro tune`"
            ) from None
        if not isinstance(raw, dict) or not isinstance(raw.get("train"), dict):
            raise TunedParamsError(f"{path}: no `train:` mapping: run `dvc repro tune`")
        return cls(raw["train"])

    def apply(self, settings: Settings, source: Path) -> Settings:
        """`settings` with these train values in place of params.yaml's.

        Raises:
            TunedParamsError: the keys are not tune.space's (the file is from another search)
                or a value is not valid for its train key.
        """
        wanted, have = sorted(settings.tune.space), sorted(self.train)
        if wanted != have:
            raise TunedParamsError(
                f"{source} holds train keys {have} but tune.space searches {wanted}: it is from "
                "another search; run `dvc repro tune`"
            )
        try:
            train = TrainSettings.model_validate({**settings.train.model_dump(), **self.train})
        except ValidationError as err:
            bad = "; ".join(f"train.{e['loc'][0]}: {e['msg']}" for e in err.errors() if e["loc"])
            raise TunedParamsError(f"{source}: {bad or err}: run `dvc repro tune`") from None
        return settings.model_copy(update={"train": train})


def effective_settings(settings: Settings, paths: Paths) -> Settings:
    """The settings training uses: with `tune.enabled`, the search's train values.

    Raises:
        TunedParamsError: tuning is on and the tuned file is missing or does not fit.
    """
    if not settings.tune.enabled:
        return settings
    return TunedParams.read(paths.tuned_params).apply(settings, paths.tuned_params)


def as_they_are(settings: Settings) -> TunedParams:
    """params.yaml's own values of the searched keys (tuning off)."""
    values = settings.train.model_dump()
    return TunedParams({k: values[k] for k in settings.tune.space})
