"""
Smoke test of ``benchmarks/ctl_cost.py``: it measures both clients against a real server and
prints its figures and the target.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.operate import becomeSubreaper
from tests.procs import childProcesses

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.mark.slow
def test_ctlCostPrintsEveryFigure(tmp_path: Path) -> None:
    """
    A short run (2 calls, 1 restart each) prints a CPU figure for status, status --json and
    restart of the stdlib client, and of the Twisted one when git holds it, and the target line;
    it leaves no process behind, not even a zombie of ours (this process may be a subreaper).
    """
    becomeSubreaper()  # so that anything the run orphaned would be left to us
    before = {pid for pid, _ in childProcesses(os.getpid())}
    out = tmp_path / "ctl.json"
    argv = [sys.executable, str(BENCHMARKS / "ctl_cost.py"), "--calls", "2", "--restarts", "1"]
    done = subprocess.run(
        [*argv, "--json", str(out)], capture_output=True, text=True, timeout=90, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    figures = json.loads(out.read_text())
    for label in ("status", "status --json", "restart"):
        assert figures[f"stdlib: {label}"]["n"] == (1 if label == "restart" else 2)
        assert figures[f"stdlib: {label}"]["median_ms"] > 0
    assert re.search(r"^target: .* <= 30 ms of CPU: (met|NOT met)", done.stdout, re.M)
    assert [p for p, _ in childProcesses(os.getpid()) if p not in before] == []
