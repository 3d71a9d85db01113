"""
Talking to systemd without a compiled dependency: readiness notification (``sd_notify``) and
socket activation (``sd_listen_fds``).

Readiness: L{Notifier} sends datagrams to the socket named by ``NOTIFY_SOCKET``. Under
``Type=notify`` the process systemd started says C{READY=1} once it accepts connections; during a
handoff the predecessor says C{RELOADING=1}, and once the successor confirms it accepts, the
predecessor says C{MAINPID=} with the successor's pid and C{READY=1}, so that systemd follows the
new main process instead of declaring the service dead when the predecessor exits (this needs
``NotifyAccess=all``; see C{docs/systemd.md}; the order is L{graceful_plugin.lifecycle}'s).

Socket activation: L{listenFds} reads ``LISTEN_PID``, ``LISTEN_FDS`` and ``LISTEN_FDNAMES`` and
describes the listening sockets systemd passed us, starting at descriptor 3.

Neither touches the reactor.
"""

from __future__ import annotations

import os
import socket
import stat
import time
from collections.abc import Iterable, Mapping, MutableMapping
from dataclasses import dataclass

from twisted.logger import Logger

SD_LISTEN_FDS_START = 3
"""
The first descriptor systemd passes to an activated process.
"""

LISTEN_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
"""
The environment variables of socket activation, removed by C{listenFds(unsetEnvironment=True)}.
"""

_UNKNOWN_NAME = "unknown"


class Notifier:
    """
    Send C{sd_notify} messages to systemd's notification socket.

    Each message is one datagram of newline-separated C{KEY=VALUE} lines, sent from a fresh
    C{AF_UNIX}/C{SOCK_DGRAM} socket so the sender's credentials are those of the current process
    (what systemd checks against C{NotifyAccess=}). Without a notification socket every method is
    a no-op that returns C{False}. A failure to send is logged and reported by the return value,
    never raised: a server must not stop serving because systemd is not listening.

    C{NOTIFY_SOCKET} is deliberately left in the environment: a successor process started later
    must be able to notify systemd too.

    @ivar address: the socket address as found in C{NOTIFY_SOCKET} (a path, or C{@name} for the
        abstract namespace), or L{None} when notification is disabled.
    @ivar timeout: the longest a send may block, in seconds, when systemd's queue is full.
    """

    log = Logger()

    def __init__(self, address: str | None, timeout: float = 1.0) -> None:
        """
        @param address: a filesystem path (absolute) or C{@name} for an abstract socket; L{None}
            or the empty string disables notification.
        @param timeout: the longest a send may block, in seconds.
        @raise ValueError: when C{address} is neither an absolute path nor C{@name}.
        """
        if not address:
            address = None
        elif not (address.startswith("/") or address.startswith("@")):
            raise ValueError(
                f"NOTIFY_SOCKET must be an absolute path or start with '@' (abstract namespace),"
                f" not {address!r}."
            )
        self.address = address
        self.timeout = timeout

    @classmethod
    def fromEnvironment(
        cls, environ: Mapping[str, str] | None = None, timeout: float = 1.0
    ) -> Notifier:
        """
        Build a notifier for the socket named by C{NOTIFY_SOCKET}.

        An unset or empty variable gives a disabled notifier. So does an address this module
        cannot use (such as systemd's C{vsock:} addresses for virtual machines), with a warning
        logged, since refusing to start over it would be worse than not notifying.

        @param environ: the environment to read; L{os.environ} when L{None}.
        @param timeout: the longest a send may block, in seconds.
        @return: a notifier, enabled or not.
        """
        if environ is None:
            environ = os.environ
        address = environ.get("NOTIFY_SOCKET") or None
        try:
            return cls(address, timeout)
        except ValueError as e:
            cls.log.warn("systemd notification disabled: {reason}", reason=str(e), address=address)
            return cls(None, timeout)

    @property
    def enabled(self) -> bool:
        """
        Whether messages are sent at all (C{NOTIFY_SOCKET} was set).
        """
        return self.address is not None

    def _socketAddress(self) -> str | bytes:
        """
        The address in the form C{socket.sendto} takes: abstract names start with a NUL byte.

        @return: the path, or the abstract name as bytes with C{@} replaced by C{\\0}.
        """
        assert self.address is not None
        if self.address.startswith("@"):
            return b"\0" + self.address[1:].encode("utf-8")
        return self.address

    def send(self, lines: Iterable[str]) -> bool:
        """
        Send one datagram made of C{lines}, each a C{KEY=VALUE} assignment.

        @param lines: the assignments, without newlines; sent in this order.
        @return: C{True} when the datagram was sent, C{False} when notification is disabled or
            sending failed (the failure is logged).
        @raise ValueError: when a line contains a newline or no C{=}: a programming error, not a
            run-time condition.
        """
        lines = list(lines)
        for line in lines:
            if "\n" in line or "=" not in line:
                raise ValueError(
                    f"each sd_notify line must be one KEY=VALUE assignment, not {line!r}."
                )
        if self.address is None:
            return False
        payload = "\n".join(lines).encode("utf-8")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.settimeout(self.timeout)
                sock.sendto(payload, self._socketAddress())
        except OSError:
            self.log.failure(
                "could not notify systemd at {address} of {message!r}",
                address=self.address,
                message=payload.decode("utf-8"),
            )
            return False
        return True

    def notify(self, **fields: object) -> bool:
        """
        Send one datagram with a C{KEY=VALUE} line per keyword argument, in the order given.

        @param fields: the assignments, for example C{notify(READY=1, STATUS="serving")}.
        @return: as L{send}.
        """
        return self.send(f"{key}={value}" for key, value in fields.items())

    def ready(self) -> bool:
        """
        Tell systemd the service is up (or, after C{RELOADING=1}, that the reload is done).

        @return: as L{send}.
        """
        return self.send(["READY=1"])

    def reloading(self) -> bool:
        """
        Tell systemd a reload (for us, a handoff) has begun, with the C{CLOCK_MONOTONIC} time in
        microseconds that systemd requires in the same datagram; C{READY=1} ends the reload.

        @return: as L{send}.
        """
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send(["RELOADING=1", f"MONOTONIC_USEC={usec}"])

    def stopping(self) -> bool:
        """
        Tell systemd the service is shutting down.

        @return: as L{send}.
        """
        return self.send(["STOPPING=1"])

    def mainPid(self, pid: int) -> bool:
        """
        Tell systemd that C{pid} is now the service's main process (the predecessor sends it
        about its successor, before it starts draining; requires C{NotifyAccess=all}).

        @param pid: the new main process id.
        @return: as L{send}.
        @raise ValueError: when C{pid} is not a positive integer.
        """
        if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
            raise ValueError(f"the main pid must be a positive integer, not {pid!r}.")
        return self.send([f"MAINPID={pid}"])

    def status(self, text: str) -> bool:
        """
        Set the one-line status shown by C{systemctl status}.

        @param text: the status; newlines are replaced by spaces.
        @return: as L{send}.
        """
        return self.send([f"STATUS={' '.join(text.splitlines())}"])


_KINDS = {
    (socket.AF_INET, socket.SOCK_STREAM): "tcp",
    (socket.AF_INET6, socket.SOCK_STREAM): "tcp6",
    (socket.AF_UNIX, socket.SOCK_STREAM): "unix",
    (socket.AF_INET, socket.SOCK_DGRAM): "udp",
    (socket.AF_INET6, socket.SOCK_DGRAM): "udp6",
    (socket.AF_UNIX, socket.SOCK_DGRAM): "unixgram",
    (socket.AF_UNIX, socket.SOCK_SEQPACKET): "unixseqpacket",
}


@dataclass(frozen=True)
class ActivatedSocket:
    """
    One socket passed by systemd.

    The descriptor stays owned by the caller: adopt it (C{reactor.adoptStreamPort}) and then
    close it, or close it.

    @ivar name: the name from C{LISTEN_FDNAMES} (C{FileDescriptorName=}, by default the socket
        unit's name), or C{KIND:ADDRESS} as for an unnamed C{--port} listener when systemd gave
        no name, C{unknown}, or a name it also gave another descriptor.
    @ivar fd: the descriptor number.
    @ivar family: the address family (C{AF_INET}, C{AF_INET6}, C{AF_UNIX}, ...).
    @ivar type: the socket type (C{SOCK_STREAM}, C{SOCK_DGRAM}, ...).
    @ivar address: the bound address: C{host:port}, C{[host]:port} for IPv6, a path, C{@name}
        for an abstract Unix socket, or the empty string for an unbound one.
    """

    name: str
    fd: int
    family: socket.AddressFamily
    type: socket.SocketKind
    address: str

    @property
    def kind(self) -> str:
        """
        The listener kind: C{tcp}, C{tcp6} or C{unix} for stream sockets (as in C{--port}), and
        C{udp}, C{udp6}, C{unixgram}, C{unixseqpacket} or C{FAMILY/TYPE} for anything else.
        """
        return _KINDS.get((self.family, self.type), f"{self.family.name}/{self.type.name}")


def formatAddress(family: int, address: object) -> str:
    """
    Format an address returned by C{getsockname()} as a string.

    @param family: the socket's address family.
    @param address: what C{getsockname()} returned for it.
    @return: C{host:port}, C{[host]:port} for IPv6 (with its scope, when the host has one), the
        path of a Unix socket, C{@name} for an abstract one, the empty string for an unbound one,
        or C{str(address)} for other families.
    """
    if family == socket.AF_INET and isinstance(address, tuple):
        return f"{address[0]}:{address[1]}"
    if family == socket.AF_INET6 and isinstance(address, tuple):
        return f"[{address[0]}]:{address[1]}"
    if family == socket.AF_UNIX:
        if isinstance(address, bytes):
            if address.startswith(b"\0"):
                return "@" + address[1:].decode("utf-8", "backslashreplace")
            return os.fsdecode(address)
        if isinstance(address, str) and address.startswith("\0"):
            return "@" + address[1:]
        return str(address or "")
    return str(address)


def _describe(fd: int, name: str | None) -> ActivatedSocket:
    """
    Describe the socket at C{fd} without taking ownership of it, and make it close-on-exec.

    @param fd: an open descriptor.
    @param name: its name from C{LISTEN_FDNAMES}, or L{None} to derive one from its address.
    @return: the description.
    @raise ValueError: when C{fd} is not open or not a socket.
    """
    try:
        mode = os.fstat(fd).st_mode
    except OSError as e:
        raise ValueError(
            f"LISTEN_FDS names descriptor {fd}, but it is not open ({e.strerror})."
        ) from None
    if not stat.S_ISSOCK(mode):
        raise ValueError(f"descriptor {fd} passed by systemd is not a socket.")
    sock = socket.socket(fileno=fd)
    try:
        family = socket.AddressFamily(sock.family)
        kind = socket.SocketKind(sock.type)
        address = formatAddress(family, sock.getsockname())
    finally:
        sock.detach()
    os.set_inheritable(fd, False)
    if name is None:
        derived = _KINDS.get((family, kind), f"{family.name}/{kind.name}")
        name = f"{derived}:{address}"
    return ActivatedSocket(name=name, fd=fd, family=family, type=kind, address=address)


def _parseCount(variable: str, value: str) -> int:
    """
    Parse a non-negative decimal integer from the environment.

    @param variable: the variable's name, for the error message.
    @param value: its value.
    @return: the number.
    @raise ValueError: when C{value} is not a non-negative decimal integer.
    """
    if not value.strip().isdecimal():
        raise ValueError(f"{variable} must be a non-negative integer, not {value!r}.")
    return int(value)


def listenFds(
    environ: MutableMapping[str, str] | None = None,
    pid: int | None = None,
    unsetEnvironment: bool = False,
    fdStart: int = SD_LISTEN_FDS_START,
) -> list[ActivatedSocket]:
    """
    Describe the sockets passed by systemd socket activation, like C{sd_listen_fds_with_names}.

    The variables are for us only when C{LISTEN_PID} is our pid: a child process inheriting
    them must ignore them, so a different pid, or no C{LISTEN_PID} or C{LISTEN_FDS} at all,
    gives an empty list. Each returned descriptor is made close-on-exec.

    @param environ: the environment to read (and, with C{unsetEnvironment}, change);
        L{os.environ} when L{None}.
    @param pid: our process id; L{os.getpid()} when L{None}.
    @param unsetEnvironment: remove C{LISTEN_PID}, C{LISTEN_FDS} and C{LISTEN_FDNAMES} from
        C{environ} after reading them, whatever they held, so that our own children do not see
        them. (The successor of a handoff receives its sockets over the control socket, never
        through these variables.)
    @param fdStart: the first descriptor; systemd always uses 3, tests may use another.
    @return: one L{ActivatedSocket} per passed descriptor, in descriptor order.
    @raise ValueError: with a sentence naming the variable, when a value is malformed, when
        C{LISTEN_FDNAMES} does not name every descriptor, or when a descriptor is not an open
        socket.
    """
    if environ is None:
        environ = os.environ
    if pid is None:
        pid = os.getpid()
    try:
        return _listenFds(environ, pid, fdStart)
    finally:
        if unsetEnvironment:
            for variable in LISTEN_VARIABLES:
                environ.pop(variable, None)


def _listenFds(environ: Mapping[str, str], pid: int, fdStart: int) -> list[ActivatedSocket]:
    """
    The work of L{listenFds}, without the clean-up of the environment.

    @param environ: the environment to read.
    @param pid: our process id.
    @param fdStart: the first descriptor.
    @return: as L{listenFds}.
    @raise ValueError: as L{listenFds}.
    """
    listenPid = environ.get("LISTEN_PID")
    if listenPid is None:
        return []
    if _parseCount("LISTEN_PID", listenPid) != pid:
        return []
    count = environ.get("LISTEN_FDS")
    if count is None:
        return []
    n = _parseCount("LISTEN_FDS", count)
    names: list[str | None] = [None] * n
    rawNames = environ.get("LISTEN_FDNAMES")
    if rawNames is not None and n:
        given = rawNames.split(":")
        if len(given) != n:
            raise ValueError(
                f"LISTEN_FDNAMES names {len(given)} descriptor(s) but LISTEN_FDS says {n}:"
                f" {rawNames!r}."
            )
        # A name must tell listeners apart across generations: one that systemd gives to
        # several descriptors (all the sockets of one .socket unit share its name) does not.
        names = [
            None if name in ("", _UNKNOWN_NAME) or given.count(name) > 1 else name for name in given
        ]
    return [_describe(fdStart + i, names[i]) for i in range(n)]
