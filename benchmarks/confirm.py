"""Measure how long a successor takes to confirm, and what a stalled one costs new connections.

    python benchmarks/confirm.py [--takeovers 8] [--clients 4]

1. confirm: ``--takeovers`` successive takeovers of a server under light load (``--clients``
   threads making requests on fresh connections); for each, the predecessor's own figure from
   pausing (its Commit answer) to the successor's ``Accepting`` arriving (its "handoff to pid P
   confirmed ... ms after we paused" line).  This is what ``--confirm-timeout`` must cover.
2. stall: a successor (``tests/fake_successor.py real:committed``) stops itself with SIGSTOP
   right after the Commit answer arrives, with the default ``--confirm-timeout``; a request is
   sent at that moment, and its latency is what a new connection pays until the predecessor
   resumes.  Repeated ``--stalls`` times.
3. standby: a successor (``real:confirmed``) kills itself with SIGKILL as the answer to its
   ``Accepting`` arrives, while the predecessor drains a held session; a request is sent the
   moment the successor is reaped, and its latency is what a new connection pays until the
   predecessor standing by resumes.  Repeated ``--stalls`` times.  Client errors are counted
   in each phase (in this one, connections the dead successors had accepted die with them:
   resets; none should be refused).

Standard library only.  Every process started is killed and reaped and the temporary directory
removed at the end; the whole run is bounded by ``--hard-timeout`` (60 s).
"""

from __future__ import annotations

import argparse
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
from pathlib import Path

HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parent.parent
TWISTD = str(Path(sys.executable).parent / "twistd")


class Failed(RuntimeError):
    """A server did not do what the measurement needs."""


class Run:
    def __init__(self, directory: Path, deadline: float) -> None:
        self.directory = directory
        self.deadline = deadline
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self, args: list[str], name: str) -> tuple[subprocess.Popen[bytes], Path]:
        log = self.directory / f"{name}.log"
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        with open(log, "wb") as out:
            process = subprocess.Popen(
                args, cwd=self.directory, stdout=out, stderr=subprocess.STDOUT, env=env
            )
        self.processes.append(process)
        return process, log

    def waitFor(self, log: Path, pattern: str) -> re.Match[str]:
        regex = re.compile(pattern)
        while time.monotonic() < self.deadline:
            match = regex.search(log.read_text(errors="replace"))
            if match:
                return match
            time.sleep(0.005)
        tail = log.read_text(errors="replace")[-1500:]
        raise Failed(f"{log.name} never logged {pattern!r} in time:\n{tail}")

    def cleanup(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            process.wait(10)


def request(port: int, timeout: float = 20.0) -> bytes:
    with socket.create_connection((HOST, port), timeout=timeout) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n")
        chunks = []
        while True:
            data = s.recv(65536)
            if not data:
                return b"".join(chunks)
            chunks.append(data)


#: Set while a server should be answering (not between the two measurements).
COUNTING = threading.Event()


def load(port: int, stop: threading.Event, errors: list[str]) -> None:
    while not stop.is_set():
        try:
            request(port)
        except OSError as e:
            if COUNTING.is_set():
                errors.append(type(e).__name__)


def serve(run: Run, port: int, name: str, *extra: str) -> tuple[subprocess.Popen[bytes], Path]:
    process, log = run.start(
        [TWISTD, "-n", "--pidfile", "app.pid", "graceful"]
        + ["--port", f"tcp:{port}:interface={HOST}", "--control", "c.sock", *extra],
        name,
    )
    run.waitFor(log, r"serving on")
    COUNTING.set()
    return process, log


def confirmTimes(run: Run, port: int, takeovers: int) -> list[float]:
    current, log = serve(run, port, "first", "--confirm-timeout", "10")
    times = []
    for i in range(takeovers):
        successor, successorLog = run.start(
            [TWISTD, "-n", "--pidfile", "app.pid", "graceful", "--takeover", "c.sock"], f"s{i}"
        )
        match = run.waitFor(
            log, rf"handoff to pid {successor.pid} confirmed .*?([\d.]+) ms after we paused"
        )
        times.append(float(match.group(1)))
        current.wait(max(1.0, run.deadline - time.monotonic()))
        current, log = successor, successorLog
    COUNTING.clear()
    current.send_signal(signal.SIGTERM)
    current.wait(10)
    return times


def stallCosts(run: Run, port: int, stalls: int) -> tuple[list[float], str]:
    current, log = serve(run, port, "stalled")
    costs = []
    rolledBack = ""
    for i in range(stalls):
        fake, fakeLog = run.start(
            [sys.executable, "-m", "tests.fake_successor", "c.sock", "real:committed"], f"f{i}"
        )
        run.waitFor(fakeLog, r"reached committed")
        started = time.monotonic()
        body = request(port)
        costs.append((time.monotonic() - started) * 1000)
        if f"pid {current.pid}".encode() not in body:
            raise Failed("the request was not answered by the predecessor")
        rolledBack = run.waitFor(
            log, rf"handoff to pid {fake.pid} rolled back: (the successor did not confirm [^;]*)"
        ).group(1)
        fake.kill()
        fake.wait(10)
    COUNTING.clear()
    current.send_signal(signal.SIGTERM)
    current.wait(10)
    return costs, rolledBack


def standbyCosts(run: Run, port: int, kills: int) -> list[float]:
    """
    Successors that kill themselves (SIGKILL) as the answer to their Accepting arrives, with a
    session held on the predecessor so that it drains: the latency of a request sent the moment
    each successor is reaped (the predecessor answers it once it resumed).
    """
    current, log = serve(run, port, "standby")
    held = socket.create_connection((HOST, port), timeout=30)
    held.sendall(b"GET / HTTP/1.1\r\nHost: b\r\n")
    costs = []
    try:
        for i in range(kills):
            fake, fakeLog = run.start(
                [sys.executable, "-m", "tests.fake_successor", "c.sock", "real:confirmed"],
                f"k{i}",
            )
            fake.wait(max(1.0, run.deadline - time.monotonic()))
            started = time.monotonic()
            body = request(port)
            costs.append((time.monotonic() - started) * 1000)
            if f"pid {current.pid}".encode() not in body:
                raise Failed("the request was not answered by the resumed predecessor")
            run.waitFor(log, rf"resumed serving: .*\(pid {fake.pid}\) is lost")
    finally:
        held.close()
    COUNTING.clear()
    current.send_signal(signal.SIGTERM)
    current.wait(10)
    return costs


def startLoad(port: int, threads: list[threading.Thread], run: Run) -> None:
    while time.monotonic() < run.deadline:
        try:
            socket.create_connection((HOST, port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.01)
    for t in threads:
        t.start()


def describe(values: list[float]) -> str:
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]
    return (
        f"n={len(values)} median {statistics.median(values):.1f} ms, p99 {p99:.1f} ms,"
        f" max {max(values):.1f} ms"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--takeovers", type=int, default=8)
    parser.add_argument("--stalls", type=int, default=3)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--hard-timeout", type=float, default=60.0)
    options = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="gr-confirm-"))
    run = Run(directory, time.monotonic() + options.hard_timeout)
    stop = threading.Event()
    errors: list[str] = []
    with socket.socket() as s:
        s.bind((HOST, 0))
        port = s.getsockname()[1]
    try:
        threads = [
            threading.Thread(target=load, args=(port, stop, errors), daemon=True)
            for _ in range(options.clients)
        ]
        # The load starts once the first server serves (its port would refuse before).
        starter = threading.Thread(target=startLoad, args=(port, threads, run), daemon=True)
        starter.start()
        times = confirmTimes(run, port, options.takeovers)
        phaseErrors = [list(errors)]
        print(f"commit answer -> Accepting at the predecessor, under load: {describe(times)}")
        costs, rolledBack = stallCosts(run, port, options.stalls)
        phaseErrors.append(errors[len(phaseErrors[0]) :])
        print(
            "a new connection while the successor is stopped after Commit (default"
            f" --confirm-timeout): {describe(costs)}; predecessor: {rolledBack}"
        )
        kills = standbyCosts(run, port, options.stalls)
        phaseErrors.append(errors[len(phaseErrors[0]) + len(phaseErrors[1]) :])
        print(
            "a new connection sent as a confirmed successor dies (SIGKILL), answered by the"
            f" predecessor standing by: {describe(kills)}"
        )
        for name, found in zip(("confirm", "stall", "standby"), phaseErrors, strict=True):
            print(f"client errors during {name}: {len(found)} {sorted(set(found))}")
        return 0
    except Failed as e:
        print(f"failed: {e}", file=sys.stderr)
        return 1
    finally:
        stop.set()
        run.cleanup()
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
