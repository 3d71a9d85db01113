"""
The fork server's spare: a child forked ahead of time, waiting for the successor's command.

Forking the fork server costs a few milliseconds of CPU in the kernel (copying its page tables),
and the child then breaks the copy-on-write sharing of every page it writes to, thousands of
page faults spread over its start-up and its first requests.  Both used to happen in the middle
of a takeover, on the cores the serving process needs.  The fork server now forks its next
successor in advance, at idle priority, while nothing is being handed over: the spare closes
what it inherited, copies the memory it shares with the fork server (C{MADV_POPULATE_WRITE}),
and waits on a socketpair.  A fork request is then one message to the spare, which runs the
command at once.

The spare holds none of the server's sockets and imports nothing new, so it is exactly what a
fork at the time of the request would have been: what it runs is the fork server's own code of
the moment (the fork server checks it against the disk before each use and replaces itself, and
its spare, when it is stale) and the application, imported fresh from disk.  It exits when the
fork server goes away (its socketpair closes).

Standard library only.
"""

from __future__ import annotations

import array
import json
import os
import select
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

#: The environment variables that switch the spare, or its copying of the fork server's memory,
#: off (C{off}), to compare.
ENV_SPARE = "GRACEFUL_FORK_SPARE"
ENV_PREFAULT = "GRACEFUL_FORK_PREFAULT"

#: Seconds after a fork (or a spare's death) before the fork server forks its next spare: not
#: while the takeover the last one started is still running.
SPARE_DELAY = 1.0

#: A spare copies this many bytes of memory at a time, ...
PREFAULT_CHUNK = 1 << 20
#: ... with this many seconds between two chunks (about 0.5 s for the 38 MB a fork server holds).
PREFAULT_PAUSE = 0.012

#: What C{ps}, C{top} and C{pgrep} call a waiting spare (once used, it is named as its program).
NAME = "graceful-spare"

#: Linux's C{madvise} advice that pre-faults a range writable (5.14 and later).
MADV_POPULATE_WRITE = 23

_HEADER = struct.Struct("!I")

#: Most descriptors one message to the spare carries (Linux's C{SCM_MAX_FD}); a request with
#: more (a worker with hundreds of listeners) is handed over in several.
_MAX_FDS = 253


def enabled(env: Mapping[str, str] | None = None, name: str = ENV_SPARE) -> bool:
    """
    Whether the fork server keeps a spare (unless C{GRACEFUL_FORK_SPARE=off}), or, with
    C{name=ENV_PREFAULT}, whether the spare copies its memory ahead.
    """
    value = (os.environ if env is None else env).get(name, "")
    return value.strip().lower() not in ("off", "0", "no", "false")


@dataclass
class Spare:
    """
    The fork server's side of a spare: its pid and its end of the socketpair.
    """

    pid: int
    sock: socket.socket
    #: When it was forked (C{time.monotonic()}).
    forkedAt: float = 0.0

    def hand(self, message: dict[str, Any], fds: list[int]) -> bool:
        """
        Give the spare its work and the descriptors it takes; it waits for L{go}.  False when
        the spare is gone (the caller forks as before).
        """
        chunks = [fds[i : i + _MAX_FDS] for i in range(0, len(fds), _MAX_FDS)]
        data = json.dumps(message).encode()
        # Each group of descriptors rides on one byte of the message (pad it if it is short).
        data += b" " * max(0, len(chunks) - len(data))
        frame = _HEADER.pack(len(data)) + data
        try:
            self.sock.setblocking(True)
            for i, chunk in enumerate(chunks):
                socket.send_fds(self.sock, [frame[i : i + 1]], chunk)
            self.sock.sendall(frame[len(chunks) :])
        except OSError:
            return False
        return True

    def go(self) -> None:
        """
        Let the spare run the command (after the generation has been told its pid).
        """
        try:
            self.sock.send(b"g")
        except OSError:
            pass
        self.sock.close()

    def discard(self) -> None:
        """
        End an unused spare (the fork server is replacing itself or exiting) and reap it.
        """
        self.sock.close()
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass


def fork(run: Callable[[socket.socket], None]) -> Spare:
    """
    Fork a spare.  In the child, C{run(sock)} is called with the spare's end of the socketpair;
    it must not return (it ends the process with C{os._exit}), and if it does, the child exits.
    """
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:
        try:
            # Our copy of the fork server's end goes, or its closing would never reach us.
            ours.close()
            run(theirs)
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            os._exit(1)
    theirs.close()
    return Spare(pid, ours, time.monotonic())


def waitForWork(sock: socket.socket) -> tuple[dict[str, Any], list[int]]:
    """
    In the spare: the fork server's message and the descriptors that came with it, once it says
    go.  Exits the process when the fork server closes the socketpair first.
    """
    sock.setblocking(True)
    buffer = b""
    fds: list[int] = []
    while len(buffer) < _HEADER.size or len(buffer) < _HEADER.size + _HEADER.unpack_from(buffer)[0]:
        try:
            data, ancdata, flags, _ = sock.recvmsg(1 << 16, socket.CMSG_SPACE(_MAX_FDS * 4))
        except OSError:
            data, ancdata, flags = b"", [], 0
        if flags & socket.MSG_CTRUNC:
            os._exit(1)  # (descriptors were lost: we cannot run the command as asked)
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                got = array.array("i")
                got.frombytes(payload[: len(payload) - (len(payload) % got.itemsize)])
                fds.extend(got)
        if not data:
            os._exit(0)
        buffer += data
    (size,) = _HEADER.unpack_from(buffer)
    message = json.loads(buffer[_HEADER.size : _HEADER.size + size])
    # The go may have come with the message's last bytes.
    go = buffer[_HEADER.size + size : _HEADER.size + size + 1]
    if not go:
        try:
            go = sock.recv(1)
        except OSError:
            go = b""
    if go != b"g":
        os._exit(0)
    sock.close()
    return message, fds


def prefault(
    stop: Callable[[float], bool] = lambda timeout: False,
    chunk: int = PREFAULT_CHUNK,
    pause: float = PREFAULT_PAUSE,
) -> int:
    """
    Copy now every page this process shares copy-on-write with the fork server that the
    fork server has touched, rather than one page fault at a time while serving.  Returns the
    bytes populated (0 where the kernel cannot: before Linux 5.14, or no C{madvise}).

    The copy goes C{chunk} bytes at a time with C{pause} seconds between two chunks: a copy
    done at once takes the memory bus and the caches from the processes that serve for tens of
    milliseconds (idle priority does not stop that), paced it takes a few percent of them.

    @param stop: asked before each chunk, with how long it may wait for work first; when it
        says work has come (the successor must not wait for the copy), the rest is left to
        copy-on-write.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
        madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    except (OSError, AttributeError):
        return 0
    total = 0
    wait = 0.0
    for start, end in privateMappings():
        for at in range(start, end, chunk):
            if stop(wait):
                return total
            size = min(chunk, end - at)
            if madvise(at, size, MADV_POPULATE_WRITE) != 0:
                break
            total += size
            wait = pause
    return total


def privateMappings(smaps: str = "/proc/self/smaps") -> list[tuple[int, int]]:
    """
    The writable private mappings of this process that hold pages (those with a resident size
    in C{smaps}), but not its stack.
    """
    found: list[tuple[int, int]] = []
    try:
        with open(smaps) as f:
            lines = f.read().splitlines()
    except OSError:
        return found
    current: tuple[int, int] | None = None
    for line in lines:
        head = line.split(None, 5)
        if not head:
            continue
        if "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
            current = None
            perms = head[1]
            name = head[5] if len(head) > 5 else ""
            if perms.startswith("rw") and perms[3] == "p" and name != "[stack]":
                lo, hi = head[0].split("-")
                current = (int(lo, 16), int(hi, 16))
        elif head[0] == "Rss:" and current is not None:
            if int(head[1]) > 0:
                found.append(current)
            current = None
    return found


def readable(sock: socket.socket) -> Callable[[float], bool]:
    """
    Whether C{sock} has something to read, waiting for it at most the seconds given (for
    L{prefault}'s C{stop}).
    """
    poller = select.poll()
    poller.register(sock, select.POLLIN)

    def ready(timeout: float = 0.0) -> bool:
        return bool(poller.poll(timeout * 1000))

    return ready


def reset() -> None:
    """
    In the spare: no longer the fork server's signal handling (its wake-up pipe is not ours).
    """
    signal.set_wakeup_fd(-1)
    for signum in (signal.SIGHUP, signal.SIGCHLD, signal.SIGTERM, signal.SIGUSR2):
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.stdout.flush()
