"""What a command prints for a person or a pipe: a reader that goes away (``nnoc-trainer fleet status | head``) ends
the output quietly, not with a BrokenPipeError traceback."""

from __future__ import annotations

import os
import sys


def write_out(text: str) -> None:
    """``text`` and a newline on standard output, flushed; a closed pipe silences the rest of the output."""
    try:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)  # the interpreter's own flush at exit must not fail either
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
