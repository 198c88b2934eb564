"""What a person reads on a terminal: text tables (rich) and progress bars.

Tables are plain aligned columns (no box), never wrapped or cut, so paths stay copyable
and a table piped into a file reads the same as on screen. Progress bars show only on a
terminal; elsewhere (CI logs, Prefect) a stage prints one summary line instead.
"""

from __future__ import annotations

import io
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, TypeVar

T = TypeVar("T")


def render_table(headers: Sequence[str], rows: Iterable[Sequence[Any]],
                 right: Sequence[str] = ()) -> str:  # fmt: skip
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
    Console(file=out, width=100_000, color_system=None, force_terminal=False,
            highlight=False).print(table)  # fmt: skip
    return "\n".join(line.rstrip() for line in out.getvalue().splitlines())


class Progress:
    """A progress bar on a terminal; silent otherwise (the stage prints one summary line).

    Use as a context manager: `with Progress(n, "validate") as bar: ... bar.update()`.
    """

    def __init__(self, total: int, desc: str, unit: str = "img", enabled: bool = True):
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
