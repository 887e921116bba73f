"""Start a process as a terminal starts a foreground command: with Ctrl-C delivered.

A test runner started in the background by a non-interactive shell (``make test &``, many CI
runners) ignores SIGINT, and its children inherit that: Python then installs no
KeyboardInterrupt handler, and a test's Ctrl-C never reaches the run it means to stop.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def sigint_delivered() -> Iterator[None]:
    """Around ``subprocess.Popen``: the child starts with SIGINT at its default action.

    A caught signal is reset to its default in the child by exec, an ignored one stays ignored:
    catch it here for as long as the child takes to start, then put back what was there.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    before = signal.getsignal(signal.SIGINT)
    if before is not signal.SIG_IGN:
        yield
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)
