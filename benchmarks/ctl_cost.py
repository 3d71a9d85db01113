"""What one ``graceful-ctl`` call costs in CPU: ``status``, ``status --json`` and ``restart``.

    python benchmarks/ctl_cost.py [--calls 20] [--restarts 3] [--json ctl.json]

Starts one ``twistd -n graceful`` server (one listener on 127.0.0.1, control socket in a
temporary directory) and runs each command ``--calls`` times (``restart`` ``--restarts``
times) against it, one after another; each call's CPU is the user + system time of that child
alone, from ``os.wait4``.  Two clients are measured side by side:

- ``stdlib``: the installed ``graceful-ctl`` console script (no Twisted imported);
- ``twisted``: the reactor-based client this project had before (``graceful_plugin/ctl.py``
  in the parent of the commit that added ``graceful_plugin/ctlclient.py``, read from git), run
  with the same interpreter, when git can give it.

For context, the interpreter's own start-up (``python -c pass``) is measured too.  The
package's bytecode is compiled first (as ``pip install`` does), so that no run pays for
compiling it.  Target (issue 12): ``status`` and ``restart``, at most 30 ms of CPU.  Standard
library only; the server and every successor are stopped, and the directory removed, at the
end (also on errors and at the hard timeout).
"""

from __future__ import annotations

import argparse
import compileall
import ctypes
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TWISTD = str(BIN / "twistd")
CTL = str(BIN / "graceful-ctl")
TARGET_MS = 30.0
_PR_SET_CHILD_SUBREAPER = 36


class HardTimeout(Exception):
    """The whole run took longer than ``--hard-timeout``."""


def cpuMs(argv: list[str], cwd: Path) -> tuple[float, int]:
    """Run C{argv}; its CPU (user + system, ms) and exit status."""
    child = subprocess.Popen(
        argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    return (usage.ru_utime + usage.ru_stime) * 1000, child.returncode


def oldClient(directory: Path) -> list[str] | None:
    """The command line of the Twisted-based client, from git; None when git cannot give it."""
    try:
        added = subprocess.run(
            ["git", "log", "--diff-filter=A", "--format=%H", "--", "graceful_plugin/ctlclient.py"],
            cwd=REPO, capture_output=True, text=True, timeout=30, check=True,
        ).stdout.split()  # fmt: skip
        if not added:
            return None
        source = subprocess.run(
            ["git", "show", f"{added[-1]}^:graceful_plugin/ctl.py"],
            cwd=REPO, capture_output=True, text=True, timeout=30, check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    (directory / "ctl_twisted.py").write_text(source)
    runner = (
        f"import sys; sys.path.insert(0, {str(directory)!r}); sys.argv[0] = 'graceful-ctl';"
        " from ctl_twisted import main; main()"
    )
    return [sys.executable, "-c", runner]


def waitServing(directory: Path, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        result = subprocess.run(
            [CTL, "-c", "c.sock", "status", "--json"], cwd=directory, capture_output=True,
            text=True, timeout=20, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        if result.returncode == 0:
            status = json.loads(result.stdout)
            if status["state"] == "serving":
                return status
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server never served: {result.stderr}")
        time.sleep(0.05)


def pidAlive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def children() -> list[int]:
    """Our child processes (successors orphaned by an exited generation become ours)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == os.getpid():
                        found.append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    return found


def stopEverything(pids: set[int]) -> None:
    """Kill C{pids} and every child of ours, and reap them all (bounded)."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        left = children()
        if not left:
            return
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass


def summary(samples: list[float]) -> dict:
    return {
        "n": len(samples),
        "median_ms": round(statistics.median(samples), 1),
        "min_ms": round(min(samples), 1),
        "max_ms": round(max(samples), 1),
    }


def measure(args: argparse.Namespace, directory: Path, seen: set[int]) -> dict:
    results: dict = {}
    results["python -c pass"] = summary(
        [cpuMs([sys.executable, "-c", "pass"], directory)[0] for _ in range(args.calls)]
    )
    clients = {"stdlib": [CTL]}
    old = oldClient(directory)
    if old is not None:
        clients["twisted"] = old
    for name, base in clients.items():
        for label, extra in (("status", ["status"]), ("status --json", ["status", "--json"])):
            samples = []
            for _ in range(args.calls):
                ms, code = cpuMs([*base, "-c", "c.sock", *extra], directory)
                if code != 0:
                    raise RuntimeError(f"{name} {label} exited {code}")
                samples.append(ms)
            results[f"{name}: {label}"] = summary(samples)
        samples = []
        for _ in range(args.restarts):
            before = waitServing(directory)
            ms, code = cpuMs([*base, "-c", "c.sock", "restart"], directory)
            if code != 0:
                raise RuntimeError(f"{name} restart exited {code}")
            samples.append(ms)
            after = waitServing(directory)
            seen.add(after["pid"])
            if after["generation"] != before["generation"] + 1:
                raise RuntimeError(f"{name} restart: generation {after['generation']}")
            # The next restart waits for the predecessor to have drained and exited.
            deadline = time.monotonic() + 30
            while pidAlive(before["pid"]) and time.monotonic() < deadline:
                time.sleep(0.05)
        results[f"{name}: restart"] = summary(samples)
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=20, help="calls of each status command")
    p.add_argument("--restarts", type=int, default=3, help="restarts with each client")
    p.add_argument("--json", help="write the figures to this file too")
    p.add_argument("--hard-timeout", type=float, default=60.0)
    args = p.parse_args()

    import graceful_plugin

    compileall.compile_dir(str(Path(graceful_plugin.__file__).parent), quiet=1)

    def onAlarm(signum: int, frame: object) -> None:
        raise HardTimeout(f"the run took longer than {args.hard_timeout:g} s")

    # Successors are started by the server, detached; once the generation that started one
    # exits, it becomes ours, so that the end of the run can kill and reap every one.
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    signal.signal(signal.SIGALRM, onAlarm)
    signal.setitimer(signal.ITIMER_REAL, args.hard_timeout)
    seen: set[int] = set()
    with tempfile.TemporaryDirectory(prefix="ctlcost-") as d:
        directory = Path(d)
        server = subprocess.Popen(
            [TWISTD, "-n", "--pidfile", "app.pid", "graceful", "--port",
             "tcp:0:interface=127.0.0.1", "--control", "c.sock"],
            cwd=directory, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        seen.add(server.pid)
        try:
            waitServing(directory)
            results = measure(args, directory, seen)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            stopEverything(seen | {server.pid})
            server.poll()  # reaped above: this only tells Popen
    width = max(len(k) for k in results)
    print(f"{'CPU per call (user + sys)':<{width}}  median     min     max   (n)")
    for label, s in results.items():
        print(
            f"{label:<{width}}  {s['median_ms']:6.1f}  {s['min_ms']:6.1f}  {s['max_ms']:6.1f}"
            f"   ({s['n']}) ms"
        )
    worst = max(results["stdlib: status"]["median_ms"], results["stdlib: restart"]["median_ms"])
    verdict = "met" if worst <= TARGET_MS else "NOT met"
    print(f"target: stdlib status and restart <= {TARGET_MS:g} ms of CPU: {verdict} ({worst} ms)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
