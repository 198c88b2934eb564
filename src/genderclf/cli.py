"""`genderclf`: the stage commands and the tools, in one command for people.

* the stage commands, `genderclf download` ... `genderclf register`: `genderclf.pipeline`,
  the module `dvc.yaml` runs (`python -m genderclf.pipeline <stage>`);
* the tools, `genderclf predict`, `drift`, `promote`, `rollback`, `compare`:
  `genderclf.tools`, which no stage depends on.

Nothing imports this module; it only puts the two sets together. One command has a part
from each: `genderclf tune` is the tune stage's command, and `genderclf tune --apply` the
tool that copies the search's winner into params.yaml.
"""

from __future__ import annotations

import inspect

import typer

from genderclf import pipeline, tools

app = typer.Typer(
    help="Retraining pipeline for a face-image gender classifier. Stages run in order: "
    "download -> validate -> split -> augment -> tune -> train -> evaluate -> register "
    "(`dvc repro` runs them; each command here runs one), plus the tools predict, drift, "
    "promote, rollback and compare.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def tune(params: tools.ParamsOpt = tools.DEFAULT_PARAMS, apply: tools.ApplyOpt = False) -> None:
    """The tune stage's command (`genderclf.pipeline.tune`), or with `--apply` the tool
    that writes its winner into params.yaml (`genderclf.tools.apply_tuned`)."""
    if apply:
        tools.apply_tuned(params)
    else:
        pipeline.tune(params)


# `genderclf tune` in the tune stage's place, with the stage's help and the tool's option
_tune = typer.Typer()
_tune.command(help=inspect.getdoc(pipeline.tune))(tune)
app.registered_commands += [
    _tune.registered_commands[0] if c.callback is pipeline.tune else c
    for c in pipeline.app.registered_commands
] + tools.app.registered_commands


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
