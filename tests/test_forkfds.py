"""
A fork request's descriptors (L{graceful_plugin.forkserver}): besides stdio, a request may pass
any descriptors with the number each gets in the child (C{targets}); the child has exactly those,
at those numbers, whether it is forked at the request or is the spare; a request whose targets
do not fit what it passed gets an error answer, and the fork server serves on.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from graceful_plugin import spare
from graceful_plugin.forkserver import BadTargets, encode, placeDescriptors, targetsOf
from tests.test_spare import _env, _ForkServer, _spareOf

#: A child that prints, for each descriptor it has, the identity of the file it is.
CHILD = """
import json, os
fds = sorted(int(fd) for fd in os.listdir("/proc/self/fd"))
found = {}
for fd in fds:
    try:
        st = os.fstat(fd)
    except OSError:
        continue  # (the listing's own descriptor)
    found[fd] = [st.st_dev, st.st_ino]
print(json.dumps(found), flush=True)
"""


def _identity(fd: int) -> list[int]:
    st = os.fstat(fd)
    return [st.st_dev, st.st_ino]


# -- in-process: what a request's targets may be, and how they are placed ---------------------


@pytest.mark.parametrize(
    ("request_", "passed", "words"),
    [
        ({"targets": [0, 1, 2, 3]}, 3, "3 descriptors were passed for 4 targets"),
        ({"targets": [0, 1, 2]}, 4, "4 descriptors were passed for 3 targets"),
        ({}, 4, "4 descriptors were passed for 3 targets"),
        ({"targets": [0, 1, 2, 2]}, 4, "name a descriptor twice"),
        ({"targets": [0, 1, 2, -1]}, 4, "not a descriptor number from 0 to 1023"),
        ({"targets": [0, 1, 2, 1024]}, 4, "not a descriptor number from 0 to 1023"),
        ({"targets": [0, 1, 3]}, 3, "do not include stdin, stdout and stderr"),
        ({"targets": "0,1,2"}, 3, "not a list of descriptor numbers"),
        ({"targets": [0, 1, True]}, 3, "not a list of descriptor numbers"),
    ],
)
def test_targetsThatDoNotFitAreRefused(request_: dict[str, Any], passed: int, words: str) -> None:
    """
    Targets that do not fit the descriptors passed (count, duplicates, range, no stdio, not
    numbers) are refused with a sentence saying how.
    """
    with pytest.raises(BadTargets, match=words):
        targetsOf(request_, passed, limit=1024)


def test_targetsDefaultToStdio() -> None:
    """
    A request that names no targets (every request before them) passes stdin, stdout, stderr.
    """
    assert targetsOf({}, 3) == [0, 1, 2]
    assert targetsOf({"targets": [0, 1, 2, 9, 4]}, 5) == [0, 1, 2, 9, 4]


def test_placedDescriptorsLandAtTheirNumbersThoughTheyOverlap() -> None:
    """
    In a child, each passed descriptor becomes its target even where one's number is another's
    target (two swapped, one moved onto a third's number), and nothing else stays open.
    """
    pipes = [os.pipe() for _ in range(3)]
    # Our descriptors 40, 41, 42 go to 41, 40 and 50: 40 and 41 swap places.
    for number, (r, _) in zip((40, 41, 42), pipes, strict=True):
        os.dup2(r, number)
    wanted = {41: _identity(40), 40: _identity(41), 50: _identity(42)}
    reportR, reportW = os.pipe()
    os.dup2(reportW, 45)
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        try:
            placeDescriptors([0, 1, 45, 40, 41, 42], [0, 1, 2, 41, 40, 50])
            found = {fd: _identity(fd) for fd in range(64) if _isOpen(fd)}
            os.write(2, json.dumps(found).encode())
        finally:
            os._exit(0)
    try:
        os.close(reportW)
        os.close(45)
        with os.fdopen(reportR, "rb") as report:
            found = {int(k): v for k, v in json.loads(report.read()).items()}
        assert os.waitpid(pid, 0)[1] == 0
    finally:
        for number in (40, 41, 42):
            os.close(number)
        for r, w in pipes:
            os.close(r)
            os.close(w)
    assert sorted(found) == [0, 1, 2, 40, 41, 50]
    assert {fd: found[fd] for fd in (40, 41, 50)} == wanted


def _isOpen(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


# -- a real fork server ------------------------------------------------------------------------


@pytest.fixture(params=["spare", "no spare"])
def forkServer(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[_ForkServer]:
    env = _env() if request.param == "spare" else _env(**{spare.ENV_SPARE: "off"})
    server = _ForkServer(tmp_path, env)
    if request.param == "spare":
        _spareOf(server)  # (the request is the spare's)
    try:
        yield server
    finally:
        server.close()


def _ask(server: _ForkServer, script: Path, targets: list[int] | None, fds: list[int]) -> Any:
    server.ids += 1
    request: dict[str, Any] = {
        "op": "fork",
        "id": server.ids,
        "argv": [sys.executable, str(script)],
        "cwd": str(server.tmp),
        "env": dict(os.environ),
    }
    if targets is not None:
        request["targets"] = targets
    socket.send_fds(server.conn, [encode(request)], fds)
    return server.read()


def _openFds(pid: int) -> list[str]:
    return sorted(os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd"))


def test_childHasThePassedDescriptorsAtTheirTargets(forkServer: _ForkServer) -> None:
    """
    A request with targets gets a child (forked at the request, or the spare) that has exactly
    the descriptors passed, each at its target, and nothing of the fork server's.
    """
    script = forkServer.tmp / "child.py"
    script.write_text(CHILD)
    outR, outW = os.pipe()
    a, b = socket.socketpair()
    extraR, extraW = os.pipe()
    try:
        targets = [0, 1, 2, 3, 5, 9]
        passed = [0, outW, 2, a.fileno(), extraR, b.fileno()]
        wanted = {t: _identity(fd) for t, fd in zip(targets, passed, strict=True)}
        answer = _ask(forkServer, script, targets, passed)
        os.close(outW)
        assert answer["op"] == "forked", answer
        with os.fdopen(outR, "rb") as out:
            found = {int(k): v for k, v in json.loads(out.read()).items()}
        assert forkServer.read() == {"op": "exited", "pid": answer["pid"], "status": 0}
    finally:
        a.close()
        b.close()
        os.close(extraR)
        os.close(extraW)
    assert found == wanted


def test_badTargetsGetAnErrorAndTheForkServerServesOn(forkServer: _ForkServer) -> None:
    """
    A request whose targets do not fit the descriptors passed gets an error answer saying why,
    keeps none of them, and the next request on the same connection is forked.
    """
    script = forkServer.tmp / "child.py"
    script.write_text(CHILD)
    forkServer.conn.sendall(encode({"op": "hello", "id": 0}))
    assert forkServer.read()["reason"] == "unknown request"  # (it has our connection now)
    before = _openFds(forkServer.process.pid)
    r, w = os.pipe()
    try:
        answer = _ask(forkServer, script, [0, 1, 2, 3], [0, 1, 2, r, w])
        assert answer == {
            "op": "error",
            "id": forkServer.ids,
            "reason": "5 descriptors were passed for 4 targets",
        }
        answer = _ask(forkServer, script, [0, 1, 1, 3], [0, 1, 2, r])
        assert answer["op"] == "error" and "twice" in answer["reason"]
        assert _openFds(forkServer.process.pid) == before
    finally:
        os.close(r)
        os.close(w)
    outR, outW = os.pipe()
    answer = _ask(forkServer, script, None, [0, outW, 2])
    os.close(outW)
    assert answer["op"] == "forked"
    with os.fdopen(outR, "rb") as out:
        assert sorted(int(k) for k in json.loads(out.read())) == [0, 1, 2]
    assert forkServer.read()["op"] == "exited"
