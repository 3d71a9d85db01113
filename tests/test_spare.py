"""
The fork server's spare (L{graceful_plugin.spare}): a child forked ahead runs the next request,
the fork server forks another one later, a spare that dies unused is replaced without a report,
none outlives the fork server, and C{GRACEFUL_FORK_SPARE=off} forks at the request as before.
The spare copies the memory it shares with the fork server before it is used
(C{MADV_POPULATE_WRITE}), so the successor takes no copy-on-write faults for it.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from graceful_plugin import spare
from graceful_plugin.forkserver import addressFor, encode, sockaddr

ROOT = Path(__file__).resolve().parent.parent

#: A successor stand-in: prints its pid, and when its process started (in clock ticks).
CHILD = """
import os
with open("/proc/self/stat") as f:
    started = int(f.read().rsplit(")", 1)[1].split()[19])
print(os.getpid(), started, flush=True)
"""


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(c) for c in text.split()]


def _ticksNow() -> int:
    """The boot-relative time now, in the clock ticks of /proc/PID/stat's start time."""
    with open("/proc/uptime") as f:
        return int(float(f.read().split()[0]) * os.sysconf("SC_CLK_TCK"))


def _until(predicate, timeout: float = 20.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


class _ForkServer:
    """A fork server of our own (no generation), and one connection to it."""

    def __init__(self, tmp: Path, env: dict[str, str]) -> None:
        self.tmp = tmp
        self.address = addressFor(str(tmp / "c.sock"))
        readyR, readyW = os.pipe()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "graceful_plugin.forkserver", "--address", self.address]
            + ["--ready-fd", str(readyW)],
            pass_fds=[readyW],
            cwd=ROOT,
            env=env,
        )
        os.close(readyW)
        with os.fdopen(readyR, "rb") as ready:
            assert ready.readline().startswith(b"ready"), "the fork server did not start"
        self.conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.conn.settimeout(30)
        self.conn.connect(sockaddr(self.address))
        self.buffer = b""
        self.ids = 0

    def fork(self, script: Path) -> tuple[dict[str, object], str]:
        """Ask for a fork of C{script}; the answer and what the child printed."""
        self.ids += 1
        request = {
            "op": "fork",
            "id": self.ids,
            "argv": [sys.executable, str(script)],
            "cwd": str(self.tmp),
            "env": dict(os.environ),
        }
        outR, outW = os.pipe()
        try:
            socket.send_fds(self.conn, [encode(request)], [0, outW, 2])
        finally:
            os.close(outW)
        answer = self.read()
        with os.fdopen(outR, "rb") as out:
            printed = out.read().decode()
        return answer, printed

    def read(self) -> dict[str, object]:
        while True:
            if len(self.buffer) >= 4:
                (size,) = struct.unpack_from("!I", self.buffer)
                if len(self.buffer) >= 4 + size:
                    body, self.buffer = self.buffer[4 : 4 + size], self.buffer[4 + size :]
                    message: dict[str, object] = json.loads(body)
                    return message
            data = self.conn.recv(65536)
            assert data, "the fork server closed the connection"
            self.buffer += data

    def close(self) -> None:
        self.conn.close()
        try:
            self.process.wait(30)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait(10)


@pytest.fixture
def script(tmp_path: Path) -> Path:
    path = tmp_path / "child.py"
    path.write_text(CHILD)
    return path


def _env(**changes: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (spare.ENV_SPARE, spare.ENV_PREFAULT)}
    env.update(changes)
    return env


@pytest.fixture
def forkServer(tmp_path: Path) -> Iterator[_ForkServer]:
    server = _ForkServer(tmp_path, _env())
    try:
        yield server
    finally:
        server.close()


def _spareOf(server: _ForkServer, besides: set[int] = frozenset()) -> int:  # type: ignore[assignment]
    found: list[int] = []

    def ready() -> bool:
        found[:] = [c for c in _children(server.process.pid) if c not in besides]
        return len(found) == 1

    assert _until(ready), f"no spare beside {besides}: {_children(server.process.pid)}"
    return found[0]


def test_spareRunsTheRequestAndIsReplaced(forkServer: _ForkServer, script: Path) -> None:
    """
    The fork server forks a spare as it starts; a fork request runs in it (its process started
    before the request was made, and the answer says how long ahead), and a new spare follows.
    """
    first = _spareOf(forkServer)
    assert _until(lambda: Path(f"/proc/{first}/comm").read_text().strip() == spare.NAME)
    # At least a clock tick (10 ms) between its start and the request, or they look the same.
    forkedAt = int(Path(f"/proc/{first}/stat").read_text().rsplit(")", 1)[1].split()[19])
    assert _until(lambda: _ticksNow() > forkedAt)
    asked = _ticksNow()
    answer, printed = forkServer.fork(script)
    pid, started = (int(x) for x in printed.split())
    assert answer["op"] == "forked" and answer["pid"] == pid == first
    assert started < asked, "the child was forked at the request, not ahead"
    assert isinstance(answer["ahead"], float | int) and answer["ahead"] >= 0
    exited = forkServer.read()
    assert exited == {"op": "exited", "pid": pid, "status": 0}
    # The next spare comes after SPARE_DELAY, and runs the next request.
    second = _spareOf(forkServer, {first})
    answer, printed = forkServer.fork(script)
    assert answer["pid"] == second == int(printed.split()[0])


def test_deadSpareIsReplacedSilently(forkServer: _ForkServer, script: Path) -> None:
    """
    A spare killed before it is used is reaped without a report to anyone, a new one is forked,
    and the next request still runs.
    """
    first = _spareOf(forkServer)
    os.kill(first, signal.SIGKILL)
    second = _spareOf(forkServer, {first})
    assert second != first
    answer, printed = forkServer.fork(script)
    assert answer["op"] == "forked" and answer["pid"] == second
    assert forkServer.read()["op"] == "exited"


def test_noSpareOutlivesTheForkServer(tmp_path: Path) -> None:
    """
    When its last connection goes, the fork server exits and ends its unused spare; a spare
    whose fork server was killed exits by itself (its socketpair closed).
    """
    for kill in (False, True):
        server = _ForkServer(tmp_path, _env())
        ready = _spareOf(server)
        if kill:
            server.process.kill()
        server.close()
        assert _until(lambda pid=ready: not Path(f"/proc/{pid}").exists() or _zombie(pid)), (
            f"the spare {ready} outlived its fork server (killed: {kill})"
        )


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_spareOff(tmp_path: Path, script: Path) -> None:
    """
    With GRACEFUL_FORK_SPARE=off, no child waits, and a request is forked when it comes.
    """
    server = _ForkServer(tmp_path, _env(GRACEFUL_FORK_SPARE="off"))
    try:
        asked = _ticksNow()
        answer, printed = server.fork(script)
        assert int(printed.split()[1]) >= asked
        assert answer.get("ahead") is None
        assert server.read()["op"] == "exited"
        # Its loop has turned since it started (a spare would be forked on its first turn) and
        # reaped the child: no child of its is left waiting.
        assert _children(server.process.pid) == []
    finally:
        server.close()


@pytest.mark.parametrize("populate", [True, False])
def test_prefaultCopiesSharedMemoryAhead(populate: bool) -> None:
    """
    After L{spare.prefault}, a forked child writes to memory it shares with its parent without
    a page fault per page; without it, each page written costs one (copy-on-write).
    """
    pages = 2048
    page = resource.getpagesize()
    data = bytearray(pages * page)
    for i in range(0, len(data), page):
        data[i] = 1
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            populated = spare.prefault() if populate else 0
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for i in range(0, len(data), page):
                data[i] = 2
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
            os.write(w, f"{populated} {faults}".encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        populated, faults = (int(x) for x in f.read().split())
    os.waitpid(pid, 0)
    if populate:
        if populated == 0:
            pytest.skip("this kernel has no MADV_POPULATE_WRITE (Linux 5.14)")
        assert populated >= pages * page
        assert faults < pages // 10, f"{faults} faults after prefault"
    else:
        assert faults >= pages * 9 // 10, f"only {faults} faults without prefault"


def test_privateMappingsAreTheWritableResidentOnes(tmp_path: Path) -> None:
    """
    Only writable private mappings with resident pages are populated: not read-only ones, not
    shared ones, not the stack, not reserved but untouched ones (a thread stack would become
    megabytes of memory).
    """
    smaps = tmp_path / "smaps"
    smaps.write_text(
        "00400000-00401000 r-xp 00000000 08:01 1 /usr/bin/python3\n"
        "Rss:                   4 kB\n"
        "00600000-00602000 rw-p 00000000 00:00 0 [heap]\n"
        "Size:                  8 kB\n"
        "Rss:                   8 kB\n"
        "7f0000000000-7f0000800000 rw-p 00000000 00:00 0\n"
        "Rss:                   0 kB\n"
        "7f0000800000-7f0000801000 rw-s 00000000 00:05 3 /dev/shm/x\n"
        "Rss:                   4 kB\n"
        "7f0000900000-7f0000a00000 rw-p 00000000 00:00 0\n"
        "Rss:                  12 kB\n"
        "7ffc00000000-7ffc00021000 rw-p 00000000 00:00 0 [stack]\n"
        "Rss:                  16 kB\n"
    )
    assert spare.privateMappings(str(smaps)) == [
        (0x00600000, 0x00602000),
        (0x7F0000900000, 0x7F0000A00000),
    ]


def test_prefaultStopsWhenWorkComes() -> None:
    """
    The spare leaves its copy as soon as its socket has something to read (the successor must
    not wait for it): nothing is populated once C{stop} says so.
    """
    ours, theirs = socket.socketpair()
    try:
        stop = spare.readable(theirs)
        assert stop() is False
        ours.send(b"x")
        assert stop() is True
        assert spare.prefault(stop=stop) == 0
    finally:
        ours.close()
        theirs.close()


def test_prefaultIsPacedAndStopsBetweenChunks() -> None:
    """
    The copy goes a chunk at a time: before each chunk but the first, the spare waits C{pause}
    seconds for work (a copy done at once takes the memory bus from the processes that serve),
    and it stops between two chunks when work has come.
    """
    waits: list[float] = []

    def stop(timeout: float) -> bool:
        waits.append(timeout)
        return len(waits) == 4

    page = resource.getpagesize()
    populated = spare.prefault(stop=stop, chunk=page, pause=0.25)
    if populated == 0:
        pytest.skip("this kernel has no MADV_POPULATE_WRITE (Linux 5.14)")
    assert waits == [0.0, 0.25, 0.25, 0.25]
    assert populated == 3 * page
