"""Disk transfer progress for people: rich bars on a terminal, a plain line now and then otherwise.

A log file or a CI console cannot take redrawn bars, so off a TTY each task prints one line
every ``interval_s`` (and one when it finishes). The disk pipeline only sees ``Task``:
``advance(n)`` after each chunk, ``finish()`` at the end; both are thread-safe.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from migrate.units import human_bytes


def human_seconds(seconds: float) -> str:
    hours, rest = divmod(round(seconds), 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class Task(Protocol):
    def advance(self, count: int) -> None: ...

    def finish(self) -> None: ...


class Board(Protocol):
    def task(self, label: str, total: int, done: int = 0) -> Task: ...

    def close(self) -> None: ...

    def __enter__(self) -> Board: ...

    def __exit__(self, *exc: object) -> None: ...


# -- plain lines ----------------------------------------------------------------------------


@dataclass(slots=True)
class _PlainState:
    label: str
    total: int
    done: int
    start_done: int
    started: float
    last_line: float
    finished: bool = False


class _PlainTask:
    def __init__(self, board: PlainBoard, state: _PlainState) -> None:
        self._board = board
        self._state = state

    def advance(self, count: int) -> None:
        self._board._advance(self._state, count)

    def finish(self) -> None:
        self._board._finish(self._state)


class PlainBoard:
    """One line per task every ``interval_s`` seconds, and one when it finishes."""

    def __init__(
        self, stream: TextIO, *, interval_s: float = 10.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._stream = stream
        self._interval = interval_s
        self._clock = clock
        self._lock = threading.Lock()

    def task(self, label: str, total: int, done: int = 0) -> Task:
        now = self._clock()
        return _PlainTask(self, _PlainState(label, total, done, done, now, now))

    def _rate(self, state: _PlainState, now: float) -> float:
        elapsed = now - state.started
        return (state.done - state.start_done) / elapsed if elapsed > 0 else 0.0

    def _advance(self, state: _PlainState, count: int) -> None:
        with self._lock:
            state.done += count
            now = self._clock()
            if now - state.last_line < self._interval:
                return
            state.last_line = now
            rate = self._rate(state, now)
            line = f"{state.label}: {human_bytes(state.done)} of {human_bytes(state.total)}"
            if state.total:
                line += f" ({100 * state.done / state.total:.0f}%)"
            if rate > 0:
                line += f", {human_bytes(rate)}/s"
                if state.total > state.done:
                    line += f", about {human_seconds((state.total - state.done) / rate)} left"
            self._write(line)

    def _finish(self, state: _PlainState) -> None:
        with self._lock:
            if state.finished:
                return
            state.finished = True
            now = self._clock()
            elapsed = now - state.started
            line = f"{state.label}: done, {human_bytes(state.done)} in {human_seconds(elapsed)}"
            if elapsed > 0:
                line += f" ({human_bytes(self._rate(state, now))}/s)"
            self._write(line)

    def _write(self, line: str) -> None:
        self._stream.write(line + "\n")
        self._stream.flush()

    def close(self) -> None:
        pass

    def __enter__(self) -> PlainBoard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- rich bars ------------------------------------------------------------------------------


class _RichTask:
    def __init__(self, progress: Progress, task_id: TaskID) -> None:
        self._progress = progress
        self._id = task_id

    def advance(self, count: int) -> None:
        self._progress.update(self._id, advance=count)

    def finish(self) -> None:
        task = self._progress.tasks[self._id]
        self._progress.update(self._id, completed=task.total or task.completed)


class RichBoard:
    """Live bars (bytes, speed, time left) on a terminal."""

    def __init__(self, stream: TextIO) -> None:
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            # The caller decided this is a terminal (open_board); rich need not guess again.
            console=Console(file=stream, force_terminal=True),
            transient=False,
        )
        self._progress.start()

    def task(self, label: str, total: int, done: int = 0) -> Task:
        return _RichTask(self._progress, self._progress.add_task(label, total=total, completed=done))

    def close(self) -> None:
        self._progress.stop()

    def __enter__(self) -> RichBoard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_board(stream: TextIO | None = None, *, tty: bool | None = None, interval_s: float = 10.0) -> Board:
    """Bars when ``stream`` (stderr by default) is a terminal, plain lines otherwise."""
    out = stream if stream is not None else sys.stderr
    is_tty = out.isatty() if tty is None else tty
    return RichBoard(out) if is_tty else PlainBoard(out, interval_s=interval_s)
