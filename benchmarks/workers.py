"""Requests per second with 1, 2 and ``auto`` worker processes, and how connections spread.

    python benchmarks/workers.py --duration 10 --json workers.json

For each count (``--workers``, repeatable; default 1, 2 and auto) one ``twistd -n graceful
--workers N`` serves the demo app's ``/bytes/N``; ``wrk`` loads it with a fresh connection per
request (``Connection: close``) and then with keep-alive.  Printed for each run: requests per
second, the client's own CPU share (wrk's user+system time over the run's wall time times the
CPUs we may use: what the load generator took from the server on a small machine), and the
spread of connections over the processes: with fresh connections, a probe makes
fresh-connection ``GET /`` requests during the run, each answered by the process that accepted
it, counted per pid; with keep-alive, the sessions each process holds a third into the run
(wrk opens its connections once and keeps them), read once from ``status``; and for bursts of
connections opened at once, the largest share one process took.
Target: with a fresh connection per request, 2 workers reach at least 1.4 times one worker's
requests per second (on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from loadtest import HOST, Children, ServerDied, free_port, machine, signals_held, wait_until

TARGET_RATIO = 1.4
"""Two workers' requests per second over one worker's (fresh connections), at least."""


def status(ctl: str, control: Path) -> dict[str, Any] | None:
    done = subprocess.run(
        [ctl, "--control", str(control), "status", "--json"],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    return json.loads(done.stdout) if done.returncode == 0 else None


def start(children: Children, args: argparse.Namespace, count: int) -> tuple[Any, int, Path]:
    """Start a group of C{count} processes; return it, its port and control path once every
    process serves."""
    port = free_port()
    control = children.tmp / f"c{count}.sock"
    proc = children.spawn(
        f"graceful-{count}",
        [args.twistd, "-n", "--pidfile", str(children.tmp / f"g{count}.pid"), "graceful"]
        + ["--port", f"tcp:{port}:interface={HOST}", "--control", str(control)]
        + ["--workers", str(count)],
    )

    def ready() -> bool:
        now = status(args.ctl, control) if control.exists() else None
        if now is None:
            return False
        workers = now.get("workers") or []
        return len(workers) == count and all(w["pid"] and w["uptime"] > 0 for w in workers)

    wait_until(ready, [proc], 60, f"starting {count} workers", children)
    # (The group is told to accept once every worker is ready: a moment later.)
    time.sleep(0.5)
    return proc, port, control


class Sampler(threading.Thread):
    """A while into the run, reads once how many sessions each process holds (for
    keep-alive, where wrk opens its connections once and keeps them)."""

    def __init__(self, ctl: str, control: Path, after: float) -> None:
        super().__init__(daemon=True)
        self.ctl = ctl
        self.control = control
        self.after = after
        self.sessions: Counter[int] = Counter()
        self._done = threading.Event()

    def run(self) -> None:
        if self._done.wait(self.after):
            return
        now = status(self.ctl, self.control)
        for worker in (now or {}).get("workers", []):
            self.sessions[worker["index"]] += worker["sessions"]

    def stop(self) -> None:
        self._done.set()
        self.join(30)


def shares(counts: Counter[int]) -> list[float]:
    total = sum(counts.values())
    return sorted((round(n / total, 3) for n in counts.values()), reverse=True) if total else []


class Probe(threading.Thread):
    """Fresh-connection ``GET /`` requests until stopped; counts which pid answered each."""

    def __init__(self, port: int, interval: float) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.interval = interval
        self.pids: Counter[int] = Counter()
        self.failed = 0
        self._done = threading.Event()

    def run(self) -> None:
        import http.client

        while not self._done.is_set():
            try:
                conn = http.client.HTTPConnection(HOST, self.port, timeout=10)
                conn.request("GET", "/", headers={"Connection": "close"})
                body = conn.getresponse().read()
                conn.close()
                self.pids[int(body.split(b"pid ")[1].split(b",")[0])] += 1
            except (OSError, ValueError, IndexError):
                self.failed += 1
            self._done.wait(self.interval)

    def stop(self) -> None:
        self._done.set()
        self.join(15)


def bursts(port: int, size: int, count: int) -> list[float]:
    """Open ``size`` connections at once, ``count`` times; for each burst, the largest share
    of its connections that one process accepted."""
    largest = []
    for _ in range(count):
        socks = [socket.create_connection((HOST, port), timeout=10) for _ in range(size)]
        pids: Counter[int] = Counter()
        try:
            for sock in socks:
                sock.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
            for sock in socks:
                data = b""
                while not data.endswith(b"\n") or b"generation" not in data:
                    chunk = sock.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                pids[int(data.split(b"pid ")[1].split(b",")[0])] += 1
        finally:
            for sock in socks:
                sock.close()
        largest.append(max(pids.values()) / size)
        time.sleep(0.2)
    return largest


def wrk(port: int, seconds: float, args: argparse.Namespace, keepalive: bool) -> dict[str, Any]:
    """Run wrk; return requests/s, errors and wrk's own CPU seconds."""
    argv = ["wrk", "-t", "1", "-c", str(args.connections), "-d", f"{seconds:g}s"]
    argv += ["--timeout", "10s"]
    if not keepalive:
        argv += ["-H", "Connection: close"]
    argv.append(f"http://{HOST}:{port}/bytes/{args.body}")
    out_path = Path(tempfile.mkstemp(prefix="wrk-")[1])
    try:
        with open(out_path, "wb") as out:
            started = time.monotonic()
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
            _, code, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(code)
            wall = time.monotonic() - started
        text = out_path.read_text(errors="replace")
    finally:
        out_path.unlink()
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if proc.returncode != 0 or rps is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}):\n{text}")
    sockets = re.search(r"connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    errors = sum(map(int, sockets.groups())) if sockets else 0
    cpu = usage.ru_utime + usage.ru_stime
    return {
        "rps": float(rps.group(1)),
        "errors": errors + (int(non_2xx[1]) if non_2xx else 0),
        "client_cpu_share": cpu / (wall * len(os.sched_getaffinity(0))),
    }


def measure(args: argparse.Namespace, children: Children, count: int) -> dict[str, Any]:
    proc, port, control = start(children, args, count)
    try:
        results: dict[str, Any] = {"workers": count}
        if args.warmup:
            wrk(port, args.warmup, args, keepalive=False)
        for mode, keepalive in (("fresh", False), ("keepalive", True)):
            probe = Probe(port, args.probe_interval)
            # (graceful-ctl takes a while to start: read early enough to be answered mid-run.)
            sampler = Sampler(args.ctl, control, args.duration / 3)
            probe.start()
            sampler.start()
            try:
                run = wrk(port, args.duration, args, keepalive)
            finally:
                probe.stop()
                sampler.stop()
            # Fresh connections: who accepted the probes; keep-alive: who holds wrk's
            # connections (the probes then show only which process is least busy).
            run["accepts"] = shares(probe.pids)
            run["sessions"] = shares(sampler.sessions)
            run["spread"] = run["sessions"] if keepalive else run["accepts"]
            run["probes"] = sum(probe.pids.values())
            run["probe_failures"] = probe.failed
            results[mode] = run
        if args.bursts:
            largest = bursts(port, args.burst_size, args.bursts)
            results["burst_largest_share"] = round(sum(largest) / len(largest), 3)
        now = status(args.ctl, control)
        results["restarts"] = sum(w["restarts"] for w in (now or {}).get("workers", []))
        return results
    finally:
        code = children.stop(proc, 30)
        if code != 0:
            raise ServerDied(f"graceful --workers {count} exited {code}: {children.log_tail(proc)}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--workers", action="append", help="a count or auto (repeatable; default 1, 2, auto)"
    )
    p.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up per group")
    p.add_argument("--connections", type=int, default=32, help="wrk's connections")
    p.add_argument("--body", type=int, default=1024, help="bytes per response")
    p.add_argument("--probe-interval", type=float, default=0.005, help="seconds between probes")
    p.add_argument("--bursts", type=int, default=10, help="bursts of connections opened at once")
    p.add_argument("--burst-size", type=int, default=32, help="connections per burst")
    p.add_argument("--json", help="also write the numbers to this file")
    here = Path(sys.executable).parent
    p.add_argument("--twistd", default=str(here / "twistd"))
    p.add_argument("--ctl", default=str(here / "graceful-ctl"))
    args = p.parse_args(argv)
    if shutil.which("wrk") is None:
        print("workers.py needs wrk (apt-get install wrk)", file=sys.stderr)
        return 2
    counts = []
    for value in args.workers or ["1", "2", "auto"]:
        count = len(os.sched_getaffinity(0)) if value == "auto" else int(value)
        if count not in counts:
            counts.append(count)
    tmp = Path(tempfile.mkdtemp(prefix="graceful-workers-"))
    children = Children(tmp)
    previous = signal.signal(signal.SIGTERM, lambda *a: sys.exit(1))
    runs = []
    try:
        for count in counts:
            runs.append(measure(args, children, count))
    finally:
        signal.signal(signal.SIGTERM, previous)
        with signals_held():
            children.kill_all()
            shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"{'workers':>7}  {'mode':<9} {'requests/s':>10}  {'errors':>6}  {'client CPU':>10}"
        "  spread over the processes (fresh: accepts; keep-alive: sessions held)"
    )
    for run in runs:
        for mode in ("fresh", "keepalive"):
            r = run[mode]
            spread = " / ".join(f"{share:.0%}" for share in r["spread"])
            print(
                f"{run['workers']:>7}  {mode:<9} {r['rps']:>10.0f}  {r['errors']:>6}"
                f"  {r['client_cpu_share']:>10.0%}  {spread}"
            )
    for run in runs:
        if run["workers"] > 1 and "burst_largest_share" in run:
            print(
                f"{run['workers']} workers: bursts of {args.burst_size} connections opened at"
                f" once, the largest share one process took: {run['burst_largest_share']:.0%}"
                f" on average (even: {1 / run['workers']:.0%})"
            )
    one = next((r for r in runs if r["workers"] == 1), None)
    two = next((r for r in runs if r["workers"] == 2), None)
    verdict = None
    if one and two:
        ratio = two["fresh"]["rps"] / one["fresh"]["rps"]
        verdict = ratio >= TARGET_RATIO
        print(
            f"2 workers / 1 worker, fresh connections: {ratio:.2f}x"
            f" (target at least {TARGET_RATIO}x): {'met' if verdict else 'NOT met'}"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"machine": machine(), "runs": runs, "target_met": verdict}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
