"""
Scheduling priority of a successor's start-up: idle while it imports and builds its application,
normal for the handoff and for serving.

Standard library only, and cheap to import: L{graceful_plugin} imports it first thing, so that a
successor started by hand goes idle at its first import of graceful (twistd's plugin discovery).
"""

from __future__ import annotations

import os
import resource
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager


def canRestorePriority(
    euid: int | None = None, niceLimit: int | None = None, nice: int | None = None
) -> bool:
    """
    Whether this process may go back from idle to normal scheduling: Linux lets an unprivileged
    process leave C{SCHED_IDLE} only when C{RLIMIT_NICE} allows its nice value.

    @param euid: the effective uid (ours when L{None}).
    @param niceLimit: the soft C{RLIMIT_NICE} (ours when L{None}).
    @param nice: the nice value (ours when L{None}).
    """
    if (os.geteuid() if euid is None else euid) == 0:
        return True
    if niceLimit is None:
        niceLimit = resource.getrlimit(resource.RLIMIT_NICE)[0]
    if nice is None:
        nice = os.getpriority(os.PRIO_PROCESS, 0)
    return niceLimit == resource.RLIM_INFINITY or niceLimit >= 20 - nice


def lowerPriority() -> None:
    """
    Run our start-up (imports, building the application) at idle priority, so that it does not
    compete with the serving process for the CPU.  L{restorePriority} undoes it before the
    handoff itself, which must be quick.  Nothing is lowered that could not be restored.
    """
    if not canRestorePriority():
        return
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        pass


def idleForGood() -> None:
    """
    Idle priority from now on, for a process that never needs normal priority back (the
    C{graceful-ctl restart} client, which only waits while the server hands over): it then
    takes no CPU the serving process could use.
    """
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        pass


def restorePriority() -> None:
    """
    Back to normal scheduling for the handoff and for serving.
    """
    try:
        if os.sched_getscheduler(0) != os.SCHED_OTHER:
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    except (AttributeError, OSError) as e:
        from twisted.logger import Logger

        Logger().warn(
            "cannot leave idle scheduling ({error}): serving at low priority", error=str(e)
        )


@contextmanager
def idleChildren() -> Iterator[None]:
    """
    Processes started inside this block begin at idle priority (the scheduling policy is
    inherited through fork), so a successor's start-up does not slow the serving process; the
    calling thread is back to normal when the block ends.
    """
    if not canRestorePriority():
        yield
        return
    try:
        before = os.sched_getscheduler(0)
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        yield
        return
    try:
        yield
    finally:
        os.sched_setscheduler(0, before, os.sched_param(0))


def isTakeoverCommand(argv: Sequence[str]) -> bool:
    """
    Whether C{argv} is a twistd command line that takes over: the C{graceful} subcommand
    followed by C{--takeover}.
    """
    try:
        start = list(argv).index("graceful", 1)
    except ValueError:
        return False
    return any(arg == "--takeover" or arg.startswith("--takeover=") for arg in argv[start + 1 :])


def idleIfTakingOver(argv: Sequence[str] | None = None) -> None:
    """
    Go idle now if this process is a successor's twistd (L{isTakeoverCommand}): its start-up
    runs at idle priority from the first import of graceful until it connects for the handoff.
    """
    if isTakeoverCommand(sys.argv if argv is None else argv):
        lowerPriority()
