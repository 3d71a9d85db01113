"""
Listeners: parsing ``--port``, binding sockets ourselves, and the adoptable port's pause, resume,
release and close on real sockets (loopback and temporary Unix paths), with a memory reactor.
"""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from graceful_plugin.listeners import (
    AdoptedTCPPort,
    AdoptedUNIXPort,
    ListenerSpec,
    adoptListener,
    bindListener,
    parseListener,
    portAddress,
)

# -- parseListener -------------------------------------------------------------------------------


def test_barePortMeansTcp() -> None:
    """
    A bare number is a TCP port on every IPv4 interface, named by kind and address.
    """
    spec = parseListener("8080")
    assert (spec.kind, spec.host, spec.port) == ("tcp", "0.0.0.0", 8080)
    assert spec.name == "tcp:0.0.0.0:8080"
    assert spec.address == "0.0.0.0:8080"


def test_tcpWithInterfaceAndBacklog() -> None:
    """
    tcp: takes an interface and a backlog.
    """
    spec = parseListener("tcp:0:interface=127.0.0.1:backlog=77")
    assert (spec.kind, spec.host, spec.port, spec.backlog) == ("tcp", "127.0.0.1", 0, 77)


def test_tcp6WithEscapedInterface() -> None:
    """
    tcp6: takes an IPv6 interface with escaped colons (Twisted's syntax), default ::, and its
    address is bracketed.
    """
    spec = parseListener(r"tcp6:8443:interface=\:\:1")
    assert (spec.kind, spec.host, spec.port) == ("tcp6", "::1", 8443)
    assert spec.address == "[::1]:8443"
    assert parseListener("tcp6:80").host == "::"


def test_unixWithModeAndRelativePath(tmp_path: Path) -> None:
    """
    unix: takes an octal mode; a relative path is made absolute against the given directory.
    """
    spec = parseListener("unix:app.sock:mode=0660", relativeTo=str(tmp_path))
    assert spec.kind == "unix"
    assert spec.path == str(tmp_path / "app.sock")
    assert spec.mode == 0o660
    assert spec.address == spec.path
    assert parseListener("unix:/run/x.sock").mode == 0o666


def test_names() -> None:
    """
    NAME= in front names a listener, for any kind.
    """
    assert parseListener("web=tcp:8080").name == "web"
    assert parseListener("web=8080").port == 8080
    assert parseListener("admin-api=unix:/run/a.sock").name == "admin-api"


@pytest.mark.parametrize(
    "text, words",
    [
        ("", "no listener given"),
        ("web=", "no listener given"),
        ("sctp:53", "unknown listener kind 'sctp'"),
        ("tcp:http", "the port must be a number, not 'http'"),
        ("tcp:70000", "between 0 and 65535"),
        ("tcp:", "expected a port number after 'tcp'"),
        ("unix:", "expected a path after 'unix'"),
        ("tcp:80:bogus=1", "unknown option(s) bogus"),
        ("tcp:80:mode=0600", "unknown option(s) mode"),
        ("tcp:80:interface=example.com", "'example.com' is not an IPv4 address"),
        ("tcp6:80:interface=127.0.0.1", "'127.0.0.1' is not an IPv6 address"),
        ("tcp:80:backlog=many", "backlog must be a number"),
        ("unix:/x.sock:mode=rw", "mode must be octal, like 0660"),
    ],
)
def test_badInputNamesTheProblem(text: str, words: str) -> None:
    """
    Bad input raises ValueError with a sentence quoting the input and naming the problem.
    """
    with pytest.raises(ValueError) as raised:
        parseListener(text)
    message = str(raised.value)
    assert message.startswith(repr(text)), message
    assert words in message


# -- bindListener --------------------------------------------------------------------------------


def test_bindTcp() -> None:
    """
    A TCP listener is bound, listening, non-blocking and not inherited by child processes.
    """
    sock = bindListener(parseListener("tcp:0:interface=127.0.0.1"))
    try:
        host, port = sock.getsockname()
        assert host == "127.0.0.1" and port > 0
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        assert sock.getblocking() is False
        assert sock.get_inheritable() is False
        with socket.create_connection((host, port), timeout=5):
            pass
    finally:
        sock.close()


def test_bindTcpInUse() -> None:
    """
    Binding an address already listened on raises OSError.
    """
    first = bindListener(parseListener("tcp:0:interface=127.0.0.1"))
    try:
        port = first.getsockname()[1]
        with pytest.raises(OSError):
            bindListener(parseListener(f"tcp:{port}:interface=127.0.0.1"))
    finally:
        first.close()


def test_bindUnixWithMode(workdir: Path) -> None:
    """
    A Unix listener's path has exactly the mode asked for, and the process umask is restored.
    """
    path = workdir / "s.sock"
    before = os.umask(0o022)
    os.umask(before)
    sock = bindListener(parseListener(f"unix:{path}:mode=0600"))
    try:
        assert stat.S_ISSOCK(os.stat(path).st_mode)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert os.umask(before) == before
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(path))
    finally:
        sock.close()


def test_bindUnixRefusesLivePath(workdir: Path) -> None:
    """
    A Unix path another server listens on is refused, and left in place.
    """
    path = workdir / "s.sock"
    live = bindListener(parseListener(f"unix:{path}"))
    try:
        with pytest.raises(OSError, match="in use by a running server"):
            bindListener(parseListener(f"unix:{path}"))
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(path))
    finally:
        live.close()


def test_bindUnixReplacesStaleSocket(workdir: Path) -> None:
    """
    A Unix socket file nobody listens on any more is replaced.
    """
    path = workdir / "s.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()
    assert path.exists()
    sock = bindListener(parseListener(f"unix:{path}"))
    try:
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(path))
    finally:
        sock.close()


def test_bindUnixRefusesNonSocket(workdir: Path) -> None:
    """
    A regular file at the path is refused and not touched.
    """
    path = workdir / "s.sock"
    path.write_text("precious")
    with pytest.raises(OSError, match="exists and is not a socket"):
        bindListener(parseListener(f"unix:{path}"))
    assert path.read_text() == "precious"


# -- the adoptable port --------------------------------------------------------------------------


class Echo(Protocol):
    pass


def adopt(
    reactor: MemoryReactorClock, spec: ListenerSpec
) -> tuple[socket.socket, AdoptedTCPPort | AdoptedUNIXPort]:
    """
    Bind C{spec} and adopt it; the caller keeps the original socket (as another process would).
    """
    sock = bindListener(spec)
    port = adoptListener(
        reactor, sock.fileno(), spec.kind, Factory.forProtocol(Echo), name=spec.name
    )
    return sock, port


def connects(address: object, family: int = socket.AF_INET) -> bool:
    """
    Whether a plain client's connect succeeds (it does on a listening socket even when nobody
    accepts: the kernel queues it).
    """
    with socket.socket(family, socket.SOCK_STREAM) as client:
        client.settimeout(5)
        try:
            client.connect(address)
        except ConnectionRefusedError:
            return False
        return True


def accepts(sock: socket.socket) -> bool:
    """
    Whether C{sock} has a queued connection to accept now.
    """
    sock.settimeout(5)
    try:
        conn, _ = sock.accept()
    except (TimeoutError, BlockingIOError):
        return False
    conn.close()
    return True


def test_adoptedPortDoesNotAcceptUntilResumed() -> None:
    """
    An adopted port listens without accepting; resume starts reading, pause stops, and both are
    idempotent.
    """
    reactor = MemoryReactorClock()
    sock, port = adopt(reactor, parseListener("web=tcp:0:interface=127.0.0.1"))
    try:
        assert port.connected and not port.accepting
        assert port not in reactor.getReaders()
        port.resumeAccepting()
        port.resumeAccepting()
        assert port.accepting and port in reactor.getReaders()
        port.pauseAccepting()
        port.pauseAccepting()
        assert not port.accepting and port not in reactor.getReaders()
        assert port.name == "web" and port.kind == "tcp"
        assert portAddress(port) == "127.0.0.1:%d" % sock.getsockname()[1]
    finally:
        port.close()
        reactor.advance(0)
        sock.close()


def test_pausedPortKeepsQueueing() -> None:
    """
    While paused, connections are queued by the kernel, not refused; accepted after resuming they
    are counted as sessions until they close.
    """
    reactor = MemoryReactorClock()
    sock, port = adopt(reactor, parseListener("tcp:0:interface=127.0.0.1"))
    address = sock.getsockname()
    try:
        port.resumeAccepting()
        port.pauseAccepting()
        client = socket.create_connection(address, timeout=5)
        port.resumeAccepting()
        port.doRead()  # the reactor would call this: accept what is queued
        assert port.sessions.count == 1
        [transport] = list(port.sessions._live)
        transport.connectionLost(Failure(ConnectionDone()))
        assert port.sessions.count == 0
        client.close()
    finally:
        port.close()
        reactor.advance(0)
        sock.close()


def test_releaseNeverShutsTheSocketDown() -> None:
    """
    After release, the socket still listens through another copy (no shutdown()): a client
    connects and the other copy accepts it.
    """
    reactor = MemoryReactorClock()
    sock, port = adopt(reactor, parseListener("tcp:0:interface=127.0.0.1"))
    address = sock.getsockname()
    try:
        port.resumeAccepting()
        port.release()
        reactor.advance(0)
        assert not port.connected and not port.accepting
        assert port not in reactor.getReaders()
        assert connects(address)
        assert accepts(sock)
    finally:
        sock.close()


def test_tcpCloseNeverShutsTheSocketDown() -> None:
    """
    Even close() does not shut a TCP socket down: a copy another process holds keeps listening.
    """
    reactor = MemoryReactorClock()
    sock, port = adopt(reactor, parseListener("tcp:0:interface=127.0.0.1"))
    address = sock.getsockname()
    try:
        port.close()
        reactor.advance(0)
        assert connects(address)
        assert accepts(sock)
    finally:
        sock.close()


def test_unixReleaseKeepsThePath(workdir: Path) -> None:
    """
    Releasing a Unix port neither unlinks its path nor shuts the socket down: a client still
    connects by path and the other copy accepts.
    """
    path = workdir / "s.sock"
    reactor = MemoryReactorClock()
    sock, port = adopt(reactor, parseListener(f"unix:{path}:mode=0600"))
    try:
        assert isinstance(port, AdoptedUNIXPort)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        port.resumeAccepting()
        port.release()
        reactor.advance(0)
        assert not port.connected
        assert path.exists()
        assert connects(str(path), socket.AF_UNIX)
        assert accepts(sock)
    finally:
        sock.close()


def test_unixCloseUnlinksThePath(workdir: Path) -> None:
    """
    Closing a Unix port for good (the last generation) unlinks its path.
    """
    path = workdir / "s.sock"
    reactor = MemoryReactorClock()
    sock, port = adopt(reactor, parseListener(f"unix:{path}"))
    sock.close()
    port.resumeAccepting()
    port.close()
    reactor.advance(0)
    assert not path.exists()


def test_resumeAfterReleaseDoesNothing() -> None:
    """
    A released port cannot be resumed: it never reads from a closed socket.
    """
    reactor = MemoryReactorClock()
    sock, port = adopt(reactor, parseListener("tcp:0:interface=127.0.0.1"))
    try:
        port.release()
        reactor.advance(0)
        port.resumeAccepting()
        assert not port.accepting and port not in reactor.getReaders()
    finally:
        sock.close()
