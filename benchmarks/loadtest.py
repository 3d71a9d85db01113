"""Load an HTTP server with short requests while it restarts, and count what the clients see.

    python benchmarks/loadtest.py --mode graceful --restarts 5 --interval 3 --json out.json

Client processes (``--clients``) each open a new TCP connection to 127.0.0.1 per request, ask for
``/bytes/B`` and check the body is exactly B bytes; ``--downloaders`` fetch a large body slowly so
downloads are in flight across restarts. Every request's start, latency and outcome is kept:
``ok``, ``refused``, ``reset``, ``eof`` (closed before the whole response), ``timeout`` or
``other``. The same load meets one restart method per ``--mode`` (repeatable):

naive
    SIGTERM the server, wait for it to exit, start a new one on the same port.
reuseport
    Start a second server with ``SO_REUSEPORT`` on the port, wait until it listens, then SIGTERM
    the old one (Linux resets the connections still queued on the old socket).
graceful
    ``twistd graceful --takeover``: a new process takes the listening sockets over; the old one
    drains its connections and exits by itself.

Standard library only; ``--plot`` needs matplotlib. Every process started is killed and reaped and
every temporary file removed at the end, on Ctrl-C and on errors too.
"""

import argparse
import contextlib
import ctypes
import json
import math
import multiprocessing
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from multiprocessing.process import BaseProcess
from pathlib import Path

HERE = Path(__file__).resolve().parent
HOST = "127.0.0.1"
OUTCOMES = ("ok", "refused", "reset", "eof", "timeout", "other")
FAILURES = OUTCOMES[1:]
TARGET_RATIO = 1.1
"""Graceful target: p99 latency near a restart at most this many times the steady p99."""

_PR_SET_PDEATHSIG = 1


# --- one HTTP client ------------------------------------------------------------------------


class PrematureEOF(Exception):
    """The server closed the connection before the whole response had arrived."""


class BadResponse(Exception):
    """A complete response that is wrong: status, framing or body length."""


class _Response:
    """Read one HTTP/1.1 response from a socket, counting the body without keeping it.

    :param pause: seconds to sleep after each ``recv``, to read slowly like a slow client.
    """

    def __init__(self, sock: socket.socket, recv_size: int, pause: float) -> None:
        self._sock = sock
        self._recv_size = recv_size
        self._pause = pause
        self._buf = b""

    def _fill(self) -> None:
        data = self._sock.recv(self._recv_size)
        if not data:
            raise PrematureEOF("connection closed mid-response")
        self._buf += data
        if self._pause:
            time.sleep(self._pause)

    def _line(self) -> bytes:
        while (end := self._buf.find(b"\r\n")) < 0:
            if len(self._buf) > 65536:
                raise BadResponse("header line too long")
            self._fill()
        line, self._buf = self._buf[:end], self._buf[end + 2 :]
        return line

    def _skip(self, count: int) -> None:
        while len(self._buf) < count:
            count -= len(self._buf)
            self._buf = b""
            self._fill()
        self._buf = self._buf[count:]

    def _skip_to_eof(self) -> int:
        length = len(self._buf)
        self._buf = b""
        while data := self._sock.recv(self._recv_size):
            length += len(data)
        return length

    def read(self) -> tuple[int, bool]:
        """Read status, headers and body; return the body length and whether the connection
        stays open for another request."""
        status = self._line().split(None, 2)
        if len(status) < 2 or not status[0].startswith(b"HTTP/"):
            raise BadResponse("bad status line")
        headers = {}
        while line := self._line():
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip().lower()
        if status[1] != b"200":
            raise BadResponse(f"status {status[1].decode(errors='replace')}")
        keep_open = headers.get(b"connection") != b"close"
        if headers.get(b"transfer-encoding") == b"chunked":
            length = 0
            while size := int(self._line().split(b";")[0], 16):
                self._skip(size)
                length += size
                if self._line():
                    raise BadResponse("chunk not followed by CRLF")
            while self._line():
                pass  # trailer fields
        elif b"content-length" in headers:
            length = int(headers[b"content-length"])
            self._skip(length)
        else:
            length = self._skip_to_eof()
            keep_open = False
        return length, keep_open


def classify(exc: BaseException) -> str:
    """Name the failure class of an exception raised while making one request."""
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, ConnectionResetError | BrokenPipeError | ConnectionAbortedError):
        return "reset"
    if isinstance(exc, PrematureEOF):
        return "eof"
    if isinstance(exc, TimeoutError):
        return "timeout"
    return "other"


@dataclass(frozen=True)
class LoadSpec:
    """What one client process asks for, and how."""

    port: int
    size: int
    stop_at: float
    """``time.monotonic()`` after which no new request starts (the clock is system-wide)."""
    timeout: float
    fail_pause: float
    """Seconds to wait after a failure, so a refused port is not hammered in a busy loop."""
    recv_size: int = 65536
    pause: float = 0.0
    keepalive: bool = False


def run_client(spec: LoadSpec) -> tuple[list[tuple[float, float, int]], Counter]:
    """Make requests until ``spec.stop_at``; return ``(start, latency, outcome index)`` per
    request and a count of the "other" failures by message."""
    request = b"GET /bytes/%d HTTP/1.1\r\nHost: x\r\n%s\r\n" % (
        spec.size,
        b"" if spec.keepalive else b"Connection: close\r\n",
    )
    records: list[tuple[float, float, int]] = []
    others: Counter = Counter()
    sock = None
    while (start := time.monotonic()) < spec.stop_at:
        keep_open = False
        try:
            if sock is None:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.settimeout(spec.timeout)
                sock.connect((HOST, spec.port))
                response = _Response(sock, spec.recv_size, spec.pause)
            sock.sendall(request)
            length, keep_open = response.read()
            if length != spec.size:
                raise BadResponse(f"body of {length} bytes, expected {spec.size}")
            outcome = "ok"
        except Exception as exc:  # every failure is classified and counted, none is lost
            outcome = classify(exc)
            if outcome == "other":
                others[f"{type(exc).__name__}: {exc}"] += 1
        records.append((start, time.monotonic() - start, OUTCOMES.index(outcome)))
        if sock is not None and not (keep_open and spec.keepalive):
            sock.close()
            sock = None
        if outcome != "ok":
            time.sleep(spec.fail_pause)
    if sock is not None:
        sock.close()
    return records, others


# --- processes ------------------------------------------------------------------------------


#: CPUs every server process runs on (``Children.spawn``), or None: wherever the kernel puts it.
SERVER_CPUS: set[int] | None = None


def split_cores() -> tuple[set[int], set[int]]:
    """Keep servers and clients apart: servers on the last CPU this process may use, this
    process (and so every client it forks from now on) on the others.  Returns both sets."""
    global SERVER_CPUS
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise RuntimeError("--split-cores needs at least 2 CPUs")
    SERVER_CPUS, clients = {cpus[-1]}, set(cpus[:-1])
    os.sched_setaffinity(0, clients)
    return SERVER_CPUS, clients


def server_child() -> None:
    """In a server's child before exec: die with us, and run on the servers' CPUs."""
    die_with_parent()
    if SERVER_CPUS is not None:
        os.sched_setaffinity(0, SERVER_CPUS)


def die_with_parent() -> None:
    """Have Linux SIGKILL this process when its parent dies, so no child outlives a killed run."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _worker_main(out: Path, kind: str, spec: LoadSpec) -> None:
    """Entry point of a client process: run the load, then write the records to ``out``."""
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent, which stops us
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    records, others = run_client(spec)
    out.write_text(json.dumps({"kind": kind, "records": records, "others": others}))


class Workers:
    """The client processes of one run: started together, joined with a bound, killed if late."""

    def __init__(self, tmp: Path) -> None:
        self._tmp = tmp
        self._procs: list[tuple[Path, BaseProcess]] = []
        self._ctx = multiprocessing.get_context("fork")

    def start(self, kind: str, spec: LoadSpec) -> None:
        """Start one client process of ``kind`` ("client" or "download")."""
        out = self._tmp / f"{kind}-{len(self._procs)}.json"
        proc = self._ctx.Process(target=_worker_main, args=(out, kind, spec), daemon=True)
        proc.start()
        self._procs.append((out, proc))

    def join(self, timeout: float) -> list[dict]:
        """Wait up to ``timeout`` seconds for every client to finish; return their results."""
        deadline = time.monotonic() + timeout
        for _, proc in self._procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        late = [proc.pid for _, proc in self._procs if proc.is_alive()]
        if late:
            raise RuntimeError(f"client processes {late} still running after {timeout:.0f} s")
        crashed = [proc.pid for _, proc in self._procs if proc.exitcode != 0]
        if crashed:
            raise RuntimeError(f"client processes {crashed} crashed")
        return [json.loads(out.read_text()) for out, _ in self._procs]

    def kill(self) -> None:
        """Kill and reap every client process still alive."""
        for _, proc in self._procs:
            if proc.is_alive():
                proc.kill()
            proc.join(5)


class ServerDied(RuntimeError):
    """A server process exited when it should have been serving."""


class Children:
    """Every server process of one run, each logging to its own file in ``tmp``."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self._procs: list[subprocess.Popen] = []
        self._names: dict[int, str] = {}

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None):
        """Start ``argv`` in its own session (Ctrl-C reaches only us), stdout to ``name.log``."""
        with open(self.tmp / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.tmp,
                env=env,
                start_new_session=True,
                preexec_fn=server_child,
            )
        self._procs.append(proc)
        self._names[proc.pid] = name
        return proc

    def name(self, proc: subprocess.Popen) -> str:
        """The name ``proc`` was spawned with."""
        return self._names[proc.pid]

    def log_tail(self, proc: subprocess.Popen, lines: int = 15) -> str:
        """The last lines ``proc`` logged, to explain a failure."""
        path = self.tmp / f"{self.name(proc)}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, proc: subprocess.Popen, timeout: float) -> int:
        """SIGTERM ``proc``, wait up to ``timeout`` seconds, then SIGKILL; return its exit code."""
        if proc.poll() is None:
            proc.terminate()
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait(5)

    def alive(self) -> list[subprocess.Popen]:
        """The processes that have not exited yet."""
        return [proc for proc in self._procs if proc.poll() is None]

    def kill_all(self) -> None:
        """SIGKILL and reap every process still alive."""
        for proc in self.alive():
            proc.kill()
        for proc in self._procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                print(f"pid {proc.pid} did not die after SIGKILL", file=sys.stderr)


def wait_until(ready, procs, timeout: float, what: str, children: Children) -> None:
    """Poll ``ready()`` until true; raise if one of ``procs`` exits or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while not ready():
        for proc in procs:
            if proc.poll() is not None:
                raise ServerDied(
                    f"pid {proc.pid} exited with {proc.returncode} while {what}:\n"
                    + children.log_tail(proc)
                )
        if time.monotonic() > deadline:
            raise ServerDied(f"timed out after {timeout:.0f} s {what}")
        time.sleep(0.01)


def accepts_connections(port: int) -> bool:
    """Whether a TCP connect to 127.0.0.1:port succeeds now."""
    try:
        with socket.create_connection((HOST, port), timeout=1):
            return True
    except OSError:
        return False


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def graceful_available(twistd: str) -> bool:
    """Whether ``twistd graceful`` can run here (its ``--help`` works)."""
    try:
        done = subprocess.run(
            [twistd, "graceful", "--help"], capture_output=True, timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


# --- restart modes --------------------------------------------------------------------------


class Restarter:
    """Start the first server, then restart it one way (one subclass per mode).

    Times in the events that ``restart`` returns are ``time.monotonic()`` values.
    """

    current: subprocess.Popen
    """The server that serves now (set by ``start``)."""

    def __init__(self, children: Children, port: int, args: argparse.Namespace) -> None:
        self.children = children
        self.port = port
        self.args = args
        self.generation = 0
        self.server_kind = ""

    def launch(self) -> subprocess.Popen:
        """Start the server of the next generation (not waiting for it)."""
        raise NotImplementedError

    def wait_serving(self, proc: subprocess.Popen) -> None:
        """Return once ``proc`` is serving."""
        wait_until(
            lambda: accepts_connections(self.port),
            [proc],
            self.args.start_timeout,
            f"starting {self.children.name(proc)}",
            self.children,
        )

    def start(self) -> None:
        """Start the first server and wait until it serves."""
        self.current = self.launch()
        self.wait_serving(self.current)

    def restart(self) -> dict:
        """Restart the server once; return what happened."""
        raise NotImplementedError

    def stop(self) -> dict[int, int]:
        """SIGTERM every server still running, old ones draining included; return exit codes."""
        return {
            proc.pid: self.children.stop(proc, self.args.drain_timeout)
            for proc in self.children.alive()
        }

    def _next_name(self) -> str:
        name = f"gen{self.generation}"
        self.generation += 1
        return name

    def _standalone(self, reuseport: bool) -> tuple[subprocess.Popen, Path]:
        name = self._next_name()
        ready = self.children.tmp / f"{name}.ready"
        argv = [sys.executable, str(HERE / "reuseport_server.py"), "--port", str(self.port)]
        argv += ["--ready-file", str(ready)] + (["--reuseport"] if reuseport else [])
        return self.children.spawn(name, argv), ready

    def _graceful_argv(self, name: str, *service_args: str) -> list[str]:
        pidfile = str(self.children.tmp / f"{name}.pid")
        return [self.args.twistd, "-n", "--pidfile", pidfile, "graceful", *service_args]

    def _graceful_first(self, control: Path) -> subprocess.Popen:
        name = self._next_name()
        port = f"tcp:{self.port}:interface={HOST}"
        argv = self._graceful_argv(name, "--port", port, "--control", str(control))
        return self.children.spawn(name, argv)


class NaiveRestarter(Restarter):
    """SIGTERM, wait for the exit, (optionally idle ``--down-time``), start anew, wait to serve."""

    def __init__(self, children: Children, port: int, args: argparse.Namespace) -> None:
        super().__init__(children, port, args)
        self.use_graceful = args.naive_server == "graceful"
        self.server_kind = "twistd graceful" if self.use_graceful else "reuseport_server.py"

    def launch(self) -> subprocess.Popen:
        """Start the same server as graceful mode, or the standalone one without SO_REUSEPORT."""
        if self.use_graceful:
            return self._graceful_first(self.children.tmp / f"control-{self.generation}.sock")
        return self._standalone(reuseport=False)[0]

    def restart(self) -> dict:
        """Stop the server, then start a new one on the port the old one closed."""
        old, start = self.current, time.monotonic()
        old_exit = self.children.stop(old, self.args.drain_timeout)
        stopped = time.monotonic()
        time.sleep(self.args.down_time)
        self.current = self.launch()
        self.wait_serving(self.current)
        end = time.monotonic()
        return {
            "start": start,
            "end": end,
            "old_pid": old.pid,
            "old_exit": old_exit,
            "new_pid": self.current.pid,
            "stop_s": stopped - start,
            "down_s": end - stopped,
        }


class ReuseportRestarter(Restarter):
    """Start a second SO_REUSEPORT server, wait for its ready file, then SIGTERM the old one."""

    def __init__(self, children: Children, port: int, args: argparse.Namespace) -> None:
        super().__init__(children, port, args)
        self.server_kind = "reuseport_server.py --reuseport"
        self._ready: dict[int, Path] = {}

    def launch(self) -> subprocess.Popen:
        """Start a standalone server with SO_REUSEPORT and remember its ready file."""
        proc, ready = self._standalone(reuseport=True)
        self._ready[proc.pid] = ready
        return proc

    def wait_serving(self, proc: subprocess.Popen) -> None:
        """Wait for the ready file: the port accepts anyway while the old server lives."""
        ready = self._ready[proc.pid]
        wait_until(ready.exists, [proc], self.args.start_timeout, "starting", self.children)

    def restart(self) -> dict:
        """Start the new server, then stop the old one once the new one listens."""
        old, start = self.current, time.monotonic()
        self.current = self.launch()
        self.wait_serving(self.current)
        overlap = time.monotonic()
        old_exit = self.children.stop(old, self.args.drain_timeout)
        end = time.monotonic()
        return {
            "start": start,
            "end": end,
            "old_pid": old.pid,
            "old_exit": old_exit,
            "new_pid": self.current.pid,
            "new_ready_s": overlap - start,
            "stop_s": end - overlap,
        }


class GracefulRestarter(Restarter):
    """``twistd graceful --takeover``: the restart ends when the old process has drained and
    exited 0 by itself; it failed if the successor exits or the old one exits otherwise."""

    def __init__(self, children: Children, port: int, args: argparse.Namespace) -> None:
        super().__init__(children, port, args)
        self.server_kind = "twistd graceful"
        self.control = children.tmp / "control.sock"

    def launch(self) -> subprocess.Popen:
        """Start the first generation, listening on the port and on the control socket."""
        return self._graceful_first(self.control)

    def wait_serving(self, proc: subprocess.Popen) -> None:
        """Wait until the port accepts and the control socket exists."""
        wait_until(
            lambda: self.control.exists() and accepts_connections(self.port),
            [proc],
            self.args.start_timeout,
            "starting the first generation",
            self.children,
        )

    def restart(self) -> dict:
        """Start a successor with ``--takeover`` and wait for one of the two to exit."""
        old, start = self.current, time.monotonic()
        name = self._next_name()
        argv = self._graceful_argv(name, "--takeover", str(self.control))
        if self.args.successor_priority == "idle":
            # As graceful-ctl restart and SIGHUP start it: at idle priority until it connects.
            from graceful_plugin.takeover import idleChildren

            with idleChildren():
                new = self.children.spawn(name, argv)
        else:
            new = self.children.spawn(name, argv)
        deadline = start + self.args.start_timeout + self.args.drain_timeout
        while old.poll() is None and new.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        event = {"start": start, "end": time.monotonic(), "old_pid": old.pid, "new_pid": new.pid}
        event["old_exit"] = old.poll()
        if new.poll() is not None:
            failed = f"successor exited {new.returncode}"
            event.update(failed=failed, log=self.children.log_tail(new))
            if old.returncode is None:
                return event  # the old generation serves on
        elif old.returncode is None:
            event["failed"] = "old generation still running at the deadline"
        elif old.returncode != 0:
            event["failed"] = f"old generation exited {old.returncode}, not 0"
        self.current = new
        return event


RESTARTERS = {
    "naive": NaiveRestarter,
    "reuseport": ReuseportRestarter,
    "graceful": GracefulRestarter,
}


# --- statistics -----------------------------------------------------------------------------


def percentile(sorted_values: list[float], fraction: float) -> float | None:
    """Nearest-rank percentile of already sorted values (None when there are none)."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[rank - 1]


def latency_ms(latencies: list[float]) -> dict:
    """Count, p50, p99 and max of latencies given in seconds, in milliseconds."""
    values = sorted(latencies)
    result: dict = {"count": len(values)}
    for key, fraction in (("p50", 0.5), ("p99", 0.99), ("max", 1.0)):
        value = percentile(values, fraction)
        result[key] = None if value is None else round(value * 1000, 3)
    return result


def count_outcomes(records: list[tuple[float, float, int]]) -> dict:
    """Total, ok, failed and failures by class of a list of records."""
    counts = Counter(OUTCOMES[outcome] for _, _, outcome in records)
    return {
        "total": len(records),
        "ok": counts["ok"],
        "failed": len(records) - counts["ok"],
        "by_class": {name: counts[name] for name in FAILURES},
    }


def _overlaps(record: tuple[float, float, int], window: tuple[float, float]) -> bool:
    start, latency, _ = record
    return start <= window[1] and start + latency >= window[0]


def summarize(results: list[dict], events: list[dict], origin: float, window: float) -> dict:
    """All the numbers of one run; times become seconds since ``origin`` (the load's start).

    Latency counts successful client requests only (a refused connect is fast, not good).
    A request is "near a restart" when it overlaps ``[start - window, end + window]`` of one.
    """
    records: dict[str, list[tuple[float, float, int]]] = {"client": [], "download": []}
    others: Counter = Counter()
    for result in results:
        records[result["kind"]] += [(s - origin, lat, o) for s, lat, o in result["records"]]
        others.update(result["others"])
    for event in events:
        event["start"] = round(event["start"] - origin, 4)
        event["end"] = round(event["end"] - origin, 4)
    windows = [(e["start"] - window, e["end"] + window) for e in events]
    clients = records["client"]
    ok = [r for r in clients if r[2] == 0]
    near = [r for r in ok if any(_overlaps(r, w) for w in windows)]
    steady = [r for r in ok if not any(_overlaps(r, w) for w in windows)]
    for event, win in zip(events, windows, strict=True):
        inside = [r for r in clients if _overlaps(r, win)]
        event["window"] = [round(win[0], 4), round(win[1], 4)]
        event["requests"] = count_outcomes(inside)
        event["latency_ms"] = latency_ms([r[1] for r in inside if r[2] == 0])
    steady_p99 = latency_ms([r[1] for r in steady])["p99"]
    near_p99 = latency_ms([r[1] for r in near])["p99"]
    return {
        "requests": count_outcomes(clients),
        "downloads": count_outcomes(records["download"]),
        "other_failures": dict(others.most_common(20)),
        "latency_ms": latency_ms([r[1] for r in ok]),
        "steady_latency_ms": latency_ms([r[1] for r in steady]),
        "near_restart_latency_ms": latency_ms([r[1] for r in near]),
        "ratio": round(near_p99 / steady_p99, 3) if near_p99 and steady_p99 else None,
        "restarts": events,
        "timeline": timeline(clients + records["download"]),
        "_records": records,
    }


def timeline(records: list[tuple[float, float, int]], step: float = 1.0) -> list[dict]:
    """Per ``step`` seconds of start time: ok and failed requests, p99 of the ok ones (ms)."""
    buckets: dict[int, list] = {}
    for record in records:
        buckets.setdefault(int(record[0] // step), []).append(record)
    rows = []
    for index in sorted(buckets):
        bucket = buckets[index]
        ok = [r[1] for r in bucket if r[2] == 0]
        rows.append(
            {
                "t": round(index * step, 3),
                "ok": len(ok),
                "failed": len(bucket) - len(ok),
                "p99_ms": latency_ms(ok)["p99"],
            }
        )
    return rows


def verdicts(run: dict) -> dict:
    """The graceful targets, checked against one run's numbers (every restart completed too)."""
    failed = run["requests"]["failed"] + run["downloads"]["failed"]
    ratio = run["ratio"]
    return {
        "restarts_ok": not any("failed" in event for event in run["restarts"]),
        "zero_failures": failed == 0,
        "ratio_within_target": ratio is not None and ratio <= TARGET_RATIO,
    }


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Ignore SIGINT and SIGTERM inside the block, so a second Ctrl-C cannot cut a cleanup
    short (leaving processes or files behind)."""
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {signum: signal.signal(signum, signal.SIG_IGN) for signum in held}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


# --- one run --------------------------------------------------------------------------------


def run_mode(mode: str, args: argparse.Namespace) -> dict:
    """Serve, load, restart ``args.restarts`` times, stop; return the run's numbers."""
    tmp = Path(tempfile.mkdtemp(prefix=f"graceful-bench-{mode}-"))
    children, workers = Children(tmp), Workers(tmp)
    try:
        port = args.port or free_port()
        restarter = RESTARTERS[mode](children, port, args)
        restarter.start()
        origin = time.monotonic()
        stop_at = origin + args.duration
        client = LoadSpec(port, args.body, stop_at, args.timeout, args.fail_pause)
        for _ in range(args.clients):
            workers.start("client", client)
        recv_size = 16384
        download = LoadSpec(
            port,
            args.download_size,
            stop_at,
            args.timeout,
            args.fail_pause,
            recv_size=recv_size,
            pause=recv_size / args.download_rate,
        )
        for _ in range(args.downloaders):
            workers.start("download", download)
        events = []
        for index in range(args.restarts):
            time.sleep(max(0.0, origin + args.interval * (index + 1) - time.monotonic()))
            events.append(restarter.restart())
        time.sleep(max(0.0, stop_at - time.monotonic()))
        results = workers.join(args.timeout + args.download_size / args.download_rate + 30)
        alive_at_end = restarter.current.poll() is None
        exits = restarter.stop()
        run = summarize(results, events, origin, args.window)
        run.update(
            mode=mode,
            server=restarter.server_kind,
            port=port,
            duration_s=args.duration,
            server_alive_at_end=alive_at_end,
            final_exit_codes=exits,
        )
        run["targets"] = verdicts(run)
        return run
    finally:
        with signals_held():
            workers.kill()
            children.kill_all()
            if args.keep_tmp:
                print(f"kept {tmp}", file=sys.stderr)
            else:
                shutil.rmtree(tmp, ignore_errors=True)


# --- output ---------------------------------------------------------------------------------


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.1f}" if isinstance(value, float) else str(value)


def table(runs: list[dict]) -> str:
    """One line per run: requests, failures by class, latency, and the graceful targets."""
    head = ["mode", "requests", "failed", *FAILURES, "downloads", "dl failed"]
    head += ["p50 ms", "p99 ms", "max ms", "steady p99", "near p99", "ratio"]
    rows = [head]
    for run in runs:
        req, lat = run["requests"], run["latency_ms"]
        rows.append(
            [run["mode"], req["total"], req["failed"], *req["by_class"].values()]
            + [run["downloads"]["total"], run["downloads"]["failed"]]
            + [lat["p50"], lat["p99"], lat["max"]]
            + [run["steady_latency_ms"]["p99"], run["near_restart_latency_ms"]["p99"]]
            + [None if run["ratio"] is None else f"{run['ratio']:.2f}"]
        )
    cells = [[_fmt(value) for value in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(head))]
    lines = [
        "  ".join(
            cell.rjust(width) if column else cell.ljust(width)
            for column, (cell, width) in enumerate(zip(row, widths, strict=True))
        )
        for row in cells
    ]
    lines.append(
        f"targets (graceful): 0 failed requests and downloads; p99 near restarts <= "
        f"{TARGET_RATIO} x steady p99"
    )
    for run in runs:
        marks = ", ".join(
            f"{name} {'PASS' if ok else 'FAIL'}" for name, ok in run["targets"].items()
        )
        spans = " ".join(f"{e['end'] - e['start']:.2f}" for e in run["restarts"])
        lines.append(f"  {run['mode']}: {marks}; restart durations (s): {spans}")
        if not run["server_alive_at_end"]:
            lines.append("    the server had died before the load ended: see the failures")
        for message, count in run["other_failures"].items():
            lines.append(f"    other x{count}: {message}")
        for event in run["restarts"]:
            if "failed" in event:
                lines.append(f"    restart at {event['start']:.2f} s failed: {event['failed']}")
    return "\n".join(lines)


def plot(runs: list[dict], path: Path) -> None:
    """Draw requests and failures per 100 ms, and every request's latency, with restarts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2 * len(runs), 1, figsize=(11, 5.5 * len(runs)), squeeze=False)
    step = 0.1
    for index, run in enumerate(runs):
        rate_ax, lat_ax = axes[2 * index][0], axes[2 * index + 1][0]
        clients = run["_records"]["client"]
        end = max((r[0] for r in clients), default=0.0) + step
        bins = [i * step for i in range(int(end / step) + 1)]
        ok = [r[0] for r in clients if r[2] == 0]
        failed = [r[0] for r in clients if r[2] != 0]
        rate_ax.hist(
            [ok, failed],
            bins=bins,
            stacked=True,
            color=["tab:blue", "tab:red"],
            label=["ok", "failed"],
        )
        rate_ax.set_ylabel(f"requests / {step:g} s")
        rate_ax.set_title(
            f"{run['mode']}: {run['requests']['failed']} failed of "
            f"{run['requests']['total']} requests, "
            f"{run['downloads']['failed']} of {run['downloads']['total']} downloads"
        )
        lat_ax.scatter(
            [r[0] for r in clients if r[2] == 0],
            [r[1] * 1000 for r in clients if r[2] == 0],
            s=2,
            alpha=0.4,
            label="ok request",
        )
        lat_ax.scatter(
            failed,
            [r[1] * 1000 for r in clients if r[2] != 0],
            s=6,
            color="tab:red",
            label="failed request",
        )
        lat_ax.set_yscale("log")
        lat_ax.set_ylabel("latency (ms)")
        lat_ax.set_xlabel("seconds since the load started")
        for ax in (rate_ax, lat_ax):
            for event in run["restarts"]:
                ax.axvspan(event["start"], event["end"], color="orange", alpha=0.3)
                ax.axvline(event["start"], color="orange")
            ax.set_xlim(0, end)
        lat_ax.legend(loc="upper right", markerscale=4)
        rate_ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def machine() -> dict:
    """Where the numbers were measured."""
    try:
        twisted_version = metadata.version("twisted")
    except metadata.PackageNotFoundError:
        twisted_version = None
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "twisted": twisted_version,
        "platform": platform.platform(),
    }


# --- command line ---------------------------------------------------------------------------


class HardTimeout(Exception):
    """The whole run took longer than ``--hard-timeout``."""


def raise_on_signal(exc: BaseException):
    """A signal handler that raises ``exc`` in the main thread, so ``finally`` blocks clean up."""

    def handler(signum, frame):
        raise exc

    return handler


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Read and check the command line."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add(
        "--mode",
        action="append",
        choices=sorted(RESTARTERS),
        help="restart method; repeat to run several in turn (default: graceful)",
    )
    add("--clients", type=int, default=16, help="client processes making short requests")
    add("--body", type=int, default=1024, help="body size of a short request, bytes")
    add("--downloaders", type=int, default=0, help="processes downloading a large body slowly")
    add("--download-size", type=int, default=8 * 1024 * 1024, help="bytes per download")
    add(
        "--download-rate",
        type=float,
        default=4 * 1024 * 1024,
        help="bytes per second each downloader reads at most",
    )
    add("--restarts", type=int, default=5, help="restarts during the run")
    add("--interval", type=float, default=5.0, help="seconds between restarts")
    add("--duration", type=float, help="seconds of load (default: interval x (restarts + 1))")
    add(
        "--window",
        type=float,
        default=1.0,
        help="seconds either side of a restart counted as near it",
    )
    add(
        "--successor-priority",
        choices=("idle", "normal"),
        default="idle",
        help="graceful mode: start each successor at idle priority, as graceful-ctl restart "
        "and SIGHUP do (default), or at normal priority, as a plain twistd --takeover does",
    )
    add("--timeout", type=float, default=10.0, help="socket timeout of a request, seconds")
    add("--fail-pause", type=float, default=0.01, help="seconds a client waits after a failure")
    add(
        "--down-time",
        type=float,
        default=0.0,
        help="naive mode: extra seconds between the old server's exit and the new one's start",
    )
    add(
        "--naive-server",
        choices=["auto", "graceful", "standalone"],
        default="auto",
        help="naive mode's server: twistd graceful, or reuseport_server.py without SO_REUSEPORT "
        "(auto: graceful when available)",
    )
    add("--port", type=int, default=0, help="TCP port on 127.0.0.1 (default: a free one)")
    add("--twistd", default=str(Path(sys.executable).with_name("twistd")), help="twistd to run")
    add("--start-timeout", type=float, default=30.0, help="seconds a server may take to start")
    add("--drain-timeout", type=float, default=30.0, help="seconds an old server may take to exit")
    add("--hard-timeout", type=float, help="abort the whole run after this many seconds")
    add("--json", type=Path, help="write every number to this file")
    add("--plot", type=Path, help="draw a PNG here (needs matplotlib)")
    add("--keep-tmp", action="store_true", help="keep sockets, pidfiles and logs for reading")
    args = parser.parse_args(argv)
    args.mode = args.mode or ["graceful"]
    if args.duration is None:
        args.duration = args.interval * (args.restarts + 1)
    if args.duration <= args.interval * args.restarts:
        parser.error("--duration must be longer than --interval x --restarts")
    if min(args.clients, args.body, args.download_size, args.downloaders, args.restarts) < 0:
        parser.error("sizes and counts must not be negative")
    if min(args.download_rate, args.interval, args.timeout) <= 0:
        parser.error("--download-rate, --interval and --timeout must be more than 0")
    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("--plot needs matplotlib (pip install 'graceful[bench]')")
    needs_graceful = "graceful" in args.mode or (
        "naive" in args.mode and args.naive_server != "standalone"
    )
    has_graceful = needs_graceful and graceful_available(args.twistd)
    if "graceful" in args.mode and not has_graceful:
        parser.error(f"'{args.twistd} graceful' does not run here: no graceful mode")
    if args.naive_server == "auto":
        args.naive_server = "graceful" if has_graceful else "standalone"
    if args.hard_timeout is None:
        per_run = args.duration + args.restarts * 10 + args.start_timeout + args.drain_timeout
        args.hard_timeout = len(args.mode) * (per_run + args.download_size / args.download_rate)
    return args


def main(argv: list[str] | None = None) -> int:
    """Run each mode, print the table, write the JSON and the plot; 2 when a run broke."""
    args = parse_args(argv)
    for signum in (signal.SIGINT, signal.SIGTERM):  # SIGINT too: a shell may have ignored it
        signal.signal(signum, raise_on_signal(KeyboardInterrupt()))
    signal.signal(
        signal.SIGALRM, raise_on_signal(HardTimeout(f"run exceeded {args.hard_timeout:.0f} s"))
    )
    signal.setitimer(signal.ITIMER_REAL, args.hard_timeout)
    runs = []
    try:
        for mode in args.mode:
            print(
                f"{mode}: {args.clients} clients, {args.downloaders} downloaders, "
                f"{args.restarts} restarts every {args.interval:g} s, {args.duration:g} s",
                file=sys.stderr,
                flush=True,
            )
            runs.append(run_mode(mode, args))
    except (ServerDied, HardTimeout, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: every process stopped, temporary files removed", file=sys.stderr)
        return 130
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    print(table(runs))
    if args.json is not None:
        public = [{k: v for k, v in run.items() if not k.startswith("_")} for run in runs]
        document = {"machine": machine(), "config": vars(args), "runs": public}
        args.json.write_text(json.dumps(document, indent=1, default=str) + "\n")
    if args.plot is not None:
        plot(runs, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
