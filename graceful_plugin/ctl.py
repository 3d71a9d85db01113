"""
``graceful-ctl``: the admin client, speaking AMP over the control socket.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.internet.error import ConnectError, ConnectionClosed, ConnectionRefusedError
from twisted.protocols import amp

from graceful_plugin.control import PROTOCOL_VERSION, ClientHandler, ControlProtocol, Status, Stop


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


async def connect(reactor: Any, path: str, timeout: float = 5.0) -> ControlProtocol:
    """
    Open a control connection to the server at C{path}.

    @raise CtlError: with a sentence when it cannot be reached.
    """
    endpoint = UNIXClientEndpoint(reactor, path, timeout=timeout)
    try:
        protocol = await connectProtocol(endpoint, ControlProtocol(ClientHandler()))
    except ConnectError as e:
        raise CtlError(describeConnectFailure(path, e)) from None
    assert isinstance(protocol, ControlProtocol)
    return protocol


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


async def fetchStatus(reactor: Any, path: str) -> dict[str, Any]:
    """
    The server's status, as a JSON-friendly dictionary.
    """
    protocol = await connect(reactor, path)
    try:
        answer = await call(protocol, Status)
    finally:
        protocol.transport.loseConnection()
    if answer["version"] != PROTOCOL_VERSION:
        raise CtlError(
            f"the server speaks control protocol {answer['version']}, this client"
            f" {PROTOCOL_VERSION}: use the graceful-ctl installed with the server"
        )
    return dict(answer)


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
    lines.append(f"live sessions: {total}")
    draining = status["draining"]
    if draining:
        lines.append("draining:")
        for item in draining:
            lines.append(
                f"  pid {item['pid']}, generation {item['generation']}, {item['state']}:"
                f" {item['sessions']} sessions"
            )
    else:
        lines.append("draining: none")
    return "\n".join(lines)


async def run(reactor: Any, args: argparse.Namespace) -> int:
    path = os.path.abspath(args.control)
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
            protocol.transport.loseConnection()
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
        "--drain-timeout", type=float, default=None, help="seconds to drain (default: the server's)"
    )
    return p


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
            print(f"graceful-ctl: {failure.getTraceback()}", file=sys.stderr)

    def start() -> None:
        d = Deferred.fromCoroutine(run(reactor, args))
        d.addCallbacks(done, failed)
        d.addBoth(lambda _: reactor.stop())  # type: ignore[attr-defined]

    reactor.callWhenRunning(start)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
    sys.exit(result["code"])
