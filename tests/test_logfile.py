"""
The log file every generation shares (L{graceful_plugin.logfile}): appended to, never written
over, rotated once however many generations write it.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from pathlib import Path

from twisted.application import service
from twisted.logger import ILogObserver
from twisted.python import logfile
from twisted.trial.unittest import SynchronousTestCase

from graceful_plugin.logfile import AppendLogFile, SharedLogService, fileLogPath


def _tempDir(case: SynchronousTestCase) -> Path:
    """
    A new temporary directory, removed when the test ends.
    """
    directory = Path(tempfile.mkdtemp(prefix="gr-"))
    case.addCleanup(shutil.rmtree, directory, True)
    return directory


class AppendLogFileTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = _tempDir(self)
        self.path = self.directory / "twistd.log"

    def test_twoWritersLoseNothing(self) -> None:
        """
        Two processes' log files on one path, writing in turn, leave every line whole and in
        order; twistd's own LogFile, in the same situation, writes one over the other.
        """
        for cls, intact in ((AppendLogFile, True), (logfile.LogFile, False)):
            self.path.write_bytes(b"")
            first = cls.fromFullPath(str(self.path))
            second = cls.fromFullPath(str(self.path))
            expected = []
            for i in range(50):
                for name, f in (("first", first), ("second", second)):
                    line = f"{name} line {i}\n".encode()
                    f.write(line)
                    expected.append(line)
            first.close()
            second.close()
            self.assertEqual(self.path.read_bytes() == b"".join(expected), intact)

    def test_rotatedOnceBySeveralWriters(self) -> None:
        """
        When one writer rotates the file, another that reaches the size limit too reopens the
        new file instead of rotating again: no line is lost and only one old file exists.
        """
        first = AppendLogFile.fromFullPath(str(self.path), rotateLength=1000)
        second = AppendLogFile.fromFullPath(str(self.path), rotateLength=1000)
        lines = []
        for i in range(60):
            for name, f in (("first", first), ("second", second)):
                line = f"{name} line {i:04d}\n".encode()
                f.write(line)
                lines.append(line)
        first.close()
        second.close()
        files = sorted(p.name for p in self.directory.iterdir())
        written = b"".join(p.read_bytes() for p in self.directory.iterdir())
        self.assertEqual(sorted(written.splitlines(keepends=True)), sorted(lines))
        self.assertGreater(len(files), 1)
        # Never more rotations than the data needs (1,200-odd bytes a rotation of 1,000).
        self.assertLessEqual(len(files), len(b"".join(lines)) // 1000 + 2)

    def test_keepsTheMode(self) -> None:
        """
        A new file gets the default mode, as with twistd's LogFile.
        """
        f = AppendLogFile.fromFullPath(str(self.path), defaultMode=0o640)
        f.write(b"x\n")
        f.close()
        self.assertEqual(os.stat(self.path).st_mode & 0o777, 0o640)


class FileLogPathTests(SynchronousTestCase):
    def test_whenTwistdLogsToAFile(self) -> None:
        """
        A daemon logs to twistd.log by default, any process to its --logfile; standard output,
        syslog and a --logger of the operator's are left to twistd.
        """
        self.assertEqual(
            fileLogPath({"nodaemon": False, "logfile": ""}), os.path.abspath("twistd.log")
        )
        self.assertEqual(
            fileLogPath({"nodaemon": True, "logfile": "a.log"}), os.path.abspath("a.log")
        )
        self.assertIsNone(fileLogPath({"nodaemon": True, "logfile": ""}))
        self.assertIsNone(fileLogPath({"nodaemon": True, "logfile": "-"}))
        self.assertIsNone(fileLogPath({"logfile": "a.log", "syslog": True}))
        self.assertIsNone(fileLogPath({"logfile": "a.log", "logger": object()}))
        self.assertIsNone(fileLogPath(None))

    def test_applicationGetsTheObserver(self) -> None:
        """
        Made part of twistd's application, the service gives it an append-mode log observer,
        which twistd's logger then uses; without a log file it gives none.
        """
        previous = signal.getsignal(signal.SIGUSR1)
        self.addCleanup(signal.signal, signal.SIGUSR1, previous)
        path = _tempDir(self) / "app.log"
        application = service.Application("graceful")
        SharedLogService({"nodaemon": True, "logfile": str(path)}).setServiceParent(application)
        observer = application.getComponent(ILogObserver, None)
        self.assertIsNotNone(observer)
        self.assertIsInstance(observer.logFile, AppendLogFile)
        observer.logFile.close()
        bare = service.Application("graceful")
        SharedLogService({"nodaemon": True, "logfile": ""}).setServiceParent(bare)
        self.assertIsNone(bare.getComponent(ILogObserver, None))
