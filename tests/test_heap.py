"""
L{graceful_plugin.heap}: a serving process's heap is settled once before it serves.
"""

from __future__ import annotations

import ctypes
import gc
import subprocess
import sys

import pytest

from graceful_plugin import heap

# A fresh interpreter allocates 8 MiB in 64 KiB pieces (what a burst of responses does), frees
# them, and counts the page faults of doing it again: the second time costs none if the heap's
# top was kept, one a page if it was given back to the kernel.
_CHURN = """
import resource, sys
from graceful_plugin import heap
if sys.argv[1] == "pad":
    assert heap.padMalloc({})
def burst():
    return [bytearray(65536) for _ in range(128)]
pieces = burst()
del pieces
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
pieces = burst()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    done = subprocess.run(
        [sys.executable, "-c", _CHURN, mode],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(sys.path)},
    )
    return int(done.stdout)


def test_aPaddedHeapKeepsItsTopForTheNextBurst() -> None:
    """
    With the pad, memory freed at the heap's top is kept for the next burst: allocating the
    same 8 MiB again takes (almost) no page fault; without it, about one per page.
    """
    if not hasattr(ctypes.CDLL(None), "mallopt"):
        pytest.skip("this C library has no mallopt")
    pages = 8 * 1024 * 1024 // 4096
    assert _faults("default") > pages // 2
    assert _faults("pad") < pages // 20


@pytest.mark.parametrize(
    "environ", [{"GRACEFUL_MALLOC": "off"}, {"GRACEFUL_MALLOC": " OFF "}, {"MALLOC_TOP_PAD_": "0"}]
)
def test_theOperatorCanKeepMallocsDefaults(environ: dict[str, str]) -> None:
    """
    C{GRACEFUL_MALLOC=off} leaves malloc alone, and so does an operator's own
    C{MALLOC_TOP_PAD_} (glibc read it at start-up: setting ours would override it).
    """
    assert heap.padMalloc(environ) is False


def test_settleFreezesWhatStartUpLeft() -> None:
    """
    After L{heap.settle}, the objects that existed are out of the collector's generations.
    """
    frozen = gc.get_freeze_count()
    try:
        heap.settle({"GRACEFUL_MALLOC": "off"})
        assert gc.get_freeze_count() > frozen
    finally:
        gc.unfreeze()
