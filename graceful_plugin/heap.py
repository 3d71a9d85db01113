"""
A serving process's heap: what it does once, before it serves.

 - Start-up's garbage is collected and what is left (modules, the application) is kept out of
   every later collection (C{gc.freeze}): no long collection pauses the first requests, and the
   interpreter's teardown at exit does not walk it either.
 - glibc's malloc keeps C{TOP_PAD} bytes at the top of its heap instead of its default 128 KiB.
   By default, each time a burst of responses is freed the heap's top is given back to the
   kernel, and the next burst takes it again one zeroed page (one page fault) at a time: a
   fresh process serving 64 KiB responses and 8 MiB downloads took about 19,000 page faults in
   its first half second of serving and went on at 1-3 faults a request (C{benchmarks/bump.py
   --timeline}), against about 550 and none with the pad.  The cost is that much memory kept
   resident once the heap has grown to it (at most C{TOP_PAD} per process); C{GRACEFUL_MALLOC=off}
   keeps glibc's defaults, and an operator's own C{MALLOC_TOP_PAD_} is left alone.
"""

from __future__ import annotations

import ctypes
import gc
import os
from collections.abc import Mapping

#: Bytes glibc's malloc keeps at its heap's top when it trims, and adds when it grows.
TOP_PAD = 16 << 20

#: C{mallopt}'s parameter for it (glibc's C{malloc.h}).
M_TOP_PAD = -2

#: Switches the pad off (to compare, or where memory is tighter than time).
ENV = "GRACEFUL_MALLOC"


def settle(environ: Mapping[str, str] = os.environ) -> None:
    """
    Before serving: collect and freeze start-up's objects, and pad malloc's heap (L{padMalloc}).
    """
    gc.collect()
    gc.freeze()
    padMalloc(environ)


def padMalloc(environ: Mapping[str, str] = os.environ, size: int = TOP_PAD) -> bool:
    """
    Make glibc's malloc keep C{size} bytes at its heap's top; whether it was set (not where
    C{GRACEFUL_MALLOC=off} or C{MALLOC_TOP_PAD_} is in C{environ}, or the C library has no
    C{mallopt}).
    """
    if environ.get(ENV, "").strip().lower() in ("off", "0", "no", "false"):
        return False
    if "MALLOC_TOP_PAD_" in environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_TOP_PAD, size))
