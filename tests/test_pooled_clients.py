"""
Pooled keep-alive clients as people run them (python requests.Session, httpx.Client, aiohttp and
wrk), pausing 0-1.5 s between requests so that their connections sit idle across the drain's
idle grace, across ten takeovers: no client sees an error.
"""

from __future__ import annotations

import asyncio
import random
import re
import shutil
import subprocess
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.procs import Processes, freePort

ENV = {"PYTHONPATH": str(Path(__file__).resolve().parent.parent)}

requests = pytest.importorskip("requests", reason="needs the test extra")
httpx = pytest.importorskip("httpx", reason="needs the test extra")
aiohttp = pytest.importorskip("aiohttp", reason="needs the test extra")

#: The longest pause between two requests on one pooled connection.
MAX_PAUSE = 1.5

_WRK_SCRIPT = """
math.randomseed(os.time())
function delay()
   return math.random(0, %d)
end
""" % (int(MAX_PAUSE * 1000),)


class Tally:
    """
    Answers and errors of every client, by client name, thread-safe.
    """

    def __init__(self) -> None:
        self.ok: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.examples: list[str] = []
        self.stop = threading.Event()
        self.byPid: Counter[tuple[str, int]] = Counter()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)

    def answered(self, name: str, status: int, body: str) -> None:
        if status != 200:
            self.record(name, AssertionError(f"status {status}"))
            return
        found = re.search(r"pid (\d+)", body)
        with self._lock:
            self.ok[name] += 1
            if found:
                self.byPid[name, int(found.group(1))] += 1
            self._changed.notify_all()

    def waitAnswered(
        self, pid: int, names: tuple[str, ...], count: int, timeout: float = 30.0
    ) -> None:
        """
        Wait until every client kind in C{names} has had C{count} answers from process C{pid}.
        """
        with self._lock:
            done = self._changed.wait_for(
                lambda: all(self.byPid[name, pid] >= count for name in names), timeout
            )
        assert done, f"not every client reached pid {pid} in {timeout} s: {self.byPid}"

    def record(self, name: str, error: BaseException | None) -> None:
        with self._lock:
            if error is None:
                self.ok[name] += 1
                return
            self.errors[f"{name}: {type(error).__name__}"] += 1
            if len(self.examples) < 10:
                self.examples.append(f"{name}: {error!r}")


def _syncClient(
    name: str, get: Callable[[], Any], tally: Tally, rng: random.Random
) -> Callable[[], None]:
    def run() -> None:
        for _ in range(100_000):
            if tally.stop.wait(rng.uniform(0, MAX_PAUSE)):
                return
            try:
                response = get()
                tally.answered(name, response.status_code, response.text)
            except Exception as e:
                tally.record(name, e)

    return run


def _aiohttpClients(url: str, tally: Tally, count: int) -> Callable[[], None]:
    async def one(session: Any, rng: random.Random) -> None:
        while not tally.stop.is_set():
            await asyncio.sleep(rng.uniform(0, MAX_PAUSE))
            if tally.stop.is_set():
                return
            try:
                async with session.get(url) as response:
                    body = await response.text()
                tally.answered("aiohttp", response.status, body)
            except Exception as e:
                tally.record("aiohttp", e)

    async def main() -> None:
        connector = aiohttp.TCPConnector(limit=count)
        async with aiohttp.ClientSession(connector=connector) as session:
            await asyncio.gather(*(one(session, random.Random(n)) for n in range(count)))

    return lambda: asyncio.run(main())


@pytest.mark.slow
def test_pooledClientsAcrossTenTakeovers(procs: Processes, workdir: Path) -> None:
    """
    Four pooled keep-alive clients of each kind (requests.Session, httpx.Client, aiohttp, wrk)
    with random idle pauses of 0-1.5 s between requests, across ten takeovers (each made once
    every client has been answered by the current generation), see no error: no reset, no
    connection closed under a request, no non-200 answer, and no EOF on an idle connection
    (which wrk counts as a read error).
    """
    wrk = shutil.which("wrk")
    port = freePort()
    url = f"http://127.0.0.1:{port}/"
    args = ["--port", f"tcp:{port}:interface=127.0.0.1", "--control", "c.sock"]
    current = procs.server([*args, "--drain-timeout", "60"], "gen1").start()
    current.waitServing()
    tally = Tally()
    threads: list[threading.Thread] = []
    sessions: list[Any] = []
    for n in range(4):
        session = requests.Session()
        client = httpx.Client()
        sessions += [session, client]
        for name, get in (
            ("requests", lambda s=session: s.get(url, timeout=20)),
            ("httpx", lambda c=client: c.get(url, timeout=20)),
        ):
            threads.append(
                threading.Thread(
                    target=_syncClient(name, get, tally, random.Random(n)), daemon=True
                )
            )
    threads.append(threading.Thread(target=_aiohttpClients(url, tally, 4), daemon=True))
    (workdir / "pause.lua").write_text(_WRK_SCRIPT)
    wrkProcess = None
    for t in threads:
        t.start()
    if wrk is not None:
        wrkProcess = subprocess.Popen(
            [wrk, "-t1", "-c4", "-d120s", "--timeout", "20s", "-s", "pause.lua", url],
            cwd=workdir,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
    old = []
    names = ("requests", "httpx", "aiohttp")

    def successor(n: int) -> Any:
        # Started while its predecessor serves; it commits once the test creates its ready file.
        server = procs.server(
            [
                "--takeover",
                "c.sock",
                "--drain-timeout",
                "60",
                "--wsgi",
                "tests.apps.slow_ready.app",
            ],
            f"gen{n}",
        )
        return server.start({**ENV, "GRACEFUL_TEST_READY_FILE": str(workdir / f"ready{n}")})

    try:
        pending = successor(2)
        for n in range(2, 12):
            # Each generation serves every kind of client for a while (about two requests per
            # connection) before it is taken over: it learns their pace (see
            # DrainableHTTPChannel), as a generation that lives longer than seconds does.
            tally.waitAnswered(current.pid, names, 8)
            (workdir / f"ready{n}").touch()
            pending.waitFor(r"took over from pid %d" % current.pid, timeout=60)
            old.append(current)
            current = pending
            if n < 11:
                pending = successor(n + 1)
        tally.waitAnswered(current.pid, names, 1)
        for server in old:
            assert server.wait(60) == 0
    finally:
        tally.stop.set()
        wrkOutput = ""
        if wrkProcess is not None:
            wrkProcess.send_signal(2)
            wrkOutput, _ = wrkProcess.communicate(timeout=30)
        for t in threads:
            t.join(30)
        for s in sessions:
            s.close()
    assert not any(t.is_alive() for t in threads)
    for server in old:
        assert "drain deadline passed" not in server.text()
    assert tally.errors == {}, tally.examples
    for name in ("requests", "httpx", "aiohttp"):
        assert tally.ok[name] > 20, (name, tally.ok)
    if wrkProcess is not None:
        done = re.search(r"(\d+) requests in", wrkOutput)
        assert done is not None and int(done.group(1)) > 20, wrkOutput
        assert "Socket errors" not in wrkOutput, wrkOutput
        assert "Non-2xx" not in wrkOutput, wrkOutput
