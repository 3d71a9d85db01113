"""
Tests for L{graceful_plugin.systemd}: sd_notify datagrams on real Unix datagram sockets standing
in for systemd's notification socket, and socket activation with real listening sockets, in
this process, in a child process that places them at descriptor 3, and under
C{systemd-socket-activate}.
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

from twisted.logger import ILogObserver, Logger
from twisted.trial.unittest import SynchronousTestCase

from graceful_plugin.systemd import (
    LISTEN_VARIABLES,
    ActivatedSocket,
    Notifier,
    formatAddress,
    listenFds,
)

REPO = Path(__file__).resolve().parent.parent
CHILD_TIMEOUT = 20.0


def _ipv6Available() -> bool:
    """
    Whether this host can bind the IPv6 loopback address.
    """
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


class _Case(SynchronousTestCase):
    """
    Shared helpers: a temporary directory removed after the test, and sockets closed after it.
    """

    def tempDir(self) -> Path:
        """
        A fresh, short temporary directory (Unix socket paths are limited to 107 bytes),
        removed after the test.
        """
        path = tempfile.mkdtemp(prefix="graceful-")
        self.addCleanup(shutil.rmtree, path, True)
        return Path(path)

    def socketFor(self, family: int, kind: int = socket.SOCK_STREAM) -> socket.socket:
        """
        A new socket closed after the test.
        """
        sock = socket.socket(family, kind)
        self.addCleanup(sock.close)
        return sock

    def listening(self, family: int, address: Any) -> socket.socket:
        """
        A listening stream socket bound to C{address}, closed after the test.
        """
        sock = self.socketFor(family)
        sock.bind(address)
        sock.listen(8)
        return sock


class NotifierTests(_Case):
    """
    L{Notifier} sends exactly the datagrams systemd expects, and never raises for I/O failures.
    """

    def receiver(self, abstract: bool = False) -> tuple[socket.socket, str]:
        """
        Bind a datagram socket standing in for systemd's notification socket.

        @param abstract: bind in the abstract namespace instead of the file system.
        @return: the socket (with credentials passing on, a 5 s receive timeout) and the value
            C{NOTIFY_SOCKET} would hold for it.
        """
        sock = self.socketFor(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"graceful-test-{uuid.uuid4().hex}"
            sock.bind("\0" + name)
            address = "@" + name
        else:
            address = str(self.tempDir() / "notify.sock")
            sock.bind(address)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        sock.settimeout(5.0)
        return sock, address

    def notifierFor(self, address: str) -> tuple[Notifier, list[dict[str, Any]]]:
        """
        A notifier built from an environment naming C{address}, logging into a list.
        """
        notifier = Notifier.fromEnvironment({"NOTIFY_SOCKET": address})
        events: list[dict[str, Any]] = []
        notifier.log = Logger(observer=cast(ILogObserver, events.append))
        return notifier, events

    def receive(self, sock: socket.socket) -> tuple[bytes, int]:
        """
        Receive one datagram and the pid of its sender from the kernel's credentials.
        """
        space = socket.CMSG_SPACE(struct.calcsize("3i"))
        data, ancillary, _flags, _address = sock.recvmsg(4096, space)
        pids = [
            struct.unpack("3i", cdata[: struct.calcsize("3i")])[0]
            for level, ctype, cdata in ancillary
            if level == socket.SOL_SOCKET and ctype == socket.SCM_CREDENTIALS
        ]
        self.assertEqual(len(pids), 1)
        return data, pids[0]

    def test_readyPath(self) -> None:
        """
        C{ready()} sends the single datagram C{READY=1} to a filesystem-path socket.
        """
        sock, address = self.receiver()
        notifier, events = self.notifierFor(address)
        self.assertTrue(notifier.enabled)
        self.assertTrue(notifier.ready())
        self.assertEqual(self.receive(sock)[0], b"READY=1")
        self.assertEqual(events, [])

    def test_readyAbstract(self) -> None:
        """
        A C{NOTIFY_SOCKET} starting with C{@} reaches a socket in the abstract namespace.
        """
        sock, address = self.receiver(abstract=True)
        notifier, events = self.notifierFor(address)
        self.assertTrue(notifier.ready())
        self.assertEqual(self.receive(sock)[0], b"READY=1")
        self.assertEqual(events, [])

    def test_reloading(self) -> None:
        """
        C{reloading()} sends C{RELOADING=1} and the current C{CLOCK_MONOTONIC} time in
        microseconds in one datagram.
        """
        sock, address = self.receiver()
        notifier, _ = self.notifierFor(address)
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.assertTrue(notifier.reloading())
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        lines = self.receive(sock)[0].decode("ascii").split("\n")
        self.assertEqual(len(lines), 2)
        self.assertEqual(lines[0], "RELOADING=1")
        key, _, value = lines[1].partition("=")
        self.assertEqual(key, "MONOTONIC_USEC")
        self.assertTrue(value.isdecimal())
        self.assertTrue(before <= int(value) <= after)

    def test_stopping(self) -> None:
        """
        C{stopping()} sends the single datagram C{STOPPING=1}.
        """
        sock, address = self.receiver()
        notifier, _ = self.notifierFor(address)
        self.assertTrue(notifier.stopping())
        self.assertEqual(self.receive(sock)[0], b"STOPPING=1")

    def test_mainPid(self) -> None:
        """
        C{mainPid(pid)} sends C{MAINPID=pid}, and the kernel vouches the sender is this process.
        """
        sock, address = self.receiver()
        notifier, _ = self.notifierFor(address)
        self.assertTrue(notifier.mainPid(4242))
        self.assertEqual(self.receive(sock), (b"MAINPID=4242", os.getpid()))

    def test_mainPidInvalid(self) -> None:
        """
        C{mainPid} refuses a pid that is not a positive integer, before sending anything.
        """
        sock, address = self.receiver()
        notifier, _ = self.notifierFor(address)
        for bad in (0, -1, True, "12"):
            self.assertRaises(ValueError, notifier.mainPid, bad)
        sock.settimeout(0)
        self.assertRaises(BlockingIOError, sock.recv, 4096)

    def test_status(self) -> None:
        """
        C{status(text)} sends C{STATUS=text}, with newlines in the text turned into spaces so the
        datagram stays one assignment.
        """
        sock, address = self.receiver()
        notifier, _ = self.notifierFor(address)
        self.assertTrue(notifier.status("serving 3 listeners"))
        self.assertEqual(self.receive(sock)[0], b"STATUS=serving 3 listeners")
        self.assertTrue(notifier.status("handoff\nto 12"))
        self.assertEqual(self.receive(sock)[0], b"STATUS=handoff to 12")

    def test_notifyFields(self) -> None:
        """
        C{notify(**fields)} sends one datagram with a C{KEY=VALUE} line per field, in order.
        """
        sock, address = self.receiver()
        notifier, _ = self.notifierFor(address)
        self.assertTrue(notifier.notify(MAINPID=77, READY=1, STATUS="serving"))
        self.assertEqual(self.receive(sock)[0], b"MAINPID=77\nREADY=1\nSTATUS=serving")

    def test_sendLines(self) -> None:
        """
        C{send(lines)} sends the lines joined by newlines, UTF-8 encoded, in one datagram.
        """
        sock, address = self.receiver()
        notifier, _ = self.notifierFor(address)
        self.assertTrue(notifier.send(["STATUS=café", "READY=1"]))
        self.assertEqual(self.receive(sock)[0], "STATUS=café\nREADY=1".encode())

    def test_sendMalformed(self) -> None:
        """
        C{send} refuses a line that is not one C{KEY=VALUE} assignment, before sending anything.
        """
        sock, address = self.receiver()
        notifier, _ = self.notifierFor(address)
        self.assertRaises(ValueError, notifier.send, ["READY"])
        self.assertRaises(ValueError, notifier.send, ["READY=1\nSTOPPING=1"])
        sock.settimeout(0)
        self.assertRaises(BlockingIOError, sock.recv, 4096)

    def test_disabledWithoutNotifySocket(self) -> None:
        """
        Without C{NOTIFY_SOCKET} (unset or empty) the notifier is disabled: every method returns
        C{False} and logs nothing.
        """
        for environ in ({}, {"NOTIFY_SOCKET": ""}):
            notifier = Notifier.fromEnvironment(environ)
            events: list[dict[str, Any]] = []
            notifier.log = Logger(observer=cast(ILogObserver, events.append))
            self.assertFalse(notifier.enabled)
            self.assertIsNone(notifier.address)
            results = [
                notifier.ready(),
                notifier.reloading(),
                notifier.stopping(),
                notifier.mainPid(1),
                notifier.status("x"),
                notifier.notify(READY=1),
                notifier.send(["READY=1"]),
            ]
            self.assertEqual(results, [False] * 7)
            self.assertEqual(events, [])

    def test_defaultEnvironment(self) -> None:
        """
        C{fromEnvironment()} reads C{os.environ} and leaves C{NOTIFY_SOCKET} in it for
        successor processes.
        """
        sock, address = self.receiver()
        previous = os.environ.get("NOTIFY_SOCKET")
        os.environ["NOTIFY_SOCKET"] = address

        def restore() -> None:
            if previous is None:
                os.environ.pop("NOTIFY_SOCKET", None)
            else:
                os.environ["NOTIFY_SOCKET"] = previous

        self.addCleanup(restore)
        notifier = Notifier.fromEnvironment()
        self.assertTrue(notifier.ready())
        self.assertEqual(self.receive(sock)[0], b"READY=1")
        self.assertEqual(os.environ.get("NOTIFY_SOCKET"), address)

    def test_unusableAddress(self) -> None:
        """
        An address that is neither an absolute path nor C{@name} is refused by the constructor
        and gives a disabled notifier, with a warning, from C{fromEnvironment}.
        """
        self.assertRaises(ValueError, Notifier, "relative/notify.sock")
        events: list[dict[str, Any]] = []
        original = Notifier.log
        Notifier.log = Logger(observer=cast(ILogObserver, events.append))
        self.addCleanup(setattr, Notifier, "log", original)
        notifier = Notifier.fromEnvironment({"NOTIFY_SOCKET": "vsock:2:1234"})
        self.assertFalse(notifier.enabled)
        self.assertEqual(len(events), 1)
        self.assertEqual(events[0]["address"], "vsock:2:1234")
        self.assertIn("disabled", events[0]["log_format"])

    def test_goneSocketIsLoggedNotRaised(self) -> None:
        """
        When the notification socket is gone, sending returns C{False} and logs the failure
        with the address and message as named fields, instead of raising.
        """
        sock, address = self.receiver()
        sock.close()
        os.unlink(address)
        notifier, events = self.notifierFor(address)
        self.assertFalse(notifier.ready())
        self.assertEqual(len(events), 1)
        self.assertEqual(events[0]["address"], address)
        self.assertEqual(events[0]["message"], "READY=1")
        self.assertIsInstance(events[0]["log_failure"].value, OSError)

    def test_goneAbstractSocketIsLoggedNotRaised(self) -> None:
        """
        When an abstract notification socket is gone, sending returns C{False} and logs it.
        """
        sock, address = self.receiver(abstract=True)
        sock.close()
        notifier, events = self.notifierFor(address)
        self.assertFalse(notifier.stopping())
        self.assertEqual([e["message"] for e in events], ["STOPPING=1"])

    def test_successorProcessNotifies(self) -> None:
        """
        A child process inheriting C{NOTIFY_SOCKET} (as a successor does) can announce itself
        with C{MAINPID=} and C{READY=1}, and the kernel vouches that the datagram is its own.
        """
        sock, address = self.receiver()
        script = textwrap.dedent(
            """
            import os
            from graceful_plugin.systemd import Notifier
            notifier = Notifier.fromEnvironment()
            assert notifier.notify(MAINPID=os.getpid(), READY=1)
            """
        )
        env = dict(os.environ, NOTIFY_SOCKET=address, PYTHONPATH=str(REPO))
        child = subprocess.Popen([sys.executable, "-c", script], env=env)
        try:
            self.assertEqual(child.wait(CHILD_TIMEOUT), 0)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        data, pid = self.receive(sock)
        self.assertEqual(pid, child.pid)
        self.assertEqual(data, f"MAINPID={child.pid}\nREADY=1".encode())


class FormatAddressTests(SynchronousTestCase):
    """
    L{formatAddress} writes addresses the way listener names and C{--port} do.
    """

    def test_forms(self) -> None:
        """
        IPv4, IPv6, path, abstract and unbound Unix addresses each have their written form.
        """
        self.assertEqual(formatAddress(socket.AF_INET, ("127.0.0.1", 80)), "127.0.0.1:80")
        self.assertEqual(formatAddress(socket.AF_INET6, ("::1", 80, 0, 0)), "[::1]:80")
        self.assertEqual(formatAddress(socket.AF_UNIX, "/run/a.sock"), "/run/a.sock")
        self.assertEqual(formatAddress(socket.AF_UNIX, b"\0abc"), "@abc")
        self.assertEqual(formatAddress(socket.AF_UNIX, "\0abc"), "@abc")
        self.assertEqual(formatAddress(socket.AF_UNIX, b"/run/b.sock"), "/run/b.sock")
        self.assertEqual(formatAddress(socket.AF_UNIX, ""), "")


def _isOpen(fd: int) -> bool:
    """
    Whether C{fd} is an open descriptor.
    """
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


class ListenFdsTests(_Case):
    """
    L{listenFds} describes the sockets systemd passes, and refuses malformed variables clearly.
    """

    def placeAt(self, sockets: list[socket.socket]) -> int:
        """
        Duplicate C{sockets}, in order, to consecutive free descriptors (inheritable, as systemd
        passes them), closed after the test.

        @return: the first descriptor.
        """
        start = 200
        while any(_isOpen(fd) for fd in range(start, start + len(sockets))):
            start += len(sockets)
        for i, sock in enumerate(sockets):
            os.dup2(sock.fileno(), start + i, inheritable=True)
            self.addCleanup(os.close, start + i)
        return start

    def environ(self, n: int, names: str | None = None, pid: int | None = None) -> dict[str, str]:
        """
        The variables systemd would set for C{n} descriptors.
        """
        env = {"LISTEN_PID": str(os.getpid() if pid is None else pid), "LISTEN_FDS": str(n)}
        if names is not None:
            env["LISTEN_FDNAMES"] = names
        return env

    def test_describesSockets(self) -> None:
        """
        Each passed socket is described with its name, descriptor, family, type and bound
        address, in descriptor order, and made close-on-exec.
        """
        tcp = self.listening(socket.AF_INET, ("127.0.0.1", 0))
        path = str(self.tempDir() / "web.sock")
        unix = self.listening(socket.AF_UNIX, path)
        abstractName = f"graceful-test-{uuid.uuid4().hex}"
        abstract = self.listening(socket.AF_UNIX, "\0" + abstractName)
        start = self.placeAt([tcp, unix, abstract])
        result = listenFds(self.environ(3, "web:admin:metrics"), fdStart=start)
        port = tcp.getsockname()[1]
        self.assertEqual(
            result,
            [
                ActivatedSocket(
                    "web", start, socket.AF_INET, socket.SOCK_STREAM, f"127.0.0.1:{port}"
                ),
                ActivatedSocket("admin", start + 1, socket.AF_UNIX, socket.SOCK_STREAM, path),
                ActivatedSocket(
                    "metrics",
                    start + 2,
                    socket.AF_UNIX,
                    socket.SOCK_STREAM,
                    "@" + abstractName,
                ),
            ],
        )
        self.assertEqual([s.kind for s in result], ["tcp", "unix", "unix"])
        for fd in range(start, start + 3):
            self.assertFalse(os.get_inheritable(fd))

    def test_ipv6AndDatagram(self) -> None:
        """
        An IPv6 stream socket is a C{tcp6} listener at C{[host]:port}, and a datagram socket is
        described with its own kind rather than refused.
        """
        if not _ipv6Available():
            raise self.skipTest("this host cannot bind the IPv6 loopback address ::1")
        tcp6 = self.listening(socket.AF_INET6, ("::1", 0))
        udp = self.socketFor(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("127.0.0.1", 0))
        start = self.placeAt([tcp6, udp])
        result = listenFds(self.environ(2), fdStart=start)
        port6 = tcp6.getsockname()[1]
        portUdp = udp.getsockname()[1]
        self.assertEqual(
            [(s.name, s.kind, s.family, s.type, s.address) for s in result],
            [
                (
                    f"tcp6:[::1]:{port6}",
                    "tcp6",
                    socket.AF_INET6,
                    socket.SOCK_STREAM,
                    f"[::1]:{port6}",
                ),
                (
                    f"udp:127.0.0.1:{portUdp}",
                    "udp",
                    socket.AF_INET,
                    socket.SOCK_DGRAM,
                    f"127.0.0.1:{portUdp}",
                ),
            ],
        )

    def test_derivedNames(self) -> None:
        """
        Without C{LISTEN_FDNAMES}, or where it says C{unknown} or nothing, the name is
        C{KIND:ADDRESS}, the default name of a C{--port} listener.
        """
        tcp = self.listening(socket.AF_INET, ("127.0.0.1", 0))
        path = str(self.tempDir() / "a.sock")
        unix = self.listening(socket.AF_UNIX, path)
        start = self.placeAt([tcp, unix])
        port = tcp.getsockname()[1]
        derived = [f"tcp:127.0.0.1:{port}", f"unix:{path}"]
        self.assertEqual([s.name for s in listenFds(self.environ(2), fdStart=start)], derived)
        for names in ("unknown:unknown", ":"):
            result = listenFds(self.environ(2, names), fdStart=start)
            self.assertEqual([s.name for s in result], derived)
        result = listenFds(self.environ(2, "web:unknown"), fdStart=start)
        self.assertEqual([s.name for s in result], ["web", f"unix:{path}"])

    def test_sharedNames(self) -> None:
        """
        A name systemd gives to several descriptors (the sockets of one socket unit) is replaced
        by each one's C{KIND:ADDRESS}, while a unique name in the same list is kept.
        """
        first = self.listening(socket.AF_INET, ("127.0.0.1", 0))
        second = self.listening(socket.AF_INET, ("127.0.0.1", 0))
        path = str(self.tempDir() / "admin.sock")
        admin = self.listening(socket.AF_UNIX, path)
        start = self.placeAt([first, second, admin])
        result = listenFds(self.environ(3, "app.socket:app.socket:admin"), fdStart=start)
        self.assertEqual(
            [s.name for s in result],
            [
                f"tcp:127.0.0.1:{first.getsockname()[1]}",
                f"tcp:127.0.0.1:{second.getsockname()[1]}",
                "admin",
            ],
        )

    def test_notForUs(self) -> None:
        """
        Variables meant for another process (a different C{LISTEN_PID}), or incomplete ones,
        give no sockets and leave the descriptors alone.
        """
        tcp = self.listening(socket.AF_INET, ("127.0.0.1", 0))
        start = self.placeAt([tcp])
        self.assertEqual(listenFds(self.environ(1, pid=os.getpid() + 1), fdStart=start), [])
        self.assertEqual(listenFds({"LISTEN_FDS": "1"}, fdStart=start), [])
        self.assertEqual(listenFds({"LISTEN_PID": str(os.getpid())}, fdStart=start), [])
        self.assertEqual(listenFds({}, fdStart=start), [])
        self.assertEqual(listenFds(self.environ(0), fdStart=start), [])
        self.assertTrue(os.get_inheritable(start))

    def test_explicitPid(self) -> None:
        """
        The C{pid} argument replaces C{os.getpid()} in the comparison with C{LISTEN_PID}.
        """
        tcp = self.listening(socket.AF_INET, ("127.0.0.1", 0))
        start = self.placeAt([tcp])
        self.assertEqual(listenFds(self.environ(1, pid=5), pid=6, fdStart=start), [])
        self.assertEqual(len(listenFds(self.environ(1, pid=5), pid=5, fdStart=start)), 1)

    def test_unsetEnvironment(self) -> None:
        """
        With C{unsetEnvironment=True} the C{LISTEN_*} variables are removed after reading (even
        when they were for another process, or malformed) and other variables stay; without it
        they stay.
        """
        tcp = self.listening(socket.AF_INET, ("127.0.0.1", 0))
        start = self.placeAt([tcp])
        env = dict(self.environ(1, "web"), OTHER="1")
        self.assertEqual(len(listenFds(env, fdStart=start)), 1)
        self.assertEqual(set(env), {*LISTEN_VARIABLES, "OTHER"})
        self.assertEqual(len(listenFds(env, unsetEnvironment=True, fdStart=start)), 1)
        self.assertEqual(env, {"OTHER": "1"})
        env = dict(self.environ(1, "web", pid=os.getpid() + 1), OTHER="1")
        self.assertEqual(listenFds(env, unsetEnvironment=True, fdStart=start), [])
        self.assertEqual(env, {"OTHER": "1"})
        env = {"LISTEN_PID": "x", "LISTEN_FDS": "1", "OTHER": "1"}
        self.assertRaises(ValueError, listenFds, env, unsetEnvironment=True, fdStart=start)
        self.assertEqual(env, {"OTHER": "1"})

    def test_malformedValues(self) -> None:
        """
        A malformed C{LISTEN_PID}, C{LISTEN_FDS} or C{LISTEN_FDNAMES} raises C{ValueError} with
        a sentence naming the variable.
        """
        tcp = self.listening(socket.AF_INET, ("127.0.0.1", 0))
        start = self.placeAt([tcp])
        pid = str(os.getpid())
        cases = [
            ({"LISTEN_PID": "abc", "LISTEN_FDS": "1"}, "LISTEN_PID"),
            ({"LISTEN_PID": "-3", "LISTEN_FDS": "1"}, "LISTEN_PID"),
            ({"LISTEN_PID": pid, "LISTEN_FDS": "two"}, "LISTEN_FDS"),
            ({"LISTEN_PID": pid, "LISTEN_FDS": "-1"}, "LISTEN_FDS"),
            ({"LISTEN_PID": pid, "LISTEN_FDS": ""}, "LISTEN_FDS"),
            ({"LISTEN_PID": pid, "LISTEN_FDS": "1", "LISTEN_FDNAMES": "a:b"}, "LISTEN_FDNAMES"),
        ]
        for env, variable in cases:
            e = self.assertRaises(ValueError, listenFds, env, fdStart=start)
            self.assertIn(variable, str(e))
            self.assertTrue(str(e).endswith("."))

    def test_descriptorNotOpen(self) -> None:
        """
        A C{LISTEN_FDS} counting past the open descriptors raises C{ValueError} naming the
        descriptor.
        """
        tcp = self.listening(socket.AF_INET, ("127.0.0.1", 0))
        start = self.placeAt([tcp])
        self.assertFalse(_isOpen(start + 1))
        e = self.assertRaises(ValueError, listenFds, self.environ(2), fdStart=start)
        self.assertIn(f"descriptor {start + 1}", str(e))
        self.assertIn("not open", str(e))

    def test_descriptorNotSocket(self) -> None:
        """
        A passed descriptor that is not a socket (a pipe here) raises C{ValueError}.
        """
        readEnd, writeEnd = os.pipe()
        self.addCleanup(os.close, readEnd)
        self.addCleanup(os.close, writeEnd)
        e = self.assertRaises(ValueError, listenFds, self.environ(1), fdStart=readEnd)
        self.assertIn("not a socket", str(e))

    def test_descriptorsStayOpen(self) -> None:
        """
        Describing a socket does not close it: the descriptor still accepts connections.
        """
        tcp = self.listening(socket.AF_INET, ("127.0.0.1", 0))
        start = self.placeAt([tcp])
        [activated] = listenFds(self.environ(1), fdStart=start)
        self.assertTrue(_isOpen(activated.fd))
        with socket.create_connection(tcp.getsockname(), timeout=5):
            adopted = socket.socket(fileno=os.dup(activated.fd))
            with adopted:
                adopted.settimeout(5)
                conn, _ = adopted.accept()
                conn.close()


_CHILD_SCRIPT = """
import fcntl, json, os, socket
from graceful_plugin.systemd import listenFds

if os.environ.get("GRACEFUL_TEST_SOURCE_FDS"):
    # Place the inherited sockets at 3, 4, ... as systemd does: first out of the way (a source
    # may itself be 3 or 4), then into place.
    sources = [int(fd) for fd in os.environ.pop("GRACEFUL_TEST_SOURCE_FDS").split(",")]
    moved = []
    for fd in sources:
        moved.append(fcntl.fcntl(fd, fcntl.F_DUPFD, 100))
        os.close(fd)
    for i, fd in enumerate(moved):
        os.dup2(fd, 3 + i, inheritable=True)
        os.close(fd)
    os.environ["LISTEN_PID"] = str(os.getpid())

result = listenFds(unsetEnvironment=True)
report = {
    "sockets": [
        {
            "name": s.name,
            "fd": s.fd,
            "family": s.family.name,
            "type": s.type.name,
            "address": s.address,
            "kind": s.kind,
            "inheritable": os.get_inheritable(s.fd),
        }
        for s in result
    ],
    "left": sorted(k for k in os.environ if k.startswith("LISTEN_")),
}
# Prove the first descriptor is the real listening socket: answer the client waiting on it.
if result:
    with socket.socket(fileno=os.dup(result[0].fd)) as listener:
        listener.settimeout(15)
        conn, _ = listener.accept()
        with conn:
            conn.sendall(json.dumps(report).encode() + b"\\n")
print(json.dumps(report), flush=True)
"""


@contextmanager
def _reaped(child: subprocess.Popen[bytes]) -> Iterator[subprocess.Popen[bytes]]:
    """
    Make sure C{child} is dead and reaped when the block is left, however it is left.
    """
    try:
        yield child
    finally:
        if child.poll() is None:
            child.kill()
        child.wait(CHILD_TIMEOUT)
        for stream in (child.stdout, child.stderr):
            if stream is not None:
                stream.close()


def _readUntil(stream: Any, predicate: Any, timeout: float) -> list[str]:
    """
    Read lines from C{stream} until one satisfies C{predicate}, for at most C{timeout} seconds.

    @return: the lines read, the last one satisfying C{predicate}.
    @raise AssertionError: at end of stream or when the time is up.
    """
    deadline = time.monotonic() + timeout
    lines: list[str] = []
    buffer = b""
    with selectors.DefaultSelector() as selector:
        selector.register(stream, selectors.EVENT_READ)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out waiting; read so far: {lines!r}")
            if not selector.select(remaining):
                continue
            chunk = os.read(stream.fileno(), 4096)
            if not chunk:
                raise AssertionError(f"stream ended; read so far: {lines!r}")
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                lines.append(line.decode("utf-8", "replace"))
                if predicate(lines[-1]):
                    return lines


def _receiveLine(address: Any, family: int, timeout: float) -> dict[str, Any]:
    """
    Connect to C{address} and read one JSON line from it.
    """
    with socket.socket(family, socket.SOCK_STREAM) as client:
        client.settimeout(timeout)
        client.connect(address)
        data = b""
        while not data.endswith(b"\n"):
            chunk = client.recv(65536)
            if not chunk:
                break
            data += chunk
    report: dict[str, Any] = json.loads(data)
    return report


class ActivatedProcessTests(_Case):
    """
    L{listenFds} with its defaults, in a real process that finds its sockets at descriptor 3.
    """

    def childEnvironment(self, **extra: str) -> dict[str, str]:
        """
        The environment of a child: ours, without any C{LISTEN_*}, with this checkout importable.
        """
        env = {k: v for k, v in os.environ.items() if k not in LISTEN_VARIABLES}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        env.update(extra)
        return env

    def test_childAtDescriptorThree(self) -> None:
        """
        A child process with listening sockets placed at descriptors 3 and 4, and the variables
        systemd would set, finds them by name with their addresses, makes them close-on-exec,
        removes the variables, and can accept on them.
        """
        tcp = self.listening(socket.AF_INET, ("127.0.0.1", 0))
        path = str(self.tempDir() / "admin.sock")
        unix = self.listening(socket.AF_UNIX, path)
        port = tcp.getsockname()[1]
        env = self.childEnvironment(
            GRACEFUL_TEST_SOURCE_FDS=f"{tcp.fileno()},{unix.fileno()}",
            LISTEN_FDS="2",
            LISTEN_FDNAMES="web:admin",
        )
        child = subprocess.Popen(
            [sys.executable, "-c", _CHILD_SCRIPT],
            env=env,
            pass_fds=(tcp.fileno(), unix.fileno()),
            stdout=subprocess.PIPE,
        )
        with _reaped(child):
            # The child now shares the sockets; ours are closed so only it can accept.
            tcp.close()
            unix.close()
            fromSocket = _receiveLine(("127.0.0.1", port), socket.AF_INET, CHILD_TIMEOUT)
            out, _ = child.communicate(timeout=CHILD_TIMEOUT)
            self.assertEqual(child.returncode, 0)
        report = json.loads(out)
        self.assertEqual(fromSocket, report)
        self.assertEqual(
            report["sockets"],
            [
                {
                    "name": "web",
                    "fd": 3,
                    "family": "AF_INET",
                    "type": "SOCK_STREAM",
                    "address": f"127.0.0.1:{port}",
                    "kind": "tcp",
                    "inheritable": False,
                },
                {
                    "name": "admin",
                    "fd": 4,
                    "family": "AF_UNIX",
                    "type": "SOCK_STREAM",
                    "address": path,
                    "kind": "unix",
                    "inheritable": False,
                },
            ],
        )
        self.assertEqual(report["left"], [])

    def test_systemdSocketActivate(self) -> None:
        """
        Under C{systemd-socket-activate}, the activated process finds the path and abstract
        sockets at descriptors 3 and 4 with the names given by C{--fdname}, and accepts the
        connection that woke it on the first.
        """
        binary = shutil.which("systemd-socket-activate")
        if binary is None:
            raise self.skipTest(
                "systemd-socket-activate is not installed (Debian package 'systemd')"
            )
        path = str(self.tempDir() / "web.sock")
        abstract = f"graceful-test-{uuid.uuid4().hex}"
        env = self.childEnvironment()
        child = subprocess.Popen(
            [
                binary,
                "--listen",
                path,
                "--listen",
                "@" + abstract,
                "--fdname=web:admin",
                f"--setenv=PYTHONPATH={env['PYTHONPATH']}",
                sys.executable,
                "-c",
                _CHILD_SCRIPT,
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        with _reaped(child):
            # systemd-socket-activate reports each socket it listens on, then waits for a
            # connection before starting the program.
            _readUntil(child.stderr, lambda line: " as 4." in line, CHILD_TIMEOUT)
            fromSocket = _receiveLine(path, socket.AF_UNIX, CHILD_TIMEOUT)
            out, err = child.communicate(timeout=CHILD_TIMEOUT)
            self.assertEqual(child.returncode, 0, err)
        report = json.loads(out)
        self.assertEqual(fromSocket, report)
        self.assertEqual(
            [(s["name"], s["fd"], s["kind"], s["address"]) for s in report["sockets"]],
            [("web", 3, "unix", path), ("admin", 4, "unix", "@" + abstract)],
        )
        self.assertEqual([s["inheritable"] for s in report["sockets"]], [False, False])
        self.assertEqual(report["left"], [])
