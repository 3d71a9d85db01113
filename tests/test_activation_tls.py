"""
A TLS ``--port`` that comes in by socket activation is served with TLS, by the first generation
and by the successors it hands the socket to; a socket of a kind its listener cannot serve is
refused with a sentence.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import tempfile
from pathlib import Path
from typing import Any

import pytest
from twisted.trial.unittest import SynchronousTestCase

from graceful_plugin.lifecycle import planActivation
from graceful_plugin.listeners import parseListener
from graceful_plugin.systemd import ActivatedSocket
from tests.operate import becomeSubreaper, track, waitForPid
from tests.procs import TWISTD, Processes, ctl, freePort
from tests.test_listener_kinds import makeCertificate
from tests.test_systemd_integration import Command, _socketActivate


def _tempDir(case: SynchronousTestCase) -> Path:
    """
    A new temporary directory, removed when the test ends.
    """
    directory = Path(tempfile.mkdtemp(prefix="gr-"))
    case.addCleanup(shutil.rmtree, directory, True)
    return directory


def _activated(name: str, kind: str, address: str, fd: int) -> ActivatedSocket:
    family, type_ = {
        "tcp": (socket.AF_INET, socket.SOCK_STREAM),
        "unix": (socket.AF_UNIX, socket.SOCK_STREAM),
    }[kind]
    return ActivatedSocket(name=name, fd=fd, family=family, type=type_, address=address)


def _tlsSpec(directory: Path, text: str) -> Any:
    key, cert = makeCertificate(directory, "site")
    return parseListener(f"{text}:privateKey={key}:certKey={cert}")


class PlanTests(SynchronousTestCase):
    def test_sslByNameAndByAddress(self) -> None:
        """
        An ssl C{--port} takes the TCP socket of its name, or the one at its address, and the
        plan names the spec each adopted socket serves (the ssl one with its TLS context).
        """
        directory = _tempDir(self)
        named = _tlsSpec(directory, "web=ssl:8443:interface=127.0.0.1")
        other = _tlsSpec(directory, "api=ssl:9443:interface=127.0.0.1")
        web = _activated("web", "tcp", "0.0.0.0:443", 3)
        api = _activated("tcp:127.0.0.1:9443", "tcp", "127.0.0.1:9443", 4)
        plan = planActivation([named, other], [web, api])
        self.assertEqual(plan.adopt, [("web", web), ("api", api)])
        self.assertEqual(plan.specs, {"web": named, "api": other})
        self.assertIsNotNone(plan.specs["web"].tls)

    def test_wrongKindByName(self) -> None:
        """
        A Unix socket passed under an ssl listener's name is refused with a sentence naming
        both, instead of being served without TLS.
        """
        directory = _tempDir(self)
        spec = _tlsSpec(directory, "web=ssl:8443")
        with self.assertRaises(ValueError) as raised:
            planActivation([spec], [_activated("web", "unix", "/run/web.sock", 3)])
        self.assertEqual(
            str(raised.exception),
            "--port web is ssl, but the socket systemd passed under that name is unix"
            " (/run/web.sock)",
        )


def _tlsGet(port: int, timeout: float = 20.0) -> tuple[str, bytes]:
    """
    GET / over TLS (any certificate), returning the negotiated TLS version and the body.
    """
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw:
        with context.wrap_socket(raw) as tls:
            tls.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
            return str(tls.version()), data


@pytest.mark.slow
def test_activatedTLSServedAndHandedOver(procs: Processes, workdir: Path) -> None:
    """
    Under ``systemd-socket-activate``, an ssl C{--port} named like the passed socket answers
    over TLS (not plaintext), and after a restart its successor serves the same socket with TLS.
    """
    becomeSubreaper()
    binary = _socketActivate()
    key, cert = makeCertificate(workdir, "site")
    port = freePort()
    argv = [
        binary,
        "-l",
        f"127.0.0.1:{port}",
        "--fdname=web",
        "-E",
        "PYTHONUNBUFFERED=1",
        TWISTD,
        "-n",
        "--pidfile",
        "app.pid",
        "graceful",
        "--control",
        "c.sock",
        "--port",
        f"web=ssl:{port}:interface=127.0.0.1:privateKey={key}:certKey={cert}",
    ]
    server = Command(workdir, argv, "activated")
    procs.servers.append(server)
    server.start()
    server.waitFor(r"as 3\.")
    version, body = _tlsGet(port)
    assert version.startswith("TLS") and f"pid {server.pid}, generation 1".encode() in body
    assert f"socket activation: adopted web (127.0.0.1:{port}) from fd 3" in server.text()
    result = ctl(workdir, "-c", "c.sock", "restart", timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    successor = waitForPid(workdir / "app.pid", server.pid)
    track(procs, successor)
    assert server.wait(30) == 0
    version, body = _tlsGet(port)
    assert version.startswith("TLS") and f"pid {successor}, generation 2".encode() in body


class OptionsTests(SynchronousTestCase):
    def test_refusedAtStart(self) -> None:
        """
        C{twistd graceful} refuses to start, with one sentence, when the socket systemd passed
        under a listener's name is of a kind that listener cannot serve.
        """
        from twisted.python.usage import UsageError

        from graceful_plugin.tap import _checkActivation

        spec = parseListener("web=tcp:8080")
        with self.assertRaises(UsageError) as raised:
            _checkActivation([spec], [_activated("web", "unix", "/run/web.sock", 3)])
        self.assertTrue(str(raised.exception).startswith("socket activation: --port web is tcp"))
