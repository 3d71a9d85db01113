"""Smoke tests of the benchmark tools: each runs a few seconds of real load and reports it."""

import importlib.util
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
TWISTD = Path(sys.executable).with_name("twistd")


def _loadtest_module():
    spec = importlib.util.spec_from_file_location("loadtest", BENCHMARKS / "loadtest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _require_graceful() -> None:
    """Skip unless ``twistd --help`` lists the graceful command."""
    try:
        listing = subprocess.run(
            [TWISTD, "--help"], capture_output=True, text=True, timeout=60, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"twistd does not run: {exc}")
    if not any(line.split()[:1] == ["graceful"] for line in listing.splitlines()):
        pytest.skip("twistd --help lists no graceful command: the plugin is not installed")


def _loadtest(tmp_path: Path, mode: str, *extra: str) -> dict:
    """Run loadtest.py for one mode (2 restarts, small bodies, a slow download) and read its
    JSON."""
    out = tmp_path / f"{mode}.json"
    argv = [sys.executable, str(BENCHMARKS / "loadtest.py"), "--mode", mode]
    argv += ["--clients", "3", "--body", "512", "--restarts", "2", "--interval", "1.5"]
    argv += ["--downloaders", "1", "--download-size", "262144", "--download-rate", "524288"]
    argv += ["--json", str(out), *extra]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    (run,) = json.loads(out.read_text())["runs"]
    assert run["mode"] == mode
    assert len(run["restarts"]) == 2
    assert run["requests"]["ok"] > 0, done.stdout
    return run


def test_client_reads_chunked_bodies_and_classifies_short_ones():
    """The load client counts a chunked body exactly and calls a body cut short an EOF."""
    loadtest = _loadtest_module()
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n3;ext=1\r\nabc\r\n0\r\nTrailer: x\r\n\r\n"
    )
    short = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nConnection: close\r\n\r\nabc"
    server, client = socket.socketpair()
    with server, client:
        server.sendall(chunked + short)
        server.shutdown(socket.SHUT_WR)
        response = loadtest._Response(client, 7, 0)
        assert response.read() == (8, True)
        with pytest.raises(loadtest.PrematureEOF) as caught:
            response.read()
    assert loadtest.classify(caught.value) == "eof"


def test_naive_restart_refuses_connections(tmp_path):
    """A naive restart leaves the port closed while the load goes on, so clients are refused."""
    run = _loadtest(tmp_path, "naive", "--down-time", "0.5")
    assert run["requests"]["by_class"]["refused"] > 0
    assert run["targets"]["zero_failures"] is False


def test_reuseport_restart_never_refuses(tmp_path):
    """A SO_REUSEPORT restart keeps a listener on the port throughout: no connect is refused."""
    run = _loadtest(tmp_path, "reuseport")
    assert run["requests"]["by_class"]["refused"] == 0
    assert run["downloads"]["by_class"]["refused"] == 0
    assert [event.get("failed") for event in run["restarts"]] == [None, None]


def test_graceful_restart_fails_no_request(tmp_path):
    """A graceful takeover under load fails no request and cuts no download short."""
    _require_graceful()
    run = _loadtest(tmp_path, "graceful")
    assert [event.get("failed") for event in run["restarts"]] == [None, None]
    assert run["requests"]["failed"] == 0, run["requests"]
    assert run["downloads"]["failed"] == 0, run["downloads"]
    assert run["downloads"]["ok"] > 0
    assert run["server_alive_at_end"]


def test_throughput_measures_both_servers(tmp_path):
    """throughput.py loads graceful's demo app, twistd web serving the same app and, in a git
    checkout, graceful at a baseline revision, and reports the rates and CPU per request of each."""
    _require_graceful()
    out = tmp_path / "throughput.json"
    argv = [sys.executable, str(BENCHMARKS / "throughput.py"), "--duration", "1", "--rounds", "1"]
    argv += ["--warmup", "0", "--connections", "4", "--json", str(out)]
    inGit = subprocess.run(
        ["git", "-C", str(BENCHMARKS), "rev-parse", "--verify", "--quiet", "HEAD^{commit}"],
        capture_output=True,
        check=False,
    )
    names = ["graceful", "web"]
    if inGit.returncode == 0:
        argv += ["--baseline", "HEAD"]
        names.append("baseline")
    done = subprocess.run(argv, capture_output=True, text=True, timeout=90, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(out.read_text())["result"]
    for name in names:
        assert result[name]["rps_median"] > 0, name
        assert result[name]["cpu_us_per_request_median"] > 0, name
        assert result[name]["errors"] == 0, name
    assert result["ratio"] > 0
    assert result["cpu_ratio"] > 0 and result["cpu_ratio_by_round"] > 0
    assert "server CPU per request, graceful / web:" in done.stdout


def test_handoff_measures_phases_scale_and_drain(tmp_path):
    """handoff.py times each phase of real takeovers (all positive), one row per listener count,
    and drains K idle keep-alive connections: the predecessor reports K sessions and exits after
    the 1 s idle grace, and its memory grows with the connections."""
    _require_graceful()
    out = tmp_path / "handoff.json"
    argv = [sys.executable, str(BENCHMARKS / "handoff.py"), "--takeovers", "2"]
    argv += ["--listeners", "1", "--listeners", "10", "--scale-takeovers", "1"]
    argv += ["--connections", "1", "--connections", "10", "--hard-timeout", "80"]
    argv += ["--json", str(out)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=90, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(out.read_text())
    phases = result["phases"]
    assert phases["takeovers"] == 2
    for name in ("fds", "adopt", "ready", "commit", "handoff", "confirm", "drain_to_exit"):
        assert len(phases["phases"][name]["samples"]) == 2, name
        assert all(value > 0 for value in phases["phases"][name]["samples"]), name
    assert [row["listeners"] for row in result["scale"]] == [1, 10]
    assert [row["handed_over"] for row in result["scale"]] == [2, 11]  # + the control socket
    assert all(row["handoff"]["median"] > 0 for row in result["scale"])
    assert [row["connections"] for row in result["drain"]] == [1, 10]
    for row in result["drain"]:
        assert row["sessions_at_drain"] == row["connections"]
        assert row["handed_over"] == row["connections"]  # idle ones move to the successor
        assert row["rss_after_kib"] >= row["rss_before_kib"] > 0


def test_article_experiment_counts_what_the_article_saw(tmp_path):
    """article.py, small: a plain restart cuts downloads in flight (EOF mid-body) and refuses the
    clients that arrive while no server runs; a graceful one fails no download."""
    _require_graceful()
    out = tmp_path / "article.json"
    argv = [sys.executable, str(BENCHMARKS / "article.py"), "--clients", "8"]
    # Downloads much larger than the socket buffers (a few MiB on loopback), which a client
    # still reads after the plain server has gone.
    argv += ["--size", str(24 << 20), "--rate", str(16 << 20), "--spread", "1.5"]
    argv += ["--restart-at", "0.9", "--down-time", "0.5", "--hard-timeout", "80"]
    argv += ["--json", str(out)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=90, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    plain, graceful = json.loads(out.read_text())["runs"]
    assert (plain["mode"], graceful["mode"]) == ("plain", "graceful")
    assert plain["by_outcome"]["eof"] + plain["by_outcome"]["reset"] > 0, plain["by_outcome"]
    assert plain["by_outcome"]["refused"] > 0, plain["by_outcome"]
    assert graceful["failed"] == 0, graceful["by_outcome"]
    assert graceful["by_outcome"]["ok"] == 8
    assert "failed" not in graceful["restart"]
    assert "target (graceful): no failed download: PASS" in done.stdout


@pytest.mark.slow
def test_workersBenchmarkPrintsEveryCount(tmp_path: Path) -> None:
    """workers.py measures 1 and 2 workers (fresh and keep-alive), 2 without the balance and 2
    independent processes, and prints each run, with the spread of connections over the
    processes, where the CPUs' time went, and no error."""
    import shutil

    _require_graceful()
    if shutil.which("wrk") is None:
        pytest.skip("wrk is not installed (apt-get install wrk)")
    out = tmp_path / "workers.json"
    argv = [sys.executable, str(BENCHMARKS / "workers.py"), "--workers", "1", "--workers", "2"]
    argv += ["--duration", "1", "--warmup", "0", "--connections", "4", "--json", str(out)]
    argv += ["--compare-balance", "--independent", "2", "--bursts", "2"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 workers / 1 worker, fresh connections" in done.stdout
    assert "2 independent processes / 1, fresh connections" in done.stdout
    assert "where the CPUs' time went" in done.stdout
    result = json.loads(out.read_text())
    runs = result["runs"]
    assert [(run["workers"], run["balance"]) for run in runs] == [(1, True), (2, True), (2, False)]
    independent = result["independent"]
    for mode in ("fresh", "keepalive"):
        assert independent[mode]["rps"] > 0 and independent[mode]["errors"] == 0
        assert len(independent[mode]["cpu"]["procs"]) == 2
    for run in runs:
        for mode in ("fresh", "keepalive"):
            assert len(run[mode]["cpu"]["procs"]) == run["workers"]
            assert run[mode]["server_us_per_request"] > 0
        for mode in ("fresh", "keepalive"):
            assert run[mode]["rps"] > 0 and run[mode]["errors"] == 0
            # The balance's holds during the run, from status: none to count without it.
            holds = run[mode]["holds"]
            assert (holds is None) == (run["workers"] == 1 or not run["balance"]), run
            assert holds is None or holds >= 0
        # Every process accepted some of the probes; the keep-alive spread is one status read,
        # which a loaded machine may answer after this short run has ended.
        assert len(run["fresh"]["spread"]) == run["workers"]
        spread = run["keepalive"]["spread"]
        assert not spread or abs(sum(spread) - 1) < 0.01


@pytest.mark.slow
def test_bump_measures_a_takeover(tmp_path):
    """bump.py takes a graceful server over by SIGHUP under load and reports p99 near and away,
    the rate after the takeover in 100 ms bins, and no failed request."""
    _require_graceful()
    out = tmp_path / "bump.json"
    argv = [sys.executable, str(BENCHMARKS / "bump.py"), "--scenario", "graceful-hup"]
    argv += ["--duration", "5", "--takeovers", "1", "--clients", "2", "--downloaders", "1"]
    argv += ["--json", str(out)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "graceful-hup" in done.stdout and "p99 near" in done.stdout
    (run,) = json.loads(out.read_text())["runs"]
    assert run["requests"]["ok"] > 0 and run["requests"]["failed"] == 0
    assert run["downloads"]["failed"] == 0
    (takeover,) = run["takeovers"]
    assert "failed" not in takeover and takeover["old_exited_s"] > 0
    assert run["near_ms"]["p99"] is not None and run["away_ms"]["p99"] is not None
    assert [b["t"] for b in run["rate_bins"]][:6] == [-0.5, -0.4, -0.3, -0.2, -0.1, 0.0]


@pytest.mark.slow
def test_bump_timeline_places_each_handoff_step(tmp_path):
    """bump.py --timeline samples the graceful processes and places the handoff's steps in
    order after the takeover's start, with the successor's CPU at each and the pause gap."""
    _require_graceful()
    out = tmp_path / "bump.json"
    argv = [sys.executable, str(BENCHMARKS / "bump.py"), "--scenario", "graceful-hup"]
    argv += ["--duration", "5", "--takeovers", "1", "--clients", "2", "--downloaders", "1"]
    argv += ["--timeline", "--json", str(out)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "timeline, 20 ms bins" in done.stdout and "pause gap" in done.stdout
    (run,) = json.loads(out.read_text())["runs"]
    timeline = run["timeline"]
    assert timeline["takeovers"] == 1
    steps = timeline["steps_median_ms"]
    order = ["forked", "twistd", "hello", "paused", "serving", "confirmed"]
    assert [steps[name] for name in order] == sorted(steps[name] for name in order)
    (takeover,) = timeline["per_takeover"]
    assert 0 <= takeover["pause_gap_ms"] < 1000
    assert takeover["new_cpu"]["serving"][0] > 0
    assert sum(row["new_cpu_ms"] for row in timeline["rows"]) > 0


@pytest.mark.slow
def test_bump_idle_takeovers_count_each_process_cpu(tmp_path):
    """bump.py --idle-takeovers takes a graceful server over without load and reports the CPU
    the predecessor, the forked successor and the fork server used in each takeover."""
    _require_graceful()
    out = tmp_path / "idle.json"
    argv = [sys.executable, str(BENCHMARKS / "bump.py"), "--scenario", "graceful-hup"]
    argv += ["--idle-takeovers", "1", "--json", str(out)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "CPU per takeover without load" in done.stdout
    ((name, (takeover,)),) = json.loads(out.read_text())["idle"]
    assert name == "graceful-hup"
    assert takeover["old"] > 0 and takeover["new"] > 0 and takeover["forkserver"] > 0
    assert takeover["total"] >= takeover["old"] + takeover["new"]


def test_bump_summary_takes_each_scenarios_median_over_its_rounds():
    """bump.py --rounds N prints, for each scenario, the median ratio and rate near over its
    rounds with their range (a round without a rate near is left out of that one)."""
    spec = importlib.util.spec_from_file_location("bump", BENCHMARKS / "bump.py")
    bump = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bump)
    runs = [
        {"scenario": "graceful-hup", "ratio": 1.3, "rate_near": 0.9},
        {"scenario": "nginx", "ratio": 1.0, "rate_near": 0.99},
        {"scenario": "graceful-hup", "ratio": 1.1, "rate_near": 0.95},
        {"scenario": "graceful-hup", "ratio": 1.2, "rate_near": None},
    ]
    lines = bump.summary(runs).splitlines()[1:]
    assert lines == [
        "  graceful-hup: 3 rounds, ratio 1.20 (1.10-1.30), rate near 0.93 (0.90-0.95)",
        "  nginx: 1 rounds, ratio 1.00 (1.00-1.00), rate near 0.99 (0.99-0.99)",
    ]


def test_workers_judge_takes_the_median_ratio_over_its_rounds(monkeypatch):
    """workers.py --rounds N judges the target on the median of the rounds' 2 workers / 1
    worker ratios (fresh connections), and prints the independent pair's median beside it."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location("workers_bench", BENCHMARKS / "workers.py")
    workers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(workers)

    def round_(one, two, independent):
        runs = [
            {"workers": 1, "balance": True, "fresh": {"rps": one}},
            {"workers": 2, "balance": True, "fresh": {"rps": two}},
            {"workers": 2, "balance": False, "fresh": {"rps": 2 * two}},
        ]
        return {"runs": runs, "independent": {"independent": 2, "fresh": {"rps": independent}}}

    rounds = [round_(1000, 1500, 1600), round_(1000, 1300, 1400), round_(1000, 1450, 1500)]
    lines, verdict = workers.judge(rounds)
    assert verdict is True  # 1.30, 1.45, 1.50: median 1.45 >= 1.4 (one round alone would fail)
    assert lines == [
        "2 workers / 1 worker, fresh connections: 1.45x (median of 3 rounds: 1.50, 1.30, 1.45)"
        " (target at least 1.4x): met",
        "2 independent processes / 1, fresh connections: 1.50x (median of 1.60, 1.40, 1.50)"
        " (the ceiling here)",
    ]
    lines, verdict = workers.judge([round_(1000, 1300, 1400)])
    assert verdict is False
    assert (
        lines[0] == "2 workers / 1 worker, fresh connections: 1.30x (target at least 1.4x): NOT met"
    )
    assert workers.judge([{"runs": rounds[0]["runs"][1:], "independent": None}]) == ([], None)
