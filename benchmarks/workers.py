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
connections opened at once, the largest share one process took.  A second table says where
the CPUs' time went during each run: idle and softirq (``/proc/stat``), each server process's
user and system time (``/proc/PID/stat``), the server processes' CPU per request, and how many
times per 1,000 requests the group's balance held a process (from ``status``).

``--compare-balance`` measures each group of several again with its balance turned off
(``GRACEFUL_BALANCE=off``: the spread before and after); ``--independent N`` measures N
independent single processes on ports of their own, each loaded by its own wrk with its share
of the connections at the same time: the ceiling for N processes on this machine, with nothing
shared.
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
import statistics
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


def start(
    children: Children,
    args: argparse.Namespace,
    count: int,
    label: str = "",
    balance: bool = True,
) -> tuple[Any, int, Path]:
    """Start a group of C{count} processes; return it, its port and control path once every
    process serves."""
    port = free_port()
    name = f"{count}{label}"
    control = children.tmp / f"c{name}.sock"
    proc = children.spawn(
        f"graceful-{name}",
        [args.twistd, "-n", "--pidfile", str(children.tmp / f"g{name}.pid"), "graceful"]
        + ["--port", f"tcp:{port}:interface={HOST}", "--control", str(control)]
        + ["--workers", str(count)],
        env=None if balance else {**os.environ, "GRACEFUL_BALANCE": "off"},
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


def holds(ctl: str, control: Path) -> int | None:
    """How many times the group's processes held so far (None: no balance, or no answer)."""
    counts = [w.get("holds") for w in (status(ctl, control) or {}).get("workers", [])]
    return sum(counts) if counts and None not in counts else None


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


TICK = os.sysconf("SC_CLK_TCK")


def cpu_snapshot(pids: list[int]) -> dict[str, Any]:
    """The machine's CPU time by kind (``/proc/stat``) and each of ``pids``' user and system
    time (``/proc/PID/stat``), in seconds."""
    with open("/proc/stat") as f:
        fields = f.readline().split()[1:9]
    kinds = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
    machine_ = {k: int(v) / TICK for k, v in zip(kinds, fields, strict=True)}
    procs = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                rest = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # (Fields 14 and 15 of stat(5), counted after the command's closing parenthesis.)
        procs[pid] = (int(rest[11]) / TICK, int(rest[12]) / TICK)
    return {"machine": machine_, "procs": procs, "at": time.monotonic()}


def cpu_spent(before: dict[str, Any], after: dict[str, Any], pids: list[int]) -> dict[str, Any]:
    """Where the CPUs' time went between two snapshots, as shares of all the CPUs' time."""
    m0, m1 = before["machine"], after["machine"]
    total = sum(m1.values()) - sum(m0.values()) or 1.0
    spent = {k: (m1[k] - m0[k]) / total for k in m0}
    procs = []
    for pid in pids:
        if pid in before["procs"] and pid in after["procs"]:
            (u0, s0), (u1, s1) = before["procs"][pid], after["procs"][pid]
            procs.append({"pid": pid, "user": (u1 - u0) / total, "system": (s1 - s0) / total})
    return {
        "idle": spent["idle"] + spent["iowait"],
        "softirq": spent["softirq"] + spent["irq"],
        "user": spent["user"] + spent["nice"],
        "system": spent["system"],
        "procs": procs,
        "cpu_seconds": total,
    }


def wrk(
    port: int,
    seconds: float,
    args: argparse.Namespace,
    keepalive: bool,
    connections: int | None = None,
) -> dict[str, Any]:
    """Run wrk; return requests/s, errors and wrk's own CPU seconds."""
    connections = connections or args.connections
    argv = ["wrk", "-t", "1", "-c", str(connections), "-d", f"{seconds:g}s"]
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
    requests = re.search(r"(\d+) requests in", text)
    if proc.returncode != 0 or rps is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}):\n{text}")
    sockets = re.search(r"connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    errors = sum(map(int, sockets.groups())) if sockets else 0
    cpu = usage.ru_utime + usage.ru_stime
    return {
        "rps": float(rps.group(1)),
        "requests": int(requests.group(1)) if requests else 0,
        "errors": errors + (int(non_2xx[1]) if non_2xx else 0),
        "client_cpu_share": cpu / (wall * len(os.sched_getaffinity(0))),
    }


def measure(
    args: argparse.Namespace, children: Children, count: int, balance: bool = True
) -> dict[str, Any]:
    proc, port, control = start(children, args, count, "" if balance else "n", balance)
    try:
        results: dict[str, Any] = {"workers": count, "balance": balance}
        pids = [w["pid"] for w in (status(args.ctl, control) or {}).get("workers", [])]
        if args.warmup:
            wrk(port, args.warmup, args, keepalive=False)
        for mode, keepalive in (("fresh", False), ("keepalive", True)):
            probe = Probe(port, args.probe_interval)
            # (graceful-ctl takes a while to start: read early enough to be answered mid-run.)
            sampler = Sampler(args.ctl, control, args.duration / 3)
            held = holds(args.ctl, control)
            probe.start()
            sampler.start()
            try:
                before = cpu_snapshot(pids)
                run = wrk(port, args.duration, args, keepalive)
                run["cpu"] = cpu_spent(before, cpu_snapshot(pids), pids)
            finally:
                probe.stop()
                sampler.stop()
            # How often the balance held during the run (status counts each process's holds).
            after = holds(args.ctl, control)
            run["holds"] = after - held if after is not None and held is not None else None
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


def measure_independent(args: argparse.Namespace, children: Children, count: int) -> dict:
    """The ceiling for a group of ``count`` on this machine: ``count`` independent single
    processes on ports of their own, each loaded by its own wrk with its share of the
    connections at the same time (nothing shared: no common socket, no balance, no leader)."""
    started = [start(children, args, 1, label=f"i{i}") for i in range(count)]
    try:
        pids = []
        for _, _, control in started:
            pids += [w["pid"] for w in (status(args.ctl, control) or {}).get("workers", [])]
        results: dict[str, Any] = {"independent": count}
        for mode, keepalive in (("fresh", False), ("keepalive", True)):
            if args.warmup and not keepalive:
                warm = [
                    threading.Thread(
                        target=wrk, args=(port, args.warmup, args, False, args.connections // count)
                    )
                    for _, port, _ in started
                ]
                for t in warm:
                    t.start()
                for t in warm:
                    t.join()
            runs: list[dict[str, Any]] = []

            def one(port: int, keepalive: bool = keepalive, runs: list = runs) -> None:
                runs.append(wrk(port, args.duration, args, keepalive, args.connections // count))

            threads = [threading.Thread(target=one, args=(port,)) for _, port, _ in started]
            before = cpu_snapshot(pids)
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            results[mode] = {
                "rps": sum(r["rps"] for r in runs),
                "requests": sum(r["requests"] for r in runs),
                "errors": sum(r["errors"] for r in runs),
                "client_cpu_share": sum(r["client_cpu_share"] for r in runs),
                "cpu": cpu_spent(before, cpu_snapshot(pids), pids),
            }
        return results
    finally:
        for proc, _, _ in started:
            children.stop(proc, 30)


def label(run: dict[str, Any]) -> str:
    if "independent" in run:
        return f"{run['independent']} independent"
    return f"{run['workers']}" + ("" if run["balance"] else " no balance")


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
    p.add_argument(
        "--compare-balance",
        action="store_true",
        help="also measure each group of several without its balance (GRACEFUL_BALANCE=off)",
    )
    p.add_argument(
        "--independent",
        type=int,
        default=0,
        help="also measure this many independent single processes on ports of their own, each"
        " with its own wrk (the ceiling for a group of that many on this machine)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measure everything this many times, interleaved, and judge the median ratio",
    )
    p.add_argument("--json", help="also write the numbers to this file")
    here = Path(sys.executable).parent
    p.add_argument("--twistd", default=str(here / "twistd"))
    p.add_argument("--ctl", default=str(here / "graceful-ctl"))
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
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
    rounds: list[dict[str, Any]] = []
    try:
        # Rounds interleave the configurations, so that what else the machine does at one
        # moment does not land on one configuration's figures only.
        for number in range(1, args.rounds + 1):
            runs = []
            for count in counts:
                runs.append(measure(args, children, count))
                if count > 1 and args.compare_balance:
                    runs.append(measure(args, children, count, balance=False))
            ceiling = (
                measure_independent(args, children, args.independent) if args.independent else None
            )
            rounds.append({"round": number, "runs": runs, "independent": ceiling})
    finally:
        signal.signal(signal.SIGTERM, previous)
        with signals_held():
            children.kill_all()
            shutil.rmtree(tmp, ignore_errors=True)
    for each in rounds:
        if args.rounds > 1:
            print(f"\nround {each['round']} of {args.rounds}")
        report(args, each["runs"], each["independent"])
    lines, verdict = judge(rounds)
    print("\n".join(lines))
    if args.json:
        last = rounds[-1]
        Path(args.json).write_text(
            json.dumps(
                {
                    "machine": machine(),
                    "runs": last["runs"],
                    "independent": last["independent"],
                    "rounds": rounds,
                    "target_met": verdict,
                },
                indent=2,
            )
        )
    return 0


def judge(rounds: list[dict[str, Any]]) -> tuple[list[str], bool | None]:
    """
    The verdict over the rounds: the median of their 2 workers / 1 worker ratios against the
    target, and the median of 2 independent processes / 1 (each round's, when more than one).
    """
    ratios = [r for r in (ratiosOf(each) for each in rounds) if r is not None]
    if not ratios:
        return [], None
    group = statistics.median(r[0] for r in ratios)
    verdict = group >= TARGET_RATIO
    each = f" (median of {len(ratios)} rounds: {', '.join(f'{r[0]:.2f}' for r in ratios)})"
    lines = [
        f"2 workers / 1 worker, fresh connections: {group:.2f}x"
        + (each if len(ratios) > 1 else "")
        + f" (target at least {TARGET_RATIO}x): {'met' if verdict else 'NOT met'}"
    ]
    ceilings = [r[1] for r in ratios if r[1] is not None]
    if ceilings:
        each = f" (median of {', '.join(f'{c:.2f}' for c in ceilings)})"
        lines.append(
            f"2 independent processes / 1, fresh connections: {statistics.median(ceilings):.2f}x"
            + (each if len(ceilings) > 1 else "")
            + " (the ceiling here)"
        )
    return lines, verdict


def ratiosOf(each: dict[str, Any]) -> tuple[float, float | None] | None:
    """
    One round's 2 workers / 1 worker and 2 independent processes / 1 worker, fresh
    connections (None without both a 1 and a 2).
    """
    runs, ceiling = each["runs"], each["independent"]
    one = next((r for r in runs if r["workers"] == 1), None)
    two = next((r for r in runs if r["workers"] == 2 and r["balance"]), None)
    if not one or not two or not one["fresh"]["rps"]:
        return None
    independent = None
    if ceiling is not None and ceiling.get("independent") == 2:
        independent = ceiling["fresh"]["rps"] / one["fresh"]["rps"]
    return two["fresh"]["rps"] / one["fresh"]["rps"], independent


def report(args: argparse.Namespace, runs: list[dict[str, Any]], ceiling: dict | None) -> None:
    """
    Print one round's tables (and note each run's server CPU per request in it).
    """
    rows = runs + ([ceiling] if ceiling is not None else [])
    print(
        f"{'workers':<14} {'mode':<9} {'requests/s':>10}  {'errors':>6}  {'client CPU':>10}"
        "  spread over the processes (fresh: accepts; keep-alive: sessions held)"
    )
    for run in rows:
        for mode in ("fresh", "keepalive"):
            r = run[mode]
            spread = " / ".join(f"{share:.0%}" for share in r.get("spread", []))
            print(
                f"{label(run):<14} {mode:<9} {r['rps']:>10.0f}  {r['errors']:>6}"
                f"  {r['client_cpu_share']:>10.0%}  {spread}"
            )
    print(
        "\nwhere the CPUs' time went (shares of all the CPUs' time during the run; each"
        " process user+system; us/req: the server processes' CPU per request; holds/1k: the"
        " balance's holds per 1,000 requests)"
    )
    print(
        f"{'workers':<14} {'mode':<9} {'idle':>5} {'softirq':>7} {'client':>6} {'us/req':>6}"
        f" {'holds/1k':>8}  processes"
    )
    for run in rows:
        for mode in ("fresh", "keepalive"):
            r = run[mode]
            cpu = r["cpu"]
            group = sum(p["user"] + p["system"] for p in cpu["procs"])
            per = group * cpu["cpu_seconds"] / r["requests"] * 1e6 if r["requests"] else 0.0
            r["server_us_per_request"] = round(per, 1)
            procs = ", ".join(f"{p['user']:.0%}+{p['system']:.0%}" for p in cpu["procs"])
            held = r.get("holds")
            perk = "-"
            if held is not None and r["requests"]:
                perk = f"{held / r['requests'] * 1000:.1f}"
            print(
                f"{label(run):<14} {mode:<9} {cpu['idle']:>5.0%} {cpu['softirq']:>7.0%}"
                f" {r['client_cpu_share']:>6.0%} {per:>6.0f} {perk:>8}  {procs}"
            )
    for run in runs:
        if run["workers"] > 1 and "burst_largest_share" in run:
            print(
                f"{label(run)}: bursts of {args.burst_size} connections opened at"
                f" once, the largest share one process took: {run['burst_largest_share']:.0%}"
                f" on average (even: {1 / run['workers']:.0%})"
            )


if __name__ == "__main__":
    sys.exit(main())
