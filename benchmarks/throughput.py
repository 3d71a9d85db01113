"""Steady-state requests per second: graceful's demo app next to plain ``twistd web``, and
graceful with ``--metrics`` (scraped every ``--scrape-interval`` seconds) next to graceful without.

    python benchmarks/throughput.py --duration 5 --rounds 3 --json throughput.json

Both servers run at once on their own ports, and serve the same application: graceful's demo
app, which ``twistd web`` serves too (``demo_resource.DemoTree``: the same resources, traversal
and body producer), so that only the servers differ.  The load meets them in turn, alternating
the order each round.  Each server's CPU time (user + system, from ``/proc``) per request served
is printed next to its requests per second: it depends far less than requests per second on
what else the machine runs.
Each request opens a new connection unless ``--keepalive``. The load generator is ``wrk`` when it
is installed (one thread, leaving the other core to the server), else client processes of
``loadtest.py``. Targets: graceful serves at least 97% of the requests per second of twistd web,
and graceful with --metrics at least 98% of graceful without.

``--baseline REV`` adds a fourth server in the same rounds: graceful as it was at git revision
REV of this checkout (its package extracted with ``git archive`` and put first on
``PYTHONPATH``), to measure a change before and after in one run.
"""

import argparse
import io
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from loadtest import (
    HERE,
    HOST,
    Children,
    HardTimeout,
    LoadSpec,
    ServerDied,
    Workers,
    accepts_connections,
    free_port,
    graceful_available,
    machine,
    raise_on_signal,
    run_client,
    signals_held,
    wait_until,
)

TARGET_RATIO = 0.97
"""Graceful's requests per second over twistd web's, at least."""

METRICS_TARGET_RATIO = 0.98
"""Graceful's requests per second with --metrics over without, at least."""

SERVERS = ("graceful", "metrics", "web")

LABELS = {
    "graceful": "graceful",
    "metrics": "graceful --metrics",
    "web": "twistd web",
    "baseline": "graceful at baseline",
}


def servers(args: argparse.Namespace) -> list[str]:
    """The servers measured, in the order of the first round."""
    return [*SERVERS, "baseline"] if args.baseline else list(SERVERS)


def is_revision(revision: str) -> bool:
    """Whether ``revision`` names a commit of the git checkout this benchmark is in."""
    try:
        found = subprocess.run(
            ["git", "-C", str(HERE.parent), "rev-parse", "--verify", "--quiet"]
            + [f"{revision}^{{commit}}"],
            capture_output=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return found.returncode == 0


def extract_baseline(revision: str, into: Path) -> Path:
    """Extract graceful's package (and its dropin) at git ``revision`` of this checkout."""
    tree = subprocess.run(
        ["git", "-C", str(HERE.parent), "archive", "--format=tar", revision]
        + ["graceful_plugin", "twisted"],
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(tree)) as archive:
        archive.extractall(into, filter="data")
    return into


def start_servers(
    children: Children, args: argparse.Namespace
) -> tuple[dict[str, int], dict[str, int]]:
    """Start the servers; return each one's port once it serves, and each one's pid."""
    ports = {name: free_port() for name in servers(args)}
    ports["scrape"] = free_port()
    tmp = children.tmp
    python_path = [os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []
    procs = {
        "graceful": children.spawn(
            "graceful",
            [args.twistd, "-n", "--pidfile", str(tmp / "graceful.pid"), "graceful"]
            + ["--port", f"tcp:{ports['graceful']}:interface={HOST}"]
            + ["--control", str(tmp / "control.sock")],
        ),
        "metrics": children.spawn(
            "metrics",
            [args.twistd, "-n", "--pidfile", str(tmp / "metrics.pid"), "graceful"]
            + ["--port", f"tcp:{ports['metrics']}:interface={HOST}"]
            + ["--metrics", f"tcp:{ports['scrape']}:interface={HOST}"]
            + ["--control", str(tmp / "metrics.sock")],
        ),
        "web": children.spawn(
            "web",
            [args.twistd, "-n", "--pidfile", str(tmp / "web.pid"), "web"]
            + ["--listen", f"tcp:{ports['web']}:interface={HOST}"]
            + ["--class", "demo_resource.DemoTree"],
            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), *python_path])},
        ),
    }
    if args.baseline:
        baseline = extract_baseline(args.baseline, tmp / "baseline")
        procs["baseline"] = children.spawn(
            "baseline",
            [args.twistd, "-n", "--pidfile", str(tmp / "baseline.pid"), "graceful"]
            + ["--port", f"tcp:{ports['baseline']}:interface={HOST}"]
            + ["--control", str(tmp / "baseline.sock")],
            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(baseline), *python_path])},
        )
    for name, proc in procs.items():
        port = ports[name]
        wait_until(lambda port=port: accepts_connections(port), [proc], 30, name, children)
        spec = LoadSpec(port, args.body, time.monotonic() + 0.2, 10, 0.01)
        records, others = run_client(spec)
        if not records or any(outcome for _, _, outcome in records) or others:
            raise ServerDied(f"{name} does not serve /bytes/{args.body} right: {dict(others)}")
    scrape = ports["scrape"]
    wait_until(lambda: accepts_connections(scrape), [procs["metrics"]], 30, "metrics", children)
    return ports, {name: proc.pid for name, proc in procs.items()}


def cpu_seconds(pid: int) -> float:
    """User and system CPU time a process has used so far, from /proc (Linux)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Scraper:
    """Scrapes a metrics listener every ``interval`` seconds in a thread, as Prometheus would."""

    def __init__(self, port: int, interval: float) -> None:
        self.url = f"http://{HOST}:{port}/metrics"
        self.interval = interval
        self.scrapes = 0
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                with urllib.request.urlopen(self.url, timeout=10) as answer:
                    answer.read()
                self.scrapes += 1
            except OSError:
                self.failures += 1

    def __enter__(self) -> "Scraper":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(15)


def measure_wrk(port: int, seconds: int, args: argparse.Namespace) -> dict:
    """Run wrk for ``seconds``; return its requests per second and error counts."""
    argv = ["wrk", "-t", str(args.wrk_threads), "-c", str(args.connections)]
    argv += ["-d", f"{seconds}s", "--timeout", "10s"]
    if not args.keepalive:
        argv += ["-H", "Connection: close"]
    argv.append(f"http://{HOST}:{port}/bytes/{args.body}")
    out = subprocess.run(
        argv, capture_output=True, text=True, timeout=seconds + 30, check=True
    ).stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if rps is None:
        raise RuntimeError(f"wrk printed no Requests/sec:\n{out}")
    sockets = re.search(r"connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = sum(map(int, sockets.groups())) if sockets else 0
    return {"rps": float(rps.group(1)), "errors": errors + (int(non_2xx[1]) if non_2xx else 0)}


def measure_python(port: int, seconds: int, args: argparse.Namespace, tmp: Path) -> dict:
    """Run ``--connections`` client processes for ``seconds``; return requests/s and errors."""
    workers = Workers(Path(tempfile.mkdtemp(dir=tmp)))
    try:
        start = time.monotonic()
        spec = LoadSpec(port, args.body, start + seconds, 10, 0.01, keepalive=args.keepalive)
        for _ in range(args.connections):
            workers.start("client", spec)
        results = workers.join(seconds + 30)
    finally:
        with signals_held():
            workers.kill()
    outcomes = [outcome for result in results for _, _, outcome in result["records"]]
    ok = outcomes.count(0)
    return {"rps": round(ok / seconds, 1), "errors": len(outcomes) - ok}


def run(args: argparse.Namespace) -> dict:
    """Start both servers, load each in turn for every round, stop them; return the numbers."""
    tmp = Path(tempfile.mkdtemp(prefix="graceful-throughput-"))
    children = Children(tmp)
    try:
        ports, pids = start_servers(children, args)

        def load(name: str, seconds: int) -> dict:
            if args.client == "wrk":
                return measure_wrk(ports[name], seconds, args)
            return measure_python(ports[name], seconds, args, tmp)

        def measure(name: str, seconds: int) -> dict:
            # The server's CPU time per request does not depend on what else the machine runs
            # as much as requests per second do.
            before = cpu_seconds(pids[name])
            if name != "metrics":
                numbers = load(name, seconds)
            else:
                with Scraper(ports["scrape"], args.scrape_interval) as scraper:
                    numbers = load(name, seconds)
                numbers["scrapes"] = scraper.scrapes
                numbers["errors"] += scraper.failures
            requests = numbers["rps"] * seconds
            used = cpu_seconds(pids[name]) - before
            numbers["cpu_us_per_request"] = round(used / requests * 1e6, 1) if requests else 0.0
            return numbers

        order = servers(args)
        for name in order if args.warmup else ():
            measure(name, args.warmup)
        rounds: dict[str, list[dict]] = {name: [] for name in order}
        for index in range(args.rounds):
            for name in order if index % 2 == 0 else order[::-1]:
                rounds[name].append(measure(name, args.duration))
        for proc in children.alive():
            children.stop(proc, 10)
    finally:
        with signals_held():
            children.kill_all()
            shutil.rmtree(tmp, ignore_errors=True)
    result: dict[str, Any] = {
        name: {
            "rps_median": statistics.median(r["rps"] for r in runs),
            "rps": [r["rps"] for r in runs],
            "cpu_us_per_request_median": statistics.median(r["cpu_us_per_request"] for r in runs),
            "errors": sum(r["errors"] for r in runs),
        }
        for name, runs in rounds.items()
    }
    result["ratio"] = round(result["graceful"]["rps_median"] / result["web"]["rps_median"], 4)
    result["cpu_ratio"] = round(
        result["graceful"]["cpu_us_per_request_median"]
        / result["web"]["cpu_us_per_request_median"],
        4,
    )
    # Each round's own ratio (both servers loaded within seconds of each other): steadier than
    # the ratio of the medians when the machine's other load comes and goes.
    result["cpu_ratio_by_round"] = round(
        statistics.median(
            g["cpu_us_per_request"] / w["cpu_us_per_request"]
            for g, w in zip(rounds["graceful"], rounds["web"], strict=True)
            if w["cpu_us_per_request"]
        ),
        4,
    )
    result["ratio_within_target"] = result["ratio"] >= TARGET_RATIO
    result["metrics"]["scrapes"] = sum(r.get("scrapes", 0) for r in rounds["metrics"])
    result["metrics_ratio"] = round(
        result["metrics"]["rps_median"] / result["graceful"]["rps_median"], 4
    )
    result["metrics_ratio_within_target"] = result["metrics_ratio"] >= METRICS_TARGET_RATIO
    result["metrics_cpu_ratio"] = round(
        result["metrics"]["cpu_us_per_request_median"]
        / result["graceful"]["cpu_us_per_request_median"],
        4,
    )
    if args.baseline:
        result["baseline_ratio"] = round(
            result["baseline"]["rps_median"] / result["web"]["rps_median"], 4
        )
        result["baseline_cpu_ratio_by_round"] = round(
            statistics.median(
                b["cpu_us_per_request"] / w["cpu_us_per_request"]
                for b, w in zip(rounds["baseline"], rounds["web"], strict=True)
                if w["cpu_us_per_request"]
            ),
            4,
        )
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Read the command line; pick the load generator."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--duration", type=int, default=5, help="seconds of load per server per round")
    add("--rounds", type=int, default=3, help="rounds; the median is compared")
    add("--warmup", type=int, default=1, help="seconds of load per server first, not counted")
    add("--connections", type=int, default=16, help="concurrent connections (or processes)")
    add("--body", type=int, default=1024, help="response body size, bytes")
    add("--keepalive", action="store_true", help="reuse connections (default: one per request)")
    add(
        "--client",
        choices=["auto", "wrk", "python"],
        default="auto",
        help="load generator (auto: wrk when installed)",
    )
    add("--wrk-threads", type=int, default=1, help="wrk threads")
    add(
        "--scrape-interval",
        type=float,
        default=1.0,
        help="seconds between two scrapes of graceful --metrics while it is loaded",
    )
    add("--twistd", default=str(Path(sys.executable).with_name("twistd")), help="twistd to run")
    add(
        "--baseline",
        metavar="REV",
        help="also measure graceful as it was at this git revision of this checkout",
    )
    add("--json", type=Path, help="write the numbers to this file")
    args = parser.parse_args(argv)
    if args.duration < 1 or args.rounds < 1 or args.warmup < 0 or args.connections < 1:
        parser.error("--duration, --rounds and --connections must be at least 1, --warmup 0")
    if args.client == "auto":
        args.client = "wrk" if shutil.which("wrk") else "python"
    if not graceful_available(args.twistd):
        parser.error(f"'{args.twistd} graceful' does not run here")
    if args.baseline and not is_revision(args.baseline):
        parser.error(f"--baseline: {args.baseline!r} is not a revision of the git checkout here")
    return args


def main(argv: list[str] | None = None) -> int:
    """Measure, print both servers' requests/s and the ratio, write the JSON."""
    args = parse_args(argv)
    limit = (args.rounds + 1) * len(servers(args)) * (args.duration + 30) + 120
    for signum in (signal.SIGINT, signal.SIGTERM):  # SIGINT too: a shell may have ignored it
        signal.signal(signum, raise_on_signal(KeyboardInterrupt()))
    signal.signal(signal.SIGALRM, raise_on_signal(HardTimeout(f"run exceeded {limit:.0f} s")))
    signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        result = run(args)
    except (ServerDied, HardTimeout, RuntimeError, subprocess.SubprocessError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: every process stopped, temporary files removed", file=sys.stderr)
        return 130
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    connection = "keep-alive" if args.keepalive else "a new connection per request"
    print(
        f"{args.client}, {args.connections} connections, {connection}, /bytes/{args.body}, "
        f"{args.rounds} x {args.duration} s"
    )
    for name in servers(args):
        numbers = result[name]
        each = " ".join(f"{rps:.0f}" for rps in numbers["rps"])
        scrapes = f"; scrapes: {numbers['scrapes']}" if name == "metrics" else ""
        print(
            f"  {LABELS[name]:20} {numbers['rps_median']:9.1f} req/s median, "
            f"{numbers['cpu_us_per_request_median']:6.1f} us CPU/request  (rounds: {each}; "
            f"errors: {numbers['errors']}{scrapes})"
        )
    verdict = "PASS" if result["ratio_within_target"] else "FAIL"
    print(
        f"  ratio graceful / web: {result['ratio']:.1%}   target >= {TARGET_RATIO:.0%}  {verdict}"
    )
    print(
        "  server CPU per request, graceful / web:"
        f" {result['cpu_ratio']:.1%}, median of each round's: {result['cpu_ratio_by_round']:.1%}"
        " (steadier than req/s on a busy machine)"
    )
    verdict = "PASS" if result["metrics_ratio_within_target"] else "FAIL"
    print(
        f"  ratio graceful --metrics / graceful: {result['metrics_ratio']:.1%}   target >= "
        f"{METRICS_TARGET_RATIO:.0%}  {verdict}"
    )
    print(
        "  server CPU per request, graceful --metrics / graceful:"
        f" {result['metrics_cpu_ratio']:.1%} (steadier than req/s on a busy machine)"
    )
    if args.baseline:
        print(
            f"  baseline {args.baseline}: ratio to web {result['baseline_ratio']:.1%}, CPU per"
            f" request to web, median of each round's: {result['baseline_cpu_ratio_by_round']:.1%}"
        )
    if args.json is not None:
        document = {"machine": machine(), "config": vars(args), "result": result}
        args.json.write_text(json.dumps(document, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
