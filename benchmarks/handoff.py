"""Measure what one graceful handoff costs: its phases, its scale, its drain.

    python benchmarks/handoff.py --json handoff.json

1. phases: ``--takeovers`` successive takeovers of a server with one listener and no load; the
   successor's log line gives connect to fds, adopt, ready, commit (connect to commit in all) and
   confirm; the predecessor's drain-to-exit time is from its "draining" log line to its exit.
2. scale: connect to commit against the number of listeners (``--listeners``, each
   ``--port l{i}=tcp:0:interface=127.0.0.1``), ``--scale-takeovers`` takeovers each.
3. drain: K idle keep-alive connections (``--connections``), each having had one complete
   request and response, then a takeover, which hands them over to the successor: time from the
   successor's commit to the predecessor's exit, how many it handed over, and the predecessor's
   RSS before and after opening the K connections.

Servers log JSON lines (``--logger graceful_plugin.jsonlog.stdoutObserver``), one file per
process. Standard library only. Every process started is killed and reaped and the temporary
directory removed at the end, on errors, Ctrl-C and the hard timeout (``--hard-timeout``) too.
"""

import argparse
import ctypes
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HOST = "127.0.0.1"
TARGET_COMMIT_MS = 15.0
"""Design target for connect to commit (the issue asks for 50 ms)."""
ISSUE_COMMIT_MS = 50.0
TARGET_1000_MS = 1000.0
"""1,000 listeners handed over in under 1 s."""
PHASES = (
    ("fds", "fdsMs", "connect -> fds received"),
    ("adopt", "adoptMs", "adopt"),
    ("ready", "readyMs", "app ready"),
    ("commit", "commitMs", "commit round trip"),
    ("handoff", "ms", "connect -> commit (total)"),
    ("confirm", "confirmMs", "commit -> confirmed"),
    ("drain_to_exit", None, "predecessor draining -> exit"),
)
_PR_SET_PDEATHSIG = 1


class HardTimeout(Exception):
    """The whole run took longer than ``--hard-timeout``."""


class Failed(RuntimeError):
    """A server did not do what a handoff should."""


def _die_with_parent() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class Servers:
    """Every server process of the run, each with its own JSON log file in ``tmp``."""

    def __init__(self, tmp: Path, twistd: str) -> None:
        self.tmp = tmp
        self.twistd = twistd
        self.procs: list[subprocess.Popen] = []
        self.logs: dict[int, Path] = {}

    def spawn(self, *service_args: str) -> subprocess.Popen:
        """Start ``twistd -n graceful ARGS`` with JSON logs to a file of its own."""
        name = f"server-{len(self.procs)}"
        argv = [self.twistd, "--logger", "graceful_plugin.jsonlog.stdoutObserver", "-n"]
        argv += ["--pidfile", str(self.tmp / f"{name}.pid"), "graceful", *service_args]
        log = self.tmp / f"{name}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.tmp,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        self.procs.append(proc)
        self.logs[proc.pid] = log
        return proc

    def events(self, proc: subprocess.Popen) -> list[dict]:
        """Every complete JSON event ``proc`` has logged so far."""
        found = []
        for line in self.logs[proc.pid].read_text(errors="replace").splitlines():
            try:
                found.append(json.loads(line))
            except ValueError:
                pass
        return found

    def find(self, proc: subprocess.Popen, match) -> dict | None:
        """The first event of ``proc`` for which ``match(event)`` is true."""
        return next((e for e in self.events(proc) if match(e)), None)

    def tail(self, proc: subprocess.Popen, lines: int = 8) -> str:
        """The last log lines of ``proc`` (their text), to explain a failure."""
        texts = [e.get("text", "") for e in self.events(proc)]
        return "\n".join(texts[-lines:])

    def kill_all(self) -> None:
        """SIGKILL and reap every process still alive."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                print(f"pid {proc.pid} did not die after SIGKILL", file=sys.stderr)


def _is_serving(event: dict) -> bool:
    return str(event.get("log_format", "")).startswith(
        "generation {generation} (pid {pid}) serving"
    )


def _is_takeover(event: dict) -> bool:
    return event.get("log_namespace") == "graceful_plugin.takeover" and "fdsMs" in event


def _is_draining(event: dict) -> bool:
    return str(event.get("log_format", "")).startswith("generation {generation} draining")


def start_first(servers: Servers, control: Path, ports: list[str], timeout: float):
    """Start the first generation; return it and its "serving on" event once it serves."""
    args = []
    for spec in ports:
        args += ["--port", spec]
    proc = servers.spawn(*args, "--control", str(control))
    deadline = time.monotonic() + timeout
    while (serving := servers.find(proc, _is_serving)) is None or not control.exists():
        if proc.poll() is not None:
            raise Failed(f"first server exited {proc.returncode}:\n{servers.tail(proc)}")
        if time.monotonic() > deadline:
            raise Failed(f"first server not serving after {timeout:.0f} s")
        time.sleep(0.01)
    return proc, serving


def take_over(servers: Servers, old: subprocess.Popen, control: Path, timeout: float):
    """Start a successor, wait for the old generation to exit 0; return (new process, sample).

    The sample holds the successor's phase timings (ms), the wall-clock time of its commit, and
    the predecessor's exit time (polled every millisecond), in ``time.time()`` seconds.
    """
    new = servers.spawn("--takeover", str(control))
    deadline = time.monotonic() + timeout
    while old.poll() is None:
        if new.poll() is not None:
            raise Failed(f"successor exited {new.returncode}:\n{servers.tail(new)}")
        if time.monotonic() > deadline:
            raise Failed(f"predecessor {old.pid} still running after {timeout:.0f} s")
        time.sleep(0.001)
    exited = time.time()
    if old.returncode != 0:
        raise Failed(f"predecessor exited {old.returncode}:\n{servers.tail(old)}")
    while (line := servers.find(new, _is_takeover)) is None:
        if new.poll() is not None or time.monotonic() > deadline:
            raise Failed(f"successor {new.pid} logged no takeover:\n{servers.tail(new)}")
        time.sleep(0.005)
    draining = servers.find(old, _is_draining)
    if draining is None:
        raise Failed(f"predecessor {old.pid} logged no draining line:\n{servers.tail(old)}")
    # The line is logged right after the confirmation: its time less confirm is the commit.
    committed = line["log_time"] - line["confirmMs"] / 1000
    sample = {key: line[field] for key, field, _ in PHASES if field}
    sample["listeners_handed_over"] = line.get("listeners")
    sample["drain_to_exit"] = (exited - draining["log_time"]) * 1000
    sample["commit_to_exit"] = (exited - committed) * 1000
    sample["sessions_at_drain"] = draining.get("sessions")
    handed = servers.find(old, lambda event: "handedOver" in event)
    sample["connections_handed_over"] = handed.get("handedOver", 0) if handed else 0
    return new, sample


def summary(values: list[float]) -> dict:
    """Median and max (ms) of ``values``, and the values themselves."""
    return {
        "median": statistics.median(values),
        "max": max(values),
        "samples": [round(v, 3) for v in values],
    }


# --- the three measurements -----------------------------------------------------------------


def measure_phases(servers: Servers, args: argparse.Namespace) -> dict:
    """``--takeovers`` takeovers in a row of one server with one listener, no load."""
    control = servers.tmp / "phases.sock"
    proc, _ = start_first(servers, control, [f"tcp:0:interface={HOST}"], args.start_timeout)
    samples = []
    for _ in range(args.takeovers):
        proc, sample = take_over(servers, proc, control, args.step_timeout)
        samples.append(sample)
    proc.terminate()
    proc.wait(args.step_timeout)
    phases = {key: summary([s[key] for s in samples]) for key, _, _ in PHASES}
    handoff = phases["handoff"]
    return {
        "takeovers": len(samples),
        "phases": phases,
        "target_ms": TARGET_COMMIT_MS,
        "issue_target_ms": ISSUE_COMMIT_MS,
        "met": handoff["max"] <= ISSUE_COMMIT_MS,
        "met_design": handoff["median"] <= TARGET_COMMIT_MS,
    }


def measure_scale(servers: Servers, args: argparse.Namespace) -> list[dict]:
    """Connect to commit for each listener count, ``--scale-takeovers`` takeovers each."""
    rows = []
    for count in args.listeners:
        control = servers.tmp / f"scale-{count}.sock"
        ports = [f"l{i}=tcp:0:interface={HOST}" for i in range(count)]
        began = time.monotonic()
        proc, _ = start_first(servers, control, ports, args.start_timeout)
        start_s = time.monotonic() - began
        samples = []
        for _ in range(args.scale_takeovers):
            proc, sample = take_over(servers, proc, control, args.step_timeout)
            samples.append(sample)
        proc.terminate()
        proc.wait(args.step_timeout)
        row = {"listeners": count, "first_start_s": round(start_s, 3)}
        row["handed_over"] = samples[0]["listeners_handed_over"]
        for key in ("handoff", "fds", "adopt", "commit"):
            row[key] = summary([s[key] for s in samples])
        if count >= 1000:
            row["target_ms"] = TARGET_1000_MS
            row["met"] = row["handoff"]["max"] < TARGET_1000_MS
        rows.append(row)
    return rows


def rss_kib(pid: int) -> int:
    """VmRSS of ``pid`` in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise Failed(f"no VmRSS for pid {pid}")


def _read_response(sock: socket.socket) -> None:
    """Read one complete HTTP/1.1 response with a Content-Length; it must keep the connection."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(4096)
        if not data:
            raise Failed("connection closed before the response headers")
        buf += data
    head, _, body = buf.partition(b"\r\n\r\n")
    headers = {}
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip().lower()
    if not head.startswith(b"HTTP/1.1 200") or headers.get(b"connection") == b"close":
        raise Failed(f"not a keep-alive 200 response: {head[:200]!r}")
    length = int(headers[b"content-length"])
    while len(body) < length:
        data = sock.recv(4096)
        if not data:
            raise Failed("connection closed mid-body")
        body += data


def open_idle(port: int, count: int, batch: int = 250) -> list[socket.socket]:
    """``count`` connections, each after one complete keep-alive request and response."""
    request = b"GET /bytes/16 HTTP/1.1\r\nHost: bench\r\n\r\n"
    socks: list[socket.socket] = []
    try:
        while len(socks) < count:
            group = []
            for _ in range(min(batch, count - len(socks))):
                sock = socket.create_connection((HOST, port), timeout=30)
                socks.append(sock)
                group.append(sock)
                sock.sendall(request)
            for sock in group:
                _read_response(sock)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


def measure_drain(servers: Servers, args: argparse.Namespace) -> list[dict]:
    """For each K: RSS before/after K idle connections, then commit to the predecessor's exit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    rows = []
    for count in args.connections:
        room = soft - 64 - len(os.listdir("/proc/self/fd"))
        if count > room:
            reason = f"needs {count} descriptors, RLIMIT_NOFILE leaves {room} (hard limit {hard})"
            print(f"drain: skipping K={count}: {reason}", file=sys.stderr)
            rows.append({"connections": count, "skipped": reason})
            continue
        control = servers.tmp / f"drain-{count}.sock"
        proc, serving = start_first(
            servers, control, [f"tcp:0:interface={HOST}"], args.start_timeout
        )
        port = int(str(serving["listeners"]).rsplit(":", 1)[1])
        for warm in open_idle(port, 1):  # first request's imports and caches are not per-conn
            warm.close()
        time.sleep(0.2)
        before = rss_kib(proc.pid)
        began = time.monotonic()
        socks = open_idle(port, count)
        try:
            open_s = time.monotonic() - began
            time.sleep(0.2)
            after = rss_kib(proc.pid)
            new, sample = take_over(servers, proc, control, args.step_timeout)
        finally:
            for sock in socks:
                sock.close()
        new.terminate()
        new.wait(args.step_timeout)
        rows.append(
            {
                "connections": count,
                "sessions_at_drain": sample["sessions_at_drain"],
                "handed_over": sample["connections_handed_over"],
                "open_s": round(open_s, 3),
                "commit_to_exit_ms": sample["commit_to_exit"],
                "drain_to_exit_ms": sample["drain_to_exit"],
                "handoff_ms": sample["handoff"],
                "rss_before_kib": before,
                "rss_after_kib": after,
                "kib_per_connection": (after - before) / count,
            }
        )
    return rows


# --- output ---------------------------------------------------------------------------------


def render(result: dict) -> str:
    """The results as plain-text tables, targets next to the numbers."""
    out = []
    phases = result.get("phases")
    if phases:
        out.append(f"Handoff phases, {phases['takeovers']} takeovers, 1 listener, no load (ms)")
        out.append(f"{'phase':32} {'median':>9} {'max':>9}  target")
        for key, _, label in PHASES:
            row = phases["phases"][key]
            target = ""
            if key == "handoff":
                design = "met" if phases["met_design"] else "NOT met"
                issue = "met" if phases["met"] else "NOT met"
                target = (
                    f"median within ~{TARGET_COMMIT_MS:g} ms: {design};"
                    f" issue: max {ISSUE_COMMIT_MS:g} ms: {issue}"
                )
            out.append(f"{label:32} {row['median']:9.2f} {row['max']:9.2f}  {target}")
        out.append("")
    scale = result.get("scale")
    if scale:
        out.append("Scale: connect -> commit against listener count (ms)")
        out.append(
            f"{'listeners':>9} {'fds med':>9} {'adopt med':>9} {'commit med':>10}"
            f" {'total med':>10} {'total max':>10}  target"
        )
        for row in scale:
            target = ""
            if "target_ms" in row:
                verdict = "met" if row["met"] else "NOT met"
                target = f"under {row['target_ms']:g} ms: {verdict}"
            out.append(
                f"{row['listeners']:9d} {row['fds']['median']:9.2f} {row['adopt']['median']:9.2f}"
                f" {row['commit']['median']:10.2f} {row['handoff']['median']:10.2f}"
                f" {row['handoff']['max']:10.2f}  {target}"
            )
        out.append("")
    drain = result.get("drain")
    if drain:
        out.append("Drain: K idle keep-alive connections, successor's commit -> predecessor's exit")
        out.append(
            f"{'K':>6} {'commit->exit ms':>16} {'handed over':>12} {'handoff ms':>11}"
            f" {'RSS before KiB':>15} {'RSS after KiB':>14} {'KiB/conn':>9}"
        )
        for row in drain:
            if "skipped" in row:
                out.append(f"{row['connections']:6d} skipped: {row['skipped']}")
                continue
            out.append(
                f"{row['connections']:6d} {row['commit_to_exit_ms']:16.1f}"
                f" {row['handed_over']:12d} {row['handoff_ms']:11.2f} {row['rss_before_kib']:15d}"
                f" {row['rss_after_kib']:14d} {row['kib_per_connection']:9.2f}"
            )
        out.append(
            "(idle connections move to the successor: the predecessor exits once the last one"
            " has gone over)"
        )
    return "\n".join(out)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--takeovers", type=int, default=10, help="takeovers for the phase timings")
    add("--listeners", type=int, action="append", help="listener counts (default 1 10 100 1000)")
    add("--scale-takeovers", type=int, default=3, help="takeovers per listener count")
    add(
        "--connections",
        type=int,
        action="append",
        help="idle connection counts for the drain (default 1 100 10000)",
    )
    add("--only", choices=("phases", "scale", "drain"), action="append", help="run only these")
    add("--json", type=Path, help="write the results to this file")
    add("--twistd", default=str(Path(sys.executable).with_name("twistd")), help="twistd to run")
    add("--start-timeout", type=float, default=60.0, help="seconds a first server may take")
    add("--step-timeout", type=float, default=60.0, help="seconds one takeover may take")
    add("--hard-timeout", type=float, default=600.0, help="abort the whole run after this")
    args = parser.parse_args(argv)
    args.listeners = args.listeners or [1, 10, 100, 1000]
    args.connections = args.connections or [1, 100, 10000]
    args.only = args.only or ["phases", "scale", "drain"]
    if min(args.takeovers, args.scale_takeovers, *args.listeners, *args.connections) < 1:
        parser.error("counts must be at least 1")
    return args


def _raise(exc: BaseException):
    def handler(signum, frame):
        raise exc

    return handler


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _raise(KeyboardInterrupt()))
    signal.signal(signal.SIGALRM, _raise(HardTimeout(f"run exceeded {args.hard_timeout:g} s")))
    signal.setitimer(signal.ITIMER_REAL, args.hard_timeout)
    tmp = Path(tempfile.mkdtemp(prefix="graceful-handoff-"))
    servers = Servers(tmp, args.twistd)
    result: dict = {
        "command": " ".join([Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)]),
        "machine": {
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "kernel": platform.release(),
        },
    }
    started = time.monotonic()
    try:
        if "phases" in args.only:
            result["phases"] = measure_phases(servers, args)
        if "scale" in args.only:
            result["scale"] = measure_scale(servers, args)
        if "drain" in args.only:
            result["drain"] = measure_drain(servers, args)
    except (Failed, HardTimeout) as e:
        print(f"handoff.py: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("handoff.py: interrupted", file=sys.stderr)
        return 130
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        servers.kill_all()
        shutil.rmtree(tmp, ignore_errors=True)
    result["elapsed_s"] = round(time.monotonic() - started, 1)
    print(render(result))
    print(f"\n{result['elapsed_s']} s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
