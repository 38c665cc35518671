"""Progress display: rich bars on a terminal, plain one-line logs otherwise, nothing with --quiet."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class Reporter:
    """Shows long steps. `step(desc, total)` yields an `advance()` callable."""

    def __init__(self, quiet: bool = False, console: Console | None = None):
        self.quiet = quiet
        self.console = console or Console(stderr=True)
        self.live = self.console.is_terminal and not quiet

    def log(self, message: str) -> None:
        if not self.quiet:
            self.console.print(message, highlight=False, soft_wrap=True)

    @contextmanager
    def step(self, description: str, total: int) -> Iterator[Callable[[], None]]:
        start = time.perf_counter()
        if self.live:
            columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())
            with Progress(*columns, console=self.console, transient=False) as progress:
                task = progress.add_task(description, total=total)
                yield lambda: progress.advance(task)
            return
        count = [0]

        def advance() -> None:
            count[0] += 1

        yield advance
        if not self.quiet:
            print(f"{description}: {count[0]}/{total} done in {time.perf_counter() - start:.1f}s", file=sys.stderr, flush=True)
