"""
Successors (and predecessors) for failure tests, speaking the real control protocol.

    python -m tests.fake_successor CONTROL_PATH STEP

A protocol-level fake: STEP is one of connected, hello, fds, adopted (the descriptors adopted
as listening ports, not accepting, the received copies closed), commit.  The process prints
``reached STEP`` (with the count of descriptors after ``fds`` and ``adopted``) and then waits to
be killed.

    python -m tests.fake_successor CONTROL_PATH real:POINT

The real takeover code (L{graceful_plugin.takeover}) serving the demo application, which stops
itself with SIGSTOP at POINT and carries on when it gets SIGCONT: ``ready`` (the application's
readiness hook, before Commit), ``committed`` (the Commit answer just arrived) or ``accepting``
(accepting, about to send Accepting).  It prints ``reached POINT`` first and exits with the
server's exit code.  ``confirmed`` is the odd one: the process kills itself with SIGKILL the
moment the answer to its Accepting arrives; ``older`` stops nowhere, but knows no
AdoptConnection command (answers it UNHANDLED), as a successor of an older version.

    python -m tests.fake_successor CONTROL_PATH zygote

Imports everything once, then forks one real successor per line ``go N`` read on stdin (logging
to ``genN.log``, answering ``pid P``); ``wait P`` reaps child P and answers ``exit P CODE``.  Lets
a test run hundreds of real takeovers without paying for Python's start-up each time.

    python -m tests.fake_successor LISTEN_PATH predecessor:KIND

A fake predecessor listening at LISTEN_PATH: KIND ``version`` answers Hello with a VERSION error;
``pipe`` and ``udp`` hand over a pipe or a UDP socket as if it were a TCP listener; ``old:PORT``
is a predecessor of an older version that knows no Counters command: it hands over a web
listener on 127.0.0.1:PORT and a control socket, and lets the takeover complete; ``noconfirm:PORT``
does the same but never answers Accepting; ``blocking`` hands over a blocking TCP listener (the
port in ``PORT``) and a blocking control listener (``LISTEN_PATH.ctl``), then answers Commit and
Accepting like a real predecessor.
"""

from __future__ import annotations

import gc
import os
import signal
import socket
import sys
from typing import Any

from twisted.application import service
from twisted.internet import defer, task
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.logger import globalLogBeginner, textFileLogObserver
from twisted.protocols import amp

from graceful_plugin import control
from graceful_plugin.control import (
    PROTOCOL_VERSION,
    ClientHandler,
    Commit,
    ControlProtocol,
    Hello,
    TakeOver,
)

STEPS = ("connected", "hello", "fds", "adopted", "commit")
REAL_POINTS = ("ready", "committed", "accepting", "confirmed", "older")
PREDECESSORS = ("version", "pipe", "udp", "old", "noconfirm", "blocking")


def reached(step: str, detail: str = "") -> None:
    print(f"reached {step}{detail}", flush=True)


def stopHere(point: str) -> None:
    reached(point)
    os.kill(os.getpid(), signal.SIGSTOP)
    print(f"continued after {point}", flush=True)


async def run(reactor: Any, path: str, step: str) -> None:
    link = await connectProtocol(
        UNIXClientEndpoint(reactor, path), ControlProtocol(ClientHandler())
    )
    if step == "connected":
        reached(step)
        return await defer.Deferred()
    await link.callRemote(Hello, version=PROTOCOL_VERSION, pid=os.getpid())
    if step == "hello":
        reached(step)
        return await defer.Deferred()
    received = []
    start = 0
    while start >= 0:
        answer = await link.callRemote(TakeOver, start=start)
        received.extend(answer["listeners"])
        start = answer["next"]
    if step == "fds":
        reached(step, f" {len(received)}")
        return await defer.Deferred()
    from twisted.internet.protocol import Factory

    from graceful_plugin.listeners import adoptListener

    ports = []
    for entry in received:
        kind = "unix" if entry["kind"] == control.CONTROL_KIND else entry["kind"]
        ports.append(adoptListener(reactor, entry["fd"], kind, Factory(), entry["name"]))
        os.close(entry["fd"])
    if step == "adopted":
        reached(step, f" {len(ports)}")
        return await defer.Deferred()
    await link.callRemote(Commit)
    reached(step)
    return await defer.Deferred()


def _logToStdout() -> None:
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)], redirectStandardIO=False)


def runGeneration(reactor: Any, path: str, pidfile: str = "", point: str = "") -> int:
    """
    Run one real successor (the demo application) until its reactor stops; its exit code.
    """
    from graceful_plugin.server import GracefulServer, Settings
    from graceful_plugin.web import demoSite

    settings = Settings(
        listeners=[],
        controlPath=os.path.abspath(path),
        takeover=True,
        pidfile=os.path.abspath(pidfile) if pidfile else "",
        drainTimeout=float(os.environ.get("GRACEFUL_TEST_DRAIN", "60")),
    )
    holder: dict[str, GracefulServer] = {}
    ready = (lambda: stopHere("ready")) if point == "ready" else None
    server = GracefulServer(settings, demoSite(lambda: holder["server"].generation), reactor, ready)
    holder["server"] = server
    if point in ("committed", "accepting", "confirmed"):
        original = ControlProtocol.callRemote

        def callRemote(self: ControlProtocol, command: Any, **kw: Any) -> Any:
            if command is control.Accepting and point == "accepting":
                stopHere(point)
            d = original(self, command, **kw)
            if command is control.Accepting and point == "confirmed":
                d.addCallback(lambda _: os.kill(os.getpid(), signal.SIGKILL))
            if command is Commit and point == "committed":

                def stop(answer: Any) -> Any:
                    stopHere(point)
                    return answer

                d.addCallback(stop)
            return d

        ControlProtocol.callRemote = callRemote  # type: ignore[method-assign]
    if point == "older":
        locate = ControlProtocol.locateResponder

        def locateResponder(self: ControlProtocol, name: bytes) -> Any:
            return None if name == control.AdoptConnection.commandName else locate(self, name)

        ControlProtocol.locateResponder = locateResponder  # type: ignore[method-assign]
    top = service.MultiService()
    server.setServiceParent(top)
    reactor.callWhenRunning(top.startService)
    reactor.addSystemEventTrigger("before", "shutdown", top.stopService)
    reactor.run()
    return server.exitCode


def zygote(path: str) -> None:
    """
    Fork one real successor per ``go N`` line on stdin; reap with ``wait P``.
    """
    import twisted.internet.endpoints  # noqa: F401
    import twisted.internet.epollreactor  # noqa: F401
    import twisted.internet.tcp  # noqa: F401
    import twisted.internet.unix  # noqa: F401

    import graceful_plugin.server  # noqa: F401  (imported once, before forking)
    import graceful_plugin.takeover  # noqa: F401
    import graceful_plugin.web  # noqa: F401

    assert "twisted.internet.reactor" not in sys.modules
    # What every child inherits is never garbage: keep its collections (takeover.py collects
    # before connecting) short.
    gc.collect()
    gc.freeze()
    for line in sys.stdin:
        words = line.split()
        if words[:1] == ["go"]:
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    log = os.open(f"gen{words[1]}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                    os.dup2(log, 1)
                    os.dup2(log, 2)
                    os.close(log)
                    devnull = os.open(os.devnull, os.O_RDONLY)
                    os.dup2(devnull, 0)
                    os.close(devnull)
                    from twisted.internet import epollreactor

                    epollreactor.install()
                    from twisted.internet import reactor

                    _logToStdout()
                    code = runGeneration(reactor, path, pidfile="app.pid")
                finally:
                    sys.stdout.flush()
                    os._exit(code)
            print(f"pid {pid}", flush=True)
        elif words[:1] == ["wait"]:
            pid = int(words[1])
            _, status = os.waitpid(pid, 0)
            print(f"exit {pid} {os.waitstatus_to_exitcode(status)}", flush=True)


class _FakePredecessor(amp.AMP):
    def __init__(self, kind: str, path: str = "") -> None:
        super().__init__()
        self.kind = kind
        self.path = path

    @Hello.responder
    def hello(self, version: int, pid: int, standby: bool | None = None) -> dict[str, Any]:
        if self.kind == "version":
            raise control.VersionMismatch(
                f"this server speaks control protocol {PROTOCOL_VERSION + 1}, the successor"
                f" {version}"
            )
        return {"version": PROTOCOL_VERSION, "pid": os.getpid(), "generation": 7}

    @TakeOver.responder
    def takeOver(self, start: int) -> dict[str, Any]:
        if self.kind == "blocking":
            return {"listeners": self._blockingListeners(), "next": -1}
        if self.kind.startswith(("old:", "noconfirm:")):
            web = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            web.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            web.bind(("127.0.0.1", int(self.kind.partition(":")[2])))
            web.listen(128)
            control_ = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            control_.bind(os.path.abspath("old-control.sock"))
            control_.listen(128)
            # As a real predecessor's: the reactor's accept loop must never block.
            web.setblocking(False)
            control_.setblocking(False)
            address = f"127.0.0.1:{web.getsockname()[1]}"
            return {
                "listeners": [
                    {"name": "web", "kind": "tcp", "address": address, "fd": web.detach()},
                    {
                        "name": "control",
                        "kind": control.CONTROL_KIND,
                        "address": os.path.abspath("old-control.sock"),
                        "fd": control_.detach(),
                    },
                ],
                "next": -1,
            }
        if self.kind == "pipe":
            fd, other = os.pipe()
            print(f"handing over pipe {fd}", flush=True)
        else:
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.bind(("127.0.0.1", 0))
            fd = udp.detach()
            print(f"handing over udp {fd}", flush=True)
        return {
            "listeners": [{"name": "web", "kind": "tcp", "address": "127.0.0.1:1", "fd": fd}],
            "next": -1,
        }

    def _blockingListeners(self) -> list[dict[str, Any]]:
        web = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        web.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        web.bind(("127.0.0.1", int(os.environ["PORT"])))
        web.listen(128)
        ctl = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        ctlPath = self.path + ".ctl"
        ctl.bind(ctlPath)
        ctl.listen(16)
        for sock in (web, ctl):
            assert sock.getblocking()
        print("handing over blocking listeners", flush=True)
        address = f"127.0.0.1:{web.getsockname()[1]}"
        return [
            {"name": "web", "kind": "tcp", "address": address, "fd": web.detach()},
            {"name": "control", "kind": "control", "address": ctlPath, "fd": ctl.detach()},
        ]

    @Commit.responder
    def commit(self, dropped: list[str] | None = None) -> dict[str, Any]:
        return {"confirmWithin": 10.0}

    @control.Accepting.responder
    def accepting(self) -> Any:
        print("successor accepting", flush=True)
        if self.kind.startswith("noconfirm:"):
            return defer.Deferred()
        return {}

    @control.Abort.responder
    def abort(self, reason: str) -> dict[str, Any]:
        print(f"successor gave up: {reason}", flush=True)
        return {}

    def connectionLost(self, reason: Any) -> None:
        print(f"connection lost: {reason.getErrorMessage()}", flush=True)
        super().connectionLost(reason)


def predecessor(reactor: Any, path: str, kind: str) -> defer.Deferred[None]:
    from twisted.internet.endpoints import UNIXServerEndpoint
    from twisted.internet.protocol import Factory

    endpoint = UNIXServerEndpoint(reactor, path)
    d = endpoint.listen(Factory.forProtocol(lambda: _FakePredecessor(kind, path)))
    d.addCallback(lambda _: reached("listening"))
    return defer.Deferred()


def main() -> None:
    path, step = sys.argv[1], sys.argv[2]
    if step == "zygote":
        zygote(path)
        return
    if step.startswith("real:"):
        point = step.partition(":")[2]
        if point not in REAL_POINTS:
            raise SystemExit(f"real:POINT takes one of {', '.join(REAL_POINTS)}")
        from twisted.internet import reactor

        _logToStdout()
        code = runGeneration(reactor, path, pidfile="app.pid", point=point)
        sys.stdout.flush()
        os._exit(code)
    if step.startswith("predecessor:"):
        kind = step.partition(":")[2]
        if kind.partition(":")[0] not in PREDECESSORS:
            raise SystemExit(f"predecessor:KIND takes one of {', '.join(PREDECESSORS)}")
        task.react(lambda reactor: predecessor(reactor, path, kind))
        return
    if step not in STEPS:
        raise SystemExit(f"step must be one of {', '.join(STEPS)}")
    task.react(lambda reactor: defer.Deferred.fromCoroutine(run(reactor, path, step)))


if __name__ == "__main__":
    main()
