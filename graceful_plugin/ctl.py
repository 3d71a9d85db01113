"""
``graceful-ctl``: the admin client, speaking AMP over the control socket.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.internet.error import ConnectError, ConnectionClosed, ConnectionRefusedError
from twisted.internet.task import deferLater
from twisted.protocols import amp

from graceful_plugin.control import (
    PROTOCOL_VERSION,
    ClientHandler,
    ControlProtocol,
    HandoffBusy,
    Restart,
    RestartFailed,
    RestartProgress,
    Status,
    Stop,
)


class CtlError(Exception):
    """
    An error to print as one line, exiting non-zero.
    """


def describeConnectFailure(path: str, error: BaseException) -> str:
    """
    One sentence on why C{path} could not be reached.
    """
    if not os.path.exists(path):
        return f"no server at {path}: there is no such socket (is this its --control path?)"
    if isinstance(error, ConnectionRefusedError):
        return f"nothing listens at {path} (a stale socket left by a server that died?)"
    if not os.access(path, os.R_OK | os.W_OK):
        return f"permission denied on {path}: run as the server's user or root"
    return f"cannot connect to {path}: {error}"


class CtlProtocol(ControlProtocol):
    """
    The admin client's end of a control connection: it hears the progress of a restart.
    """

    def __init__(self, onProgress: Callable[[str, float, str], None] | None = None) -> None:
        super().__init__(ClientHandler())
        self.onProgress = onProgress

    @RestartProgress.responder
    def _restartProgress(self, phase: str, ms: float, detail: str) -> dict[str, Any]:
        if self.onProgress is not None:
            self.onProgress(phase, ms, detail)
        return {}


async def connect(
    reactor: Any,
    path: str,
    timeout: float = 5.0,
    onProgress: Callable[[str, float, str], None] | None = None,
) -> ControlProtocol:
    """
    Open a control connection to the server at C{path}.

    @raise CtlError: with a sentence when it cannot be reached.
    """
    endpoint = UNIXClientEndpoint(reactor, path, timeout=timeout)
    try:
        protocol = await connectProtocol(endpoint, CtlProtocol(onProgress))
    except ConnectError as e:
        raise CtlError(describeConnectFailure(path, e)) from None
    assert isinstance(protocol, ControlProtocol)
    return protocol


def hangUp(protocol: ControlProtocol) -> None:
    """
    Close a control connection, if it is still open.
    """
    if protocol.transport is not None:
        protocol.transport.loseConnection()


async def call(protocol: ControlProtocol, command: type[amp.Command], **kw: Any) -> Any:
    """
    Call C{command}; turn a dropped connection into a sentence.
    """
    try:
        return await protocol.callRemote(command, **kw)
    except ConnectionClosed:
        raise CtlError(
            "the server closed the connection (only its own user or root may use it)"
        ) from None
    except amp.UnhandledCommand:
        raise CtlError("the server does not know this command (an older version?)") from None
    except amp.UnknownRemoteError:
        raise CtlError("the server failed to answer; its log says why") from None


async def fetchStatus(reactor: Any, path: str) -> dict[str, Any]:
    """
    The server's status, as a JSON-friendly dictionary.
    """
    protocol = await connect(reactor, path)
    try:
        answer = dict(await call(protocol, Status))
        checkVersion(answer["version"])
        # Thousands of listeners do not fit one answer: fetch the rest in batches.
        nextStart = answer.pop("next", -1)
        while nextStart is not None and nextStart >= 0:
            more = await call(protocol, Status, start=nextStart)
            answer["listeners"].extend(more["listeners"])
            nextStart = more.get("next", -1)
    finally:
        hangUp(protocol)
    # (AMP fills an optional field the server did not send with None: not said, not shown.)
    answer["draining"] = [
        {key: value for key, value in entry.items() if value is not None}
        for entry in answer.get("draining") or []
    ]
    return answer


def checkVersion(version: int) -> None:
    """
    @raise CtlError: the server speaks another version of the control protocol.
    """
    if version != PROTOCOL_VERSION:
        raise CtlError(
            f"the server speaks control protocol {version}, this client"
            f" {PROTOCOL_VERSION}: use the graceful-ctl installed with the server"
        )


def formatStatus(status: dict[str, Any]) -> str:
    """
    Status for people.
    """
    lines = [
        f"pid {status['pid']}, generation {status['generation']}, {status['state']},"
        f" up {status['uptime']:.1f} s"
    ]
    listeners = status["listeners"]
    if listeners:
        lines.append("listeners:")
        width = max(len(item["name"]) for item in listeners)
        for item in listeners:
            lines.append(
                f"  {item['name']:<{width}}  {item['kind']:<7} {item['address']}  "
                f"{'accepting' if item['accepting'] else 'paused'}, {item['sessions']} sessions"
            )
    total = sum(item["sessions"] for item in listeners if item["kind"] != "control")
    workers = status.get("workers") or []
    if len(workers) > 1:
        total = sum(item["sessions"] for item in workers)
        lines.append(
            f"workers: {len(workers)}: "
            + ", ".join(
                f"pid {w['pid'] or '-'} {w['sessions']} sessions"
                + (f" ({w['restarts']} restarts)" if w["restarts"] else "")
                for w in workers
            )
        )
    lines.append(f"live sessions: {total}")
    draining = status["draining"]
    if draining:
        lines.append("draining:")
        for item in draining:
            processes = item.get("workers") or []
            lines.append(
                f"  pid {item['pid']}, generation {item['generation']}, {item['state']}:"
                f" {item['sessions']} sessions"
                + (f" in {len(processes)} processes" if len(processes) > 1 else "")
            )
    else:
        lines.append("draining: none")
    return "\n".join(lines)


def formatPhase(phase: str, ms: float, detail: str) -> str:
    """
    One phase of a restart, for people.
    """
    return f"  {ms:9.1f} ms  {phase:<12} {detail}"


async def restart(reactor: Any, path: str, args: argparse.Namespace) -> int:
    """
    Ask the server at C{path} to start its successor and follow the handoff to its end.

    @return: 0 once the successor accepts; 1 when the handoff was rolled back.
    """
    before = await fetchStatus(reactor, path)
    phases: list[dict[str, Any]] = []

    def progress(phase: str, ms: float, detail: str) -> None:
        phases.append({"phase": phase, "ms": ms, "detail": detail})
        if not args.json:
            print(formatPhase(phase, ms, detail), flush=True)

    if not args.json:
        print(
            f"restarting pid {before['pid']} (generation {before['generation']}) at {path}",
            flush=True,
        )
    protocol = await connect(reactor, path, onProgress=progress)
    outcome: dict[str, Any]
    sentAt = time.monotonic()
    try:
        d = protocol.callRemote(Restart, progress=True)
        d.addTimeout(args.timeout, reactor)
        answer = await d
        outcome = {
            "ok": True,
            "pid": answer["pid"],
            "generation": answer["generation"],
            "ms": answer["ms"],
        }
    except (RestartFailed, HandoffBusy) as e:
        outcome = {"ok": False, "error": str(e)}
    except TimeoutError:
        outcome = {
            "ok": False,
            "error": f"no outcome within {args.timeout:g} s; see `graceful-ctl status`",
        }
    except ConnectionClosed:
        # The server may have exited right after its successor took over, before our answer
        # left: whoever serves now tells.
        after = await fetchStatus(reactor, path)
        if after["generation"] > before["generation"]:
            outcome = {
                "ok": True,
                "pid": after["pid"],
                "generation": after["generation"],
                "ms": (time.monotonic() - sentAt) * 1000,
            }
        else:
            outcome = {
                "ok": False,
                "error": "the server closed the connection before the handoff was decided;"
                f" pid {after['pid']} (generation {after['generation']}) serves",
            }
    except amp.UnhandledCommand:
        raise CtlError("the server does not know how to restart (an older version?)") from None
    finally:
        hangUp(protocol)
    outcome["phases"] = phases
    outcome["previous"] = {"pid": before["pid"], "generation": before["generation"]}
    if args.json:
        print(json.dumps(outcome, sort_keys=True))
    elif outcome["ok"]:
        took = f" in {outcome['ms']:.1f} ms"
        print(
            f"restarted: pid {outcome['pid']} (generation {outcome['generation']}) serves{took};"
            f" pid {before['pid']} drains"
        )
    else:
        print(f"graceful-ctl: restart failed: {outcome['error']}", file=sys.stderr)
    return 0 if outcome["ok"] else 1


def formatWatch(status: dict[str, Any]) -> str:
    """
    One line of C{watch}: who serves with how many sessions, and who drains.
    """
    live = sum(item["sessions"] for item in status["listeners"])
    line = (
        f"{time.strftime('%H:%M:%S')}  generation {status['generation']} (pid {status['pid']})"
        f" {status['state']}: {live} sessions"
    )
    draining = status["draining"]
    line += " | draining: " + (
        ", ".join(
            f"generation {d['generation']} (pid {d['pid']}) {d['sessions']} sessions"
            for d in draining
        )
        if draining
        else "none"
    )
    return line


async def watch(reactor: Any, path: str, args: argparse.Namespace) -> int:
    """
    Print the sessions of each generation as they change, until none drains.

    @return: 0 once nothing drains; 1 if something still drains after C{args.timeout} seconds.
    """
    deadline = time.monotonic() + args.timeout
    last: Any = None
    while True:
        status = await fetchStatus(reactor, path)
        key = (
            status["pid"],
            status["state"],
            tuple(item["sessions"] for item in status["listeners"]),
            tuple((d["pid"], d["sessions"]) for d in status["draining"]),
        )
        if key != last:
            last = key
            if args.json:
                print(json.dumps(status, sort_keys=True), flush=True)
            else:
                print(formatWatch(status), flush=True)
        if not status["draining"]:
            return 0
        if time.monotonic() > deadline:
            print(f"graceful-ctl: still draining after {args.timeout:g} s", file=sys.stderr)
            return 1
        await deferLater(reactor, args.interval, lambda: None)


async def run(reactor: Any, args: argparse.Namespace) -> int:
    path = os.path.abspath(args.control)
    if args.command == "restart":
        return await restart(reactor, path, args)
    if args.command == "watch":
        return await watch(reactor, path, args)
    if args.command == "status":
        status = await fetchStatus(reactor, path)
        print(json.dumps(status, sort_keys=True) if args.json else formatStatus(status))
        return 0
    if args.command == "stop":
        protocol = await connect(reactor, path)
        kw = {} if args.drain_timeout is None else {"drainTimeout": args.drain_timeout}
        try:
            await call(protocol, Stop, **kw)
        finally:
            hangUp(protocol)
        if args.json:
            print(json.dumps({"stopping": True}))
        else:
            print(f"stopping the server at {path}")
        return 0
    raise CtlError(f"unknown command {args.command!r}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="graceful-ctl", description="Control a graceful server over its control socket."
    )
    p.add_argument(
        "--control",
        "-c",
        default="graceful.sock",
        help="the server's control socket (default: ./graceful.sock)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    sub = p.add_subparsers(dest="command", required=True)
    status = sub.add_parser("status", help="who serves, listeners, live and draining sessions")
    status.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output"
    )
    stop = sub.add_parser("stop", help="stop gracefully: stop accepting, drain, exit")
    stop.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output"
    )
    stop.add_argument(
        "--drain-timeout",
        type=_seconds,
        default=None,
        help="seconds to drain (default: the server's)",
    )
    restart = sub.add_parser(
        "restart",
        help="start a successor and follow its handoff: exit 0 once it serves, 1 on rollback",
    )
    restart.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output"
    )
    restart.add_argument(
        "--timeout",
        type=_seconds,
        default=120.0,
        help="seconds to wait for the outcome (default: 120)",
    )
    watch = sub.add_parser(
        "watch", help="show sessions per generation as they change, until none drains"
    )
    watch.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="one JSON status per line"
    )
    watch.add_argument(
        "--timeout",
        type=_seconds,
        default=300.0,
        help="give up (exit 1) after this many seconds (default: 300)",
    )
    watch.add_argument(
        "--interval", type=_seconds, default=0.5, help="seconds between looks (default: 0.5)"
    )
    return p


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, not {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected more than 0 seconds, not {text!r}")
    return value


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    from twisted.internet import reactor

    result: dict[str, int] = {"code": 1}

    def done(code: int) -> None:
        result["code"] = code

    def failed(failure: Any) -> None:
        if failure.check(CtlError):
            print(f"graceful-ctl: {failure.getErrorMessage()}", file=sys.stderr)
        else:
            print(
                f"graceful-ctl: unexpected error: {failure.type.__name__}:"
                f" {failure.getErrorMessage()}",
                file=sys.stderr,
            )

    def start() -> None:
        d = Deferred.fromCoroutine(run(reactor, args))
        d.addCallbacks(done, failed)
        d.addBoth(lambda _: reactor.stop())  # type: ignore[attr-defined]

    reactor.callWhenRunning(start)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
    sys.exit(result["code"])
