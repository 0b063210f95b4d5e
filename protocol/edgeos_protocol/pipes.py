"""Console scripts end quietly when the reader of their output goes away.

``edgeos twin get --json | head`` closes the pipe after ten lines; the next write raises
``BrokenPipeError``, and without care Python prints a traceback (and, at exit, a second
"Exception ignored" message while flushing ``stdout`` again). Every ``main()`` of the gateway,
the cloud and the simulator is wrapped in :func:`quiet_on_closed_pipe`: it exits with status
141 (128 + SIGPIPE, what a shell reports for ``cat`` in the same place) and prints nothing.
The helper lives here because the gateway and the cloud share code only through the protocol.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections.abc import Callable
from typing import ParamSpec

__all__ = ["EXIT_CLOSED_PIPE", "quiet_on_closed_pipe"]

#: 128 + SIGPIPE: the status of a process the closed pipe would have killed.
EXIT_CLOSED_PIPE = 141

P = ParamSpec("P")


def quiet_on_closed_pipe(main: Callable[P, int]) -> Callable[P, int]:
    """Wrap a console script's ``main``: a closed ``stdout`` ends it quietly with status 141."""

    @functools.wraps(main)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> int:
        try:
            try:
                code = main(*args, **kwargs)
            except SystemExit:  # argparse's --help and usage errors: their output too
                sys.stdout.flush()
                raise
            # Buffered output reaches the pipe here, inside the try, not at interpreter exit.
            sys.stdout.flush()
        except BrokenPipeError:
            _silence_stdout()
            return EXIT_CLOSED_PIPE
        except BaseExceptionGroup as group:  # a write inside a task group
            if group.split(BrokenPipeError)[1] is not None:
                raise
            _silence_stdout()
            return EXIT_CLOSED_PIPE
        return code

    return wrapper


def _silence_stdout() -> None:
    """Point ``stdout`` at /dev/null so the interpreter's final flush has nowhere to fail."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
