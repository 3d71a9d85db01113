"""
A pidfile shared by generations: the serving generation owns it, and nobody removes a pidfile
that names another process.

twistd's own pidfile handling cannot do this (it refuses to start while the pid in the file is
alive, and removes the file on exit without looking at whose pid it holds), so the plugin takes
the pidfile over from twistd's options.
"""

from __future__ import annotations

import os


def read(path: str) -> int | None:
    """
    The pid in C{path}, or L{None} when there is no such file or it holds no number.
    """
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def alive(pid: int) -> bool:
    """
    Whether a process C{pid} runs (a zombie, exited but not yet reaped by its parent, does not).
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            # pid (comm) state ...: comm may hold spaces and parentheses, so look after the last.
            state = f.read().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"


def livePid(path: str) -> int | None:
    """
    The pid in C{path} if that process is alive (and is not us).
    """
    pid = read(path)
    if pid is None or pid == os.getpid() or not alive(pid):
        return None
    return pid


def claim(path: str, pid: int) -> None:
    """
    Write C{pid} to C{path} atomically (write a temporary file, rename it into place), so no
    reader ever sees an empty or half-written pidfile.
    """
    tmp = f"{path}.{pid}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{pid}\n")
    os.replace(tmp, path)


def release(path: str, pid: int) -> bool:
    """
    Remove C{path} only if it still names C{pid}.

    @return: whether it was removed.
    """
    if read(path) != pid:
        return False
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True
