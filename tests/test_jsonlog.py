"""
Tests for L{graceful_plugin.jsonlog}: every event becomes one line holding one complete JSON
object, with the formatted message and the named fields.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any, cast

from twisted.logger import ILogObserver, Logger, LogLevel, LogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from graceful_plugin.jsonlog import (
    formatEventAsJSONLine,
    jsonLinesObserver,
    observerForOption,
    stdoutObserver,
)

REPO = Path(__file__).resolve().parent.parent
CHILD_TIMEOUT = 30.0


class Unserializable:
    """
    An object JSON cannot encode, with a readable C{repr}.
    """

    def __repr__(self) -> str:
        return "<Unserializable thing>"


def _records(text: str) -> list[dict[str, Any]]:
    """
    Parse output that must be complete JSON objects, one per line, each line ending in a newline.
    """
    assert text.endswith("\n"), repr(text)
    return [json.loads(line) for line in text.splitlines()]


class JSONLinesObserverTests(SynchronousTestCase):
    """
    L{jsonLinesObserver} writes one parseable JSON object per event and line.
    """

    def setUp(self) -> None:
        self.stream = io.StringIO()
        self.observer = jsonLinesObserver(self.stream)
        self.seen: list[dict[str, Any]] = []
        self.publisher = LogPublisher(self.observer, cast(ILogObserver, self.seen.append))
        self.log = Logger(namespace="graceful.test", observer=self.publisher)

    def test_providesILogObserver(self) -> None:
        """
        The observer provides L{ILogObserver}.
        """
        self.assertTrue(verifyObject(ILogObserver, self.observer))

    def test_namedFields(self) -> None:
        """
        An event with named fields comes out as one JSON line with those fields, the formatted
        message under C{text}, the level's name under C{level}, and the namespace and time.
        """
        self.log.info("handoff to {pid} committed in {ms:.1f} ms", pid=4242, ms=7.25)
        [record] = _records(self.stream.getvalue())
        self.assertEqual(record["text"], "handoff to 4242 committed in 7.2 ms")
        self.assertEqual(record["pid"], 4242)
        self.assertEqual(record["ms"], 7.25)
        self.assertEqual(record["level"], "info")
        self.assertEqual(record["log_namespace"], "graceful.test")
        self.assertEqual(record["log_format"], "handoff to {pid} committed in {ms:.1f} ms")
        self.assertIsInstance(record["log_time"], float)

    def test_oneLinePerEvent(self) -> None:
        """
        Each event is exactly one line, even when the message and fields contain newlines.
        """
        self.log.warn("first\nline {detail}", detail="a\nb")
        self.log.error("second")
        records = _records(self.stream.getvalue())
        self.assertEqual([r["text"] for r in records], ["first\nline a\nb", "second"])
        self.assertEqual([r["level"] for r in records], ["warn", "error"])
        self.assertEqual(records[0]["detail"], "a\nb")

    def test_eventNotModified(self) -> None:
        """
        Formatting does not change the event other observers receive.
        """
        self.log.info("hello {name}", name="world")
        [event] = self.seen
        self.assertNotIn("text", event)
        self.assertNotIn("level", event)
        self.assertNotIn("log_flattened", event)
        self.assertIs(event["log_level"], LogLevel.info)

    def test_unserializableField(self) -> None:
        """
        A field JSON cannot encode still gives a complete line, and the message shows it.
        """
        self.log.info("got {thing!r}", thing=Unserializable())
        [record] = _records(self.stream.getvalue())
        self.assertEqual(record["text"], "got <Unserializable thing>")
        self.assertEqual(record["thing"], {"unpersistable": True})

    def test_failure(self) -> None:
        """
        An event logged with C{log.failure} carries the formatted traceback under C{traceback}.
        """
        try:
            raise RuntimeError("successor vanished")
        except RuntimeError:
            self.log.failure("handoff to {pid} failed", pid=12)
        [record] = _records(self.stream.getvalue())
        self.assertEqual(record["text"], "handoff to 12 failed")
        self.assertEqual(record["pid"], 12)
        self.assertEqual(record["level"], "critical")
        self.assertIn("RuntimeError: successor vanished", record["traceback"])
        self.assertIn("test_failure", record["traceback"])

    def test_binaryStream(self) -> None:
        """
        A binary stream receives the line encoded as UTF-8.
        """
        stream = io.BytesIO()
        Logger(observer=jsonLinesObserver(stream)).info("caf\u00e9 {n}", n=1)
        [record] = _records(stream.getvalue().decode("utf-8"))
        self.assertEqual(record["text"], "caf\u00e9 1")

    def test_formatEventAsJSONLine(self) -> None:
        """
        A bare event dictionary without a format still gives a complete line with empty text.
        """
        line = formatEventAsJSONLine({"log_time": 1.0, "answer": 42})
        self.assertEqual(line.count("\n"), 1)
        self.assertEqual(json.loads(line), {"log_time": 1.0, "answer": 42, "text": ""})


class ObserverForOptionTests(SynchronousTestCase):
    """
    L{observerForOption} and L{stdoutObserver} choose where the lines go.
    """

    def test_dash(self) -> None:
        """
        C{-} writes to the given standard output.
        """
        stream = io.StringIO()
        Logger(observer=observerForOption("-", stdout=stream)).info("x {y}", y=1)
        [record] = _records(stream.getvalue())
        self.assertEqual((record["text"], record["y"]), ("x 1", 1))

    def test_stdoutObserver(self) -> None:
        """
        L{stdoutObserver} (the C{twistd --logger} factory) writes to C{sys.stdout}.
        """
        stream = io.StringIO()
        self.patch(sys, "stdout", stream)
        Logger(observer=stdoutObserver()).info("to {where}", where="stdout")
        [record] = _records(stream.getvalue())
        self.assertEqual(record["where"], "stdout")

    def test_pathAppends(self) -> None:
        """
        A path is opened in append mode: two observers on one file (a predecessor and its
        successor) keep every line of both and of what was there before.
        """
        directory = tempfile.mkdtemp(prefix="graceful-")
        self.addCleanup(shutil.rmtree, directory, True)
        path = os.path.join(directory, "log.json")
        with open(path, "w") as f:
            f.write('{"text": "earlier"}\n')
        first = observerForOption(path)
        second = observerForOption(path)
        for observer in (first, second):
            # The observer owns its file for the life of the process; a test closes it.
            self.addCleanup(observer._outFile.close)  # type: ignore[attr-defined]
        Logger(observer=first).info("from {gen}", gen=1)
        Logger(observer=second).info("from {gen}", gen=2)
        Logger(observer=first).info("from {gen}", gen=1)
        with open(path) as f:
            records = _records(f.read())
        self.assertEqual([r["text"] for r in records], ["earlier", "from 1", "from 2", "from 1"])

    def test_twistdLogger(self) -> None:
        """
        C{twistd --logger graceful_plugin.jsonlog.stdoutObserver} makes a real twistd process
        log JSON lines, including an application's event with its named fields.
        """
        directory = tempfile.mkdtemp(prefix="graceful-")
        self.addCleanup(shutil.rmtree, directory, True)
        tac = os.path.join(directory, "app.tac")
        with open(tac, "w") as f:
            f.write(
                textwrap.dedent(
                    """
                    from twisted.application import service
                    from twisted.logger import Logger

                    class Once(service.Service):
                        log = Logger()

                        def startService(self):
                            from twisted.internet import reactor
                            self.log.info("started {name} on {port}", name="demo", port=8080)
                            reactor.callLater(0, reactor.stop)

                    application = service.Application("demo")
                    Once().setServiceParent(application)
                    """
                )
            )
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        child = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from twisted.scripts.twistd import run; run()",
                "--logger",
                "graceful_plugin.jsonlog.stdoutObserver",
                "--pidfile=",
                "-n",
                "-y",
                tac,
            ],
            cwd=directory,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            out, err = child.communicate(timeout=CHILD_TIMEOUT)
        finally:
            if child.poll() is None:
                child.kill()
                child.communicate()
        self.assertEqual(child.returncode, 0, err)
        records = _records(out.decode("utf-8"))
        [started] = [r for r in records if r.get("name") == "demo"]
        self.assertEqual(started["text"], "started demo on 8080")
        self.assertEqual(started["port"], 8080)
        self.assertTrue(all("text" in r and "level" in r for r in records))
