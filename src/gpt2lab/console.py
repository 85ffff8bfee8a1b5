"""Printing that survives the loss of its reader.

`gpt2lab train ... | tee log` and Ctrl-C: the same Ctrl-C ends `tee`, so the next line written
meets a closed pipe (EPIPE); a closed terminal answers writes with EIO. Neither may stop a run
from saving its checkpoint: output is what is lost, never the work.
"""

from __future__ import annotations

import errno
import os
import sys
from typing import Callable

# The reader of a pipe has gone; the terminal has hung up.
_READER_GONE = (errno.EPIPE, errno.EIO)


def reader_gone(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in _READER_GONE


def detach_stdout() -> None:
    """Point stdout at /dev/null, so that later writes, and the flush of Python's buffers at
    exit, have somewhere to go."""
    try:
        descriptor = sys.stdout.fileno()
    except (OSError, ValueError):  # not a real file (a test's capture): nothing to repoint
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, descriptor)
    finally:
        os.close(devnull)


class Console:
    """Writes lines with `write` until its reader goes; from then on writes nothing, and calls
    `on_gone` once (to silence whatever else writes to the same place)."""

    def __init__(self, write: Callable[[str], None], on_gone: Callable[[], None] | None = None):
        self._write = write
        self._on_gone = on_gone
        self.gone = False

    def __call__(self, line: str) -> None:
        if self.gone:
            return
        try:
            self._write(line)
        except OSError as error:
            if not reader_gone(error):
                raise
            self.lost()

    def lost(self) -> None:
        if self.gone:
            return
        self.gone = True
        detach_stdout()
        if self._on_gone is not None:
            self._on_gone()
