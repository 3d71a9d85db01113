"""
A successor that speaks the real control protocol and stops at a chosen step, for tests of what
the predecessor does when its successor dies or hangs there.

    python -m tests.fake_successor CONTROL_PATH STEP

STEP is one of: connected, hello, fds, commit.  The process prints ``reached STEP`` (with the
count of descriptors after ``fds``) and then waits to be killed.
"""

from __future__ import annotations

import os
import sys

from twisted.internet import defer, task
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol

from graceful_plugin.control import (
    PROTOCOL_VERSION,
    ClientHandler,
    Commit,
    ControlProtocol,
    Hello,
    TakeOver,
)

STEPS = ("connected", "hello", "fds", "commit")


def reached(step: str, detail: str = "") -> None:
    print(f"reached {step}{detail}", flush=True)


async def run(reactor: object, path: str, step: str) -> None:
    link = await connectProtocol(
        UNIXClientEndpoint(reactor, path), ControlProtocol(ClientHandler())
    )
    if step == "connected":
        reached(step)
        return await defer.Deferred()
    await link.callRemote(Hello, version=PROTOCOL_VERSION, pid=os.getpid())
    if step == "hello":
        reached(step)
        return await defer.Deferred()
    received = []
    start = 0
    while start >= 0:
        answer = await link.callRemote(TakeOver, start=start)
        received.extend(answer["listeners"])
        start = answer["next"]
    if step == "fds":
        reached(step, f" {len(received)}")
        return await defer.Deferred()
    await link.callRemote(Commit)
    reached(step)
    return await defer.Deferred()


def main() -> None:
    path, step = sys.argv[1], sys.argv[2]
    if step not in STEPS:
        raise SystemExit(f"step must be one of {', '.join(STEPS)}")
    task.react(lambda reactor: defer.Deferred.fromCoroutine(run(reactor, path, step)))


if __name__ == "__main__":
    main()
