"""The latency bump near a takeover, graceful's and its peers' side by side in one run.

    python benchmarks/bump.py --duration 60 --takeovers 20 --plot bump.png --json bump.json

Every server serves the same files (``/bytes/65536`` and ``/bytes/8388608``, made in a temporary
directory) on 127.0.0.1 while closed-loop clients (``--clients`` processes, each on a fresh
connection per request, as fast as they go) and slow downloaders load it, and it is taken over
``--takeovers`` times, evenly spread over ``--duration`` seconds. Every request is binned by its
time since the latest takeover started:

- *near*: requests that started within ``--near`` seconds after a takeover started;
  *away*: requests that started outside ``[-0.5, --away-after]`` seconds of every takeover;
  the table shows p99 near, p99 away and their ratio;
- the completion rate (requests finished per 100 ms bin) after each takeover, against the rate
  in the away bins: its mean over the near window and its lowest bin.

Scenarios (``--scenario``, repeatable; default: all that can run here):

graceful-hup / graceful-ctl / graceful-hand
    ``twistd graceful --path FILES``: SIGHUP, ``graceful-ctl restart``, or a successor started
    by hand (``twistd graceful --takeover``); with the fork server, and ``...-nofork`` with
    ``--no-fork-server``.
graceful-hand-idle
    by hand under ``chrt --idle 0`` (docs/operating.md): the interpreter's and twistd's own
    start-up, before graceful's code runs, at idle priority too.
nginx
    ``nginx -s reload`` (Debian's nginx-light; one worker).
haproxy
    a new ``haproxy -x SOCKET -sf OLDPID`` (``expose-fd listeners``), proxying to an nginx that
    is not reloaded (HAProxy serves no files itself).
gunicorn-hup / gunicorn-usr2
    gunicorn (one gthread worker) serving the files through ``static_wsgi.py``: SIGHUP (the
    arbiter forks new workers), or SIGUSR2 (a re-exec of the arbiter) then SIGTERM to the old
    arbiter once the new one has a worker.

Each server is started by this tool with its own temporary configuration and stopped by it, by
pid; this process is a child subreaper, so every process a server starts is reaped here too.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bumptrace  # noqa: E402  (--timeline: where the bump comes from)
import loadtest  # noqa: E402  (the load generator: its clients and process handling)

HOST = loadtest.HOST
BIN = Path(sys.executable).parent
SMALL = 65536
LARGE = 8 * 1024 * 1024
STEP = 0.1
#: Seconds at the start of the load that count as neither near nor away.
WARMUP = 1.0
GRACEFUL = ("graceful-hup", "graceful-ctl", "graceful-hand")
SCENARIOS = (
    *GRACEFUL,
    *(f"{name}-nofork" for name in GRACEFUL),
    "graceful-hand-idle",
    "nginx",
    "haproxy",
    "gunicorn-hup",
    "gunicorn-usr2",
)
TARGET_RATIO = 1.15
TARGET_RATE = 0.90


def become_subreaper() -> None:
    """Orphaned descendants (successors, new masters) become our children, so we reap them."""
    ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER


def children_of(pid: int) -> list[int]:
    """The pids whose parent is ``pid``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return found


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def reap_all() -> None:
    """Reap every child that has exited (we are a subreaper)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def stop_descendants(timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL, every process we started or inherited, by pid; reap them."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        deadline = time.monotonic() + timeout
        while True:
            reap_all()
            pids = [pid for pid in children_of(os.getpid()) if alive(pid)]
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
    reap_all()


def cpu_ms(pid: int) -> float | None:
    """CPU time (user + system) ``pid`` has used so far, in ms (10 ms resolution)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) * 1000 / os.sysconf("SC_CLK_TCK")


def read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise loadtest.ServerDied(f"timed out after {timeout:g} s {what}")
        time.sleep(0.005)


def serves(port: int) -> bool:
    """Whether a GET of the small file works now."""
    import socket

    try:
        with socket.create_connection((HOST, port), timeout=2) as sock:
            sock.sendall(b"GET /bytes/%d HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % SMALL)
            return loadtest._Response(sock, 65536, 0).read()[0] == SMALL
    except (OSError, loadtest.PrematureEOF, loadtest.BadResponse):
        return False


# --- servers ----------------------------------------------------------------------------------


class Server:
    """One server under test: started, taken over N times, stopped (subclasses per kind)."""

    def __init__(self, name: str, tmp: Path, files: Path, port: int, args) -> None:
        self.name = name
        self.tmp = tmp
        self.files = files
        self.port = port
        self.args = args
        self.children = loadtest.Children(tmp)
        self.count = 0

    def spawn(self, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        self.count += 1
        return self.children.spawn(f"{self.name}-{self.count}", argv, env=env)

    def start(self) -> None:
        raise NotImplementedError

    def takeover(self) -> dict:
        """Start one takeover; return its event (``start``: monotonic time it began)."""
        raise NotImplementedError

    def settle(self, event: dict, until: float) -> None:
        """Wait (until ``until`` at most) for the takeover to have completed, and note when."""

    def stop(self) -> None:
        stop_descendants()


class Graceful(Server):
    def __init__(self, *a) -> None:
        super().__init__(*a)
        self.control = self.tmp / "c.sock"
        self.pidfile = self.tmp / "g.pid"
        self.fork = not self.name.endswith("-nofork")
        self.how = self.name.split("-")[1]

    def command(self, *extra: str) -> list[str]:
        argv = [str(BIN / "twistd")]
        if self.args.timeline:
            argv += ["--logger", "tracelog.observer"]
        argv += ["-n", "--pidfile", str(self.pidfile), "graceful"]
        argv += ["--path", str(self.files), "--control", str(self.control)]
        argv += ["--drain-timeout", "30"] + ([] if self.fork else ["--no-fork-server"])
        return argv + list(extra)

    def start(self) -> None:
        extra = ["--workers", str(self.args.workers)] if self.args.workers != 1 else []
        first = self.spawn(self.command("--port", f"tcp:{self.port}:interface={HOST}", *extra))
        wait_for(lambda: serves(self.port), 30, f"starting {self.name}")
        self.old = first.pid
        if self.args.workers != 1:
            log = self.tmp / f"{self.name}-1.log"
            wait_for(lambda: b"workers accepting" in log.read_bytes(), 30, "for the workers")
        self.forkServer = 0
        if self.fork:
            # The fork server is up once the generation logged that it uses it.
            log = self.tmp / f"{self.name}-1.log"
            wait_for(lambda: b"fork server pid" in log.read_bytes(), 30, "for the fork server")
            match = re.search(rb"fork server pid (\d+) at @", log.read_bytes())
            self.forkServer = int(match[1]) if match else 0

    def forked(self) -> list[int]:
        """The fork server's children now (its spare, between takeovers)."""
        pid = self.forkServer
        if not pid:
            return []
        try:
            return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        except (OSError, ValueError):
            return []

    def takeover(self) -> dict:
        old = read_pid(self.pidfile) or self.old
        # A spare the fork server forked ahead (graceful_plugin.spare) has used CPU before the
        # takeover: only what the successor uses from here on is its start-up's.
        before = {pid: cpu_ms(pid) or 0.0 for pid in self.forked()}
        event = {"start": time.monotonic(), "old_pid": old, "cpu_before": before}
        if self.how == "hup":
            os.kill(old, signal.SIGHUP)
        elif self.how == "ctl":
            ctl = [str(BIN / "graceful-ctl"), "--control", str(self.control), "restart"]
            done = subprocess.run(
                ctl,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
                preexec_fn=loadtest.server_child,
            )
            if done.returncode != 0:
                event["failed"] = (done.stdout + done.stderr).strip()[-300:]
        elif self.name.endswith("-idle"):
            self.spawn(["chrt", "--idle", "0", *self.command("--takeover", str(self.control))])
        else:
            self.spawn(self.command("--takeover", str(self.control)))
        return event

    def settle(self, event: dict, until: float) -> None:
        old = event["old_pid"]
        while time.monotonic() < until:
            new = read_pid(self.pidfile)
            if new and new != old and "serving_s" not in event:
                # The successor owns the pidfile once its predecessor confirmed: its CPU time
                # then is what its start-up and handoff cost.
                event["serving_s"] = time.monotonic() - event["start"]
                used = cpu_ms(new)
                if used is not None:
                    used -= event["cpu_before"].get(new, 0.0)
                event["successor_cpu_ms"] = used
                event["new_pid"] = new
            if not alive(old):
                event["old_exited_s"] = time.monotonic() - event["start"]
                return
            time.sleep(0.005)
        if read_pid(self.pidfile) == old:
            event.setdefault("failed", "no successor took over")


def _nginx_conf(tmp: Path, files: Path, port: int, tag: str) -> Path:
    user = "user root;\n" if os.geteuid() == 0 else ""
    temp = tmp / f"nginx-{tag}-temp"
    temp.mkdir()
    conf = tmp / f"nginx-{tag}.conf"
    conf.write_text(
        f"""{user}worker_processes 1;
daemon off;
pid {tmp}/nginx-{tag}.pid;
error_log {tmp}/nginx-{tag}-error.log;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    default_type application/octet-stream;
    server {{
        listen {HOST}:{port} backlog=4096;
        root {files};
    }}
}}
"""
    )
    return conf


class Nginx(Server):
    def start(self) -> None:
        self.conf = _nginx_conf(self.tmp, self.files, self.port, "main")
        self.spawn(["nginx", "-c", str(self.conf)])
        wait_for(lambda: serves(self.port), 30, "starting nginx")

    def takeover(self) -> dict:
        event = {"start": time.monotonic()}
        done = subprocess.run(
            ["nginx", "-c", str(self.conf), "-s", "reload"], capture_output=True, check=False
        )
        if done.returncode != 0:
            event["failed"] = done.stderr.decode(errors="replace")[-300:]
        return event


class HAProxy(Server):
    def start(self) -> None:
        backend = loadtest.free_port()
        conf = _nginx_conf(self.tmp, self.files, backend, "backend")
        self.spawn(["nginx", "-c", str(conf)])
        wait_for(lambda: serves(backend), 30, "starting nginx behind haproxy")
        self.sock = self.tmp / "haproxy.sock"
        self.conf = self.tmp / "haproxy.cfg"
        self.conf.write_text(
            f"""global
    stats socket {self.sock} mode 600 level admin expose-fd listeners
    maxconn 8192
    nbthread 1
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend web
    bind {HOST}:{self.port}
    default_backend files
backend files
    server files {HOST}:{backend}
"""
        )
        self.current = self.spawn(["haproxy", "-db", "-f", str(self.conf)])
        wait_for(lambda: serves(self.port) and self.sock.exists(), 30, "starting haproxy")

    def takeover(self) -> dict:
        old = self.current
        event = {"start": time.monotonic(), "old_pid": old.pid}
        argv = ["haproxy", "-db", "-f", str(self.conf), "-x", str(self.sock), "-sf", str(old.pid)]
        self.current = self.spawn(argv)
        return event

    def settle(self, event: dict, until: float) -> None:
        while time.monotonic() < until:
            if not alive(event["old_pid"]):
                event["old_exited_s"] = time.monotonic() - event["start"]
                return
            if self.current.poll() is not None:
                event["failed"] = f"the new haproxy exited {self.current.returncode}"
                return
            time.sleep(0.005)


class Gunicorn(Server):
    def start(self) -> None:
        self.pidfile = self.tmp / "gunicorn.pid"
        env = dict(os.environ, BUMP_FILES=str(self.files))
        argv = [str(BIN / "gunicorn"), "--bind", f"{HOST}:{self.port}", "--workers", "1"]
        argv += ["--worker-class", "gthread", "--threads", "16", "--backlog", "4096"]
        argv += ["--pid", str(self.pidfile), "--chdir", str(HERE), "--graceful-timeout", "30"]
        argv += ["--no-control-socket", "--error-logfile", "-", "static_wsgi:app"]
        self.master = self.spawn(argv, env=env).pid
        wait_for(lambda: serves(self.port), 30, "starting gunicorn")

    def takeover(self) -> dict:
        # (Not from the pidfile: after USR2 the new arbiter writes PIDFILE.2, and the old one
        # removes PIDFILE on its way out.)
        master = self.master
        event = {"start": time.monotonic(), "old_pid": master}
        os.kill(master, signal.SIGHUP if self.name == "gunicorn-hup" else signal.SIGUSR2)
        return event

    def settle(self, event: dict, until: float) -> None:
        if self.name == "gunicorn-hup":
            return
        old = event["old_pid"]
        # USR2: the old arbiter forks and execs a new one, which boots a worker; then the old
        # arbiter goes.  (The new arbiter is the old one's child that has children itself.)
        while time.monotonic() < until:
            new = next((c for c in children_of(old) if alive(c) and children_of(c)), None)
            if new is not None:
                event["serving_s"] = time.monotonic() - event["start"]
                self.master = new
                os.kill(old, signal.SIGTERM)
                break
            time.sleep(0.005)
        else:
            event["failed"] = "no new arbiter with a worker"
            return
        while time.monotonic() < until and alive(old):
            time.sleep(0.005)
        event["old_exited_s"] = time.monotonic() - event["start"]
        # The new arbiter takes another USR2 only once it has seen its parent go and promoted
        # itself (within its 1 s loop), renaming PIDFILE.2 to PIDFILE.
        while time.monotonic() < until and read_pid(self.pidfile) != self.master:
            time.sleep(0.005)


KINDS = {"nginx": Nginx, "haproxy": HAProxy, "gunicorn-hup": Gunicorn, "gunicorn-usr2": Gunicorn}


def available(name: str) -> str | None:
    """Why ``name`` cannot run here, or None."""
    if name.startswith("graceful"):
        return None if (BIN / "twistd").exists() else "no twistd next to this interpreter"
    need = {"nginx": ["nginx"], "haproxy": ["haproxy", "nginx"]}.get(name, [])
    for program in need:
        if shutil.which(program) is None:
            return f"{program} is not installed (apt-get install nginx-light haproxy)"
    if name.startswith("gunicorn") and not (BIN / "gunicorn").exists():
        return "gunicorn is not installed (pip install 'graceful[bench]')"
    return None


# --- numbers ----------------------------------------------------------------------------------


def analyse(records: dict, events: list[dict], origin: float, stop_at: float, args) -> dict:
    """p99 near and away, rates per 100 ms bin after each takeover against the away rate."""
    starts = [e["start"] for e in events]
    clients = records["client"]
    ok = [(s, lat) for s, lat, outcome in clients if outcome == 0]

    def since(t: float) -> float | None:
        before = [t - s for s in starts if s - 0.5 <= t]
        return min(before) if before else None

    def is_away(t: float) -> bool:
        return all(not (s - 0.5 <= t < s + args.away_after) for s in starts)

    near = [lat for s, lat in ok if (d := since(s)) is not None and 0 <= d < args.near]
    away = [lat for s, lat in ok if is_away(s) and s >= origin + WARMUP]
    # Completions per bin over the whole load, then the away bins' mean, then per takeover.
    nbins = int((stop_at - origin) / STEP)
    done = [0] * (nbins + 1)
    for s, lat in ok:
        index = int((s + lat - origin) / STEP)
        if 0 <= index <= nbins:
            done[index] += 1
    away_bins = [
        done[i]
        for i in range(int(WARMUP / STEP), nbins)
        if is_away(origin + i * STEP) and is_away(origin + (i + 1) * STEP)
    ]
    away_rate = sum(away_bins) / len(away_bins) if away_bins else None
    after = int(args.near / STEP)
    offsets = range(-5, int((args.near + 1.0) / STEP))
    shape = {k: 0.0 for k in offsets}  # mean completions per bin, k bins after the start
    for s in starts:
        first = int((s - origin) / STEP)
        for k in offsets:
            if 0 <= first + k <= nbins:
                shape[k] += done[first + k] / len(starts)
    window = [shape[k] for k in range(after)]
    profile = []  # latency per bin since the takeover, for the plot
    for k in range(-5, int((args.near + 1.0) / STEP)):
        lats = sorted(
            lat for s, lat in ok if (d := since(s)) is not None and k * STEP <= d < (k + 1) * STEP
        )
        profile.append(
            {
                "t": round(k * STEP, 3),
                "p50_ms": loadtest.latency_ms(lats)["p50"],
                "p99_ms": loadtest.latency_ms(lats)["p99"],
            }
        )
    near_ms, away_ms = loadtest.latency_ms(near), loadtest.latency_ms(away)
    rate_near = (sum(window) / len(window) / away_rate) if away_rate and window else None
    return {
        "requests": loadtest.count_outcomes(clients),
        "downloads": loadtest.count_outcomes(records["download"]),
        "near_ms": near_ms,
        "away_ms": away_ms,
        "ratio": round(near_ms["p99"] / away_ms["p99"], 3)
        if near_ms["p99"] and away_ms["p99"]
        else None,
        "away_rate_per_s": round(away_rate / STEP, 1) if away_rate else None,
        "rate_near": round(rate_near, 3) if rate_near else None,
        "rate_min_bin": round(min(window) / away_rate, 3) if away_rate and window else None,
        "rate_bins": [
            {"t": round(k * STEP, 3), "rate": round(v / away_rate, 3) if away_rate else None}
            for k, v in shape.items()
        ],
        "profile": profile,
    }


def run_scenario(name: str, args) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix=f"bump-{name}-"))
    os.chmod(tmp, 0o755)
    files = tmp / "files"
    (files / "bytes").mkdir(parents=True)
    for size in (SMALL, LARGE):
        (files / "bytes" / str(size)).write_bytes(b"x" * size)
    port = loadtest.free_port()
    kind = Graceful if name.startswith("graceful") else KINDS[name]
    server = kind(name, tmp, files, port, args)
    workers = loadtest.Workers(tmp)
    sampler = None
    if args.timeline and kind is Graceful:
        sampler = bumptrace.Sampler(args.sample_ms / 1000.0)
        sampler.start()
    try:
        server.start()
        origin = time.monotonic()
        stop_at = origin + args.duration
        for _ in range(args.clients):
            workers.start("client", loadtest.LoadSpec(port, SMALL, stop_at, 10.0, 0.01))
        recv = 16384
        slow = loadtest.LoadSpec(
            port, LARGE, stop_at, 30.0, 0.01, recv_size=recv, pause=recv / args.download_rate
        )
        for _ in range(args.downloaders):
            workers.start("download", slow)
        interval = args.duration / (args.takeovers + 1)
        events = []
        for index in range(args.takeovers):
            time.sleep(max(0.0, origin + interval * (index + 1) - time.monotonic()))
            event = server.takeover()
            # A slow takeover (a busy machine) delays the next one rather than overlapping it.
            server.settle(event, min(stop_at, event["start"] + max(interval * 0.95, 30.0)))
            events.append(event)
        results = workers.join(60 + LARGE / args.download_rate)
        records: dict = {"client": [], "download": []}
        if args.keep_logs:
            args.keep_logs.mkdir(parents=True, exist_ok=True)
            for log in tmp.glob("*.log"):
                shutil.copy(log, args.keep_logs / log.name)
        for result in results:
            records[result["kind"]] += [tuple(r) for r in result["records"]]
        numbers = analyse(records, events, origin, stop_at, args)
        if sampler is not None:
            sampler.stop()
            numbers["timeline"] = bumptrace.timeline(
                records,
                events,
                sampler,
                bumptrace.read_trace_logs(tmp),
                numbers["away_rate_per_s"],
                bin_ms=args.bin_ms,
            )
        numbers.update(
            scenario=name,
            takeovers=[
                {k: (round(v, 4) if isinstance(v, float) else v) for k, v in e.items()}
                for e in events
            ],
        )
        for event in numbers["takeovers"]:
            event["start"] = round(event["start"] - origin, 4)
        return numbers
    finally:
        if sampler is not None:
            sampler.stop()
        workers.kill()
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def idle_cost(name: str, args) -> list[dict[str, float]]:
    """``--idle-takeovers`` takeovers of a graceful server without load: each one's CPU by
    process (``bumptrace.takeover_cpu``), from its start to 0.5 s after the predecessor exited."""
    tmp = Path(tempfile.mkdtemp(prefix=f"bump-idle-{name}-"))
    os.chmod(tmp, 0o755)
    files = tmp / "files"
    (files / "bytes").mkdir(parents=True)
    (files / "bytes" / str(SMALL)).write_bytes(b"x" * SMALL)
    server = Graceful(name, tmp, files, loadtest.free_port(), args)
    sampler = bumptrace.Sampler(args.sample_ms / 1000.0)
    sampler.start()
    costs = []
    try:
        server.start()
        time.sleep(0.5)
        for _ in range(args.idle_takeovers):
            event = server.takeover()
            server.settle(event, event["start"] + 30)
            if "failed" in event or "old_exited_s" not in event:
                raise loadtest.ServerDied(f"{name}: a takeover failed: {event.get('failed')}")
            time.sleep(0.5)
            costs.append(
                bumptrace.takeover_cpu(sampler, event, event["start"] + event["old_exited_s"] + 0.5)
            )
        return costs
    finally:
        sampler.stop()
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def fmt(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def table(runs: list[dict]) -> str:
    head = ["scenario", "requests", "failed", "dl", "dl failed", "p50 away", "p99 away"]
    head += ["p99 near", "ratio", "rate near", "min 100ms", "takeover s", "start CPU ms"]
    head += ["failed takeovers"]
    rows = [head]
    rounds = any(run.get("round", 1) > 1 for run in runs)
    for run in runs:
        spans = [e.get("old_exited_s") or e.get("serving_s") for e in run["takeovers"]]
        spans = sorted(s for s in spans if s is not None)
        cpus = sorted(e["successor_cpu_ms"] for e in run["takeovers"] if e.get("successor_cpu_ms"))
        rows.append(
            [
                run["scenario"] + (f" #{run.get('round', 1)}" if rounds else ""),
                run["requests"]["total"],
                run["requests"]["failed"],
                run["downloads"]["total"],
                run["downloads"]["failed"],
                fmt(run["away_ms"]["p50"]),
                fmt(run["away_ms"]["p99"]),
                fmt(run["near_ms"]["p99"]),
                fmt(run["ratio"], 2),
                fmt(run["rate_near"], 2),
                fmt(run["rate_min_bin"], 2),
                fmt(spans[len(spans) // 2], 2) if spans else "-",
                fmt(cpus[len(cpus) // 2], 0) if cpus else "-",
                sum("failed" in e for e in run["takeovers"]),
            ]
        )
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(head))]
    lines = [
        "  ".join(
            c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in cells
    ]
    lines.append(
        f"latencies in ms; ratio = p99 near / p99 away (target <= {TARGET_RATIO} for graceful);"
        f" rate near = completions per 100 ms in the first {runs[0]['near_s'] if runs else '-'} s"
        f" after a takeover / away (target >= {TARGET_RATE}); min 100ms = its lowest bin;"
        " takeover s = median time to the old process's exit (or to the new one serving);"
        " start CPU ms = median CPU the graceful successor used until it served"
    )
    for run in runs:
        for event in run["takeovers"]:
            if "failed" in event:
                lines.append(
                    f"  {run['scenario']} takeover at {event['start']:.2f} s failed:"
                    f" {event['failed']}"
                )
    return "\n".join(lines)


def summary(runs: list[dict]) -> str:
    """Each scenario over its rounds: the median ratio and rate near, with their range (a
    single round's ratio moves by about 0.1 on a 2-core machine)."""
    lines = ["over the rounds: each scenario's ratio and rate near, median (min-max)"]
    names = list(dict.fromkeys(run["scenario"] for run in runs))
    for name in names:
        mine = [run for run in runs if run["scenario"] == name]
        cells = []
        for key in ("ratio", "rate_near"):
            values = sorted(run[key] for run in mine if run.get(key) is not None)
            if not values:
                cells.append("-")
                continue
            median = statistics.median(values)
            cells.append(f"{median:.2f} ({values[0]:.2f}-{values[-1]:.2f})")
        lines.append(f"  {name}: {len(mine)} rounds, ratio {cells[0]}, rate near {cells[1]}")
    return "\n".join(lines)


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (lat_ax, rate_ax) = plt.subplots(2, 1, figsize=(11, 9), sharex=True)
    for run in runs:
        ts = [p["t"] for p in run["profile"]]
        away = run["away_ms"]["p99"] or 1.0
        lat_ax.plot(
            ts,
            [(p["p99_ms"] or float("nan")) / away for p in run["profile"]],
            label=run["scenario"],
        )
        rate_ax.plot(
            [b["t"] for b in run["rate_bins"]],
            [b["rate"] for b in run["rate_bins"]],
            label=run["scenario"],
        )
    lat_ax.axhline(1.0, color="grey", lw=0.5)
    lat_ax.axhline(TARGET_RATIO, color="red", lw=0.5, ls="--")
    lat_ax.set_ylabel("p99 latency / p99 away (per 100 ms bin)")
    lat_ax.set_title("latency against time since the takeover started")
    rate_ax.axhline(1.0, color="grey", lw=0.5)
    rate_ax.axhline(TARGET_RATE, color="red", lw=0.5, ls="--")
    rate_ax.set_ylabel("completions / away rate (100 ms bins)")
    rate_ax.set_xlabel("seconds since the takeover started")
    lat_ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--scenario", action="append", choices=SCENARIOS, help="repeatable (default: all)")
    add("--duration", type=float, default=60.0, help="seconds of load per scenario")
    add("--takeovers", type=int, default=20, help="takeovers per scenario")
    add("--clients", type=int, default=32, help="closed-loop client processes")
    add("--downloaders", type=int, default=4, help="slow 8 MiB downloads in flight")
    add("--download-rate", type=float, default=4 * 1024 * 1024, help="bytes/s per downloader")
    add(
        "--rounds",
        type=int,
        default=1,
        help="run every scenario this many times, interleaved, and print each one's median ratio",
    )
    add("--near", type=float, default=1.0, help="seconds after a takeover's start that are near")
    add("--away-after", type=float, default=2.0, help="seconds after a start that are not away")
    add("--keep-logs", type=Path, help="copy every server's log into this directory")
    add("--json", type=Path)
    add(
        "--timeline",
        action="store_true",
        help="graceful scenarios: sample the server processes and print where the bump comes from",
    )
    add("--bin-ms", type=float, default=20.0, help="--timeline's bin width")
    add("--sample-ms", type=float, default=5.0, help="--timeline's sampling interval")
    add(
        "--idle-takeovers",
        type=int,
        metavar="N",
        help="instead of the load: N takeovers of each graceful scenario without load, and the"
        " CPU each process used in each (robust to other work on the machine)",
    )
    add(
        "--workers",
        type=int,
        default=1,
        help="graceful scenarios: processes per generation (--workers; a successor keeps it)",
    )
    add(
        "--split-cores",
        action="store_true",
        help="servers (and all they start) on the last CPU, the clients on the others: the"
        " takeover without the scheduler's placement of a new process among the clients",
    )
    add("--plot", type=Path, help="a PNG (needs matplotlib: the bench extra)")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.split_cores and len(os.sched_getaffinity(0)) < 2:
        parser.error("--split-cores needs at least 2 CPUs to run on")
    if args.takeovers < 1 or args.duration / (args.takeovers + 1) < 1.0:
        parser.error("leave at least 1 s between takeovers (--duration / (--takeovers + 1))")
    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("--plot needs matplotlib (pip install 'graceful[bench]')")
    return args


def idle_main(args) -> int:
    rows = []
    try:
        for name in args.scenario or SCENARIOS:
            if not name.startswith("graceful"):
                continue
            print(f"{name}: {args.idle_takeovers} takeovers without load", file=sys.stderr)
            try:
                rows.append((name, idle_cost(name, args)))
            except (loadtest.ServerDied, RuntimeError, OSError) as exc:
                print(f"{name}: error: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        print("interrupted: every process stopped", file=sys.stderr)
        return 130
    finally:
        stop_descendants()
    print(bumptrace.format_takeover_cpu(rows))
    if args.json is not None:
        document = {"machine": loadtest.machine(), "config": vars(args), "idle": rows}
        args.json.write_text(json.dumps(document, indent=1, default=str) + "\n")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.timeline:
        # The servers log through benchmarks/tracelog.py (monotonic time and pid per line).
        path = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = str(HERE) + (os.pathsep + path if path else "")
    become_subreaper()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, loadtest.raise_on_signal(KeyboardInterrupt()))
    if args.split_cores:
        servers, clients = loadtest.split_cores()
        print(f"servers on CPUs {sorted(servers)}, clients on {sorted(clients)}", file=sys.stderr)
    if args.idle_takeovers:
        return idle_main(args)
    runs: list[dict] = []
    broken: list[str] = []
    try:
        # Rounds interleave the scenarios (each round runs every one), so that what else the
        # machine does at one moment does not land on one scenario's figures only.
        for number in range(1, args.rounds + 1):
            for name in args.scenario or SCENARIOS:
                why = available(name)
                if why is not None:
                    if number == 1:
                        print(f"{name}: skipped: {why}", file=sys.stderr)
                    continue
                print(
                    f"{name}: {args.clients} clients, {args.downloaders} downloads,"
                    f" {args.takeovers} takeovers in {args.duration:g} s"
                    + (f" (round {number} of {args.rounds})" if args.rounds > 1 else ""),
                    file=sys.stderr,
                    flush=True,
                )
                try:
                    run = run_scenario(name, args)
                except (loadtest.ServerDied, RuntimeError, OSError, AssertionError) as exc:
                    # One broken scenario does not lose the others' numbers.
                    print(f"{name}: error: {exc}", file=sys.stderr)
                    broken.append(name)
                    continue
                run["near_s"] = args.near
                run["round"] = number
                runs.append(run)
    except KeyboardInterrupt:
        print("interrupted: every process stopped", file=sys.stderr)
        return 130
    finally:
        stop_descendants()
    print(table(runs))
    if args.rounds > 1:
        print()
        print(summary(runs))
    for run in runs:
        if "timeline" in run:
            print()
            print(bumptrace.format_timeline(run["scenario"], run["timeline"]))
    if args.json is not None:
        document = {"machine": loadtest.machine(), "config": vars(args), "runs": runs}
        args.json.write_text(json.dumps(document, indent=1, default=str) + "\n")
    if args.plot is not None and runs:
        plot(runs, args.plot)
    if broken:
        print(f"broken scenarios: {', '.join(broken)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
