"""
Handing idle HTTP/1.x connections to the successor (graceful_plugin.handover): the sender's
logic against real loopback sockets driven by a fake reactor (no process, no real reactor), the
successor's adoption, and the control command that carries them.
"""

from __future__ import annotations

import fcntl
import os
import select
import socket
import struct
import termios
from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols import amp
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from graceful_plugin.control import (
    AdoptConnection,
    BadArgument,
    ClientHandler,
    ControlProtocol,
    IConnectionAdopter,
    NoHandoff,
)
from graceful_plugin.handover import (
    HandoverSender,
    adoptHandedOver,
    canHandOver,
    dropCopy,
    relay,
)
from graceful_plugin.listeners import (
    ListenerSpec,
    _TrackedTCPServer,
    adoptListener,
    bindListener,
    portAddress,
)
from graceful_plugin.sessions import IHandOver, SessionTracker, unreadBytes
from graceful_plugin.web import DemoRoot, DrainableChannelSwitch, DrainableSite

_GET = b"GET / HTTP/1.1\r\nHost: test\r\n\r\n"


def isOpen(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def unread(sock: socket.socket) -> int:
    raw = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    return int(struct.unpack("i", raw)[0])


def readable(sock: socket.socket) -> bool:
    return bool(select.select([sock], [], [], 0)[0])


def recvResponse(sock: socket.socket) -> bytes:
    """
    One whole response (headers and a Content-Length body) from a blocking client socket.
    """
    sock.settimeout(5)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed after {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "closed in the body"
        body += chunk
    return head + b"\r\n\r\n" + body


class FakePort:
    """
    What a connection's transport needs of its listening port.
    """

    def __init__(self, kind: str = "tcp", name: str = "web") -> None:
        self.kind = kind
        self.name = name
        self.sessions = SessionTracker()
        self._realPortNumber = 0
        self.connected = True


class FakeLink:
    """
    The control link to a successor: records each AdoptConnection, keeping (as the kernel does
    for SCM_RIGHTS) its own duplicate of the descriptor, and answers when the test says.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[dict[str, Any], Deferred[dict[str, Any]], int]] = []

    def callRemote(self, command: Any, **kw: Any) -> Deferred[dict[str, Any]]:
        assert command is AdoptConnection
        d: Deferred[dict[str, Any]] = Deferred()
        self.calls.append((kw, d, os.dup(kw["fd"])))
        return d

    def close(self) -> None:
        for _, _, fd in self.calls:
            if isOpen(fd):
                os.close(fd)


class Connection:
    """
    A real loopback TCP connection whose server side is an HTTP channel of the demo site on a
    tracked transport, driven by hand on a fake reactor.
    """

    def __init__(self, reactor: MemoryReactorClock, port: FakePort) -> None:
        listener = socket.create_server(("127.0.0.1", 0))
        self.client = socket.create_connection(listener.getsockname())
        ours, addr = listener.accept()
        listener.close()
        self.site = DrainableSite(DemoRoot(lambda: 1), reactor=reactor)
        self.protocol = self.site.buildProtocol(None)
        self.transport = _TrackedTCPServer(ours, self.protocol, addr, port, 0, reactor)
        self.protocol.makeConnection(self.transport)
        self.reactor = reactor

    @property
    def channel(self) -> Any:
        return self.protocol._channel

    def request(self) -> bytes:
        """
        One request from the client, read and answered by our channel, and the answer read.
        """
        self.client.sendall(_GET)
        self.transport.doRead()
        self.transport.doWrite()
        return recvResponse(self.client)

    def close(self) -> None:
        self.client.close()
        if hasattr(self.transport, "socket"):
            self.transport.socket.close()


@pytest.fixture
def reactor() -> MemoryReactorClock:
    return MemoryReactorClock()


@pytest.fixture
def port() -> FakePort:
    return FakePort()


@pytest.fixture
def link() -> Any:
    fake = FakeLink()
    yield fake
    fake.close()


@pytest.fixture
def connect(reactor: MemoryReactorClock, port: FakePort) -> Any:
    made: list[Connection] = []

    def make() -> Connection:
        connection = Connection(reactor, port)
        made.append(connection)
        return connection

    yield make
    for connection in made:
        connection.close()


def sender(link: FakeLink, draining: bool = True) -> HandoverSender:
    return HandoverSender(link, lambda: draining)  # type: ignore[arg-type]


def test_channelsProvideIHandOver(connect: Any) -> None:
    """
    The HTTP channel and the protocol switch a site builds provide IHandOver.
    """
    connection = connect()
    assert isinstance(connection.protocol, DrainableChannelSwitch)
    assert verifyObject(IHandOver, connection.protocol)
    assert verifyObject(IHandOver, connection.channel)


def test_idleConnectionIsPausedSentAndDroppedWithoutAWord(
    connect: Any, link: FakeLink, reactor: MemoryReactorClock, port: FakePort
) -> None:
    """
    An idle served connection is taken: it is no longer read, and its descriptor goes to the
    successor; a request the client sends meanwhile waits in the kernel, unread by us; once the
    successor answers, our copy is closed without shutdown() or a reset, our session ends, and
    the successor's copy reads the request and answers it on the same connection.
    """
    connection = connect()
    assert b"generation 1" in connection.request()
    assert port.sessions.count == 1
    handover = sender(link)
    assert handover.offer(connection.transport)
    assert connection.transport not in reactor.getReaders()
    [(kw, answer, theirs)] = link.calls
    assert kw["listener"] == "web"
    assert kw["address"] == "127.0.0.1:%d" % connection.transport.getHost().port
    sent = kw["fd"]
    assert os.fstat(sent).st_ino == os.fstat(connection.transport.fileno()).st_ino
    # The client's next request, sent while the handover is on its way, stays in the kernel.
    connection.client.sendall(_GET)
    successor = socket.socket(fileno=theirs)
    deadline = 200
    while not unread(successor) and deadline:
        select.select([successor], [], [], 0.01)
        deadline -= 1
    assert unread(successor) == len(_GET)
    assert connection.channel.requests == []
    answer.callback({})
    assert connection.transport.disconnected
    assert port.sessions.count == 0
    assert not isOpen(sent)
    assert handover.handedOver == 1 and handover.fellBack == 0
    # Neither FIN nor RST reached the client, and the socket lingers normally.
    assert not readable(connection.client)
    assert successor.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, 8) == struct.pack("ii", 0, 0)
    assert successor.recv(1024) == _GET
    successor.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nsuccessor")
    assert recvResponse(connection.client).endswith(b"successor")
    successor.close()


def test_twistedsOrderlyCloseWouldEndTheSuccessorsCopy(connect: Any) -> None:
    """
    The control for the test above: Twisted's own orderly close of a connection
    (C{shutdown(2)}, then close) ends it for the client even while another process holds a
    copy, which is why dropCopy turns that off.
    """
    connection = connect()
    connection.request()
    other = os.dup(connection.transport.fileno())
    try:
        connection.transport.connectionLost(Failure(ConnectionDone()))
        assert connection.client.recv(1) == b""
    finally:
        os.close(other)


def test_dropCopyOfAClosedConnectionDoesNothing(connect: Any, port: FakePort) -> None:
    """
    Dropping the copy of a connection that was lost meanwhile neither fails nor counts twice.
    """
    connection = connect()
    connection.transport.connectionLost(Failure(ConnectionLost()))
    assert port.sessions.count == 0
    dropCopy(connection.transport)
    assert port.sessions.count == 0


@pytest.mark.parametrize(
    "state",
    ["partial request", "request in progress", "unsent answer", "tls listener", "closing"],
)
def test_busyConnectionIsNotTaken(connect: Any, link: FakeLink, port: FakePort, state: str) -> None:
    """
    A connection with part of a request received, a request being answered, bytes of an answer
    not written yet, on a TLS listener, or closing, is left to the polite drain: not taken.
    """
    connection = connect()
    connection.request()
    if state == "partial request":
        connection.client.sendall(b"GET / HT")
        connection.transport.doRead()
    elif state == "request in progress":
        connection.client.sendall(b"GET /bytes/100000000 HTTP/1.1\r\nHost: t\r\n\r\n")
        connection.transport.doRead()
        assert connection.channel.requests
    elif state == "unsent answer":
        connection.client.sendall(_GET)
        connection.transport.doRead()
        assert not connection.channel.requests
    elif state == "tls listener":
        port.kind = "ssl"
    else:
        connection.transport.loseConnection()
    assert not canHandOver(connection.transport)
    assert not sender(link).offer(connection.transport)
    assert link.calls == []


def test_freshConnectionIsTaken(connect: Any, link: FakeLink) -> None:
    """
    A connection that has sent nothing yet is handed over too: its first request, whenever it
    comes, is the successor's to read.
    """
    connection = connect()
    assert canHandOver(connection.transport)
    assert sender(link).offer(connection.transport)
    assert len(link.calls) == 1


def _waitUnread(connection: Connection, count: int) -> None:
    # Until our socket is readable (loopback delivers a small send whole), bounded.
    poller = select.poll()
    poller.register(connection.transport.fileno(), select.POLLIN)
    assert poller.poll(5000)
    assert unreadBytes(connection.transport) == count


@pytest.mark.parametrize("served", [False, True], ids=["first request", "next request"])
def test_requestWaitingInTheKernelIsAnsweredHere(
    connect: Any, link: FakeLink, port: FakePort, served: bool
) -> None:
    """
    A connection whose request (its first, or the next one on a kept-alive connection) has
    arrived but is still unread in the kernel is not taken: the polite drain reads it here at
    once and answers it, with Connection: close; nothing goes to the successor.
    """
    connection = connect()
    if served:
        connection.request()
    connection.client.sendall(_GET)
    _waitUnread(connection, len(_GET))
    assert not canHandOver(connection.transport)
    port.sessions.drain(sender(link).offer)
    assert link.calls == []
    connection.transport.doRead()
    connection.transport.doWrite()
    reply = recvResponse(connection.client)
    assert b"generation 1" in reply and b"\r\nConnection: close\r\n" in reply


def test_requestArrivingWhileQueuedIsAnsweredHere(connect: Any, link: FakeLink) -> None:
    """
    A connection taken while idle, whose request arrives while it waits its turn behind the
    first descriptor, is not sent when its turn comes: it is read again and answered here
    (Connection: close); the ones still idle go to the successor.
    """
    first, second, third = connect(), connect(), connect()
    for connection in (first, second, third):
        connection.request()
    handover = sender(link)
    for connection in (first, second, third):
        assert handover.offer(connection.transport)
    assert len(link.calls) == 1
    second.client.sendall(_GET)
    _waitUnread(second, len(_GET))
    link.calls[0][1].callback({})
    assert len(link.calls) == 2  # the third one: the second stayed here
    assert link.calls[1][0]["address"] == "127.0.0.1:%d" % third.transport.getHost().port
    assert handover.fellBack == 1 and not second.transport.disconnected
    second.transport.doRead()
    second.transport.doWrite()
    assert b"\r\nConnection: close\r\n" in recvResponse(second.client)


def test_oneGoesAloneUntilTheSuccessorHasAdoptedOne(connect: Any, link: FakeLink) -> None:
    """
    The first descriptor goes alone (an older successor strands only that one); once it is
    adopted, the others go together, each paused from the moment it was taken.
    """
    connections = [connect() for _ in range(4)]
    for connection in connections:
        connection.request()
    handover = sender(link)
    for connection in connections:
        assert handover.offer(connection.transport)
    assert len(link.calls) == 1
    link.calls[0][1].callback({})
    assert len(link.calls) == 4
    for _, answer, _ in link.calls[1:]:
        answer.callback({})
    assert handover.handedOver == 4
    assert all(c.transport.disconnected for c in connections)


@pytest.mark.parametrize(
    "error",
    [amp.UnhandledCommand(), ConnectionLost(), NoHandoff("no successor")],
    ids=["older successor", "link lost", "a leader without a successor"],
)
def test_refusedOrLostFallsBackToThePoliteDrain(
    connect: Any, link: FakeLink, reactor: MemoryReactorClock, error: Exception
) -> None:
    """
    When the successor answers UNHANDLED (an older version), its link is lost, or the other end
    takes no connections (a worker's leader whose successor has gone), the connection
    is read again and drained as before (Connection: close on its next answer, the idle close
    later), the descriptor sent is closed, the ones queued behind it are never sent, and no
    more are taken.
    """
    first, second = connect(), connect()
    first.request()
    second.request()
    handover = sender(link)
    assert handover.offer(first.transport) and handover.offer(second.transport)
    [(kw, answer, _)] = link.calls
    answer.errback(Failure(error))
    assert not isOpen(kw["fd"])
    assert len(link.calls) == 1
    assert handover.fellBack == 2 and handover.handedOver == 0
    for connection in (first, second):
        assert connection.transport in reactor.getReaders()
        assert connection.transport._shouldShutdown
        assert connection.channel._draining
        assert connection.channel._idleCheck is not None
        assert not readable(connection.client)
    third = connect()
    third.request()
    assert not handover.offer(third.transport)
    # Its next request is answered, and told to close.
    assert b"\r\nConnection: close\r\n" in first.request()


def test_refusedOneFallsBackOthersStillGo(connect: Any, link: FakeLink) -> None:
    """
    A connection the successor refuses (it has no such listener) is drained here; the next one
    is still offered to the successor.
    """
    first, second = connect(), connect()
    first.request()
    second.request()
    handover = sender(link)
    handover.offer(first.transport)
    handover.offer(second.transport)
    link.calls[0][1].errback(Failure(amp.RemoteAmpError(b"BAD_ARGUMENT", "no such listener")))
    assert first.channel._draining and not first.transport.disconnected
    assert len(link.calls) == 2
    link.calls[1][1].callback({})
    assert second.transport.disconnected
    assert (handover.handedOver, handover.fellBack) == (1, 1)


def test_afterAResumeTheConnectionIsServedOn(connect: Any, link: FakeLink) -> None:
    """
    If the generation serves again (its successor was lost) by the time the handover fails,
    the connection is read again and not drained.
    """
    connection = connect()
    connection.request()
    handover = sender(link, draining=False)
    handover.offer(connection.transport)
    link.calls[0][1].errback(Failure(ConnectionLost()))
    assert not connection.channel._draining
    reply = connection.request()
    assert b"Connection: close" not in reply


def test_callRemoteRaisingFallsBack(connect: Any) -> None:
    """
    A link that cannot even send the command (it raises) leaves the connection drained here.
    """

    class Broken:
        def callRemote(self, command: Any, **kw: Any) -> Any:
            raise AttributeError("no sendFileDescriptor")

    connection = connect()
    connection.request()
    handover = HandoverSender(Broken(), lambda: True)  # type: ignore[arg-type]
    assert handover.offer(connection.transport)
    assert handover.fellBack == 1 and connection.channel._draining


# -- the successor's side -------------------------------------------------------------------


@pytest.fixture
def listening(reactor: MemoryReactorClock) -> Any:
    spec = ListenerSpec(name="web", kind="tcp", host="127.0.0.1", port=0)
    sock = bindListener(spec)
    site = DrainableSite(DemoRoot(lambda: 2), reactor=reactor)
    port = adoptListener(reactor, sock.fileno(), "tcp", site, name="web", spec=spec)
    sock.close()
    yield port
    port.socket.close()


def test_adoptedConnectionIsServedAndCountedButNotAsAccepted(
    listening: Any, reactor: MemoryReactorClock
) -> None:
    """
    A handed-over connection is served on our port of its listener as if accepted there: its
    request (waiting in the kernel) is answered by our application, it counts as a live session
    of the port, as adopted and not as accepted, and the received descriptor is closed.
    """
    client = socket.create_connection(listening.socket.getsockname())
    theirs, _ = listening.socket.accept()
    try:
        client.sendall(_GET)
        fd = os.dup(theirs.fileno())
        transport = adoptHandedOver([listening], "web", portAddress(listening), fd)
        assert not isOpen(fd)
        assert listening.sessions.count == 1
        assert (listening.sessions.accepted, listening.sessions.adopted) == (0, 1)
        assert transport in reactor.getReaders()
        theirs.close()
        transport.doRead()
        transport.doWrite()
        assert b"generation 2" in recvResponse(client)
        assert canHandOver(transport)
    finally:
        client.close()
        theirs.close()


def _udp() -> int:
    return socket.socket(socket.AF_INET, socket.SOCK_DGRAM).detach()


def _listening() -> int:
    return socket.create_server(("127.0.0.1", 0)).detach()


def _pipe() -> int:
    r, w = os.pipe()
    os.close(w)
    return r


@pytest.mark.parametrize("make", [_udp, _listening, _pipe], ids=["udp", "listening", "pipe"])
def test_adoptRefusesWhatIsNoConnection(listening: Any, make: Any) -> None:
    """
    A descriptor that is no connection (a datagram socket, a listening socket, a pipe) is
    refused with a sentence and closed.
    """
    fd = make()
    with pytest.raises(BadArgument, match="no connection"):
        adoptHandedOver([listening], "web", portAddress(listening), fd)
    assert not isOpen(fd)
    assert listening.sessions.count == 0


def test_adoptRefusesAConnectionOfAnotherPort(listening: Any) -> None:
    """
    A connection whose local end is another port's is refused and closed.
    """
    other = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(other.getsockname())
    theirs, _ = other.accept()
    try:
        fd = theirs.detach()
        with pytest.raises(BadArgument, match="no plain TCP or Unix listener of ours"):
            adoptHandedOver([listening], "web", portAddress(listening), fd)
        assert not isOpen(fd)
    finally:
        client.close()
        other.close()


def test_adoptRefusesAConnectionOfATLSListener(listening: Any) -> None:
    """
    A connection of a listener that is not a plain one here (TLS) is refused and closed.
    """
    client = socket.create_connection(listening.socket.getsockname())
    theirs, _ = listening.socket.accept()
    listening.kind = "ssl"
    try:
        fd = theirs.detach()
        with pytest.raises(BadArgument, match="no plain TCP or Unix listener"):
            adoptHandedOver([listening], "web", portAddress(listening), fd)
        assert not isOpen(fd)
    finally:
        listening.kind = "tcp"
        client.close()


def test_adoptFindsTheListenerByTheConnectionsLocalEnd(reactor: MemoryReactorClock) -> None:
    """
    Of several listeners (Unix and TCP), the connection is served on the one it came in on,
    whatever the listener is named here.
    """
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        site = DrainableSite(DemoRoot(lambda: 2), reactor=reactor)
        specs = [
            ListenerSpec(name="a", kind="tcp", host="127.0.0.1", port=0),
            ListenerSpec(name="b", kind="unix", path=os.path.join(d, "b.sock")),
            ListenerSpec(name="c", kind="tcp", host="127.0.0.1", port=0),
        ]
        ports = []
        for spec in specs:
            sock = bindListener(spec)
            ports.append(adoptListener(reactor, sock.fileno(), spec.kind, site, spec.name))
            sock.close()
        try:
            for port in ports:
                family = port.socket.family
                client = socket.socket(family, socket.SOCK_STREAM)
                client.connect(port.socket.getsockname())
                theirs, _ = port.socket.accept()
                with client, theirs:
                    adoptHandedOver(ports, "other name", "?", os.dup(theirs.fileno()))
                    assert [p.sessions.count for p in ports] == [int(p is port) for p in ports]
                for p in ports:
                    for t in list(p.sessions._live):
                        t.socket.close()
                        p.sessions.closed(t)
        finally:
            for port in ports:
                port.socket.close()


def test_commandToAnEndThatAdoptsNothingIsRefused() -> None:
    """
    AdoptConnection sent to a control end whose handler adopts no connections is answered
    NO_HANDOFF, and the descriptor that came with it is closed.
    """
    from twisted.test.iosim import connectedServerAndClient

    from tests.test_control import FDTransport

    assert not IConnectionAdopter.providedBy(ClientHandler())
    server = ControlProtocol(ClientHandler())
    client = ControlProtocol(ClientHandler())
    transports: list[FDTransport] = []

    def clientTransport(p: Any) -> FDTransport:
        t = FDTransport(p, False, server)
        transports.append(t)
        return t

    c, s, pump = connectedServerAndClient(
        lambda: server,
        lambda: client,
        clientTransportFactory=clientTransport,
        serverTransportFactory=lambda p: FDTransport(p, True, client),
    )
    fd = _pipe()
    try:
        results: list[Any] = []
        client.callRemote(AdoptConnection, listener="web", address="x", fd=fd).addBoth(
            results.append
        )
        pump.flush()
        [result] = results
        assert isinstance(result, Failure) and result.check(NoHandoff)
        [delivered] = transports[0].delivered
        assert not isOpen(delivered)
    finally:
        os.close(fd)


def test_serverAdoptsOnlyFromItsPredecessor() -> None:
    """
    The server takes handed-over connections only on a link to a predecessor of its own; from
    any other control connection the descriptor is closed and the command refused.
    """
    from graceful_plugin.server import GracefulServer, Settings

    server = GracefulServer(
        Settings(listeners=[], controlPath="/tmp/x.sock"), Factory(), reactor=MemoryReactorClock()
    )
    assert verifyObject(IConnectionAdopter, server.responder)
    fd = _pipe()
    with pytest.raises(NoHandoff):
        server.responder.adoptConnection(ControlProtocol(server.responder), "web", "x", fd)
    assert not isOpen(fd)


def test_serverDrainingItselfAdoptsNothing(reactor: MemoryReactorClock) -> None:
    """
    A successor that has started draining itself (stopped at once) refuses what its predecessor
    hands over, which then drains where it is, and closes the descriptor.
    """
    from graceful_plugin.server import GracefulServer, Settings

    server = GracefulServer(
        Settings(listeners=[], controlPath="/tmp/x.sock"), Factory(), reactor=reactor
    )
    server.beginServing()
    link = ControlProtocol(server.responder)
    server.adoptPredecessorLink(link)
    server.beginDrain()
    fd = _pipe()
    with pytest.raises(NoHandoff):
        server.responder.adoptConnection(link, "web", "x", fd)
    assert not isOpen(fd)


def test_failedDeferredClosesTheDuplicate(connect: Any) -> None:
    """
    The duplicate descriptor is closed however the command ends.
    """

    class Failing:
        def __init__(self) -> None:
            self.fds: list[int] = []

        def callRemote(self, command: Any, **kw: Any) -> Any:
            self.fds.append(kw["fd"])
            return fail(ConnectionLost())

    connection = connect()
    connection.request()
    failing = Failing()
    HandoverSender(failing, lambda: True).offer(connection.transport)  # type: ignore[arg-type]
    [fd] = failing.fds
    assert not isOpen(fd)


# -- a worker's connections, through its leader -----------------------------------------------


def test_relayPassesTheConnectionOnAndClosesItsCopyAfterTheAnswer(link: FakeLink) -> None:
    """
    The leader passes a worker's connection on to the successor, keeps the descriptor open
    until the successor answered (it leaves with a later write), then closes it.
    """
    fd = _pipe()
    d = relay(link, "web", "127.0.0.1:80", fd)  # type: ignore[arg-type]
    [(kw, answer, _)] = link.calls
    assert kw == {"listener": "web", "address": "127.0.0.1:80", "fd": fd}
    assert isOpen(fd) and not d.called
    answer.callback({})
    assert not isOpen(fd)
    assert d.result == {}


@pytest.mark.parametrize(
    "error", [amp.UnhandledCommand(), ConnectionLost()], ids=["older successor", "link lost"]
)
def test_relayTurnsASuccessorThatTakesNoneIntoNoHandoff(link: FakeLink, error: Exception) -> None:
    """
    An older successor or a lost link becomes NoHandoff for the worker, which then stops
    offering connections; the descriptor is closed.
    """
    fd = _pipe()
    d = relay(link, "web", "x", fd)  # type: ignore[arg-type]
    link.calls[0][1].errback(Failure(error))
    assert not isOpen(fd)
    failure = d.result
    d.addErrback(lambda _: None)
    assert isinstance(failure, Failure) and failure.check(NoHandoff)


def test_relayWithoutASuccessorRefuses() -> None:
    """
    A leader without a successor refuses at once, and closes the descriptor.
    """
    fd = _pipe()
    d = relay(None, "web", "x", fd)
    assert not isOpen(fd)
    failure = d.result
    d.addErrback(lambda _: None)
    assert isinstance(failure, Failure) and failure.check(NoHandoff)


def test_refusedRemoteErrorOfTheSuccessorReachesTheWorkerAsItself(link: FakeLink) -> None:
    """
    A refusal of one connection by the successor (BadArgument) is passed back as it is: the
    worker drains that one and offers the next.
    """
    fd = _pipe()
    d = relay(link, "web", "x", fd)  # type: ignore[arg-type]
    link.calls[0][1].errback(Failure(BadArgument("no such listener")))
    failure = d.result
    d.addErrback(lambda _: None)
    assert isinstance(failure, Failure) and failure.check(BadArgument)


def test_supervisorRelaysOnlyAfterItsGenerationHandedOver(link: FakeLink) -> None:
    """
    The leader's supervisor passes its workers' connections on only once its generation has a
    successor that took over (before that, or after the successor's link went, it refuses).
    """
    from graceful_plugin.workerspawn import WorkerSupervisor

    class Server:
        successor: Any = None

        def successorLink(self) -> Any:
            return self.successor

    supervisor = WorkerSupervisor(2, None, 60.0, reactor=MemoryReactorClock())
    fd = _pipe()
    refused = supervisor.relayConnection("web", "x", fd)
    refused.addErrback(lambda f: f.trap(NoHandoff))
    assert not isOpen(fd)
    server = Server()
    supervisor.handoffCommitted(server, 4242)
    server.successor = link
    fd = _pipe()
    supervisor.relayConnection("web", "x", fd)
    [(kw, _, _)] = link.calls
    assert kw["fd"] == fd
    os.close(fd)


def test_leaderLinkWithoutARelayRefuses() -> None:
    """
    A leader's link to a worker that has no relay refuses a connection and closes it.
    """
    from graceful_plugin.workerspawn import LeaderLink, WorkerProcess

    worker = WorkerProcess(1, lambda n: None)
    fd = _pipe()
    d = LeaderLink(worker)._adoptConnection("web", "x", fd)
    d.addErrback(lambda f: f.trap(NoHandoff))
    assert not isOpen(fd)
