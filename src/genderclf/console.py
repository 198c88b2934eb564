"""What a person reads on a terminal: text tables (rich) and progress bars.

Tables are plain aligned columns (no box), never wrapped or cut, so paths stay copyable
and a table piped into a file reads the same as on screen. Progress bars show only on a
terminal; elsewhere (CI logs, Prefect) a stage prints one summary line instead.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, TypeVar

T = TypeVar("T")


def render_table(
    headers: Sequence[str], rows: Iterable[Sequence[Any]], right: Sequence[str] = ()
) -> str:
    """Rows under a header line, columns aligned, each cell at its full width.

    Args:
        right: headers of the columns to right-align (numbers).
    """
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
    for h in headers:
        table.add_column(str(h), justify="right" if h in right else "left", no_wrap=True)
    for r in rows:
        table.add_row(*("" if c is None else str(c) for c in r))
    out = io.StringIO()
    Console(
        file=out, width=100_000, color_system=None, force_terminal=False, highlight=False
    ).print(table)
    return "\n".join(line.rstrip() for line in out.getvalue().splitlines())


class Progress:
    """A progress bar on a terminal; silent otherwise (the stage prints one summary line).

    Use as a context manager: `with Progress(n, "validate") as bar: ... bar.update()`.
    """

    def __init__(self, total: int | None, desc: str, unit: str = "img", enabled: bool = True):
        """`total` None: a count without an end (a stream of unknown length)."""
        self.started = time.monotonic()
        self._bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr)

    def update(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def wrap(self, items: Iterable[T]) -> Iterator[T]:
        for item in items:
            yield item
            self.update()

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.started

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# TensorFlow's and TFLite's C++ start-up notices: written to stderr before (or outside) its
# logging set-up, so TF_CPP_MIN_LOG_LEVEL does not reach them. They say nothing a user can
# act on.
_TF_NOISE = re.compile(
    r"All log messages before absl::InitializeLog|oneDNN custom operations are on|"
    r"Could not find cuda drivers|failed call to cuInit|Unable to register cu(DNN|FFT|BLAS) "
    r"factory|computation placer already registered|TF-TRT Warning|This TensorFlow binary is "
    r"optimized to use available CPU instructions|To enable the following instructions:|"
    r"rebuild TensorFlow with the appropriate compiler flags|"
    r"Created TensorFlow Lite XNNPACK delegate for CPU"
)


@contextlib.contextmanager
def native_notices_filtered() -> Iterator[None]:
    """Capture what C++ code writes to file descriptor 2 inside the block; pass on all but
    TensorFlow's and TFLite's start-up notices (`_TF_NOISE`) when the block ends."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode(errors="replace").splitlines():
                if line.strip() and not _TF_NOISE.search(line):
                    print(line, file=sys.stderr)


def quiet_tensorflow() -> None:
    """Import TensorFlow (and find its devices) with those C++ notices filtered out.

    Everything else TensorFlow writes to stderr while starting is passed on unchanged.
    """
    if "tensorflow" in sys.modules:
        return
    with native_notices_filtered():
        import tensorflow as tf

        tf.config.list_physical_devices("GPU")  # the CUDA probe prints when it runs
        if not sys.stderr.isatty():  # no `1/1 ━━━━ 0s 199ms/step` frames in logs
            import keras

            keras.config.disable_interactive_logging()
