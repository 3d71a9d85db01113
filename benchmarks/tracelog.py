"""A twistd log observer for benchmarks: every line starts with the system-wide monotonic clock
and the pid, so that a server's events line up with the load's records to the microsecond.

    PYTHONPATH=benchmarks twistd --logger tracelog.observer -n graceful ...

Each line is ``MONOTONIC PID TEXT`` (``time.monotonic()`` when the event was written).
"""

from __future__ import annotations

import os
import sys
import time

from twisted.logger import FileLogObserver, formatEvent


def _format(event: dict) -> str:
    text = formatEvent(event).replace("\n", "\\n")
    return f"{time.monotonic():.6f} {os.getpid()} {text}\n"


def observer() -> FileLogObserver:
    """The observer twistd's ``--logger tracelog.observer`` asks for (a callable)."""
    return FileLogObserver(sys.stdout, _format)
