"""Progress bars (rich) for modules and epochs; silent when disabled (tests, pipes)."""

from __future__ import annotations

from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class ProgressBars:
    def __init__(self, enabled: bool = True, console: Console | None = None):
        self.enabled = enabled
        self._progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TimeRemainingColumn(),
            console=console, transient=False,
        ) if enabled else None

    def __enter__(self) -> ProgressBars:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()

    @contextmanager
    def task(self, description: str, total: int):
        """Yields ``update(advance=1, status="")``; the bar stays on screen when done."""
        if self._progress is None:
            yield lambda advance=1, status="": None
            return
        task_id = self._progress.add_task(description, total=total, status="")

        def update(advance: int = 1, status: str = "") -> None:
            self._progress.update(task_id, advance=advance, status=status)

        yield update
