"""
``graceful-ctl``: the admin client, speaking AMP over the control socket.

It imports nothing of Twisted (see L{graceful_plugin.ctlclient}): a call costs a few
milliseconds of CPU, not the 200 a reactor's start-up would take from the server's cores.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from graceful_plugin.ctlclient import (
    PROTOCOL_VERSION,
    Connection,
    ConnectionClosed,
    CtlError,
    Deadline,
    RemoteError,
    Restart,
    Status,
    Stop,
    Timeout,
    Unhandled,
    describeConnectFailure,
)
from graceful_plugin.priority import idleForGood

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

__all__ = ["CtlError", "checkVersion", "describeConnectFailure", "main"]


def toJson(value: Any) -> str:
    """
    C{value} as one line of JSON, keys sorted, without the optional fields the server did not
    send (AMP has no null: a field decoded as None was absent).  (C{json} is imported here, not
    at the top: the text output does not need its 1-2 ms.)
    """
    import json

    return json.dumps(_sent(value), sort_keys=True)


def _sent(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _sent(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_sent(v) for v in value]
    return value


#: Seconds a status (or stop) exchange may take, connecting included, unless told otherwise.
STATUS_TIMEOUT = 5.0

#: The longest time any option takes (a socket timeout must fit the kernel's; a year is plenty).
MAX_SECONDS = 365 * 86400.0

#: The least time a look of C{watch} gets when its own deadline is (nearly) reached.
LAST_LOOK = 1.0


def fetchStatus(path: str, deadline: Deadline) -> dict[str, Any]:
    """
    The server's status, as a JSON-friendly dictionary: every field the server sends, the
    ones this client does not know included (see L{graceful_plugin.ampwire.decodeValues}).
    """
    with Connection.open(path, deadline) as connection:
        answer = connection.call(Status, deadline)
        checkVersion(answer["version"])
        # Thousands of listeners do not fit one answer: fetch the rest in batches.
        nextStart = answer.pop("next", -1)
        while nextStart is not None and nextStart >= 0:
            more = connection.call(Status, deadline, start=nextStart)
            answer["listeners"].extend(more["listeners"])
            nextStart = more.get("next", -1)
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


def _balanceText(worker: dict[str, Any]) -> str:
    """
    A process's balance for people: whether it holds accepting now, and how often it held.
    """
    holds = worker.get("holds")
    if holds is None:
        return ""
    return (", holding" if worker.get("holding") else "") + f", held {holds} times"


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
                + _balanceText(w)
                for w in workers
            )
        )
    lines.append(f"live sessions: {total}")
    handedOver = status.get("handedOver")
    if handedOver:
        # (None from an older server; 0 says nothing worth a line.)
        lines.append(f"idle connections handed over by draining generations: {handedOver}")
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


def restart(path: str, args: argparse.Namespace) -> int:
    """
    Ask the server at C{path} to start its successor and follow the handoff to its end, all
    within C{args.timeout} seconds.

    @return: 0 once the successor accepts; 1 when the handoff was rolled back.
    """
    # Our own few milliseconds of CPU stay off the serving process's back, as the successor's
    # start-up does (this client only waits from here on).
    idleForGood()
    overall = Deadline(args.timeout)
    before = fetchStatus(path, Deadline(STATUS_TIMEOUT, overall))
    phases: list[dict[str, Any]] = []

    def progress(phase: dict[str, Any]) -> None:
        phases.append(phase)
        if not args.json:
            print(formatPhase(phase["phase"], phase["ms"], phase["detail"]), flush=True)

    if not args.json:
        print(
            f"restarting pid {before['pid']} (generation {before['generation']}) at {path}",
            flush=True,
        )
    outcome: dict[str, Any]
    with Connection.open(path, overall) as connection:
        sentAt = time.monotonic()
        try:
            answer = connection.call(
                Restart, overall, progress, progress=True, fresh=True if args.fresh else None
            )
            outcome = {
                "ok": True,
                "pid": answer["pid"],
                "generation": answer["generation"],
                "ms": answer["ms"],
            }
        except RemoteError as e:
            outcome = {"ok": False, "error": str(e)}
        except Timeout:
            outcome = {
                "ok": False,
                "error": f"no outcome within {args.timeout:g} s; see `graceful-ctl status`",
            }
        except ConnectionClosed:
            # The server may have exited right after its successor took over, before our
            # answer left: whoever serves now tells.
            after = fetchStatus(path, Deadline(STATUS_TIMEOUT, overall))
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
        except Unhandled:
            raise CtlError("the server does not know how to restart (an older version?)") from None
    outcome["phases"] = phases
    outcome["previous"] = {"pid": before["pid"], "generation": before["generation"]}
    if args.json:
        print(toJson(outcome))
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


def watch(path: str, args: argparse.Namespace) -> int:
    """
    Print the sessions of each generation as they change, until none drains.

    @return: 0 once nothing drains; 1 if something still drains after C{args.timeout} seconds.
    """
    overall = Deadline(args.timeout)
    last: Any = None
    while True:
        # Each look is bounded by STATUS_TIMEOUT and by what is left of the timeout, but gets
        # at least LAST_LOOK (the look that follows the deadline decides too).
        left = overall.remaining()
        look = Deadline(min(STATUS_TIMEOUT, max(left, LAST_LOOK)))
        if left < STATUS_TIMEOUT:
            # Bound by the user's --timeout: a timeout's message names that, not what was left.
            look.seconds = overall.seconds
        status = fetchStatus(path, look)
        key = (
            status["pid"],
            status["state"],
            tuple(item["sessions"] for item in status["listeners"]),
            tuple((d["pid"], d["sessions"]) for d in status["draining"]),
        )
        if key != last:
            last = key
            if args.json:
                print(toJson(status), flush=True)
            else:
                print(formatWatch(status), flush=True)
        if not status["draining"]:
            return 0
        if overall.remaining() < 0:
            print(f"graceful-ctl: still draining after {args.timeout:g} s", file=sys.stderr)
            return 1
        time.sleep(args.interval)


def stop(path: str, args: argparse.Namespace) -> int:
    """
    Ask the server at C{path} to stop gracefully.
    """
    deadline = Deadline(args.timeout)
    with Connection.open(path, deadline) as connection:
        connection.call(Stop, deadline, drainTimeout=args.drain_timeout)
    if args.json:
        print(toJson({"stopping": True}))
    else:
        print(f"stopping the server at {path}")
    return 0


def run(args: argparse.Namespace) -> int:
    path = os.path.abspath(args.control)
    if args.command == "restart":
        return restart(path, args)
    if args.command == "watch":
        return watch(path, args)
    if args.command == "status":
        status = fetchStatus(path, Deadline(args.timeout))
        print(toJson(status) if args.json else formatStatus(status))
        return 0
    if args.command == "stop":
        return stop(path, args)
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
    status.add_argument(
        "--timeout",
        type=_seconds,
        default=STATUS_TIMEOUT,
        help="seconds the server has to answer (default: %(default)g)",
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
    stop.add_argument(
        "--timeout",
        type=_seconds,
        default=STATUS_TIMEOUT,
        help="seconds the server has to answer (default: %(default)g)",
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
    restart.add_argument(
        "--fresh",
        action="store_true",
        help="have the server replace its fork server before starting the successor",
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
    if not value <= MAX_SECONDS:
        raise argparse.ArgumentTypeError(
            f"expected at most {MAX_SECONDS:.0f} seconds (a year), not {text!r}"
        )
    return value


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        code = run(args)
    except CtlError as e:
        print(f"graceful-ctl: {e}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        code = 130
    except Exception as e:
        print(f"graceful-ctl: unexpected error: {type(e).__name__}: {e}", file=sys.stderr)
        code = 1
    sys.exit(code)
