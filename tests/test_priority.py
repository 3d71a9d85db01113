"""
Start-up at idle priority: a successor's imports must not compete with the serving process.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from graceful_plugin.takeover import canRestorePriority, idleChildren, restorePriority

CHILD = "import os; print(os.sched_getscheduler(0) == os.SCHED_IDLE)"


@pytest.mark.skipif(not canRestorePriority(), reason="this user may not leave SCHED_IDLE")
def test_childrenStartIdleAndTheCallerComesBack() -> None:
    """
    A process started inside idleChildren() runs under SCHED_IDLE, and the calling thread is back
    to its normal policy afterwards.
    """
    before = os.sched_getscheduler(0)
    with idleChildren():
        child = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True)
    assert child.stdout.strip() == "True"
    assert os.sched_getscheduler(0) == before == os.SCHED_OTHER
    outside = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True)
    assert outside.stdout.strip() == "False"


@pytest.mark.skipif(not canRestorePriority(), reason="this user may not leave SCHED_IDLE")
def test_restorePriorityLeavesIdle() -> None:
    """
    restorePriority() brings a thread started idle back to normal scheduling.
    """
    script = (
        "import os; from graceful_plugin.takeover import restorePriority; restorePriority(); "
        "print(os.sched_getscheduler(0) == os.SCHED_OTHER)"
    )
    with idleChildren():
        child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert child.stdout.strip() == "True", child.stderr
    restorePriority()
    assert os.sched_getscheduler(0) == os.SCHED_OTHER


def test_unprivilegedWithoutNiceLimitMayNotLeaveIdle() -> None:
    """
    Only root, or a user whose RLIMIT_NICE covers its nice value, counts as able to come back
    from SCHED_IDLE (so nobody else is ever put there).
    """
    assert canRestorePriority(euid=0, niceLimit=0, nice=0)
    assert not canRestorePriority(euid=1000, niceLimit=0, nice=0)
    assert not canRestorePriority(euid=1000, niceLimit=19, nice=0)
    assert canRestorePriority(euid=1000, niceLimit=20, nice=0)
    assert canRestorePriority(euid=1000, niceLimit=10, nice=10)
