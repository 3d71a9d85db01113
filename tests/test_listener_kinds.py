"""
Every kind of listener across takeovers under load (TCP over IPv4 and IPv6, Unix stream sockets,
TLS, IPv6 link-local with a scope), listeners added, kept and dropped by a takeover, and a
thousand listeners handed over at once.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.procs import TWISTD, Processes, Server, ShortResponse, classify, ctl, freePort

Connect = Callable[[], socket.socket]
ROOT = Path(__file__).resolve().parent.parent


def tcpConnect(host: str, port: int) -> Connect:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET

    def connect() -> socket.socket:
        s = socket.socket(family, socket.SOCK_STREAM)
        s.settimeout(20)
        try:
            s.connect((host, port))
        except BaseException:
            s.close()
            raise
        return s

    return connect


def unixConnect(path: Path) -> Connect:
    def connect() -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(20)
        try:
            s.connect(str(path))
        except BaseException:
            s.close()
            raise
        return s

    return connect


def tlsConnect(port: int, seen: list[bytes] | None = None) -> Connect:
    """
    TLS to 127.0.0.1 with the ssl module; the server's certificate (DER) is appended to C{seen}.
    """
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    plain = tcpConnect("127.0.0.1", port)

    def connect() -> socket.socket:
        s = plain()
        try:
            wrapped = context.wrap_socket(s)
        except BaseException:
            s.close()
            raise
        if seen is not None:
            seen.append(wrapped.getpeercert(binary_form=True) or b"")
        return wrapped

    return connect


def get(connect: Connect, path: str) -> tuple[int, bytes]:
    """
    One HTTP/1.1 request on a fresh connection, read to the end (a body shorter than its
    Content-Length raises L{ShortResponse}).
    """
    with connect() as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n".encode())
        chunks = []
        while True:
            try:
                data = s.recv(65536)
            except ssl.SSLZeroReturnError:
                break
            if not data:
                break
            chunks.append(data)
    raw = b"".join(chunks)
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        raise ShortResponse(f"no complete header in {len(raw)} bytes")
    lines = head.split(b"\r\n")
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length" and len(body) != int(value):
            raise ShortResponse(f"body of {len(body)} bytes, expected {int(value)}")
    return int(lines[0].split()[1]), body


class KindLoad:
    """
    C{threads} clients per connector, each making requests on fresh connections until stopped,
    every failure counted by connector and kind of error.
    """

    def __init__(self, connectors: dict[str, Connect], threads: int = 3, size: int = 4096):
        self.connectors = connectors
        self.size = size
        self.ok: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.examples: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(name,), daemon=True)
            for name in connectors
            for _ in range(threads)
        ]

    def _run(self, name: str) -> None:
        connect = self.connectors[name]
        for _ in range(1_000_000):
            if self._stop.is_set():
                return
            try:
                status, body = get(connect, f"/bytes/{self.size}")
                if status != 200 or len(body) != self.size:
                    raise ShortResponse(f"status {status}, {len(body)} bytes")
                with self._lock:
                    self.ok[name] += 1
            except Exception as e:
                with self._lock:
                    self.errors[f"{name}: {classify(e)}"] += 1
                    if len(self.examples) < 10:
                        self.examples.append(f"{name}: {e!r}")

    def __enter__(self) -> KindLoad:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)
        assert not any(t.is_alive() for t in self._threads)


def makeCertificate(directory: Path, name: str) -> tuple[Path, Path]:
    """
    A fresh self-signed certificate for 127.0.0.1 and its key, as PEM files.
    """
    pytest.importorskip("OpenSSL", reason="TLS listeners need pyOpenSSL (pip install .[test])")
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    keyPath = directory / f"{name}.key"
    certPath = directory / f"{name}.crt"
    keyPath.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    certPath.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return keyPath, certPath


def derOf(certPath: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(certPath.read_text())


def statusOf(workdir: Path) -> str:
    result = ctl(workdir, "--control", "c.sock", "status", "--json")
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_everyKindServesAcrossTakeoversUnderLoad(procs: Processes, workdir: Path) -> None:
    """
    Clients on TCP over IPv4 and IPv6, a Unix socket and TLS see no failed request across three
    takeovers by successors that name no listeners; the Unix path is never unlinked or re-created
    and keeps its mode; a certificate replaced on disk is served after the next takeover.
    """
    v4, v6, tls = freePort(), freePort("::1"), freePort()
    key, cert = makeCertificate(workdir, "one")
    shutil.copy(key, workdir / "site.key")
    shutil.copy(cert, workdir / "site.crt")
    sockPath = workdir / "app.sock"
    first = procs.server(
        [
            "--port",
            f"v4=tcp:{v4}:interface=127.0.0.1",
            "--port",
            f"v6=tcp6:{v6}:interface=::1",
            "--port",
            "local=unix:app.sock:mode=0660",
            "--port",
            f"secure=ssl:{tls}:privateKey=site.key:certKey=site.crt:interface=127.0.0.1",
            "--control",
            "c.sock",
        ],
        "gen1",
    ).start()
    first.waitServing()
    inode = os.stat(sockPath).st_ino
    assert stat.S_IMODE(os.stat(sockPath).st_mode) == 0o660
    certs: list[bytes] = []
    connectors = {
        "v4": tcpConnect("127.0.0.1", v4),
        "v6": tcpConnect("::1", v6),
        "unix": unixConnect(sockPath),
        "tls": tlsConnect(tls, certs),
    }
    current = first
    with KindLoad(connectors) as load:
        for n in (2, 3, 4):
            if n == 3:
                newKey, newCert = makeCertificate(workdir, "two")
                os.replace(newKey, workdir / "site.key")
                os.replace(newCert, workdir / "site.crt")
            successor = procs.server(["--takeover", "c.sock"], f"gen{n}").start()
            successor.waitFor(r"took over from pid %d as generation %d" % (current.pid, n))
            assert current.wait(60) == 0, current.text()[-3000:]
            assert os.stat(sockPath).st_ino == inode
            assert stat.S_IMODE(os.stat(sockPath).st_mode) == 0o660
            current = successor
        seenBefore = len(certs)
        get(connectors["tls"], "/")
    assert load.errors == {}, load.examples
    assert all(load.ok[name] > 10 for name in connectors), load.ok
    assert derOf(cert) in certs
    assert certs[seenBefore] == derOf(workdir / "site.crt") != derOf(cert)
    status = statusOf(workdir)
    for name in ("v4", "v6", "local", "secure"):
        assert f'"name": "{name}"' in status
    assert '"kind": "ssl"' in status


def test_listenersAddedKeptAndDropped(procs: Processes, workdir: Path) -> None:
    """
    A successor keeps the listeners it names (by name, or by address under a new name), opens
    the ones only it names (a name moved to another port is opened there), and the predecessor
    closes for good the ones the successor drops (a Unix path unlinked, the old port of a moved
    name refused) after letting a download in flight on them finish.
    """
    keep, renamed, added, movedFrom, movedTo = (freePort() for _ in range(5))
    first = procs.server(
        [
            "--port",
            f"keep=tcp:{keep}:interface=127.0.0.1",
            "--port",
            f"old=tcp:{renamed}:interface=127.0.0.1",
            "--port",
            "gone=unix:gone.sock",
            "--port",
            f"moved=tcp:{movedFrom}:interface=127.0.0.1",
            "--control",
            "c.sock",
        ],
        "gen1",
    ).start()
    first.waitServing()
    gone = unixConnect(workdir / "gone.sock")
    download = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    download.settimeout(20)
    download.connect(str(workdir / "gone.sock"))
    size = 32 * 1024 * 1024
    download.sendall(b"GET /bytes/%d HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n" % size)
    assert download.recv(1)
    second = procs.server(
        [
            "--takeover",
            "c.sock",
            "--port",
            f"keep=tcp:{keep}:interface=127.0.0.1",
            "--port",
            f"new-name=tcp:{renamed}:interface=127.0.0.1",
            "--port",
            f"added=tcp:{added}:interface=127.0.0.1",
            "--port",
            "fresh=unix:fresh.sock:mode=0600",
            "--port",
            f"moved=tcp:{movedTo}:interface=127.0.0.1",
        ],
        "gen2",
    ).start()
    second.waitFor(r"took over from pid %d" % first.pid)
    first.waitFor(r"closing listener gone \(.*gone.sock\): the successor dropped it")
    first.waitFor(r"closing listener moved \(127.0.0.1:%d\): the successor dropped it" % movedFrom)
    for port in (keep, renamed, added, movedTo):
        assert get(tcpConnect("127.0.0.1", port), "/")[1].startswith(
            b"graceful demo: pid %d" % second.pid
        )
    assert get(unixConnect(workdir / "fresh.sock"), "/")[0] == 200
    assert stat.S_IMODE(os.stat(workdir / "fresh.sock").st_mode) == 0o600
    received = 1
    while True:
        data = download.recv(1 << 20)
        if not data:
            break
        received += len(data)
    download.close()
    assert received > size
    assert first.wait(60) == 0
    assert not (workdir / "gone.sock").exists()
    with pytest.raises(OSError):
        get(gone, "/")
    with pytest.raises(ConnectionRefusedError):
        get(tcpConnect("127.0.0.1", movedFrom), "/")
    status = statusOf(workdir)
    assert f"127.0.0.1:{movedTo}" in status and f"127.0.0.1:{movedFrom}" not in status
    for name in ("keep", "new-name", "added", "fresh", "moved"):
        assert f'"name": "{name}"' in status
    assert '"name": "gone"' not in status and '"name": "old"' not in status


def test_badTlsFilesStopStartup(workdir: Path) -> None:
    """
    A TLS listener whose key file is missing, or whose key and certificate do not match, stops
    start-up with one sentence and a non-zero exit.
    """
    keyOne, certOne = makeCertificate(workdir, "one")
    keyTwo, _ = makeCertificate(workdir, "two")
    for spec, words in [
        ("ssl:0:privateKey=missing.key", "cannot read the private key"),
        (f"ssl:0:privateKey={keyTwo}:certKey={certOne}", "are not a matching PEM key"),
    ]:
        result = subprocess.run(
            [TWISTD, "-n", "--pidfile", "", "graceful", "--port", spec, "--control", "c.sock"],
            cwd=workdir,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode != 0
        assert words in result.stdout + result.stderr
        assert "Traceback" not in result.stdout + result.stderr


@pytest.fixture
def netns() -> Iterator[str]:
    """
    A network namespace of our own with a veth pair whose one end has the link-local address
    fe80::1 (no duplicate detection), deleted afterwards.
    """
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("IPv6 link-local test needs root and iproute2 (ip netns)")
    name = f"gr{uuid.uuid4().hex[:8]}"
    added = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if added.returncode != 0:
        pytest.skip(f"cannot create a network namespace: {added.stderr.strip()}")
    try:
        for command in (
            "ip link set lo up",
            "ip link add veth-a type veth peer name veth-b",
            "ip link set veth-a up",
            "ip link set veth-b up",
            "ip -6 addr add fe80::1/64 dev veth-a nodad",
        ):
            done = subprocess.run(
                ["ip", "netns", "exec", name, *command.split()], capture_output=True, text=True
            )
            if done.returncode != 0:
                pytest.skip(f"cannot set up the namespace ({command}): {done.stderr.strip()}")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


class NamespacedServer(Server):
    """
    A server run inside a network namespace.
    """

    namespace = ""

    def command(self) -> list[str]:
        return ["ip", "netns", "exec", self.namespace, *super().command()]


_CLIENT = """
import json, os, socket, sys
from collections import Counter
port, stop = int(sys.argv[1]), sys.argv[2]
ok, errors, pids, target = 0, Counter(), set(), None
for _ in range(1_000_000):
    if target is None and os.path.exists(stop):
        target = open(stop).read().strip() or None
    if target is not None and target in pids:
        break
    try:
        info = socket.getaddrinfo("fe80::1%veth-a", port, socket.AF_INET6, socket.SOCK_STREAM)
        with socket.socket(socket.AF_INET6) as s:
            s.settimeout(20)
            s.connect(info[0][4])
            s.sendall(b"GET / HTTP/1.1\\r\\nHost: t\\r\\nConnection: close\\r\\n\\r\\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        assert data.startswith(b"HTTP/1.1 200"), data[:100]
        pids.add(data.split(b"pid ")[1].split(b",")[0].decode())
        ok += 1
    except Exception as e:
        errors[type(e).__name__ + ": " + str(e)[:80]] += 1
print(json.dumps({"ok": ok, "errors": errors, "pids": sorted(pids)}), flush=True)
"""


def test_linkLocalWithScopeAcrossTakeover(procs: Processes, workdir: Path, netns: str) -> None:
    """
    A listener on an IPv6 link-local address with its scope (fe80::1%veth-a, in a network
    namespace of the test's own) is handed over: a client looping on it sees no failure and is
    answered by both generations.
    """
    port = 8080
    spec = f"ll=tcp6:{port}:interface=fe80::1%veth-a"
    first = NamespacedServer(workdir, ["--port", spec, "--control", "c.sock"], "gen1")
    first.namespace = netns
    procs.servers.append(first)
    first.start().waitServing()
    assert "ll=[fe80::1%veth-a]:8080" in first.text()
    stop = workdir / "stop"
    client = subprocess.Popen(
        ["ip", "netns", "exec", netns, sys.executable, "-c", _CLIENT, str(port), str(stop)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        second = NamespacedServer(workdir, ["--takeover", "c.sock"], "gen2")
        second.namespace = netns
        procs.servers.append(second)
        second.start().waitFor(r"took over from pid %d" % first.pid)
        assert first.wait(60) == 0
        status = ctl(workdir, "--control", "c.sock", "status", "--json")
        assert "fe80::1%veth-a" in status.stdout
    finally:
        # The client stops once the successor has answered it.
        stop.write_text(str(second.pid))
        out, _ = client.communicate(timeout=60)
    result = json.loads(out)
    assert result["errors"] == {}, result
    assert str(first.pid) in result["pids"]
    assert str(second.pid) in result["pids"]


class LimitedServer(Server):
    """
    A server started with a soft limit of 1024 open descriptors, as on most systems.
    """

    def command(self) -> list[str]:
        return ["prlimit", "--nofile=1024:", "--", *super().command()]


@pytest.mark.slow
def test_thousandListenersHandedOverInOneTakeover(procs: Processes, workdir: Path) -> None:
    """
    A server with 1,000 TCP listeners, started under a soft limit of 1024 descriptors, hands
    all of them to a successor in one takeover, each of them then answers from the successor,
    and ``graceful-ctl status`` lists all 1,000 (its answer comes in batches).
    """
    if shutil.which("prlimit") is None:
        pytest.skip("needs prlimit (util-linux) to start the server under a low soft limit")
    count = 1000
    args = [f"--port=l{i}=tcp:0:interface=127.0.0.1" for i in range(count)]
    first = LimitedServer(workdir, [*args, "--control", "c.sock"], "gen1")
    procs.servers.append(first)
    first.start().waitServing(timeout=60)
    line = first.waitFor(r"serving on (.*)").group(1)
    ports = [int(item.rsplit(":", 1)[1]) for item in line.split(", ")]
    assert len(ports) == count
    second = LimitedServer(workdir, ["--takeover", "c.sock"], "gen2")
    procs.servers.append(second)
    second.start().waitFor(r"took over from pid %d as generation 2" % first.pid, timeout=120)
    assert first.wait(120) == 0
    answered = 0
    for port in ports:
        status, body = get(tcpConnect("127.0.0.1", port), "/")
        assert status == 200 and body.startswith(b"graceful demo: pid %d" % second.pid)
        answered += 1
    assert answered == count
    result = ctl(workdir, "--control", "c.sock", "status", "--json")
    assert result.returncode == 0, result.stderr
    listed = json.loads(result.stdout)["listeners"]
    assert sorted(int(item["address"].rsplit(":", 1)[1]) for item in listed) == sorted(ports)


class DatagramClient:
    """
    One thread sending numbered datagrams one at a time and waiting for each answer; a datagram
    unanswered within 10 s is counted as lost.
    """

    def __init__(self, host: str, port: int) -> None:
        self.address = (host, port)
        self.family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.answers: Counter[bytes] = Counter()
        self.lost = 0
        self.wrong: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with socket.socket(self.family, socket.SOCK_DGRAM) as s:
            s.settimeout(10)
            for n in range(1_000_000):
                if self._stop.is_set():
                    return
                payload = b"%d" % n
                s.sendto(payload, self.address)
                try:
                    data, _ = s.recvfrom(65535)
                except TimeoutError:
                    self.lost += 1
                    continue
                version, _, echoed = data.partition(b" ")
                if echoed != payload:
                    self.wrong.append(data)
                self.answers[version] += 1

    def __enter__(self) -> DatagramClient:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)
        assert not self._thread.is_alive()


def test_udpAcrossTakeoversLosesNoDatagram(procs: Processes, workdir: Path) -> None:
    """
    Datagram clients on UDP over IPv4 and IPv6 lose no datagram across two takeovers, and the
    successor's new datagram protocol answers after the first one.
    """
    v4, v6 = freePort(), freePort("::1")
    ports = ["--port", f"udp:{v4}:interface=127.0.0.1", "--port", f"udp:{v6}:interface=::1"]
    first = procs.server(
        [*ports, "--control", "c.sock", "--factory", "tests.apps.udp_echo_v1.Echo"], "gen1"
    )
    first.start({"PYTHONPATH": str(ROOT)}).waitServing()
    with DatagramClient("127.0.0.1", v4) as four, DatagramClient("::1", v6) as six:
        current = first
        for n in (2, 3):
            successor = procs.server(
                ["--takeover", "c.sock", "--factory", "tests.apps.udp_echo_v2.Echo"], f"gen{n}"
            )
            successor.start({"PYTHONPATH": str(ROOT)})
            successor.waitFor(r"took over from pid %d" % current.pid)
            assert current.wait(60) == 0
            current = successor
        # Keep sending until the newest generation has answered both clients.
        seen = {client: client.answers[b"v2"] for client in (four, six)}
        for client in (four, six):
            for _ in range(1000):
                if client.answers[b"v2"] > seen[client]:
                    break
                client._stop.wait(0.01)
    for client in (four, six):
        assert client.lost == 0 and client.wrong == []
        assert client.answers[b"v1"] > 0 and client.answers[b"v2"] > seen[client]


def test_udpNeedsADatagramProtocol(workdir: Path) -> None:
    """
    A udp listener without a datagram protocol, or a datagram protocol with a TCP listener,
    stops start-up with one sentence.
    """
    for args, words in [
        (["--port", "udp:0"], "a udp listener needs --factory naming a DatagramProtocol"),
        (
            ["--port", "tcp:0", "--factory", "tests.apps.udp_echo_v1.Echo"],
            "is a datagram protocol: it serves udp listeners only",
        ),
    ]:
        result = subprocess.run(
            [TWISTD, "-n", "--pidfile", "", "graceful", *args, "--control", "c.sock"],
            cwd=workdir,
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert result.returncode != 0
        assert words in result.stdout + result.stderr
        assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.parametrize(
    "text",
    [
        "8080",
        "web=tcp:0:interface=127.0.0.1:backlog=77",
        "tcp6:8080:interface=::1",
        "tcp6:0:interface=fe80::1%lo",
        r"odd=unix:/tmp/with\:colon.sock:mode=0640",
        "udp:5353:interface=::1",
        "dns=udp:53",
    ],
)
def test_specTextReadsBackEqual(text: str) -> None:
    """
    The --port value a predecessor hands a successor with no --port of its own reads back to an
    equal listener, for every kind.
    """
    from graceful_plugin.listeners import parseListener

    spec = parseListener(text)
    assert parseListener(spec.text) == spec
    assert parseListener(spec.text).name == spec.name


def test_tlsSpecTextReadsBackEqual(workdir: Path) -> None:
    """
    A TLS listener's --port value, keys included, reads back to an equal listener.
    """
    from graceful_plugin.listeners import parseListener

    key, cert = makeCertificate(workdir, "one")
    spec = parseListener(f"secure=ssl:0:privateKey={key}:certKey={cert}:interface=::1")
    again = parseListener(spec.text)
    assert again == spec
    assert again.tls is not None


def test_findMatchByNameThenAddressWithinTransport() -> None:
    """
    A successor's listener keeps a predecessor's of the same name at the same address (or any
    port when it asks for port 0), else the one at the same address; never across UDP and TCP,
    and not a name that moved to another address.
    """
    from graceful_plugin.listeners import findMatch, parseListener

    web = parseListener("web=tcp:8080:interface=127.0.0.1")
    any0 = parseListener("any=tcp:0:interface=127.0.0.1")
    dns = parseListener("dns=udp:8080:interface=127.0.0.1")
    specs = [web, any0, dns]
    assert findMatch(specs, "web", "tcp", "127.0.0.1:8080") is web
    assert findMatch(specs, "old", "tcp", "127.0.0.1:8080") is web
    assert findMatch(specs, "any", "tcp", "127.0.0.1:41234") is any0
    assert findMatch(specs, "any", "tcp", "0.0.0.0:41234") is None
    assert findMatch(specs, "web", "tcp", "127.0.0.1:9090") is None
    assert findMatch(specs, "x", "udp", "127.0.0.1:8080") is dns
    assert findMatch([web], "web", "udp", "127.0.0.1:8080") is None
