"""The base of every error a user can fix (`genderclf.config` re-exports it).

A leaf module, importing nothing of the project: the registries that the settings types
derive from (`model/backbones.py`, `data/sources.py`) define their errors on it without
importing `config`.
"""

from __future__ import annotations


class GenderclfError(Exception):
    """Base of every error a user can fix; the CLI prints its message alone, no traceback."""
