"""Stopping a run cleanly on SIGINT (Ctrl-C) and SIGTERM.

The first signal asks the trainer to stop after the step it is in: it finishes the step, writes a
checkpoint and raises `TrainingInterrupted` (the command line prints how to resume and exits 130 or
143). A second signal aborts at once, raising `TrainingInterrupted` with no checkpoint from where the
main process is. Forked loader workers inherit the handler and ignore the signal: the main process
decides when the run stops, so a Ctrl-C in a terminal (sent to every process of the group) does not
kill a worker in the middle of a batch.
"""
from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Optional

__all__ = ["StopSignals", "TrainingInterrupted"]

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(KeyboardInterrupt):
    """The run stopped on a signal: at ``step``, with ``checkpoint`` written (None: aborted at once)."""

    def __init__(self, signum: int, step: int, checkpoint: Optional[Path] = None):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        name = signal.Signals(signum).name
        super().__init__(f"{name} at step {step}" + (f"; checkpoint {checkpoint}" if checkpoint else "; no checkpoint"))

    @property
    def exit_status(self) -> int:
        """128 + the signal number, as a shell reports a process its signal ended (130, 143)."""
        return 128 + self.signum


class StopSignals:
    """Context manager: while open (in the main thread), SIGINT and SIGTERM set `signum` instead of
    killing the process; a second one raises `TrainingInterrupted` (``step()`` gives its step).
    Elsewhere (another thread) it installs nothing and `signum` stays 0."""

    def __init__(self, step=lambda: 0):
        self.signum = 0
        self._step = step
        self._old: dict = {}
        self._pid = os.getpid()

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in _SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old = {}

    def _handle(self, signum: int, frame) -> None:
        if os.getpid() != self._pid:  # a forked loader worker: the main process stops the run
            return
        if self.signum:
            self.__exit__()
            raise TrainingInterrupted(signum, self._step())
        self.signum = signum
        os.write(2, f"\n{signal.Signals(signum).name}: stopping after this step and saving a checkpoint "
                    "(send it again to abort at once)\n".encode())
