"""
``twistd graceful`` options: what they accept, the sentences they refuse with, and the pidfile
they take over from twistd.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from twisted.python import usage
from twisted.scripts.twistd import ServerOptions

from graceful_plugin.tap import Options


def parse(args: list[str], cwd: Path | None = None, lowered: list[str] | None = None) -> Options:
    """
    Parse C{args} as ``twistd graceful``'s options (without twistd's own); a takeover's
    lowering of the priority is recorded in C{lowered}, never done to this test process.
    """
    options = Options()
    record = lowered if lowered is not None else []
    options.lowerPriority = lambda: record.append("lowered")  # type: ignore[method-assign]
    if cwd is None:
        options.parseOptions(args)
        return options
    here = os.getcwd()
    os.chdir(cwd)
    try:
        options.parseOptions(args)
    finally:
        os.chdir(here)
    return options


def refused(args: list[str]) -> str:
    """
    The UsageError sentence C{args} are refused with.
    """
    with pytest.raises(usage.UsageError) as raised:
        parse(args)
    message = str(raised.value)
    assert "Traceback" not in message
    return message


def test_defaults(workdir: Path) -> None:
    """
    With only --port, the control socket is graceful.sock in the working directory (absolute)
    and the deadlines are 30, 10 and 60 seconds.
    """
    options = parse(["--port", "8080"], cwd=workdir)
    assert options["control"] == str(workdir / "graceful.sock")
    [spec] = options["ports"]
    assert (spec.kind, spec.port) == ("tcp", 8080)
    assert (options["handoff-timeout"], options["confirm-timeout"]) == (30.0, 0.5)
    assert options["drain-timeout"] == 60.0
    assert options["takeover"] is None
    assert options["pidfile"] == ""


def test_repeatedPorts() -> None:
    """
    --port (and -p) may be repeated; each adds a listener in order.
    """
    options = parse(["--port", "web=8080", "-p", "api=tcp:8081", "--port", "unix:/tmp/a.sock"])
    assert [p.name for p in options["ports"]] == ["web", "api", "unix:/tmp/a.sock"]


def test_timeouts() -> None:
    """
    The deadlines take seconds as numbers.
    """
    options = parse(["--port", "1", "--handoff-timeout", "2.5", "--drain-timeout", "0.1"])
    assert (options["handoff-timeout"], options["drain-timeout"]) == (2.5, 0.1)


@pytest.mark.parametrize(
    "args, words",
    [
        ([], "name at least one listener with --port"),
        (["--port", "tcp:http"], "--port 'tcp:http': the port must be a number"),
        (["--port", "web=8080", "--port", "web=8081"], "the listener name 'web' is given twice"),
        (["--port", "1", "--drain-timeout", "soon"], "--drain-timeout takes a number of seconds"),
        (["--port", "1", "--handoff-timeout", "0"], "--handoff-timeout must be more than 0"),
        (["--port", "1", "--confirm-timeout", "-1"], "--confirm-timeout must be more than 0"),
        (["--port", "1", "--drain-timeout", "inf"], "--drain-timeout must be at most"),
        (["--port", "1", "--handoff-timeout", "nan"], "--handoff-timeout must be more than 0"),
        (["--port", "1", "--drain-timeout", "1e9"], "--drain-timeout must be at most"),
    ],
)
def test_badOptionsRefusedWithASentence(args: list[str], words: str) -> None:
    """
    Bad options are refused with a UsageError sentence that names the problem.
    """
    assert words in refused(args)


def test_takeoverMissingSocket(workdir: Path) -> None:
    """
    --takeover to a path where nothing exists is refused, saying so.
    """
    message = refused(["--takeover", str(workdir / "none.sock")])
    assert "there is no control socket at" in message


def test_takeoverNotASocket(workdir: Path) -> None:
    """
    --takeover to a regular file is refused as not a socket.
    """
    path = workdir / "file"
    path.write_text("")
    assert refused(["--takeover", str(path)]) == f"--takeover: {path} is not a socket"


def test_takeoverStaleSocket(workdir: Path) -> None:
    """
    --takeover to a socket nobody listens on is refused as stale.
    """
    path = workdir / "c.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()
    assert "nothing listens at" in refused(["--takeover", str(path)])


def test_takeoverSetsControlPath(workdir: Path) -> None:
    """
    --takeover PATH (relative) makes PATH, absolute, the control path, and needs no --port;
    the successor's start-up is then lowered to idle priority, once.
    """
    path = workdir / "c.sock"
    live = socket.socket(socket.AF_UNIX)
    live.bind(str(path))
    live.listen(1)
    lowered: list[str] = []
    try:
        options = parse(["--takeover", "c.sock"], cwd=workdir, lowered=lowered)
    finally:
        live.close()
    assert lowered == ["lowered"]
    assert options["takeover"] == "c.sock"
    assert options["control"] == str(path)
    assert options["ports"] == []


def test_pidfileTakenFromTwistd(workdir: Path) -> None:
    """
    The pidfile named to twistd is taken over (absolute) by the plugin and removed from twistd's
    options, so twistd neither refuses a takeover nor deletes a successor's pidfile.
    """
    config = ServerOptions()
    here = os.getcwd()
    os.chdir(workdir)
    try:
        config.parseOptions(["--pidfile", "app.pid", "graceful", "--port", "tcp:0"])
    finally:
        os.chdir(here)
    assert config.subCommand == "graceful"
    assert config["pidfile"] == ""
    assert config.subOptions["pidfile"] == str(workdir / "app.pid")


def test_runningServerRefused(workdir: Path) -> None:
    """
    Starting with --port while the pidfile names a live process is refused, pointing at
    --takeover.
    """
    pidfile = workdir / "app.pid"
    pidfile.write_text(f"{os.getppid()}\n")
    config = ServerOptions()
    with pytest.raises(usage.UsageError) as raised:
        config.parseOptions(["--pidfile", str(pidfile), "graceful", "--port", "tcp:0"])
    message = str(raised.value)
    assert f"a server is already running (pid {os.getppid()}" in message
    assert "--takeover" in message


def test_stalePidfileAccepted(workdir: Path) -> None:
    """
    A pidfile naming a process that no longer exists does not stop a fresh start.
    """
    pidfile = workdir / "app.pid"
    pidfile.write_text("999999999\n")
    config = ServerOptions()
    config.parseOptions(["--pidfile", str(pidfile), "graceful", "--port", "tcp:0"])
    assert config.subOptions["pidfile"] == str(pidfile)
