"""Pooled keep-alive clients across takeovers: errors, closes, and connections handed over.

    python benchmarks/keepalive.py [--takeovers 10] [--clients 4] [--max-pause 1.5]

``--clients`` connections of each kind make requests with random idle pauses of 0 to
``--max-pause`` seconds between them, while the server is taken over ``--takeovers`` times
(each generation serves every connection at least twice before its successor starts):

- ``requests``: a ``requests.Session`` each, ``httpx``: an ``httpx.Client`` each (skipped when
  not importable; both are in the ``test`` extra).  They retry a request on a connection found
  closed while idle, as pooling clients do; what they report is an error;
- ``raw``: a plain persistent socket each, which retries nothing and counts every way the server
  ended its connection: ``closed-idle`` (found closed before sending: what a pool retries),
  ``told-close`` (an answer with ``Connection: close``), and ``closed-under-request`` (closed
  after the request was sent: the idle-close race itself).

Printed: answers and errors by client kind, the raw clients' closes by kind, and how many idle
connections the draining generations handed over to their successors (from their logs:
"handed N idle connection(s) over ... M closed politely instead").  ``--code DIR`` runs the
servers from another checkout (``git archive REV | tar -x -C DIR``), to compare with a version
that closed idle connections instead.  Every process started is killed and reaped and the
temporary directory removed; the run is bounded by ``--hard-timeout`` (60 s).
"""

from __future__ import annotations

import argparse
import os
import random
import re
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parent.parent
TWISTD = str(Path(sys.executable).parent / "twistd")


class Failed(RuntimeError):
    """A server did not do what the measurement needs."""


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ok: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.closes: Counter[str] = Counter()
        self.byPid: Counter[tuple[str, int]] = Counter()
        self.examples: list[str] = []

    def answered(self, name: str, body: bytes) -> None:
        found = re.search(rb"pid (\d+)", body)
        with self.lock:
            self.ok[name] += 1
            if found:
                self.byPid[name, int(found.group(1))] += 1

    def failed(self, name: str, error: BaseException) -> None:
        with self.lock:
            self.errors[f"{name}: {type(error).__name__}"] += 1
            if len(self.examples) < 5:
                self.examples.append(f"{name}: {error!r}"[:300])

    def closed(self, how: str) -> None:
        with self.lock:
            self.closes[how] += 1

    def leastFrom(self, pid: int, names: list[str]) -> int:
        with self.lock:
            return min(self.byPid[name, pid] for name in names)


class Raw:
    """
    One persistent connection that retries nothing and counts how the server ended it.
    """

    def __init__(self, port: int, tally: Tally) -> None:
        self.port = port
        self.tally = tally
        self.sock: socket.socket | None = None

    def _open(self) -> socket.socket:
        if self.sock is not None:
            if not select.select([self.sock], [], [], 0)[0]:
                return self.sock
            if self.sock.recv(1, socket.MSG_PEEK) == b"":
                self.tally.closed("closed-idle")
            self.close()
        self.sock = socket.create_connection((HOST, self.port), timeout=20)
        return self.sock

    def get(self) -> bytes:
        sock = self._open()
        try:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: b\r\n\r\n")
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = sock.recv(65536)
                if not chunk:
                    self.tally.closed("closed-under-request")
                    raise ConnectionError("closed after the request was sent")
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            found = re.search(rb"(?i)content-length: *(\d+)", head)
            if found is None:
                raise ConnectionError(f"no Content-Length in {head!r}")
            while len(body) < int(found.group(1)):
                chunk = sock.recv(65536)
                if not chunk:
                    raise ConnectionError("closed in the middle of the body")
                body += chunk
        except OSError:
            self.close()
            raise
        if re.search(rb"(?i)\r\nconnection: *close", head):
            self.tally.closed("told-close")
            self.close()
        return body

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def clientLoop(name: str, get: Any, tally: Tally, stop: threading.Event, pause: float) -> None:
    rng = random.Random()
    while not stop.wait(rng.uniform(0, pause)):
        try:
            body = get()
        except Exception as e:
            tally.failed(name, e)
            continue
        tally.answered(name, body)


class Run:
    def __init__(self, directory: Path, deadline: float, code: Path) -> None:
        self.directory = directory
        self.deadline = deadline
        self.code = code
        self.processes: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(self, args: list[str], name: str) -> tuple[subprocess.Popen[bytes], Path]:
        log = self.directory / f"{name}.log"
        env = dict(os.environ, PYTHONPATH=str(self.code))
        with open(log, "wb") as out:
            process = subprocess.Popen(
                [TWISTD, "-n", "--pidfile", "app.pid", "graceful", *args],
                cwd=self.directory,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
            )
        self.processes.append((process, log))
        return process, log

    def waitFor(self, log: Path, pattern: str) -> None:
        regex = re.compile(pattern)
        while time.monotonic() < self.deadline:
            if regex.search(log.read_text(errors="replace")):
                return
            time.sleep(0.02)
        raise Failed(f"{log.name} never logged {pattern!r}:\n{log.read_text()[-1500:]}")

    def until(self, check: Any, what: str) -> None:
        while time.monotonic() < self.deadline:
            if check():
                return
            time.sleep(0.02)
        raise Failed(f"ran out of time waiting for {what}")

    def cleanup(self) -> None:
        for process, _ in self.processes:
            if process.poll() is None:
                process.kill()
            process.wait(10)


def measure(args: argparse.Namespace, run: Run) -> dict[str, Any]:
    port = args.port
    tally = Tally()
    stop = threading.Event()
    closers: list[Any] = []
    kinds: list[tuple[str, Any]] = []
    url = f"http://{HOST}:{port}/"
    try:
        import requests

        for _ in range(args.clients):
            session = requests.Session()
            closers.append(session)
            kinds.append(("requests", lambda s=session: s.get(url, timeout=20).content))
    except ImportError:
        print("requests is not installed: skipped", flush=True)
    try:
        import httpx

        for _ in range(args.clients):
            client = httpx.Client()
            closers.append(client)
            kinds.append(("httpx", lambda c=client: c.get(url, timeout=20).content))
    except ImportError:
        print("httpx is not installed: skipped", flush=True)
    for _ in range(args.clients):
        raw = Raw(port, tally)
        closers.append(raw)
        kinds.append(("raw", raw.get))
    names = sorted({name for name, _ in kinds})
    current, log = run.start(
        ["--port", f"tcp:{port}:interface={HOST}", "--control", "c.sock", "--no-fork-server"],
        "gen1",
    )
    run.waitFor(log, r"serving on")
    threads = [
        threading.Thread(
            target=clientLoop, args=(name, get, tally, stop, args.max_pause), daemon=True
        )
        for name, get in kinds
    ]
    for t in threads:
        t.start()
    old: list[Path] = []
    try:
        for n in range(2, args.takeovers + 2):
            pid = current.pid
            run.until(
                lambda pid=pid: tally.leastFrom(pid, names) >= 2 * args.clients,
                f"every kind answered by pid {pid}",
            )
            successor, successorLog = run.start(["--takeover", "c.sock"], f"gen{n}")
            run.waitFor(successorLog, rf"took over from pid {current.pid}")
            old.append(log)
            current, log = successor, successorLog
        pid = current.pid
        run.until(lambda: tally.leastFrom(pid, names) >= args.clients, "the last generation")
        for process, _ in run.processes[:-1]:
            process.wait(max(1.0, run.deadline - time.monotonic()))
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        for closer in closers:
            closer.close()
    handed = fellBack = 0
    deadlines = 0
    for path in old:
        text = path.read_text(errors="replace")
        for match in re.finditer(r"handed (\d+) idle connection\(s\) over.*?(\d+) closed", text):
            handed += int(match.group(1))
            fellBack += int(match.group(2))
        deadlines += text.count("drain deadline passed")
    return {
        "ok": dict(tally.ok),
        "errors": dict(tally.errors),
        "examples": tally.examples,
        "closes": dict(tally.closes),
        "handedOver": handed,
        "fellBack": fellBack,
        "drainDeadlines": deadlines,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--takeovers", type=int, default=10)
    parser.add_argument("--clients", type=int, default=4, help="connections of each kind")
    parser.add_argument("--max-pause", type=float, default=1.5)
    parser.add_argument("--port", type=int, default=0, help="0: a free one")
    parser.add_argument("--code", type=Path, default=ROOT, help="the checkout to serve from")
    parser.add_argument("--hard-timeout", type=float, default=60.0)
    args = parser.parse_args()
    if not args.port:
        with socket.socket() as s:
            s.bind((HOST, 0))
            args.port = s.getsockname()[1]
    directory = Path(tempfile.mkdtemp(prefix="ka-"))
    run = Run(directory, time.monotonic() + args.hard_timeout, args.code.resolve())
    try:
        result = measure(args, run)
    except Failed as e:
        print(f"failed: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        run.cleanup()
        shutil.rmtree(directory, ignore_errors=True)
    print(
        f"{args.takeovers} takeovers, {args.clients} connections of each kind, pauses 0-"
        f"{args.max_pause:g} s, serving from {args.code}"
    )
    for name, count in sorted(result["ok"].items()):
        errors = sum(v for k, v in result["errors"].items() if k.startswith(name + ":"))
        print(f"  {name:9} {count:6d} answers  {errors:4d} errors")
    for key, count in sorted(result["errors"].items()):
        print(f"    error {key}: {count}")
    for example in result["examples"]:
        print(f"    e.g. {example}")
    closes = result["closes"]
    ways = ("closed-idle", "told-close", "closed-under-request")
    print(
        "  raw connections ended by the server: "
        + ", ".join(f"{k} {closes.get(k, 0)}" for k in ways)
    )
    print(
        f"  idle connections handed over: {result['handedOver']}"
        f" (closed politely instead: {result['fellBack']});"
        f" drain deadlines: {result['drainDeadlines']}"
    )


if __name__ == "__main__":
    main()
