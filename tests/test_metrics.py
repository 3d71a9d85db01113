"""
Prometheus metrics for real: ``twistd graceful --metrics`` scraped with prometheus_client's own
parser, across takeovers, a rollback and generations draining behind one another.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.procs import (
    TWISTD,
    Processes,
    ctl,
    freePort,
    httpGet,
    waitForStatus,
)
from tests.test_handover_e2e import KeepAlive

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int, timeout: float = 10.0) -> Samples:
    """
    One scrape, parsed by prometheus_client: every sample by name and labels.
    """
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as answer:
        text = answer.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def _args(port: int, metrics: int, *extra: str) -> list[str]:
    return [
        "--port",
        f"web=tcp:{port}:interface=127.0.0.1",
        "--metrics",
        f"tcp:{metrics}:interface=127.0.0.1",
        "--control",
        "c.sock",
        *extra,
    ]


def _holdDownload(port: int) -> socket.socket:
    """
    A download that reads nothing: its response fills the socket buffers and waits, holding
    the session open (a drain does not cut a response short) until the socket is closed.
    """
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.sendall(b"GET /bytes/100000000 HTTP/1.1\r\nHost: test\r\n\r\n")
    s.recv(1024)
    return s


def _draining(status: dict) -> dict[int, int]:
    return {entry["pid"]: entry["sessions"] for entry in status["draining"]}


def test_figuresAfterKnownTraffic(procs: Processes, workdir: Path) -> None:
    """
    After five requests, the first generation's metrics count five connections on the web
    listener and none open, say generation 1 serving with no handoff yet and nothing draining,
    carry the process collector's figures, and graceful-ctl status --json carries the same
    counts.
    """
    port, metrics = freePort(), freePort()
    server = procs.server(_args(port, metrics), "gen1").start()
    server.waitServing()
    for _ in range(5):
        assert httpGet("127.0.0.1", port, "/")[0] == 200
    samples = scrape(metrics)
    assert value(samples, "graceful_connections_total", listener="web") == 5
    assert value(samples, "graceful_sessions", generation="1", listener="web", state="serving") == 0
    assert value(samples, "graceful_generation") == 1
    assert value(samples, "graceful_state", state="serving") == 1
    assert value(samples, "graceful_state", state="draining") == 0
    assert value(samples, "graceful_uptime_seconds") > 0
    assert value(samples, "graceful_draining_generations") == 0
    for outcome in ("committed", "rolled_back", "refused"):
        assert value(samples, "graceful_handoffs_total", outcome=outcome) == 0
    assert value(samples, "graceful_handoff_seconds_count") == 0
    assert value(samples, "process_resident_memory_bytes") > 0
    # This scrape is the metrics listener's first connection, and it is open while it is read.
    assert value(samples, "graceful_connections_total", listener="metrics") == 1
    status = json.loads(ctl(workdir, "--control", "c.sock", "status", "--json").stdout)
    web = next(item for item in status["listeners"] if item["name"] == "web")
    assert web["connections"] == 5
    assert status["drainingGenerations"] == 0
    assert {h["outcome"]: h["total"] for h in status["handoffs"]} == {
        "committed": 0,
        "rolled_back": 0,
        "refused": 0,
    }


class _Loop:
    """
    One thing done over and over in a thread until stopped, every failure recorded.
    """

    interval = 0.0

    def __init__(self, port: int) -> None:
        self.port = port
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def once(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.once()
            except Exception as e:
                self.failures.append(repr(e))

    def start(self) -> _Loop:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        assert not self._thread.is_alive()


class _Scraper(_Loop):
    """
    Scrapes every 50 ms, recording the samples it needs.
    """

    interval = 0.05

    def __init__(self, port: int) -> None:
        super().__init__(port)
        self.seen: list[tuple[float, float, float]] = []

    def once(self) -> None:
        samples = scrape(self.port)
        self.seen.append(
            (
                value(samples, "graceful_connections_total", listener="web"),
                value(samples, "graceful_handoffs_total", outcome="committed"),
                value(samples, "graceful_generation"),
            )
        )

    def waitForScrapes(self, generation: int, count: int, timeout: float = 20.0) -> None:
        """
        Wait until C{count} scrapes were answered by C{generation} (bounded).
        """
        deadline = time.monotonic() + timeout
        while sum(1 for seen in self.seen if seen[2] == generation) < count:
            assert time.monotonic() < deadline, f"fewer than {count} scrapes of {generation}"
            time.sleep(0.05)


class _Requests(_Loop):
    """
    Requests one after the other (5 ms apart); counts the answers.
    """

    interval = 0.005

    def __init__(self, port: int) -> None:
        super().__init__(port)
        self.ok = 0

    def once(self) -> None:
        assert httpGet("127.0.0.1", self.port, "/bytes/100")[0] == 200
        self.ok += 1


def test_countersNeverDecreaseAcrossTakeoversAndARollback(procs: Processes, workdir: Path) -> None:
    """
    Scraped every 50 ms through five takeovers (successors without --metrics of their own) and
    one successor rolled back after it had started accepting, no scrape fails,
    graceful_connections_total never goes down, graceful_handoffs_total counts five committed
    handoffs and one rolled back, and the connections counted equal the requests answered.
    """
    port, metrics = freePort(), freePort()
    current = procs.server(_args(port, metrics, "--confirm-timeout", "1"), "gen1").start()
    current.waitServing()
    scraper = _Scraper(metrics)
    scraper.start()
    requests = _Requests(port)
    requests.start()
    try:
        for n in range(2, 7):
            successor = procs.server(
                ["--takeover", "c.sock", "--confirm-timeout", "1"], f"gen{n}"
            ).start()
            successor.waitFor(r"took over from pid \d+ as generation %d" % n)
            assert current.wait(30) == 0, current.text()[-3000:]
            current = successor
            if n == 4:
                # Accepting, then stopped before it confirms: rolled back at the deadline.
                stopped = procs.fakeSuccessor("c.sock", "real:accepting")
                stopped.waitFor(r"reached accepting")
                current.waitFor(r"handoff to pid %d rolled back" % stopped.pid)
                stopped.signal(signal.SIGCONT)
                assert stopped.wait(30) == 1
        scraper.waitForScrapes(generation=6, count=3)
    finally:
        requests.stop()
        scraper.stop()
    assert scraper.failures == []
    assert requests.failures == []
    connections = [seen[0] for seen in scraper.seen]
    assert all(a <= b for a, b in zip(connections, connections[1:], strict=False)), connections
    assert scraper.seen[-1][2] == 6
    samples = scrape(metrics)
    assert value(samples, "graceful_handoffs_total", outcome="committed") == 5
    assert value(samples, "graceful_handoffs_total", outcome="rolled_back") == 1
    assert value(samples, "graceful_handoff_seconds_count") == 5
    assert value(samples, "graceful_handoff_phase_seconds_count", phase="confirm") == 5
    # Every request answered was counted once, by the generation that accepted it (the
    # rolled-back successor accepted none: it was stopped).
    assert value(samples, "graceful_connections_total", listener="web") == requests.ok
    assert len(scraper.seen) > 20


@pytest.mark.slow
def test_generationDrainingBehindAMiddleOneStaysInView(procs: Processes, workdir: Path) -> None:
    """
    A download holds generation 1 while two quick takeovers follow: once generation 2 (which
    drained at once) has exited, generation 3's status and metrics still list generation 1 with
    its session, and watch does not exit 0; with another download holding generation 3 and
    generation 4 serving, --max-draining 2 refuses a fifth generation; once the downloads end
    everything drains and the drains are timed.
    """
    port, metrics = freePort(), freePort()
    limit = ["--max-draining", "2"]
    first = procs.server(_args(port, metrics, *limit), "gen1").start()
    first.waitServing()
    held = [_holdDownload(port)]
    try:
        second = procs.server(["--takeover", "c.sock", *limit], "gen2").start()
        second.waitFor(r"took over from pid %d as generation 2" % first.pid)
        third = procs.server(["--takeover", "c.sock", *limit], "gen3").start()
        third.waitFor(r"took over from pid %d as generation 3" % second.pid)
        assert second.wait(30) == 0
        status = waitForStatus(
            workdir,
            lambda s: s["pid"] == third.pid and _draining(s) == {first.pid: 1},
            "generation 1 draining behind generation 3",
        )
        assert status["drainingGenerations"] == 1
        assert first.process is not None and first.process.poll() is None
        samples = scrape(metrics)
        assert (
            # (Stood down when generation 2 handed over in turn: draining, nothing to resume.)
            value(samples, "graceful_sessions", generation="1", listener="web", state="retiring")
            == 1
        )
        assert value(samples, "graceful_draining_generations") == 1
        watched = ctl(workdir, "--control", "c.sock", "watch", "--timeout", "0.5")
        assert watched.returncode == 1, watched.stdout + watched.stderr

        held.append(_holdDownload(port))
        fourth = procs.server(["--takeover", "c.sock", *limit], "gen4").start()
        fourth.waitFor(r"took over from pid %d as generation 4" % third.pid)
        waitForStatus(
            workdir,
            lambda s: s["pid"] == fourth.pid and _draining(s) == {first.pid: 1, third.pid: 1},
            "generations 1 and 3 draining behind generation 4",
        )
        refused = subprocess.run(
            [TWISTD, "-n", "--pidfile=", "graceful", "--takeover", "c.sock", *limit],
            cwd=workdir,
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
        assert refused.returncode != 0
        assert "2 generation(s) still draining (--max-draining 2)" in refused.stdout
        samples = scrape(metrics)
        assert value(samples, "graceful_handoffs_total", outcome="refused") == 1
        assert value(samples, "graceful_draining_generations") == 2
    finally:
        for s in held:
            s.close()
    assert first.wait(30) == 0
    assert third.wait(30) == 0
    waitForStatus(workdir, lambda s: s["draining"] == [], "nothing draining")
    samples = scrape(metrics)
    # Generations 1, 2 and 3 each drained to their exit.
    assert value(samples, "graceful_drain_seconds_count") == 3
    assert value(samples, "graceful_draining_generations") == 0


def test_metricsThatCannotListenStopStartUp(procs: Processes, workdir: Path) -> None:
    """
    --metrics on an address already in use stops start-up with one sentence naming it, exit
    status 1, and leaves no control socket behind; --metrics over udp is refused as a usage
    error.
    """
    port = freePort()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        server = procs.server(_args(port, busy), "gen1").start()
        assert server.wait(30) == 1
    assert f"cannot start: cannot listen on metrics (127.0.0.1:{busy}):" in server.text()
    assert "Traceback" not in server.text()
    assert not (workdir / "c.sock").exists()
    udp = subprocess.run(
        [TWISTD, "-n", "--pidfile=", "graceful", "--port", str(port), "--metrics", "udp:9"],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert udp.returncode != 0
    assert "--metrics 'udp:9': the metrics are served over tcp, tcp6 or unix" in (
        udp.stdout + udp.stderr
    )


def test_successorOfAnOlderPredecessorCountsFromZero(procs: Processes, workdir: Path) -> None:
    """
    A successor whose predecessor does not hand over counters (an older version, here a fake)
    takes over, says so in one log line, and serves metrics counting from zero: only its own
    connections and its own committed handoff.
    """
    port, metrics = freePort(), freePort()
    old = procs.fakeSuccessor("old.sock", f"predecessor:old:{port}")
    old.waitFor(r"reached listening")
    successor = procs.server(
        [
            "--takeover",
            "old.sock",
            "--metrics",
            f"tcp:{metrics}:interface=127.0.0.1",
        ],
        "gen8",
    ).start()
    successor.waitFor(r"took over from pid %d as generation 8" % old.pid)
    for _ in range(3):
        assert httpGet("127.0.0.1", port, "/")[0] == 200
    samples = scrape(metrics)
    assert value(samples, "graceful_connections_total", listener="web") == 3
    assert value(samples, "graceful_handoffs_total", outcome="committed") == 1
    assert value(samples, "graceful_generation") == 8
    assert successor.text().count("hands over no counters") == 1


def test_successorWithItsOwnMetricsMovesThem(procs: Processes, workdir: Path) -> None:
    """
    A successor with --metrics at another address serves the metrics there, counters
    continued, and the predecessor closes the old metrics listener for good once it drains.
    """
    port, before, after = freePort(), freePort(), freePort()
    first = procs.server(_args(port, before), "gen1").start()
    first.waitServing()
    for _ in range(4):
        assert httpGet("127.0.0.1", port, "/")[0] == 200
    second = procs.server(
        ["--takeover", "c.sock", "--metrics", f"tcp:{after}:interface=127.0.0.1"], "gen2"
    ).start()
    second.waitFor(r"took over from pid %d as generation 2" % first.pid)
    assert first.wait(30) == 0
    samples = scrape(after)
    assert value(samples, "graceful_connections_total", listener="web") == 4
    assert value(samples, "graceful_generation") == 2
    with pytest.raises(OSError):
        scrape(before, timeout=2)


def test_noScrapeAnsweredBeforeThePredecessorConfirms(procs: Processes, workdir: Path) -> None:
    """
    A successor whose predecessor has not confirmed the handoff yet serves the application but
    answers no scrape (the scrape waits in the queue), so that a scraper never sees the figures
    of a successor that may still be rolled back; once the predecessor is gone, it answers.
    """
    port, metrics = freePort(), freePort()
    slow = procs.fakeSuccessor("old.sock", f"predecessor:noconfirm:{port}")
    slow.waitFor(r"reached listening")
    successor = procs.server(
        ["--takeover", "old.sock", "--metrics", f"tcp:{metrics}:interface=127.0.0.1"], "gen8"
    ).start()
    slow.waitFor(r"successor accepting")
    assert httpGet("127.0.0.1", port, "/")[0] == 200
    with pytest.raises(TimeoutError):
        scrape(metrics, timeout=1)
    slow.kill()
    successor.waitFor(r"the predecessor \(pid %d\) exited at commit" % slow.pid)
    samples = scrape(metrics)
    assert value(samples, "graceful_generation") == 8
    assert value(samples, "graceful_connections_total", listener="web") == 1


def test_successorWithoutPrometheusClientStepsBack(procs: Processes, workdir: Path) -> None:
    """
    A successor that cannot serve the metrics listener its predecessor hands over (no
    prometheus_client) fails its takeover with one sentence, and the predecessor serves on,
    metrics and all.
    """
    port, metrics = freePort(), freePort()
    first = procs.server(_args(port, metrics), "gen1").start()
    first.waitServing()
    shadow = workdir / "shadow" / "prometheus_client"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('not installed here')\n")
    successor = procs.server(["--takeover", "c.sock"], "gen2")
    successor.start({"PYTHONPATH": str(shadow.parent)})
    assert successor.wait(60) == 1
    assert (
        "failed: the predecessor serves metrics, but --metrics needs prometheus_client, which"
        " is not installed" in successor.text()
    )
    assert "Traceback" not in successor.text()
    first.waitFor(r"rolled back")
    samples = scrape(metrics)
    assert value(samples, "graceful_generation") == 1
    assert value(samples, "graceful_handoffs_total", outcome="rolled_back") == 1
    assert httpGet("127.0.0.1", port, "/")[0] == 200


def test_successorWithPortsButNoMetricsKeepsThem(procs: Processes, workdir: Path) -> None:
    """
    A successor that names its --port listeners but no --metrics keeps the predecessor's
    metrics listener (it is no application listener to drop), counters continued.
    """
    port, metrics = freePort(), freePort()
    first = procs.server(_args(port, metrics), "gen1").start()
    first.waitServing()
    assert httpGet("127.0.0.1", port, "/")[0] == 200
    second = procs.server(
        ["--takeover", "c.sock", "--port", f"web=tcp:{port}:interface=127.0.0.1"], "gen2"
    ).start()
    second.waitFor(r"took over from pid %d as generation 2" % first.pid)
    assert first.wait(30) == 0
    assert "the successor dropped it" not in first.text()
    samples = scrape(metrics)
    assert value(samples, "graceful_generation") == 2
    assert value(samples, "graceful_connections_total", listener="web") == 1


def _handedOver(server: Any) -> int:
    found = re.search(r"handed (\d+) idle connection\(s\) over", server.text())
    assert found is not None, server.text()[-3000:]
    return int(found.group(1))


def test_handedOverConnectionsCountedAcrossTakeovers(procs: Processes, workdir: Path) -> None:
    """
    graceful_connections_handed_over_total counts the idle keep-alive connections each
    draining generation handed over (as its log says), and goes on counting across takeovers:
    after two of them it is the sum of both, served by the third generation, which
    graceful-ctl status says too (with --json and without).
    """
    port, metrics = freePort(), freePort()
    gen1 = procs.server(_args(port, metrics), "gen1").start()
    gen1.waitServing()
    clients = [KeepAlive(socket.AF_INET, ("127.0.0.1", port)) for _ in range(4)]
    try:
        for client in clients:
            assert client.request() == gen1.pid
        assert value(scrape(metrics), "graceful_connections_handed_over_total") == 0
        gen2 = procs.server(["--takeover", "c.sock"], "gen2").start()
        gen2.waitFor(r"took over from pid %d" % gen1.pid)
        assert gen1.wait(30) == 0
        first = _handedOver(gen1)
        assert first >= 1
        assert value(scrape(metrics), "graceful_connections_handed_over_total") == first
        for client in clients:
            assert client.request() == gen2.pid
        gen3 = procs.server(["--takeover", "c.sock"], "gen3").start()
        gen3.waitFor(r"took over from pid %d" % gen2.pid)
        assert gen2.wait(30) == 0
        second = _handedOver(gen2)
        samples = scrape(metrics)
        assert value(samples, "graceful_generation") == 3
        assert value(samples, "graceful_connections_handed_over_total") == first + second
        status = json.loads(ctl(workdir, "--control", "c.sock", "status", "--json").stdout)
        assert status["handedOver"] == first + second
        text = ctl(workdir, "--control", "c.sock", "status").stdout
        line = f"idle connections handed over by draining generations: {first + second}"
        assert line in text.splitlines(), text
    finally:
        for client in clients:
            client.close()
