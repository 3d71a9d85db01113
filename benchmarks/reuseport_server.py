"""A plain twisted.web server for ``/bytes/N``, optionally on an ``SO_REUSEPORT`` socket.

The ``reuseport`` restart mode of ``loadtest.py`` starts a second one of these on the same port,
waits for its ready file, then stops the first. Without ``--reuseport`` it is the stand-in server
for the ``naive`` mode when ``twistd graceful`` is not available.

    python benchmarks/reuseport_server.py --port 8080 --reuseport --ready-file /tmp/ready
"""

import argparse
import os
import socket
import sys
from pathlib import Path
from typing import Any

from bytes_resource import BytesRoot
from twisted.logger import globalLogBeginner, textFileLogObserver
from twisted.web import server


def listening_socket(port: int, reuseport: bool) -> socket.socket:
    """Bind and listen on 127.0.0.1:port with the largest backlog the kernel allows."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuseport:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(socket.SOMAXCONN)
    sock.setblocking(False)
    return sock


def write_ready_file(path: Path) -> None:
    """Say "listening" by creating ``path`` atomically with our pid in it."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(f"{os.getpid()}\n")
    partial.rename(path)


def serve(port: int, reuseport: bool, ready_file: Path | None, reactor: Any = None) -> None:
    """Serve ``/bytes/N`` on 127.0.0.1:port until the reactor stops (SIGTERM, SIGINT)."""
    if reactor is None:
        from twisted.internet import reactor
    sock = listening_socket(port, reuseport)
    reactor.adoptStreamPort(sock.fileno(), socket.AF_INET, server.Site(BytesRoot()))
    sock.close()
    if ready_file is not None:
        write_ready_file(ready_file)
    reactor.run()


def main(argv: list[str] | None = None) -> None:
    """Parse the command line, log to stdout like ``twistd -n``, and serve."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True, help="TCP port on 127.0.0.1")
    parser.add_argument("--reuseport", action="store_true", help="set SO_REUSEPORT on the socket")
    parser.add_argument("--ready-file", type=Path, help="created once the socket is listening")
    args = parser.parse_args(argv)
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])
    serve(args.port, args.reuseport, args.ready_file)


if __name__ == "__main__":
    main()
