"""Where a takeover's latency bump comes from: a fine timeline of one graceful scenario.

Used by ``bump.py --timeline``. While the load runs, a thread samples every graceful process
(generations, the fork server, successors; found in ``/proc`` as they appear) every few
milliseconds: CPU time (``/proc/PID/schedstat``, in ns), minor and major page faults
(``/proc/PID/stat``), and the machine's busy time (``/proc/stat``). The servers log through
``tracelog.observer``, so each handoff step (fork, twistd start, Hello, pause, serving, confirm,
first request served, exit) has a monotonic time and a pid. The timeline then puts, per bin of
``--bin-ms`` after each takeover's start (averaged over the takeovers), the completion rate
against the away rate, the p50/p99 of the requests that started in the bin, the CPU each role
used in it (old generation, new generation, fork server, the rest of the machine), the new and
old generations' page faults, and the steps that happened in it (median times).
"""

from __future__ import annotations

import bisect
import os
import statistics
import threading
import time
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")

#: Handoff steps, as (name, who logs it, a piece of the line).
STEPS = (
    ("forked", "old", "forked the successor pid"),
    ("spawned", "old", "restart: started successor pid"),
    ("twistd", "new", "starting up."),
    ("hello", "new", "taking over from pid"),
    ("paused", "old", "paused accepting"),
    ("serving", "new", "serving on"),
    ("confirmed", "old", "after we paused; draining"),
    ("first-req", "new", '"GET /bytes/'),
    ("took-over", "new", "took over from pid"),
    ("drained", "old", "drained; exiting"),
    ("old-down", "old", "Server Shut Down."),
)


def _stat(pid: int) -> tuple[int, int, int, int, int, int] | None:
    """(ppid, cpu ns, minflt, majflt, scheduling policy, run-queue wait ns) of ``pid``, or None
    once gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open(f"/proc/{pid}/schedstat") as f:
            sched = f.read().split()
        ns, wait = int(sched[0]), int(sched[1])
    except (OSError, IndexError, ValueError):
        return None
    return int(fields[1]), ns, int(fields[7]), int(fields[9]), int(fields[38]), wait


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def _busy() -> int:
    """The machine's non-idle CPU time so far, in ticks."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return sum(fields) - fields[3] - fields[4]


class Sampler:
    """Samples every graceful process of this run until stopped (a daemon thread)."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.root = os.getpid()
        self.tracked: dict[int, str] = {}  # pid -> "server" | "forkserver" | "forked"
        self.seen: set[int] = set()
        self.pending: dict[int, float] = {}
        #: (t, pid, cpu ns, minflt, majflt, policy, run-queue wait ns)
        self.samples: list[tuple[float, int, int, int, int, int, int]] = []
        #: (t, machine busy ticks)
        self.machine: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _discover(self, now: float) -> None:
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            pid = int(entry)
            if pid in self.seen:
                continue
            first = self.pending.setdefault(pid, now)
            st = _stat(pid)
            if st is None or now - first > 0.5:
                # Gone, or classified for good (a load client or another process if untracked).
                self.seen.add(pid)
                continue
            ppid = st[0]
            if ppid != self.root and ppid not in self.tracked:
                self.seen.add(pid)
                continue
            # Between fork and exec a child still shows its parent's command: look again in the
            # next passes (for 0.5 s), unless its parent is the fork server, whose children
            # never exec.
            command = _cmdline(pid)
            if self.tracked.get(ppid) == "forkserver":
                self.tracked[pid] = "forked"
            elif "graceful_plugin.forkserver" in command:
                self.tracked[pid] = "forkserver"
            elif "graceful_plugin.worker" in command:
                self.tracked[pid] = "worker"
            elif "twistd" in command:
                self.tracked[pid] = "server"
            elif "graceful-ctl" in command:
                self.tracked[pid] = "ctl"

    def _retag(self) -> None:
        # The fork server's children are successors or workers (a spare becomes either): a
        # worker it forked renames itself (graceful-worker).
        for pid, role in list(self.tracked.items()):
            if role == "forked" and _comm(pid) == "graceful-worker":
                self.tracked[pid] = "worker"

    def _run(self) -> None:
        discovered = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if now - discovered > 0.02:
                self._discover(now)
                self._retag()
                discovered = now
            for pid in list(self.tracked):
                st = _stat(pid)
                if st is not None:
                    self.samples.append((now, pid, st[1], st[2], st[3], st[4], st[5]))
            self.machine.append((now, _busy()))
            self._stop.wait(self.interval)


def read_trace_logs(directory: Path) -> list[tuple[float, int, str]]:
    """Every ``tracelog`` line of the server logs in ``directory``: (monotonic, pid, text)."""
    lines = []
    for log in directory.glob("*.log"):
        for line in log.read_text(errors="replace").splitlines():
            parts = line.split(" ", 2)
            if len(parts) == 3:
                try:
                    lines.append((float(parts[0]), int(parts[1]), parts[2]))
                except ValueError:
                    continue
    lines.sort()
    return lines


def _first(lines, pid: int, piece: str, after: float, before: float) -> float | None:
    for t, p, text in lines:
        if p == pid and after <= t < before and piece in text:
            return t
    return None


def _series(samples, pid: int) -> list[tuple[float, int, int, int, int, int]]:
    return [
        (t, ns, minflt, majflt, policy, wait)
        for t, p, ns, minflt, majflt, policy, wait in samples
        if p == pid
    ]


def _at(series, t: float, index: int) -> float | None:
    """The value of column ``index`` of a sampled counter at ``t`` (the last sample <= t)."""
    value = None
    for row in series:
        if row[0] > t:
            break
        value = row[index]
    return value


def _spread(series, lo: float, hi: float, index: int, scale: float, bins: list[float]) -> None:
    """Add each sampled increment of column ``index`` (x ``scale``) in [lo, hi) to its bin."""
    width = (hi - lo) / len(bins)
    for (_t0, *a), (t1, *b) in zip(series, series[1:], strict=False):
        if t1 < lo or t1 >= hi:
            continue
        bins[int((t1 - lo) / width)] += (b[index - 1] - a[index - 1]) * scale


def timeline(
    records: dict,
    events: list[dict],
    sampler: Sampler,
    lines: list[tuple[float, int, str]],
    away_rate_per_s: float | None,
    bin_ms: float = 20.0,
    before: float = 0.1,
    after: float = 1.0,
) -> dict:
    """The binned timeline around the takeovers (see the module's docstring)."""
    width = bin_ms / 1000.0
    nbins = int(round((before + after) / width))
    ok = [(s, lat) for s, lat, outcome in records["client"] if outcome == 0]
    ok.sort()
    done = sorted(s + lat for s, lat in ok)
    roles = {"old": [0.0] * nbins, "new": [0.0] * nbins, "forkserver": [0.0] * nbins}
    waits = {"old": [0.0] * nbins, "new": [0.0] * nbins}
    faults = {"new_minflt": [0.0] * nbins, "old_minflt": [0.0] * nbins, "majflt": [0.0] * nbins}
    machine = [0.0] * nbins
    completions = [0.0] * nbins
    started: list[list[float]] = [[] for _ in range(nbins)]
    steps: dict[str, list[float]] = {name: [] for name, _, _ in STEPS}
    per_takeover = []
    forkservers = [pid for pid, role in sampler.tracked.items() if role == "forkserver"]
    used = [e for e in events if e.get("new_pid") and "failed" not in e]
    for event in used:
        start, old, new = event["start"], event["old_pid"], event["new_pid"]
        lo, hi = start - before, start + after
        for i in range(bisect.bisect_left(done, lo), bisect.bisect_left(done, hi)):
            completions[int((done[i] - lo) / width)] += 1
        for i in range(bisect.bisect_left(ok, (lo,)), bisect.bisect_left(ok, (hi,))):
            s, lat = ok[i]
            started[int((s - lo) / width)].append(lat)
        for role, pid in (("old", old), ("new", new)):
            _spread(_series(sampler.samples, pid), lo, hi, 1, 1e-6, roles[role])
            _spread(_series(sampler.samples, pid), lo, hi, 5, 1e-6, waits[role])
        for pid in forkservers:
            _spread(_series(sampler.samples, pid), lo, hi, 1, 1e-6, roles["forkserver"])
        _spread(_series(sampler.samples, new), lo, hi, 2, 1.0, faults["new_minflt"])
        _spread(_series(sampler.samples, old), lo, hi, 2, 1.0, faults["old_minflt"])
        _spread(_series(sampler.samples, new), lo, hi, 3, 1.0, faults["majflt"])
        mseries = [(t, b) for t, b in sampler.machine]
        _spread(mseries, lo, hi, 1, 1000.0 / TICK, machine)
        found = {}
        for name, who, piece in STEPS:
            t = _first(lines, old if who == "old" else new, piece, start - 0.05, start + 30)
            if t is not None:
                found[name] = t - start
                steps[name].append(t - start)
        new_series = _series(sampler.samples, new)
        # A spare forked ahead (graceful_plugin.spare) was sampled before the takeover: count
        # only what it used from the takeover's start.
        base_cpu = _at(new_series, start, 1) or 0
        base_flt = _at(new_series, start, 2) or 0
        cpu_at = {}
        for name in ("twistd", "hello", "serving", "took-over"):
            if name in found:
                value = _at(new_series, start + found[name], 1)
                flt = _at(new_series, start + found[name], 2)
                if value is not None:
                    cpu_at[name] = (
                        round((value - base_cpu) / 1e6, 1),
                        None if flt is None else flt - base_flt,
                    )
        # CPU used at normal priority before the start-up went idle (SCHED_IDLE is policy 5),
        # and by the time it was back to normal (for the handoff).
        idle = [row for row in new_series if row[4] == 5 and row[0] >= start]
        if idle:
            cpu_at["idle-from"] = (round((idle[0][1] - base_cpu) / 1e6, 1), idle[0][2] - base_flt)
            after_idle = [row for row in new_series if row[0] > idle[-1][0]]
            if after_idle:
                cpu_at["idle-until"] = (
                    round((after_idle[0][1] - base_cpu) / 1e6, 1),
                    after_idle[0][2] - base_flt,
                )
        if "serving" in found:
            t = start + found["serving"]
            first = _at(new_series, t, 1)
            later = _at(new_series, t + 0.2, 1)
            if first is not None and later is not None:
                cpu_at["serving+200ms"] = (round((later - first) / 1e6, 1), None)
            flt0 = _at(new_series, t, 2)
            flt1 = _at(new_series, t + 0.5, 2)
            if flt0 is not None and flt1 is not None:
                faults_after = flt1 - flt0
            else:
                faults_after = None
        else:
            faults_after = None
        gap = None
        if "paused" in found and "serving" in found:
            gap = round((found["serving"] - found["paused"]) * 1000, 1)
        per_takeover.append(
            {
                "steps_ms": {k: round(v * 1000, 1) for k, v in found.items()},
                "new_cpu": cpu_at,
                "pause_gap_ms": gap,
                "faults_500ms_after_serving": faults_after,
            }
        )
    count = max(1, len(used))
    rows = []
    for k in range(nbins):
        lats = sorted(started[k])
        t0 = -before + k * width
        here = [
            name
            for name, times in steps.items()
            if times and t0 <= statistics.median(times) < t0 + width
        ]
        rows.append(
            {
                "t_ms": round(t0 * 1000),
                "rate": round(completions[k] / count / (away_rate_per_s * width), 2)
                if away_rate_per_s
                else None,
                "p50_ms": round(lats[len(lats) // 2] * 1000, 1) if lats else None,
                "p99_ms": round(lats[min(len(lats) - 1, int(len(lats) * 0.99))] * 1000, 1)
                if lats
                else None,
                "n": len(lats),
                "old_cpu_ms": round(roles["old"][k] / count, 1),
                "new_cpu_ms": round(roles["new"][k] / count, 1),
                "fs_cpu_ms": round(roles["forkserver"][k] / count, 1),
                "old_wait_ms": round(waits["old"][k] / count, 1),
                "new_wait_ms": round(waits["new"][k] / count, 1),
                "machine_cpu_ms": round(machine[k] / count, 1),
                "new_minflt": round(faults["new_minflt"][k] / count),
                "old_minflt": round(faults["old_minflt"][k] / count),
                "majflt": round(faults["majflt"][k] / count, 1),
                "steps": here,
            }
        )
    return {
        "bin_ms": bin_ms,
        "takeovers": len(used),
        "rows": rows,
        "steps_median_ms": {
            k: round(statistics.median(v) * 1000, 1) for k, v in steps.items() if v
        },
        "per_takeover": per_takeover,
    }


def format_timeline(name: str, tl: dict) -> str:
    head = ["t ms", "rate", "p50", "p99", "n", "old cpu", "new cpu", "fs cpu", "old wait"]
    head += ["new wait", "machine"]
    head += ["new minflt", "old minflt", "majflt", "steps (median)"]
    out = [
        f"{name}: timeline, {tl['bin_ms']:g} ms bins after the takeover's start, mean of"
        f" {tl['takeovers']} takeovers (rate = completions / away rate; p50/p99 ms of the"
        " requests started in the bin; CPU ms used in the bin; wait = ms runnable but waiting for a"
        " core, from /proc/PID/schedstat)"
    ]
    cells = [head]
    for r in tl["rows"]:
        cells.append(
            [
                str(r["t_ms"]),
                "-" if r["rate"] is None else f"{r['rate']:.2f}",
                "-" if r["p50_ms"] is None else f"{r['p50_ms']:.1f}",
                "-" if r["p99_ms"] is None else f"{r['p99_ms']:.1f}",
                str(r["n"]),
                f"{r['old_cpu_ms']:.1f}",
                f"{r['new_cpu_ms']:.1f}",
                f"{r['fs_cpu_ms']:.1f}",
                f"{r['old_wait_ms']:.1f}",
                f"{r['new_wait_ms']:.1f}",
                f"{r['machine_cpu_ms']:.0f}",
                str(r["new_minflt"]),
                str(r["old_minflt"]),
                f"{r['majflt']:.1f}",
                " ".join(r["steps"]),
            ]
        )
    widths = [max(len(row[i]) for row in cells) for i in range(len(head))]
    for row in cells:
        out.append("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
    out.append(
        "steps, median ms after the start: "
        + ", ".join(f"{k} {v:g}" for k, v in tl["steps_median_ms"].items())
    )
    gaps = [p["pause_gap_ms"] for p in tl["per_takeover"] if p["pause_gap_ms"] is not None]
    if gaps:
        out.append(
            f"pause gap (old paused -> new serving), ms: median {statistics.median(gaps):.1f},"
            f" each {', '.join(f'{g:.1f}' for g in gaps)}"
        )
    after = [
        p["faults_500ms_after_serving"]
        for p in tl["per_takeover"]
        if p.get("faults_500ms_after_serving") is not None
    ]
    if after:
        out.append(
            "new generation's minor faults in the 500 ms after it started accepting: median"
            f" {statistics.median(after):.0f}"
        )
    cpus: dict[str, list[float]] = {}
    flts: dict[str, list[int]] = {}
    for p in tl["per_takeover"]:
        for k, (v, f) in p["new_cpu"].items():
            cpus.setdefault(k, []).append(v)
            if f is not None:
                flts.setdefault(k, []).append(f)
    if cpus:
        out.append(
            "new generation's CPU ms (minor faults) by then, median: "
            + ", ".join(
                f"{k} {statistics.median(v):.1f}"
                + (f" ({statistics.median(flts[k]):.0f})" if k in flts else "")
                for k, v in cpus.items()
            )
        )
    return "\n".join(out)


def takeover_cpu(sampler: Sampler, event: dict, until: float) -> dict[str, float]:
    """
    CPU (ms) each graceful process used from just before a takeover's start to ``until``:
    ``old``, ``new``, ``workers`` (every worker process of either generation, with ``--workers``:
    the new ones starting, the old ones draining and exiting), ``forkserver``, ``ctl`` (a
    ``graceful-ctl`` call), and their ``total``.
    """
    t0 = event["start"] - 0.005
    used: dict[str, float] = {}
    for pid, role in list(sampler.tracked.items()):
        series = [(t, ns) for t, p, ns, *_ in sampler.samples if p == pid]
        if not series or series[-1][0] < t0:
            continue
        before = [ns for t, ns in series if t <= t0]
        after = [ns for t, ns in series if t <= until]
        if not after:
            continue
        spent = (after[-1] - (before[-1] if before else 0)) / 1e6
        if spent <= 0:
            continue
        name = {event["old_pid"]: "old", event.get("new_pid"): "new"}.get(pid, role)
        name = "workers" if name == "worker" else name
        if name == "server" or name == "forked":
            continue  # an older generation still draining, or a successor that failed
        used[name] = round(used.get(name, 0.0) + spent, 1)
    used["total"] = round(sum(used.values()), 1)
    return used


def format_takeover_cpu(rows: list[tuple[str, list[dict[str, float]]]]) -> str:
    """The median CPU per takeover of each scenario, by process."""
    roles = ["old", "new", "workers", "forkserver", "ctl", "total"]
    cells = [["scenario", "takeovers", *(f"{r} ms" for r in roles)]]
    for name, takeovers in rows:
        line = [name, str(len(takeovers))]
        for role in roles:
            values = [t.get(role, 0.0) for t in takeovers]
            line.append(f"{statistics.median(values):.1f}" if values else "-")
        cells.append(line)
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    out = [
        "  ".join(
            c.rjust(w) if i else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in cells
    ]
    out.append(
        "CPU per takeover without load (median): old = the predecessor from the takeover's start"
        " to its exit (handoff, drain, exit), new = the successor from its start to 0.5 s after"
        " its predecessor exited, workers = both generations' worker processes (--workers),"
        " forkserver, ctl = the graceful-ctl call; sampled in /proc"
    )
    return "\n".join(out)
