"""The seed article's experiment: many clients each downloading 100 MB while the server restarts.

    python benchmarks/article.py                       # 60 clients x 100 MiB, plain vs graceful
    python benchmarks/article.py --clients 8 --size 16777216 --json a.json --plot a.png

The article ("Graceful Restart with Boost.Asio", 2012) ran 60 clients, each downloading 100 MB,
against a server restarted in the middle. A plain restart (stop the server, one second of dead
time, start it again) cost 4 downloads cut short (EOF mid-body) and 10 connections refused
(ECONNREFUSED); a graceful one cost nothing. This does the same on 127.0.0.1:

- ``--clients`` clients (threads) start one download each of ``--size`` bytes, their starts
  spread evenly over ``--spread`` seconds, as the article's MPI ranks came one after another;
  a client that fails does not retry (as in the article, each client reports one outcome);
- ``--restart-at`` seconds after the first start, the server restarts, one way per ``--mode``:

  plain
      a plain twisted.web server serving the same ``/bytes/N`` (``reuseport_server.py`` without
      ``SO_REUSEPORT``): SIGTERM, wait for its exit, ``--down-time`` seconds (the article's one
      second), start a new one. Downloads in flight are cut; clients arriving meanwhile are
      refused.
  graceful
      ``twistd graceful --takeover``: the successor takes the listening socket over, the old
      process finishes its downloads and exits by itself.

Each download ends ``ok`` (every byte), ``eof`` (the connection closed mid-body, the article's
``asio.misc:2``), ``refused`` (its ``system:111``), ``reset``, ``timeout`` or ``other``.
Standard library plus ``loadtest.py``'s process handling; ``--plot`` needs matplotlib (the
``bench`` extra). Every process started is killed and reaped and every temporary file removed
at the end, on Ctrl-C and on errors too.
"""

import argparse
import json
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import loadtest  # noqa: E402  (this folder, as loadtest.py imports bytes_resource)
from loadtest import HOST, OUTCOMES, Children, PrematureEOF, classify  # noqa: E402

#: What the article reported for its 60 clients x 100 MB (its "Restart" and "Graceful Restart").
ARTICLE = {
    "plain": {"clients": 60, "eof": 4, "refused": 10},
    "graceful": {"clients": 60, "eof": 0, "refused": 0},
}

MODES = ("plain", "graceful")


def download(port: int, size: int, timeout: float, rate: float) -> tuple[str, int, str]:
    """One download of ``size`` bytes: its outcome, the body bytes received, and a message for
    an ``other`` failure. ``rate`` (bytes per second, 0 for none) caps how fast it reads."""
    received = 0
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    began = time.monotonic()
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as sock:
            sock.sendall(b"GET /bytes/%d HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % size)
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = sock.recv(65536)
                if not chunk:
                    raise PrematureEOF("connection closed before the headers")
                head += chunk
            head, rest = head.split(b"\r\n\r\n", 1)
            if not head.startswith(b"HTTP/1.1 200"):
                raise loadtest.BadResponse(head.split(b"\r\n", 1)[0].decode(errors="replace"))
            received = len(rest)
            while received < size:
                n = sock.recv_into(view)
                if not n:
                    raise PrematureEOF("connection closed mid-body")
                received += n
                if rate:
                    ahead = received / rate - (time.monotonic() - began)
                    if ahead > 0:
                        time.sleep(ahead)
        if received != size:
            raise loadtest.BadResponse(f"body of {received} bytes, expected {size}")
        return "ok", received, ""
    except Exception as exc:  # every failure is classified and counted, none is lost
        outcome = classify(exc)
        return outcome, received, f"{type(exc).__name__}: {exc}" if outcome == "other" else ""


def run_mode(mode: str, args: argparse.Namespace) -> dict:
    """Serve, start the clients, restart once, wait for every client; return the numbers."""
    tmp = Path(tempfile.mkdtemp(prefix=f"graceful-article-{mode}-"))
    children = Children(tmp)
    try:
        port = loadtest.free_port()
        options = argparse.Namespace(
            start_timeout=args.start_timeout,
            drain_timeout=args.timeout + 30,
            down_time=args.down_time,
            naive_server="standalone",
            twistd=args.twistd,
            successor_priority="idle",
        )
        cls = loadtest.NaiveRestarter if mode == "plain" else loadtest.GracefulRestarter
        restarter = cls(children, port, options)
        restarter.start()
        records: list[dict | None] = [None] * args.clients
        origin = time.monotonic() + 0.2

        def client(index: int) -> None:
            start = origin + index * args.spread / max(1, args.clients)
            time.sleep(max(0.0, start - time.monotonic()))
            began = time.monotonic()
            outcome, received, message = download(port, args.size, args.timeout, args.rate)
            records[index] = {
                "client": index,
                "start": began - origin,
                "end": time.monotonic() - origin,
                "outcome": outcome,
                "received": received,
                "message": message,
            }

        threads = [
            threading.Thread(target=client, args=(i,), daemon=True) for i in range(args.clients)
        ]
        for thread in threads:
            thread.start()
        time.sleep(max(0.0, origin + args.restart_at - time.monotonic()))
        event = restarter.restart()
        event = {
            **event,
            "start": event["start"] - origin,
            "end": event["end"] - origin,
        }
        deadline = time.monotonic() + args.timeout + args.size / max(args.rate, 1) + 60
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if any(thread.is_alive() for thread in threads):
            raise RuntimeError("clients still downloading at the deadline")
        done = [r for r in records if r is not None]
        alive = restarter.current.poll() is None
        restarter.stop()
        counts = Counter(r["outcome"] for r in done)
        return {
            "mode": mode,
            "server": restarter.server_kind,
            "clients": args.clients,
            "size": args.size,
            "by_outcome": {name: counts.get(name, 0) for name in OUTCOMES},
            "failed": sum(counts.get(name, 0) for name in OUTCOMES[1:]),
            "bytes": sum(r["received"] for r in done),
            "restart": event,
            "server_alive_at_end": alive,
            "others": Counter(r["message"] for r in done if r["message"]),
            "records": done,
        }
    finally:
        with loadtest.signals_held():
            children.kill_all()
            if args.keep_tmp:
                print(f"kept {tmp}", file=sys.stderr)
            else:
                shutil.rmtree(tmp, ignore_errors=True)


def table(runs: list[dict]) -> str:
    """One line per mode: outcomes, then the article's counts for comparison."""
    head = ["mode", "clients", *OUTCOMES, "failed", "restart s", "GB moved"]
    rows = [head]
    for run in runs:
        restart = run["restart"]
        rows.append(
            [run["mode"], run["clients"], *run["by_outcome"].values(), run["failed"]]
            + [f"{restart['end'] - restart['start']:.2f}", f"{run['bytes'] / 1e9:.2f}"]
        )
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(head))]
    lines = [
        "  ".join(
            str(cell).rjust(width) if column else str(cell).ljust(width)
            for column, (cell, width) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    for mode, seen in ARTICLE.items():
        lines.append(
            f"article, {mode}: {seen['clients']} clients x 100 MB: {seen['eof']} EOF mid-body,"
            f" {seen['refused']} ECONNREFUSED"
        )
    for run in runs:
        if run["mode"] == "graceful":
            verdict = "PASS" if run["failed"] == 0 and "failed" not in run["restart"] else "FAIL"
            lines.append(f"target (graceful): no failed download: {verdict}")
        if "failed" in run["restart"]:
            lines.append(f"  {run['mode']}: the restart failed: {run['restart']['failed']}")
        for message, count in run["others"].items():
            lines.append(f"  {run['mode']}: other x{count}: {message}")
    return "\n".join(lines)


COLOURS = {
    "ok": "tab:green",
    "eof": "tab:red",
    "refused": "tab:orange",
    "reset": "tab:purple",
    "timeout": "tab:brown",
    "other": "tab:gray",
}


def plot(runs: list[dict], path: Path) -> None:
    """One panel per mode: each client's download as a bar over time, coloured by outcome, the
    restart shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(runs), 1, figsize=(11, 3.4 * len(runs)), squeeze=False)
    for ax, run in zip((row[0] for row in axes), runs, strict=True):
        for r in run["records"]:
            ax.barh(
                r["client"],
                max(r["end"] - r["start"], 0.02),
                left=r["start"],
                color=COLOURS[r["outcome"]],
                height=0.8,
            )
        restart = run["restart"]
        # From the restart's start until the old process has exited (plain: and the new one
        # serves).
        ax.axvspan(restart["start"], restart["end"], color="0.9", zorder=0)
        counts = ", ".join(f"{n} {k}" for k, n in run["by_outcome"].items() if n)
        ax.set_title(
            f"{run['mode']}: {run['clients']} clients x {run['size'] / 2**20:.0f} MiB: {counts}"
        )
        ax.set_ylabel("client")
        ax.set_xlabel("seconds")
        handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in [*COLOURS.values(), "0.9"]]
        ax.legend(
            handles,
            [*COLOURS, "restart"],
            loc="upper left",
            bbox_to_anchor=(1.01, 1.0),
            fontsize="small",
        )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Read and check the command line."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--mode", action="append", choices=MODES, help="restart method, repeatable (default: both)")
    add("--clients", type=int, default=60, help="clients, one download each (default 60)")
    add("--size", type=int, default=100 * 1024 * 1024, help="bytes per download (100 MiB)")
    add("--spread", type=float, default=6.0, help="seconds over which client starts are spread")
    add("--restart-at", type=float, help="seconds after the first start (default: spread / 3)")
    add("--down-time", type=float, default=1.0, help="plain mode: seconds with no server (1)")
    add("--rate", type=float, default=0.0, help="bytes per second each client reads at most")
    add("--timeout", type=float, default=30.0, help="socket timeout of a client, seconds")
    add("--start-timeout", type=float, default=30.0, help="seconds a server may take to start")
    add("--twistd", default=str(Path(sys.executable).with_name("twistd")), help="twistd to run")
    add("--hard-timeout", type=float, default=600.0, help="abort the whole run after this long")
    add("--json", type=Path, help="write every number to this file")
    add("--plot", type=Path, help="draw a PNG here (needs matplotlib)")
    add("--keep-tmp", action="store_true", help="keep logs and sockets for reading")
    args = parser.parse_args(argv)
    args.mode = args.mode or list(MODES)
    if args.restart_at is None:
        # Early enough that clients still arrive after a plain restart's new server is up.
        args.restart_at = args.spread / 3
    if args.clients < 1 or args.size < 1:
        parser.error("--clients and --size must be at least 1")
    if min(args.spread, args.restart_at, args.down_time, args.rate) < 0 or args.timeout <= 0:
        parser.error("times and rates must not be negative (and --timeout more than 0)")
    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("--plot needs matplotlib (pip install 'graceful[bench]')")
    if "graceful" in args.mode and not loadtest.graceful_available(args.twistd):
        parser.error(f"'{args.twistd} graceful' does not run here: no graceful mode")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run each mode, print the table, write the JSON and the plot; 2 when a run broke."""
    args = parse_args(argv)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, loadtest.raise_on_signal(KeyboardInterrupt()))
    signal.signal(
        signal.SIGALRM,
        loadtest.raise_on_signal(loadtest.HardTimeout(f"run exceeded {args.hard_timeout:.0f} s")),
    )
    signal.setitimer(signal.ITIMER_REAL, args.hard_timeout)
    runs = []
    try:
        for mode in args.mode:
            print(
                f"{mode}: {args.clients} clients x {args.size} bytes, starts over"
                f" {args.spread:g} s, restart at {args.restart_at:g} s",
                file=sys.stderr,
                flush=True,
            )
            runs.append(run_mode(mode, args))
    except (loadtest.ServerDied, loadtest.HardTimeout, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: every process stopped, temporary files removed", file=sys.stderr)
        return 130
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    print(table(runs))
    if args.json is not None:
        document = {"machine": loadtest.machine(), "config": vars(args), "runs": runs}
        args.json.write_text(json.dumps(document, indent=1, default=str) + "\n")
    if args.plot is not None:
        plot(runs, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
