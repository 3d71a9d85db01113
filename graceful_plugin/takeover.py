"""
The successor's side of a handoff: connect to the serving process, receive its listeners, adopt
them without accepting, wait for the application, commit, and only then accept.

Whatever fails before the predecessor confirms leaves it serving: we close every descriptor we
received, tell it why if we still can, and exit non-zero.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.internet.error import ConnectError, ConnectionClosed
from twisted.logger import Logger
from twisted.protocols import amp

from graceful_plugin import pidfile
from graceful_plugin.control import (
    CONTROL_KIND,
    METRICS_ROLE,
    PROTOCOL_VERSION,
    Abort,
    Accepting,
    Commit,
    ControlProtocol,
    Counters,
    HandoffBusy,
    Hello,
    NoHandoff,
    RolledBack,
    TakeOver,
    VersionMismatch,
    peerCredentials,
)
from graceful_plugin.figures import FIGURES_VERSION
from graceful_plugin.listeners import (
    ListenerSpec,
    adoptListener,
    findMatch,
    listeningSocketProblem,
    parseListener,
)
from graceful_plugin.listenerset import Port
from graceful_plugin.metrics import (
    MetricsUnavailable,
    adoptMetrics,
    holdMetrics,
    openMetrics,
    releaseMetrics,
)
from graceful_plugin.priority import (  # noqa: F401 (re-exported: the names were here first)
    canRestorePriority,
    idleChildren,
    lowerPriority,
    restorePriority,
)
from graceful_plugin.workers import WorkerFailed

#: Connects a protocol to the predecessor; fires with it once connected.
Connect = Callable[[ControlProtocol], Deferred[Any]]

#: The generation that takes over (a L{graceful_plugin.server.GracefulServer}, which imports
#: this module: named here by its role only, so that imports point one way).
GracefulServer = Any

log = Logger()


class TakeoverFailed(Exception):
    """
    A takeover could not be completed; the predecessor serves on.
    """


def maybeReady(ready: Callable[[], Any] | None) -> Deferred[Any]:
    """
    Wait for an application's readiness hook, if it has one.
    """
    if ready is None:
        return succeed(None)
    return maybeDeferred(ready)


def serverIdentityProblem(
    peer: tuple[int, int, int] | None, ownUid: int | None = None
) -> str | None:
    """
    What is wrong with the process serving the control path (from C{SO_PEERCRED}), in words;
    L{None} when it runs as our uid or as root, the only servers we take over from.
    """
    own = os.getuid() if ownUid is None else ownUid
    if peer is None:
        return "cannot be identified (no SO_PEERCRED)"
    pid, uid, _gid = peer
    if uid in (own, 0):
        return None
    return f"(pid {pid}) runs as uid {uid}, not as uid {own} or root"


def _timed(d: Deferred[Any], seconds: float, reactor: Any) -> Deferred[Any]:
    return d.addTimeout(seconds, reactor)


async def _step(d: Deferred[Any], seconds: float, reactor: Any, late: str) -> Any:
    """
    Wait for C{d} at most C{seconds} (a L{Clock} call on C{reactor}).

    @raise TakeoverFailed: C{late}, and the deadline, when it passed.
    """
    try:
        return await _timed(d, seconds, reactor)
    except defer.TimeoutError:
        raise TakeoverFailed(f"{late} within {seconds:g} s") from None


def connectTo(reactor: Any, path: str, timeout: float) -> Connect:
    """
    How a successor connects: over the Unix socket at C{path}, giving up after C{timeout}
    seconds.
    """
    endpoint = UNIXClientEndpoint(reactor, path, timeout=timeout)
    return lambda protocol: connectProtocol(endpoint, protocol)


async def takeOver(server: GracefulServer, connect: Connect | None = None) -> None:
    """
    Take over from the server listening at C{server.settings.controlPath}.  Every deadline and
    every duration is on C{server.reactor}'s clock.

    @param connect: connects a protocol to the predecessor (L{connectTo} the control path when
        L{None}).
    @raise TakeoverFailed: with the reason, when the predecessor keeps serving.
    """
    settings = server.settings
    reactor = server.reactor
    path = settings.controlPath
    # Start-up left many objects behind: collected now, before the handoff starts, and kept out
    # of later collections, so that no long collection pauses our first requests.
    server.process.settleForHandoff()
    if connect is None:
        connect = connectTo(reactor, path, settings.connectTimeout)
    started = reactor.seconds()
    try:
        link = await connect(ControlProtocol(server.responder))
    except ConnectError as e:
        raise TakeoverFailed(f"no server answers at {path} ({e.__class__.__name__})") from None
    assert isinstance(link, ControlProtocol) and link.transport is not None
    problem = serverIdentityProblem(peerCredentials(link.transport))
    if problem is not None:
        # Before Hello: nothing was asked of it and nothing is adopted.
        link.transport.loseConnection()
        raise TakeoverFailed(f"the server at {path} {problem}; not taking over from it")
    server.adoptPredecessorLink(link)
    deadline = settings.handoffTimeout
    try:
        hello = await _timed(
            link.callRemote(Hello, version=PROTOCOL_VERSION, pid=os.getpid(), standby=True),
            deadline,
            reactor,
        )
    except (HandoffBusy, VersionMismatch) as e:
        link.transport.loseConnection()
        raise TakeoverFailed(str(e)) from None
    except (amp.UnknownRemoteError, NoHandoff):
        link.transport.loseConnection()
        raise TakeoverFailed(f"the process at {path} does not speak this protocol") from None
    except defer.TimeoutError:
        link.transport.loseConnection()
        raise TakeoverFailed(
            f"the process at {path} did not answer Hello within {deadline:g} s"
        ) from None
    except (ConnectionClosed, amp.ProtocolSwitched) as e:
        raise TakeoverFailed(f"{path} closed the connection: {e.__class__.__name__}") from None
    predecessorPid = hello["pid"]
    server.generation = hello["generation"] + 1
    workers = server.workers
    if workers is not None and not settings.workers:
        # No --workers of our own: as many processes as the predecessor has.
        settings.workers = workers.count = hello.get("workers") or 1
    log.info(
        "taking over from pid {pid} (generation {generation})",
        pid=predecessorPid,
        generation=hello["generation"],
    )
    received: list[dict[str, Any]] = []
    adopted: list[Port] = []
    controlPort: Port | None = None
    ports: list[Port] = []
    try:
        start = 0
        while start >= 0:
            answer = await _step(
                link.callRemote(TakeOver, start=start),
                deadline,
                reactor,
                "the predecessor did not hand its listeners over",
            )
            received.extend(answer["listeners"])
            start = answer["next"]
        fdsAt = reactor.seconds()
        ports, controlPort, missing, dropped = _adopt(server, received)
        adopted = ports + [controlPort]
        opened = _openNew(server, missing)
        adopted.extend(opened)
        ports.extend(opened)
        metrics = _openMetrics(server, ports)
        if metrics is not None:
            adopted.append(metrics)
            ports.append(metrics)
        adoptedAt = reactor.seconds()
        # Our workers start (and load the application) while ours gets ready: the commit waits
        # for every one of them, and none accepts before it.
        # (The first failure of either ends the wait: a worker that dies fails the handoff now.)
        waits = [maybeReady(server.ready)]
        if workers is not None:
            waits.append(workers.startWith(ports, server.generation))
        notReady = "the application" + (" or a worker" if workers is not None else "")
        try:
            await _step(
                defer.gatherResults(waits, consumeErrors=True),
                deadline,
                reactor,
                f"{notReady} was not ready",
            )
        except defer.FirstError as e:
            if e.subFailure.check(defer.CancelledError):
                # (Cancelled by the deadline: the hook's own Deferred has no canceller.)
                raise TakeoverFailed(f"{notReady} was not ready within {deadline:g} s") from None
            raise e.subFailure.value from None
        readyAt = reactor.seconds()
        committing = link.callRemote(Commit, dropped=dropped)
        # Right behind the Commit, so answered once the predecessor has paused: final figures.
        counters = _askCounters(link, 0)
        answer = await _step(
            committing, deadline, reactor, "the predecessor did not answer the commit"
        )
        committedAt = reactor.seconds()
        # The predecessor's confirm deadline started when it paused, some time within our round
        # trip (less what it says it waited before pausing).  If the round trip took more than
        # half of the window, too little of it may be left to confirm: give up rather than risk
        # accepting after the predecessor resumed.
        late = committedAt - readyAt - (answer.get("waited") or 0.0)
        if late > answer["confirmWithin"] / 2:
            raise TakeoverFailed(
                f"the commit answer came {late:.1f} s late; the predecessor may already have"
                " resumed"
            )
    except BaseException as e:
        if workers is not None:
            # Every worker of ours stops (none ever accepted); the predecessor's serve on.
            workers.abandon()
        for port in adopted:
            port.release()
        _closeAll(received)
        # Not link.connected: amp.AMP never sets it, so the Abort was never sent.
        if link.transport is not None and not link.transport.disconnecting:  # type: ignore[attr-defined]
            reason = str(e) or e.__class__.__name__
            # Wait (briefly) for the answer: the process exits right after us, and the reactor's
            # shutdown drops unwritten data.
            try:
                await _timed(link.callRemote(Abort, reason=reason), 2.0, reactor)
            except (ConnectionClosed, NoHandoff, amp.RemoteAmpError, defer.TimeoutError):
                pass  # the predecessor rolls back on the lost connection all the same
            if link.transport is not None:
                link.transport.loseConnection()
        if isinstance(e, TakeoverFailed):
            raise
        if isinstance(e, WorkerFailed):
            raise TakeoverFailed(str(e)) from None
        if isinstance(e, ConnectionClosed):
            raise TakeoverFailed("the predecessor closed the control connection") from None
        if isinstance(e, NoHandoff):
            raise TakeoverFailed(f"the predecessor refused: {e}") from None
        raise
    server.listeners.install(ports, controlPort)
    server.beginServing()
    holdMetrics(ports)
    figures = await _counters(link, counters, deadline, reactor)
    if workers is not None and workers.active:
        try:
            await _timed(workers.resume(), answer["confirmWithin"] / 2, reactor)
        except Exception as e:
            # Not confirmed yet: all or nothing, the predecessor resumes all of its own.
            _stepBack(server)
            workers.abandon()
            reason = f"a worker did not start accepting: {e}"
            try:
                await _timed(link.callRemote(Abort, reason=reason), 2.0, reactor)
            except (ConnectionClosed, NoHandoff, amp.RemoteAmpError, defer.TimeoutError):
                pass
            if link.transport is not None:
                link.transport.loseConnection()
            raise TakeoverFailed(f"{reason}; the predecessor serves on") from None
    try:
        await _timed(link.callRemote(Accepting), deadline, reactor)
    except RolledBack as e:
        _stepBack(server)
        if workers is not None:
            workers.abandon()
        raise TakeoverFailed(f"the predecessor rolled back: {e}; it serves on") from None
    except ConnectionClosed:
        # The predecessor resumes on its own only after its confirm deadline: before half of it
        # has passed here, a lost connection means it exited or died, and we serve on.
        late = reactor.seconds() - committedAt > answer["confirmWithin"] / 2
        if late and pidfile.alive(predecessorPid):
            _stepBack(server)
            if workers is not None:
                workers.abandon()
            raise TakeoverFailed(
                "the predecessor dropped the connection too late to confirm; it serves on"
            ) from None
        log.info("the predecessor (pid {pid}) exited at commit", pid=predecessorPid)
    except defer.TimeoutError:
        # Long past its confirm deadline: a predecessor still alive has resumed.
        if pidfile.alive(predecessorPid):
            _stepBack(server)
            if workers is not None:
                workers.abandon()
            raise TakeoverFailed(
                f"the predecessor did not answer Accepting within {deadline:g} s; it serves on"
            ) from None
        log.info("the predecessor (pid {pid}) exited at commit", pid=predecessorPid)
    confirmedAt = reactor.seconds()
    if settings.pidfile:
        server.process.claimPidfile(settings.pidfile)
    _continueFigures(server, figures, hello["generation"])
    server.figures.observeTakeover(
        committedAt - started,
        {
            "fds": fdsAt - started,
            "adopt": adoptedAt - fdsAt,
            "ready": readyAt - adoptedAt,
            "commit": committedAt - readyAt,
            "confirm": confirmedAt - committedAt,
        },
    )
    releaseMetrics(ports)
    log.info(
        "took over from pid {pid} as generation {generation}: handoff {ms:.1f} ms "
        "(connect to commit; fds {fdsMs:.1f} ms, adopt {adoptMs:.1f} ms, ready {readyMs:.1f} ms,"
        " commit {commitMs:.1f} ms, confirm {confirmMs:.1f} ms)",
        pid=predecessorPid,
        generation=server.generation,
        ms=(committedAt - started) * 1000,
        fdsMs=(fdsAt - started) * 1000,
        adoptMs=(adoptedAt - fdsAt) * 1000,
        readyMs=(readyAt - adoptedAt) * 1000,
        commitMs=(committedAt - readyAt) * 1000,
        confirmMs=(confirmedAt - committedAt) * 1000,
        listeners=len(received),
    )


def _stepBack(server: GracefulServer) -> None:
    """
    We started accepting but the predecessor serves on: stop accepting and let go.
    """
    server.pauseAccepting()
    server.releaseListeners()
    server.settings.pidfile = ""


def _closeAll(entries: list[dict[str, Any]]) -> None:
    for entry in entries:
        fd = entry.pop("fd", None)
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass


def _adopt(
    server: GracefulServer, entries: list[dict[str, Any]]
) -> tuple[list[Port], Port, list[Any], list[str]]:
    """
    Adopt the listeners we received (those our own command line keeps, or all of them when it
    names none), not accepting yet.  Every received descriptor is closed on the way.

    @return: the adopted listeners, the control listener, the listener specs of our own
        command line that the predecessor does not have (to be opened anew), and the names of
        the predecessor's listeners we drop (it closes them for good once we accept).
    """
    wanted = list(server.settings.listeners)
    dropped: list[str] = []
    ports: list[Port] = []
    controlPort: Port | None = None
    try:
        for entry in entries:
            fd = entry["fd"]
            problem = listeningSocketProblem(
                fd, "unix" if entry["kind"] == CONTROL_KIND else entry["kind"]
            )
            if problem is not None:
                raise TakeoverFailed(
                    f"the predecessor handed over {entry['name']!r} as a {entry['kind']}"
                    f" listener, but {problem}"
                )
            if entry["kind"] == CONTROL_KIND:
                controlPort = server.listeners.adoptControl(fd)
                continue
            if entry.get("role") == METRICS_ROLE:
                try:
                    metrics = adoptMetrics(server, entry, fd)
                except MetricsUnavailable as e:
                    raise TakeoverFailed(f"the predecessor serves metrics, but {e}") from None
                if metrics is None:
                    dropped.append(entry["name"])
                else:
                    ports.append(metrics)
                continue
            name = entry["name"]
            spec: ListenerSpec | None
            if server.settings.listeners:
                match = findMatch(wanted, name, entry["kind"], entry["address"])
                if match is None:
                    log.info(
                        "not keeping listener {name} ({address}): not on our command line",
                        name=name,
                        address=entry["address"],
                    )
                    dropped.append(entry["name"])
                    continue
                wanted.remove(match)
                name = match.name
                spec = match
            else:
                spec = _predecessorSpec(entry)
            ports.append(
                adoptListener(server.reactor, fd, entry["kind"], server.factory, name, spec=spec)
            )
    except BaseException:
        for port in ports + ([controlPort] if controlPort is not None else []):
            port.release()
        raise
    finally:
        _closeAll(entries)
    if controlPort is None:
        for port in ports:
            port.release()
        raise TakeoverFailed("the predecessor did not hand over its control socket")
    return ports, controlPort, wanted, dropped


def _predecessorSpec(entry: dict[str, Any]) -> ListenerSpec | None:
    """
    What the predecessor says one listener is, read (TLS keys and all) by this process, for a
    successor that names no listeners of its own.
    """
    text = entry.get("spec")
    if not text:
        if entry["kind"] == "ssl":
            raise TakeoverFailed(
                f"the predecessor's TLS listener {entry['name']!r} came without its key and"
                " certificate files: name it with --port"
            )
        return None
    try:
        return parseListener(text)
    except ValueError as e:
        raise TakeoverFailed(f"the predecessor's listener {entry['name']!r}: {e}") from None


def _openNew(server: GracefulServer, specs: list[Any]) -> list[Port]:
    """
    Bind the listeners only our command line names (not accepting yet).
    """
    opened: list[Port] = []
    try:
        for spec in specs:
            opened.append(server.listeners.bind(spec, server.factory))
    except OSError as e:
        for port in opened:
            port.close()
        raise TakeoverFailed(str(e)) from None
    return opened


def _openMetrics(server: GracefulServer, ports: list[Port]) -> Port | None:
    """
    Bind our own metrics listener if the predecessor handed over none at its address.
    """
    try:
        return openMetrics(server, ports)
    except OSError as e:
        raise TakeoverFailed(str(e)) from None


def _askCounters(link: ControlProtocol, start: int) -> Deferred[Any]:
    """
    Ask for a batch of the predecessor's counters; the answer, or L{None} if it has none to
    give (an older predecessor, a lost link).
    """

    def none(failure: Any) -> None:
        if failure.check(amp.UnhandledCommand):
            log.info("the predecessor hands over no counters (an older version): counting from 0")
        elif not failure.check(ConnectionClosed, defer.TimeoutError, NoHandoff, amp.RemoteAmpError):
            log.failure("asking the predecessor for its counters failed", failure)
        else:
            log.info(
                "the predecessor's counters did not arrive ({error}): counting from 0",
                error=failure.getErrorMessage() or failure.type.__name__,
            )
        return None

    return link.callRemote(Counters, start=start).addErrback(none)


async def _counters(
    link: ControlProtocol, first: Deferred[Any], deadline: float, reactor: Any
) -> list[dict[str, Any]]:
    """
    Every batch of the predecessor's counters (none when it gave none).
    """
    answers: list[dict[str, Any]] = []
    d = first
    while True:
        try:
            answer = await _timed(d, deadline, reactor)
        except defer.TimeoutError:
            log.info("the predecessor's counters did not arrive in time: counting from 0")
            return []
        if answer is None:
            return []
        answers.append(answer)
        if answer["next"] < 0:
            return answers
        d = _askCounters(link, answer["next"])


def _continueFigures(
    server: GracefulServer, answers: list[dict[str, Any]], generation: int
) -> None:
    if not answers:
        return
    if answers[0]["version"] != FIGURES_VERSION:
        log.info(
            "the predecessor's counters are of version {version}, not {ours}: counting from 0",
            version=answers[0]["version"],
            ours=FIGURES_VERSION,
        )
        return
    server.figures.inherit(answers, generation)
