"""
One log file shared by every generation: twistd's own log file, opened in append mode.

twistd's L{twisted.python.logfile.LogFile} opens an existing file for writing at its current end
and keeps its own offset: a successor started with the same C{--logfile} (a daemon logs to
C{twistd.log} by default) writes over its predecessor's lines, and the predecessor over the
successor's.  A file opened with C{O_APPEND} has every write land at the end of the file, so
each generation's lines arrive whole (one C{write} per event) and in order in the one file the
operator named.

Rotation stays as twistd does it (by size, and on C{SIGUSR1}), with one change for several
writers: a generation whose file was already rotated by another one reopens the new file
instead of rotating it away too.

The log observer reaches twistd through the hook twistd gives applications: an
L{ILogObserver} component on the application, which twistd prefers to its own file observer
(and a C{--logger} given on the command line still wins over it).
"""

from __future__ import annotations

import os
import signal
from typing import Any

from twisted.application import service
from twisted.logger import ILogObserver, textFileLogObserver
from twisted.python import logfile


class AppendLogFile(logfile.LogFile):
    """
    A L{logfile.LogFile} that appends: several processes can write it at once.
    """

    def _openFile(self) -> None:
        self.closed = False
        if self.defaultMode is not None and not os.path.exists(self.path):
            # As LogFile does: never let the file exist with looser permissions for a moment.
            oldUmask = os.umask(0o777)
            try:
                self._file = open(self.path, "ab", 0)
            finally:
                os.umask(oldUmask)
        else:
            self._file = open(self.path, "ab", 0)
        if self.defaultMode is not None:
            try:
                os.chmod(self.path, self.defaultMode)
            except OSError:
                pass
        self.size = self._file.tell()

    def shouldRotate(self) -> bool:
        # The file's real size: the other generations write it too.
        if not self.rotateLength:
            return False
        try:
            self.size = os.fstat(self._file.fileno()).st_size
        except (OSError, ValueError):
            return False
        return bool(self.size >= self.rotateLength)

    def rotate(self) -> None:
        if self._rotatedElsewhere():
            # Another generation rotated the file we write: write the new one, rotate nothing.
            self.reopen()
            return
        super().rotate()

    def _rotatedElsewhere(self) -> bool:
        try:
            ours = os.fstat(self._file.fileno())
        except (OSError, ValueError):
            return False
        try:
            current = os.stat(self.path)
        except FileNotFoundError:
            return True
        return (current.st_dev, current.st_ino) != (ours.st_dev, ours.st_ino)


def fileLogPath(twistdConfig: Any) -> str | None:
    """
    The file twistd would log to with these options, or L{None} when it would log elsewhere
    (C{--syslog}, standard output, a C{--logger} of the operator's).
    """
    if twistdConfig is None:
        return None
    if twistdConfig.get("logger") or twistdConfig.get("syslog"):
        return None
    name = twistdConfig.get("logfile") or ""
    if name == "-" or (twistdConfig.get("nodaemon") and not name):
        return None
    return os.path.abspath(name or "twistd.log")


def appendLogObserver(path: str, installRotation: bool = True) -> Any:
    """
    A text log observer writing to C{path} in append mode, rotated on C{SIGUSR1} as twistd's
    own (unless a handler for it is already set).
    """
    logFile = AppendLogFile.fromFullPath(path)
    if installRotation and not signal.getsignal(signal.SIGUSR1):

        def rotateLog(signum: int, frame: Any) -> None:
            from twisted.internet import reactor

            reactor.callFromThread(logFile.rotate)  # type: ignore[attr-defined]

        signal.signal(signal.SIGUSR1, rotateLog)
    observer = textFileLogObserver(logFile)
    observer.logFile = logFile  # type: ignore[attr-defined]
    return observer


class SharedLogService(service.MultiService):
    """
    The top service of C{twistd graceful}: once twistd makes it part of the application, it
    gives the application an append-mode log observer when twistd would log to a file.
    """

    def __init__(self, twistdConfig: Any = None) -> None:
        super().__init__()
        self.twistdConfig = twistdConfig

    def setServiceParent(self, parent: Any) -> Any:
        result = super().setServiceParent(parent)
        path = fileLogPath(self.twistdConfig)
        componentized = getattr(parent, "setComponent", None)
        if path is not None and componentized is not None:
            if parent.getComponent(ILogObserver, None) is None:
                parent.setComponent(ILogObserver, appendLogObserver(path))
        return result
