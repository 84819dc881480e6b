"""Progress bars for long work (rich), and a silent stand-in for library callers and tests."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Protocol


class Task(Protocol):
    def advance(self, n: float = 1) -> None: ...

    def update(self, completed: float) -> None: ...


class Reporter(Protocol):
    @contextmanager
    def task(self, description: str, total: float | None, unit: str = "B") -> Iterator[Task]: ...

    def note(self, text: str) -> None: ...


class _NullTask:
    def advance(self, n: float = 1) -> None:
        pass

    def update(self, completed: float) -> None:
        pass


class Silent:
    @contextmanager
    def task(self, description: str, total: float | None, unit: str = "B") -> Iterator[Task]:
        yield _NullTask()

    def note(self, text: str) -> None:
        pass


class _RichTask:
    def __init__(self, progress, tid):
        self._p, self._id = progress, tid

    def advance(self, n: float = 1) -> None:
        self._p.advance(self._id, n)

    def update(self, completed: float) -> None:
        self._p.update(self._id, completed=completed)


class RichReporter:
    """Bars on stderr, one per task, with bytes and speed for byte tasks."""

    def __init__(self, console=None):
        from rich.console import Console

        self.console = console or Console(stderr=True)

    @contextmanager
    def task(self, description: str, total: float | None, unit: str = "B") -> Iterator[Task]:
        from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TaskProgressColumn,
                                   TextColumn, TimeElapsedColumn, TransferSpeedColumn)

        cols = [TextColumn("{task.description}"), BarColumn(), TaskProgressColumn()]
        cols += [DownloadColumn(), TransferSpeedColumn()] if unit == "B" else [MofNCompleteColumn()]
        cols.append(TimeElapsedColumn())
        with Progress(*cols, console=self.console) as p:
            tid = p.add_task(description, total=total)
            yield _RichTask(p, tid)
            if total is not None:
                p.update(tid, completed=total)

    def note(self, text: str) -> None:
        # one logical line, not wrapped by rich at the console's width (80 in a pipe or a log)
        self.console.print(text, highlight=False, soft_wrap=True)
