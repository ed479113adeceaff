"""Periodic progress lines on stderr for long loops without a Lightning Trainer (collect, evaluate, imagine).

    collect: 4,096/20,000 conversations (20%), 41 s, about 2 min 40 s left

A `Progress` prints nothing for work that ends within `interval` seconds (the first line comes after
`interval`, then one every `interval`), and a last line when it ends, if it printed any: short commands stay
quiet, long ones show they are alive and how far they got. Lines go to stderr, so stdout keeps only a command's
result (the JSON line of `evaluate` and `collect`).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TextIO, TypeVar

T = TypeVar("T")

DEFAULT_INTERVAL_S = 10.0


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


class Progress:
    def __init__(
        self,
        label: str,
        total: int,
        unit: str = "conversations",
        *,
        interval: float = DEFAULT_INTERVAL_S,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        """
        Args:
            label: what is running, e.g. "collect" or "evaluate · pi_3".
            total: how many units the work has.
            unit: what is counted (plural).
            interval: seconds between lines (and before the first).
            stream: where the lines go (default: stderr at the time of each line).
            clock: seconds, monotonic (tests pass their own).
        """
        self.label, self.total, self.unit = label, int(total), unit
        self.interval, self.stream, self.clock = interval, stream, clock
        self.start = clock()
        self.next_line = self.start + interval
        self.done = 0
        self.printed = 0

    def line(self) -> str:
        elapsed = self.clock() - self.start
        text = f"{self.label}: {self.done:,}/{self.total:,} {self.unit}"
        if self.total > 0:
            text += f" ({100 * self.done // self.total}%)"
        text += f", {_duration(elapsed)}"
        if 0 < self.done < self.total:
            text += f", about {_duration(elapsed * (self.total - self.done) / self.done)} left"
        return text

    def update(self, done: int) -> None:
        """`done` units of `total` are finished; prints a line when `interval` has passed since the last one."""
        self.done = done
        now = self.clock()
        if now >= self.next_line:
            self._print()
            self.next_line = now + self.interval

    def advance(self, count: int = 1) -> None:
        self.update(self.done + count)

    def close(self) -> None:
        """The work ended: a last line, when any line was printed before."""
        if self.printed:
            self._print()

    def _print(self) -> None:
        print(self.line(), file=self.stream or sys.stderr, flush=True)
        self.printed += 1

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()


def with_progress(items: Iterable[T], label: str, total: int, unit: str = "conversations") -> Iterator[T]:
    """`items`, reporting one unit done per item (see `Progress`)."""
    with Progress(label, total, unit) as progress:
        for item in items:
            yield item
            progress.advance()
