"""What every `genderclf` command shares: logging, one-line errors, the common options.

The stage commands (`genderclf.pipeline`) and the tools (`genderclf.tools`) both use it,
so every DVC stage depends on this file: it holds nothing that only a tool needs.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from genderclf.config import PATHS, GenderclfError, SettingsError

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ start-up chatter out
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

ParamsOpt = Annotated[
    Path, typer.Option("--params", "-p", help="Settings file (default: params.yaml in the cwd).")
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
DEFAULT_PARAMS = PATHS.params


def setup_logging() -> None:
    """INFO and above on stderr, one line each; the chattiest libraries at WARNING."""
    # The time only on a terminal: whatever reads a pipe (the Prefect flow, CI) stamps each
    # line itself, and a second time inside its prefix is noise.
    stamp = "%(asctime)s " if sys.stderr.isatty() else ""
    logging.basicConfig(
        level=logging.INFO,
        format=stamp + "%(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    for noisy in ("great_expectations", "absl", "h5py", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def settings_hint(stage: str, keeps_outputs: bool) -> str:
    """What to do after fixing params.yaml for a stage that refused it.

    `dvc repro` runs the whole pipeline again (a typo in params.yaml stops the first stage
    to load it, usually download). Only a stage whose outputs DVC removes before running
    its command (every stage but download, whose data/raw persists) may have lost them.
    """
    if keeps_outputs:
        return "\nAfter fixing it, run `dvc repro` again (nothing was removed)."
    return (
        f"\nAfter fixing it, run `dvc repro` again; if DVC removed the outputs of {stage} "
        f"before running it, `dvc checkout {stage}` brings back those of the last good run."
    )


def command(
    stage: bool = False, keeps_outputs: bool = False
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Wrap a command: logging set up, known errors shown as one message and exit 1.

    Args:
        stage: a pipeline stage's command (a settings error then says what to run next).
        keeps_outputs: the stage's outputs survive a failed run (download's data/raw).
    """

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            setup_logging()
            try:
                return fn(*args, **kwargs)
            except (GenderclfError, FileNotFoundError, PermissionError) as err:
                hint = ""
                if stage and isinstance(err, SettingsError):
                    hint = settings_hint(fn.__name__, keeps_outputs)
                typer.secho(f"error ({fn.__name__}): {err}{hint}", fg=typer.colors.RED, err=True)
                raise typer.Exit(1) from None

        return wrapper

    return wrap
