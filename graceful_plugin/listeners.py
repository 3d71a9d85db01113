"""
Listening sockets: parse ``--port`` specifications, create and bind the sockets ourselves, and
the adoptable listening-port classes that can pause, resume and release a socket without ever
shutting it down or unlinking a path that a successor now owns.

Why we create every socket ourselves, even in the first process: Twisted's ``tcp.Port`` calls
``shutdown(2)`` on a socket it created when it stops listening, which would also stop the
successor's accepting on the very same kernel socket; and ``unix.Port`` unlinks its path on close.
A port built from an adopted descriptor does neither.
"""

from __future__ import annotations

import os
import socket
import stat
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import tcp, udp, unix
from twisted.internet.address import UNIXAddress
from twisted.internet.interfaces import IProtocolFactory, IReactorFDSet
from twisted.internet.protocol import AbstractDatagramProtocol
from twisted.logger import Logger

from graceful_plugin.sessions import SessionTracker

KINDS = ("tcp", "tcp6", "unix", "ssl", "udp")

#: The options each kind takes.
_OPTIONS = {
    "tcp": {"interface", "backlog"},
    "tcp6": {"interface", "backlog"},
    "ssl": {"interface", "backlog", "privateKey", "certKey"},
    "udp": {"interface"},
    "unix": {"mode", "backlog", "lockfile"},
}


def defaultBacklog() -> int:
    """
    The listen backlog: the kernel's ``somaxconn``, so that connections arriving while nobody
    accepts (the moment of a handoff) wait in the queue instead of being refused.
    """
    try:
        with open("/proc/sys/net/core/somaxconn") as f:
            return max(int(f.read().strip()), 128)
    except (OSError, ValueError):
        return 4096


@dataclass(frozen=True)
class ListenerSpec:
    """
    One listener as named on the command line.

    @ivar name: the listener's name (``web`` in ``web=tcp:8080``; by default kind and address).
    @ivar kind: ``tcp``, ``tcp6``, ``unix`` or ``ssl`` (TLS over TCP, IPv4 or IPv6 by C{host}).
    @ivar host: the interface for TCP kinds (an IPv6 link-local one with its scope:
        ``fe80::1%eth0``).
    @ivar port: the port number for TCP kinds (0 lets the kernel choose).
    @ivar path: the filesystem path for ``unix``.
    @ivar mode: the permission bits of a Unix socket's path.
    @ivar privateKey: for ``ssl``, the PEM file holding the private key.
    @ivar certKey: for ``ssl``, the PEM file holding the certificate (and any chain after it).
    @ivar tls: for ``ssl``, the TLS context loaded from those files by this process.
    """

    name: str
    kind: str
    host: str = ""
    port: int = 0
    path: str = ""
    mode: int = 0o666
    backlog: int = field(default_factory=defaultBacklog, compare=False)
    privateKey: str = ""
    certKey: str = ""
    tls: Any = field(default=None, compare=False, repr=False)

    @property
    def family(self) -> socket.AddressFamily:
        """
        The socket's address family.
        """
        if self.kind == "unix":
            return socket.AF_UNIX
        return socket.AF_INET6 if ":" in self.host else socket.AF_INET

    @property
    def address(self) -> str:
        """
        The address in a form people read and that identifies the listener across generations.
        """
        if self.kind == "unix":
            return self.path
        if self.family == socket.AF_INET6:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"

    @property
    def text(self) -> str:
        """
        This listener as a ``--port`` value that L{parseListener} reads back to an equal spec (how
        a predecessor tells a successor with no ``--port`` of its own what each listener is).
        """

        def esc(value: str) -> str:
            return value.replace("\\", "\\\\").replace(":", "\\:")

        if self.kind == "unix":
            body = f"unix:{esc(self.path)}:mode={self.mode:o}"
        else:
            body = f"{self.kind}:{self.port}:interface={esc(self.host)}"
        if self.kind == "ssl":
            body += f":privateKey={esc(self.privateKey)}:certKey={esc(self.certKey)}"
        if "backlog" in _OPTIONS[self.kind]:
            body += f":backlog={self.backlog}"
        # A default name (kind:address) is what parsing gives back anyway.
        return body if ":" in self.name else f"{self.name}={body}"


def _splitParams(text: str) -> tuple[list[str], dict[str, str]]:
    """
    Split a Twisted-style server string (``kind:positional:key=value``) honouring ``\\:``.
    """
    parts: list[str] = []
    current = ""
    escaped = False
    for ch in text:
        if escaped:
            current += ch
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == ":":
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    positional: list[str] = []
    keywords: dict[str, str] = {}
    last = ""
    for part in parts:
        key, eq, value = part.partition("=")
        if eq and key.isidentifier():
            keywords[key] = value
            last = key
        elif last:
            # After a keyword, a part without "=" continues its value: an IPv6 address written
            # without escaping its colons (interface=::1).
            keywords[last] += ":" + part
        else:
            positional.append(part)
    return positional, keywords


def _parsePortNumber(text: str, spec: str) -> int:
    try:
        number = int(text)
    except ValueError:
        raise ValueError(f"{spec!r}: the port must be a number, not {text!r}") from None
    if not 0 <= number <= 65535:
        raise ValueError(f"{spec!r}: the port must be between 0 and 65535, not {number}")
    return number


def parseListener(text: str, relativeTo: str | None = None) -> ListenerSpec:
    """
    Parse one ``--port`` value.

    ``8080`` means ``tcp:8080``; ``tcp:PORT[:interface=HOST][:backlog=N]``,
    ``tcp6:PORT[:interface=HOST]`` (colons escaped or not; a link-local address with its scope,
    ``fe80::1%eth0``), ``ssl:PORT:privateKey=KEY.pem[:certKey=CERT.pem][:interface=HOST]`` and
    ``unix:PATH[:mode=0660][:backlog=N]`` are accepted, each optionally preceded by ``NAME=``.

    For ``ssl``, the key and certificate are loaded here, so that a bad one stops start-up.

    @param relativeTo: the directory relative paths are taken from (the working directory
        when L{None}), so that they still mean the same after ``twistd`` changes directory.
    @raise ValueError: with a sentence a user understands.
    """
    original = text
    name = ""
    head, eq, rest = text.partition("=")
    if eq and head and ":" not in head and head.replace("-", "_").isidentifier():
        name, text = head, rest
    if not text:
        raise ValueError(f"{original!r}: no listener given")
    if text.isdigit():
        text = "tcp:" + text
    positional, keywords = _splitParams(text)
    kind = positional[0]
    args = positional[1:]
    if kind not in KINDS:
        raise ValueError(
            f"{original!r}: unknown listener kind {kind!r} (expected one of {', '.join(KINDS)},"
            " or a bare port number)"
        )
    allowed = _OPTIONS[kind]
    unknown = set(keywords) - allowed
    if unknown:
        raise ValueError(f"{original!r}: unknown option(s) {', '.join(sorted(unknown))}")
    if len(args) != 1 or not args[0]:
        what = "a path" if kind == "unix" else "a port number"
        raise ValueError(f"{original!r}: expected {what} after {kind!r}")
    backlog = defaultBacklog()
    if "backlog" in keywords:
        try:
            backlog = int(keywords["backlog"])
        except ValueError:
            raise ValueError(f"{original!r}: backlog must be a number") from None
    if kind == "unix":
        path = args[0]
        if relativeTo is not None:
            path = os.path.join(relativeTo, path)
        path = os.path.abspath(path)
        mode = 0o666
        if "mode" in keywords:
            try:
                mode = int(keywords["mode"], 8)
            except ValueError:
                raise ValueError(f"{original!r}: mode must be octal, like 0660") from None
        spec = ListenerSpec(name="", kind=kind, path=path, mode=mode, backlog=backlog)
    else:
        port = _parsePortNumber(args[0], original)
        host = keywords.get("interface", "::" if kind == "tcp6" else "0.0.0.0")
        host = host.strip("[]")
        v6 = kind == "tcp6" or (kind in ("ssl", "udp") and ":" in host)
        address, _, scope = host.partition("%")
        try:
            socket.inet_pton(socket.AF_INET6 if v6 else socket.AF_INET, address)
        except OSError:
            raise ValueError(
                f"{original!r}: {host!r} is not an IPv{'6' if v6 else '4'} address"
            ) from None
        if scope and not v6:
            raise ValueError(f"{original!r}: only IPv6 addresses take a scope (%{scope})")
        if scope and not scope.isdigit():
            try:
                socket.if_nametoindex(scope)
            except OSError:
                raise ValueError(f"{original!r}: there is no network interface {scope!r}") from None
        privateKey = certKey = ""
        if kind == "ssl":
            if not keywords.get("privateKey"):
                raise ValueError(
                    f"{original!r}: ssl needs privateKey=FILE (and certKey=FILE when the"
                    " certificate is in another file)"
                )
            base = relativeTo if relativeTo is not None else os.getcwd()
            privateKey = os.path.join(base, keywords["privateKey"])
            certKey = os.path.join(base, keywords.get("certKey") or keywords["privateKey"])
        spec = ListenerSpec(
            name="",
            kind=kind,
            host=host,
            port=port,
            backlog=backlog,
            privateKey=privateKey,
            certKey=certKey,
        )
    return ListenerSpec(
        name=name or f"{spec.kind}:{spec.address}",
        kind=spec.kind,
        host=spec.host,
        port=spec.port,
        path=spec.path,
        mode=spec.mode,
        backlog=spec.backlog,
        privateKey=spec.privateKey,
        certKey=spec.certKey,
        tls=loadTLS(spec.privateKey, spec.certKey, original) if spec.kind == "ssl" else None,
    )


def _transport(kind: str) -> str:
    return {"udp": "datagram", "unix": "unix", "control": "unix"}.get(kind, "stream")


def _hostOf(address: str) -> str:
    return address.rpartition(":")[0]


def findMatch(specs: list[ListenerSpec], name: str, kind: str, address: str) -> ListenerSpec | None:
    """
    Which of C{specs} (a successor's command line) keeps the predecessor's listener C{name} of
    C{kind} at C{address}: the one of the same name at the same address (or on the same
    interface with port 0, whatever port the kernel chose), else the one at the same address,
    among those of the same transport (a udp listener never matches a stream one).  A listener
    of the same name at another address is not a match: it moves (the old one is dropped, the
    new one opened).
    """
    same = [s for s in specs if _transport(s.kind) == _transport(kind)]
    for spec in same:
        if spec.name != name:
            continue
        if spec.address == address:
            return spec
        if spec.kind != "unix" and spec.port == 0 and _hostOf(spec.address) == _hostOf(address):
            return spec
    return next((spec for spec in same if spec.address == address), None)


def loadTLS(privateKey: str, certKey: str, what: str) -> Any:
    """
    The server TLS context for a key and a certificate (followed by its chain, if any) in PEM
    files, read now: each process loads its own, so certificates rotate by takeover.

    @raise ValueError: with a sentence naming the file and the problem.
    """
    from twisted.internet.error import VerifyError

    try:
        from OpenSSL import SSL, crypto
        from twisted.internet import ssl
    except ImportError:  # pragma: no cover - pyOpenSSL comes with the tls extra
        raise ValueError(f"{what!r}: TLS needs pyOpenSSL (pip install 'graceful[tls]')") from None

    def read(path: str, which: str) -> bytes:
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as e:
            raise ValueError(f"{what!r}: cannot read the {which} {path}: {e.strerror}") from None

    keyPEM = read(privateKey, "private key")
    certPEM = read(certKey, "certificate")
    marker = b"-----BEGIN CERTIFICATE-----"
    blocks = [marker + block for block in certPEM.split(marker)[1:]]
    if not blocks:
        raise ValueError(f"{what!r}: {certKey} holds no PEM certificate")
    try:
        pair = ssl.PrivateCertificate.loadPEM(keyPEM + b"\n" + blocks[0])
        chain = [ssl.Certificate.loadPEM(block).original for block in blocks[1:]]
        options = ssl.CertificateOptions(
            privateKey=pair.privateKey.original,
            certificate=pair.original,
            extraCertChain=chain or None,
        )
        options.getContext()
    except (SSL.Error, crypto.Error, VerifyError, ValueError) as e:
        raise ValueError(
            f"{what!r}: {privateKey} and {certKey} are not a matching PEM key and certificate"
            f" ({e.__class__.__name__})"
        ) from None
    return options


def bindListener(spec: ListenerSpec) -> socket.socket:
    """
    Create, bind and listen on the socket for C{spec}: non-blocking, close-on-exec, with a large
    backlog.

    @raise OSError: when the address cannot be bound (in use, no permission, no such interface).
    """
    if spec.kind == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            _removeStaleSocket(spec.path)
            # Bind under a umask that leaves no moment with wider permissions than asked for.
            old = os.umask(0o777 & ~spec.mode)
            try:
                sock.bind(spec.path)
            finally:
                os.umask(old)
            os.chmod(spec.path, spec.mode)
            sock.listen(spec.backlog)
        except BaseException:
            sock.close()
            raise
    else:
        family = spec.family
        kind = socket.SOCK_DGRAM if spec.kind == "udp" else socket.SOCK_STREAM
        sock = socket.socket(family, kind)
        try:
            if kind == socket.SOCK_STREAM:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                info = socket.getaddrinfo(
                    spec.host, spec.port, family, kind, 0, socket.AI_NUMERICHOST
                )
                sock.bind(info[0][4])
            else:
                sock.bind((spec.host, spec.port))
            if kind == socket.SOCK_STREAM:
                sock.listen(spec.backlog)
        except BaseException:
            sock.close()
            raise
    sock.setblocking(False)
    return sock


def raiseFileLimit(wanted: int = 1 << 20) -> int:
    """
    Raise the soft limit on open descriptors towards the hard one (at most C{wanted}): a
    successor holds two copies of every listener for a moment, and a thousand listeners with
    their connections exceed the usual soft limit of 1024.

    @return: the soft limit now in force.
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        return soft
    return target


def _removeStaleSocket(path: str) -> None:
    """
    Remove a Unix socket file that no process listens on any more; refuse to touch a live one or
    anything that is not a socket.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(f"{path} exists and is not a socket; not replacing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1)
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)
        return
    except OSError as e:
        raise OSError(f"{path} cannot be checked for a live server: {e.strerror}") from None
    finally:
        probe.close()
    raise OSError(f"{path} is in use by a running server")


def probeSocket(fd: int) -> socket.socket | str:
    """
    A socket object on a duplicate of C{fd}, to inspect it (the caller closes it); or, when
    C{fd} is no socket or cannot be inspected, what is wrong, in words.  C{fd} is left open.
    """
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            return "it is not a socket"
        return socket.socket(fileno=os.dup(fd))
    except OSError as e:
        return f"it cannot be inspected ({e.strerror})"


def listeningSocketProblem(fd: int, kind: str) -> str | None:
    """
    What is wrong with a descriptor handed over as a listener of C{kind}, in words; L{None}
    when it is a listening stream socket of the right family.  C{fd} is left open.
    """
    if kind not in KINDS:
        return f"{kind!r} is not a listener kind"
    probe = probeSocket(fd)
    if isinstance(probe, str):
        return probe
    with probe:
        if kind == "udp":
            if probe.type != socket.SOCK_DGRAM:
                return "it is not a datagram socket"
        elif probe.type != socket.SOCK_STREAM:
            return "it is not a stream socket"
        if probe.family not in (
            (socket.AF_INET, socket.AF_INET6) if kind in ("ssl", "udp") else (familyOf(kind),)
        ):
            return f"it is a {probe.family.name} socket"
        if kind != "udp" and not probe.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            return "it is not listening"
    return None


def familyOf(kind: str, fd: int | None = None) -> socket.AddressFamily:
    """
    The address family of a listener kind, or of the socket C{fd} when given (``ssl`` may be
    either IPv4 or IPv6).
    """
    if fd is not None:
        probe = socket.socket(fileno=fd)
        try:
            return probe.family
        finally:
            probe.detach()
    return {"tcp": socket.AF_INET, "tcp6": socket.AF_INET6, "unix": socket.AF_UNIX}[kind]


def wrapFactory(factory: IProtocolFactory, spec: ListenerSpec | None) -> IProtocolFactory:
    """
    The factory a listener serves: C{factory} itself, or wrapped in TLS for ``ssl`` (the TLS
    context this process loaded for C{spec}).
    """
    if spec is None or spec.kind != "ssl":
        return factory
    from twisted.protocols.tls import TLSMemoryBIOFactory

    tls = spec.tls or loadTLS(spec.privateKey, spec.certKey, spec.name)
    return TLSMemoryBIOFactory(tls, False, factory)


class _SessionTracking:
    """
    A connection transport that tells its port's L{SessionTracker} when it opens and closes.
    Tracking in the transport costs nothing per byte (no wrapping protocol).
    """

    server: Any

    def __init__(
        self, sock: Any, protocol: Any, client: Any, server: Any, sessionno: int, reactor: Any
    ) -> None:
        # (The arguments named: tcp.Port.doRead and unix.Port.doRead pass these six, and
        # naming them costs less per connection than packing *args.)
        super().__init__(sock, protocol, client, server, sessionno, reactor)  # type: ignore[call-arg]
        server.sessions.opened(self)

    def connectionLost(self, reason: Any) -> None:
        try:
            super().connectionLost(reason)  # type: ignore[misc]
        finally:
            self.server.sessions.closed(self)


class _TrackedTCPServer(_SessionTracking, tcp.Server):
    """
    A tracked TCP connection.
    """


class _TrackedUNIXServer(_SessionTracking, unix.Server):
    """
    A tracked Unix stream connection.
    """


class _AdoptablePortMixin:
    """
    What our listening ports add to Twisted's: adopt a descriptor without accepting yet, pause
    and resume accepting, and release the socket without C{shutdown()} or unlinking.

    The private hook this relies on (C{_fromListeningDescriptor}, the same one
    C{IReactorSocket.adoptStreamPort} uses) is wrapped here and nowhere else.
    """

    log = Logger()
    sessions: SessionTracker
    name: str
    kind: str
    spec: ListenerSpec | None = None
    #: What the listener serves when not the application (C{"metrics"}), or empty.
    role = ""
    _unlinkOnClose = False
    _accepting = False
    # Never shutdown(2) the socket: another process may be accepting on it.
    _shouldShutdown = False
    #: At most this many connections accepted per wake-up (None: Twisted's adaptive count, up
    #: to 100 and more).  Processes sharing a socket set it low, so that a burst is not taken
    #: whole by the first one to wake.
    acceptBatch: int | None = None
    _numberAccepts = 100
    #: Held by the group's balance: accepting, but not reading for a moment.
    _held = False

    @property
    def numberAccepts(self) -> int:
        # (tcp.Port.doRead reads and adapts this: the cap holds whatever it sets.)
        if self.acceptBatch is None:
            return self._numberAccepts
        return min(self._numberAccepts, self.acceptBatch)

    @numberAccepts.setter
    def numberAccepts(self, value: int) -> None:
        self._numberAccepts = value

    def pauseAccepting(self) -> None:
        """
        Stop calling C{accept()}; the socket stays open and the kernel keeps queueing connections.
        """
        if self._accepting:
            self._accepting = False
            self.stopReading()  # type: ignore[attr-defined]

    def resumeAccepting(self) -> None:
        """
        Start (or resume) calling C{accept()} on the socket.
        """
        if not self._accepting and self.connected:  # type: ignore[attr-defined]
            self._accepting = True
            if not self._held:
                self.startReading()  # type: ignore[attr-defined]

    def hold(self, held: bool) -> None:
        """
        Stop calling C{accept()} for a moment while accepting (or start again): the group's
        balance (L{graceful_plugin.balance}) holds a process that has more than its share.  The
        port stays in the accepting state; pausing and resuming keep the hold.
        """
        if held == self._held:
            return
        self._held = held
        if self._accepting:
            if held:
                self.stopReading()  # type: ignore[attr-defined]
            else:
                self.startReading()  # type: ignore[attr-defined]

    @property
    def accepting(self) -> bool:
        """
        Whether this port is calling C{accept()}.
        """
        return self._accepting

    def release(self) -> Any:
        """
        Close our copy of the socket: never C{shutdown()}, never unlink the path.  Another process
        holding the same socket keeps accepting on it undisturbed.
        """
        if self._closing():
            return self.deferred  # type: ignore[attr-defined]
        self._accepting = False
        self._unlinkOnClose = False
        return self.stopListening()  # type: ignore[attr-defined]

    def close(self) -> Any:
        """
        Close the socket for good, as the last generation: a Unix socket's path is unlinked.
        """
        if self._closing():
            # Released a moment ago (a successor that stepped back, then stopped): a release
            # never turns into an unlink of the path the predecessor still serves.
            return self.deferred  # type: ignore[attr-defined]
        self._accepting = False
        self._unlinkOnClose = True
        return self.stopListening()  # type: ignore[attr-defined]

    def _closing(self) -> bool:
        # stopListening() was called and its connectionLost is still to run.
        return bool(self.disconnecting and self.connected)  # type: ignore[attr-defined]

    def adoptConnection(self, fd: int) -> Any:
        """
        Serve the connected stream socket C{fd} (a duplicate of it: the caller still owns and
        closes C{fd}) exactly as if this port had just accepted it: a protocol from this port's
        factory, and this port's session-tracked transport, so that the connection is counted,
        drained and, in turn, handed over like any other.

        Not C{IReactorSocket.adoptStreamConnection}: it builds a transport that belongs to no
        port (C{server} is L{None}), which no L{SessionTracker} counts.  This does what
        C{tcp.Port.doRead} does with a socket that C{accept()} returned.

        @return: the transport, or L{None} if the factory built no protocol (the socket is
            closed then).
        """
        port: Any = self  # a tcp.Port or unix.Port: its factory, address type and sessions
        skt = socket.socket(fileno=os.dup(fd))
        try:
            addr: Any = skt.getpeername()
        except OSError:
            skt.close()
            raise
        if isinstance(addr, tuple) and len(addr) == 4:
            # IPv6: the host with its scope, as tcp.Port.doRead gives it.
            host = socket.getnameinfo(addr, socket.NI_NUMERICHOST | socket.NI_NUMERICSERV)[0]
            addr = (host, *addr[1:])
        protocol = port.factory.buildProtocol(port._buildAddr(addr))
        if protocol is None:
            skt.close()
            return None
        sessionno = port.sessionno
        port.sessionno = sessionno + 1
        transport = port.transport(skt, protocol, addr, port, sessionno, port.reactor)
        self.sessions.handedOverInstead(transport)
        protocol.makeConnection(transport)
        return transport


class AdoptedTCPPort(_AdoptablePortMixin, tcp.Port):
    """
    A TCP listening port built from a descriptor we created or were handed.
    """

    transport = _TrackedTCPServer

    def startListening(self) -> None:
        super().startListening()
        # tcp.Port.startListening starts reading at once: an adopted port accepts only when told.
        self.stopReading()


class AdoptedUNIXPort(_AdoptablePortMixin, unix.Port):
    """
    A Unix stream listening port built from a descriptor we created or were handed.
    """

    transport = _TrackedUNIXServer

    def startListening(self) -> None:
        # unix.Port.startListening calls listen() again with self.backlog and chmods the path to
        # self.mode: keep what the socket already has.
        path = self._bindPath
        try:
            self.mode = stat.S_IMODE(os.stat(path).st_mode)
        except (OSError, TypeError):
            pass
        super().startListening()
        self.stopReading()

    def connectionLost(self, reason: Any) -> None:
        if not self._unlinkOnClose:
            # Skip unix.Port.connectionLost, which unlinks the path a successor owns.
            tcp.Port.connectionLost(self, reason)
            return
        super().connectionLost(reason)


class AdoptedUDPPort(_AdoptablePortMixin, udp.Port):
    """
    A UDP port built from a descriptor we created or were handed: "accepting" means reading
    datagrams.  Both generations hold the one socket during a handoff, and datagrams that arrive
    while neither reads wait in its receive buffer.
    """

    def startListening(self) -> None:
        super().startListening()
        self.stopReading()


def isDatagramProtocol(app: Any) -> bool:
    """
    Whether C{app} is a datagram protocol (class or instance), for udp listeners.
    """
    if isinstance(app, type):
        return issubclass(app, AbstractDatagramProtocol)
    return isinstance(app, AbstractDatagramProtocol)


def datagramProtocol(app: Any, name: str) -> Any:
    """
    The datagram protocol a UDP listener serves: a new instance of C{app} when it is a
    L{DatagramProtocol} class, C{app} itself when it is an instance not serving another port yet.

    @raise ValueError: with a sentence, when C{app} is neither.
    """
    if isinstance(app, type) and issubclass(app, AbstractDatagramProtocol):
        return app()
    if isinstance(app, AbstractDatagramProtocol):
        if app.transport is not None:
            raise ValueError(
                f"udp listener {name}: the datagram protocol instance already serves another"
                " listener (name its class with --factory to serve several)"
            )
        return app
    raise ValueError(
        f"udp listener {name}: needs --factory naming a DatagramProtocol (class or instance)"
    )


def adoptListener(
    reactor: IReactorFDSet,
    fd: int,
    kind: str,
    factory: IProtocolFactory,
    name: str = "",
    backlog: int | None = None,
    spec: ListenerSpec | None = None,
) -> AdoptedTCPPort | AdoptedUNIXPort:
    """
    Build a listening port on a duplicate of C{fd}, listening but not accepting yet.  The caller
    still owns C{fd} and must close it.

    @param kind: ``tcp``, ``tcp6``, ``unix`` or ``ssl``.
    @param spec: what this process's command line says of the listener, if anything (an ``ssl``
        listener is served through this process's own TLS context).
    """
    if spec is not None:
        kind = spec.kind
    # A blocking socket (from systemd, or a buggy or hostile predecessor) would leave the
    # reactor stuck in accept(): every adopted descriptor is made non-blocking (the flag belongs
    # to the socket, so the duplicate adopted below has it too).
    os.set_blocking(fd, False)
    if kind == "udp":
        udpPort = AdoptedUDPPort._fromListeningDescriptor(
            reactor, fd, familyOf(kind, fd), datagramProtocol(factory, name), 65535
        )
        udpPort.name = name
        udpPort.kind = kind
        udpPort.spec = spec
        udpPort.sessions = SessionTracker()
        udpPort.startListening()
        return udpPort  # type: ignore[return-value]
    if isDatagramProtocol(factory):
        raise ValueError(
            f"{kind} listener {name}: the application is a datagram protocol, which serves udp"
            " listeners only"
        )
    factory = wrapFactory(factory, spec)
    if kind == "unix":
        port: AdoptedTCPPort | AdoptedUNIXPort = AdoptedUNIXPort._fromListeningDescriptor(
            reactor, fd, factory
        )
    else:
        port = AdoptedTCPPort._fromListeningDescriptor(reactor, fd, familyOf(kind, fd), factory)
    port.backlog = backlog if backlog is not None else defaultBacklog()
    port.name = name
    port.kind = kind
    port.spec = spec
    port.sessions = SessionTracker()
    port.startListening()
    return port


def portAddress(port: AdoptedTCPPort | AdoptedUNIXPort) -> str:
    """
    The address a port listens on, in the same form as L{ListenerSpec.address}.
    """
    host = port.getHost()
    if isinstance(host, UNIXAddress):
        name = host.name
        return name.decode() if isinstance(name, bytes) else str(name)
    if ":" in host.host:
        return f"[{host.host}]:{host.port}"
    return f"{host.host}:{host.port}"
