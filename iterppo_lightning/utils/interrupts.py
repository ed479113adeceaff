"""SIGINT and SIGTERM as an exception, so a command stops where it is, says where, and exits 130 / 143.

`kill`, SLURM and `docker stop` send SIGTERM; Ctrl-C sends SIGINT. Inside `raise_on_interrupt()` either
raises `Interrupted` in the main thread, wherever the process is. That is safe for a run folder because
every durable step of a run is committed atomically (loop/run_state.py): an exception anywhere leaves at most
a temporary file, exactly as a SIGKILL would, and `fit --resume` redoes only the interrupted step.

Lightning's own SIGTERM handler (trainer/connectors/signal_connector.py) only sets a flag that its loops
turn into `SIGTERMException`, a `SystemExit` with status 0, at the next batch: a scheduler would read that
as success. Lightning keeps the handler it finds installed and calls it after its own, so during a phase
fit our handler still runs and raises. `Interrupted` derives from BaseException, so no `except Exception`
on the way swallows it; and Lightning's KeyboardInterrupt branch (which exits 1) never sees SIGINT.

A second signal while the first one is being handled ends the process at once (os._exit): the user asked
twice, and the committed state does not depend on the cleanup.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

INTERRUPT_SIGNALS = (signal.SIGINT, signal.SIGTERM)

_received: int | None = None


class Interrupted(BaseException):
    """A SIGINT or SIGTERM arrived; `where` says what the command was doing and `folder` what it was writing
    (set on the way out by whoever knows, e.g. the loop's current step and its run folder)."""

    def __init__(self, signum: int, where: str | None = None, folder: str | None = None):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)
        self.where = where
        self.folder = folder

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by a signal: 128 + its number (130 SIGINT, 143 SIGTERM)."""
        return 128 + self.signum


def received_signal() -> int | None:
    """The interrupt signal this process got inside `raise_on_interrupt` (None = none)."""
    return _received


def as_interrupt(error: BaseException) -> Interrupted | None:
    """`error` as an Interrupted when a signal caused it (also an error it caused later on the way out, e.g. a
    collective that lost its peer); None for an error no signal caused."""
    if isinstance(error, Interrupted):
        return error
    return Interrupted(_received) if _received is not None else None


def _raise_interrupted(signum: int, frame) -> None:
    global _received
    if _received is not None:
        os._exit(128 + signum)
    _received = signum
    raise Interrupted(signum)


@contextmanager
def raise_on_interrupt() -> Iterator[None]:
    """Inside: SIGINT and SIGTERM raise `Interrupted` (outside a main thread nothing changes)."""
    global _received
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _received = None
    previous = {signum: signal.signal(signum, _raise_interrupted) for signum in INTERRUPT_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
