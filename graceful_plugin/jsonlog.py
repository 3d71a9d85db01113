"""
Structured logs: one JSON object per line, for journald, log shippers and C{jq}.

Each line is a complete JSON object holding every field of the event as
L{twisted.logger.eventAsJSON} encodes it (the named fields given to C{log.info(...)},
C{log_namespace}, C{log_time}, ...), plus:

  - C{text}: the formatted message, as a text observer would print it;
  - C{level}: the level's name (C{debug}, C{info}, C{warn}, C{error}, C{critical});
  - C{traceback}: the traceback, for events logged with C{log.failure(...)}.

With twistd, C{twistd --logger graceful_plugin.jsonlog.stdoutObserver -n graceful ...} logs
JSON lines to standard output, which suits systemd's journal. Several processes of one service
(a predecessor and its successor) may share standard output or a file opened in append mode,
since each event is written with a single C{write} of a whole line.
"""

from __future__ import annotations

import sys
from typing import IO, Any

from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    LogEvent,
    eventAsJSON,
    formatEvent,
)


def formatEventAsJSONLine(event: LogEvent) -> str:
    """
    Format one event as a line of JSON.

    The event itself is left untouched (observers share it): the fields are added to a copy.

    @param event: a log event.
    @return: one JSON object followed by a newline; the object has no newline inside.
    """
    record = dict(event)
    record["text"] = formatEvent(event)
    level = event.get("log_level")
    if level is not None:
        record["level"] = getattr(level, "name", str(level))
    failure = event.get("log_failure")
    if failure is not None:
        try:
            record["traceback"] = failure.getTraceback()
        except Exception as e:  # a broken failure must not lose the event
            record["traceback"] = f"(unable to format the traceback: {e!r})"
    return eventAsJSON(record) + "\n"


def jsonLinesObserver(stream: IO[Any]) -> ILogObserver:
    """
    Make an observer writing one JSON object per event, one per line, to C{stream}.

    @param stream: a writable text stream (or a binary one, which receives UTF-8); it is flushed
        after each event.
    @return: the observer, to give to C{globalLogBeginner.beginLoggingTo} or to set as the
        application's L{ILogObserver} component.
    """
    return FileLogObserver(stream, formatEventAsJSONLine)


def stdoutObserver() -> ILogObserver:
    """
    A JSON-lines observer on standard output: a log observer factory for C{twistd --logger}.

    @return: the observer.
    """
    return jsonLinesObserver(sys.stdout)


def observerForOption(value: str, stdout: IO[Any] | None = None) -> ILogObserver:
    """
    Make the observer for a C{--log-json} style command-line option.

    @param value: C{-} for standard output, otherwise a file path, opened in append mode (so
        that a predecessor and its successor writing to the same file do not overwrite each
        other's lines) and line buffered.
    @param stdout: the stream for C{-}; L{sys.stdout} when L{None}.
    @return: the observer.
    @raise OSError: when the file cannot be opened.
    """
    if value == "-":
        return jsonLinesObserver(stdout if stdout is not None else sys.stdout)
    return jsonLinesObserver(open(value, "a", buffering=1, encoding="utf-8"))
