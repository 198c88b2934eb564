"""The one place where source label spellings become integers: 1 = male, 0 = female."""

from __future__ import annotations

MALE = 1
FEMALE = 0
LABEL_NAMES = {MALE: "male", FEMALE: "female"}

# Class-folder spellings seen in the Kaggle gender datasets (compared case-insensitively).
CLASS_FOLDERS = {
    "male": MALE,
    "man": MALE,
    "men": MALE,
    "female": FEMALE,
    "woman": FEMALE,
    "women": FEMALE,
}


class LabelError(ValueError):
    """A label value that is not one of the known spellings."""


def label_from_celeba(value: object) -> int:
    """Map CelebA's `Male` attribute (-1 / 1) to 0 / 1.

    Raises:
        LabelError: for anything but -1 or 1 (as int or string).
    """
    text = str(value).strip()
    if text in ("1", "1.0"):
        return MALE
    if text in ("-1", "-1.0"):
        return FEMALE
    raise LabelError(f"Male={text!r} is not -1 or 1")


def label_from_folder(name: str) -> int | None:
    """Map a class folder name (`male/`, `Female/`, `man/`, ...) to a label, or None."""
    return CLASS_FOLDERS.get(name.strip().lower())
