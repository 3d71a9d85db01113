"""
Random frames on the control socket of a running server: whatever arrives, the server keeps
answering Status and serving HTTP.
"""

from __future__ import annotations

import json
import socket
import struct
import time
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.procs import Processes, ctl, freePort, httpGet

#: Every command but Stop (which would, rightly, stop the server) and the admin commands that
#: start processes.
COMMANDS = [
    b"Hello",
    b"TakeOver",
    b"Commit",
    b"Accepting",
    b"Abort",
    b"ReportSessions",
    b"Status",
    b"Counters",
    b"Nope",
    b"",
]
KEYS = [
    b"_ask",
    b"_command",
    b"_answer",
    b"_error",
    b"_error_code",
    b"_error_description",
    b"version",
    b"pid",
    b"start",
    b"reason",
    b"generations",
    b"dropped",
]


def _value() -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.sampled_from(COMMANDS),
        st.integers(-(2**70), 2**70).map(lambda n: str(n).encode()),
        st.binary(max_size=300),
    )


def _encode(box: list[tuple[bytes, bytes]]) -> bytes:
    out = b""
    for key, value in box:
        out += struct.pack("!H", len(key)) + key + struct.pack("!H", len(value)) + value
    return out + b"\x00\x00"


_box = st.lists(
    st.tuples(st.one_of(st.sampled_from(KEYS), st.binary(min_size=1, max_size=255)), _value()),
    max_size=6,
)
_frames = st.one_of(
    st.lists(_box, min_size=1, max_size=4).map(lambda boxes: b"".join(map(_encode, boxes))),
    st.binary(min_size=1, max_size=2048),
    # A frame that claims more than it sends, or a length beyond what AMP allows.
    st.tuples(st.integers(0, 65535), st.binary(max_size=64)).map(
        lambda t: struct.pack("!H", t[0]) + t[1]
    ),
)


def _send(path: Path, data: bytes) -> None:
    """
    Send C{data}, half-close, and read until the server closes the connection (bounded by the
    socket timeout: a server that never closes fails the test).
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(20)
        s.connect(str(path))
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            while s.recv(65536):
                pass
        except (ConnectionResetError, BrokenPipeError):
            pass


def test_randomFramesNeverStopTheServer(procs: Processes, workdir: Path) -> None:
    """
    Two hundred random control frames (well-formed boxes with random keys and values, raw
    bytes, truncated and over-long frames), each on its own connection, never crash or wedge
    the server: afterwards it answers Status as the same serving, accepting generation, serves
    HTTP, and logged no traceback.
    """
    port = freePort()
    server = procs.server(
        ["--port", f"tcp:{port}:interface=127.0.0.1", "--control", "c.sock"], "gen1"
    ).start()
    server.waitServing()
    path = workdir / "c.sock"
    started = time.monotonic()

    @settings(
        max_examples=200,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(_frames)
    def check(data: bytes) -> None:
        _send(path, data)

    check()
    assert time.monotonic() - started < 120, "fuzzing took too long"
    result = ctl(workdir, "--control", "c.sock", "status", "--json")
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["pid"] == server.pid
    assert status["state"] == "serving"
    assert all(item["accepting"] for item in status["listeners"])
    code, body = httpGet("127.0.0.1", port, "/")
    assert code == 200 and f"pid {server.pid}".encode() in body
    text = server.text()
    where = text.find("Traceback")
    assert where < 0, text[max(0, where - 1500) : where + 1500]
