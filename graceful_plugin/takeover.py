"""
The successor's side of a handoff, its I/O: connect to the serving process, receive its
listeners, adopt them without accepting, wait for the application, commit, and only then accept.
What comes next, each step's deadline and what a late answer means are the machine's
(L{graceful_plugin.successor}); L{Takeover} does what it asks.

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
from twisted.python.failure import Failure
from zope.interface import implementer

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
from graceful_plugin.successor import (  # TakeoverFailed re-exported: it was here first
    ISuccessorEffects,
    SuccessorCore,
    TakeoverFailed,
    makeSuccessor,
)
from graceful_plugin.workers import WorkerFailed

#: Connects a protocol to the predecessor; fires with it once connected.
Connect = Callable[[ControlProtocol], Deferred[Any]]

#: The generation that takes over (a L{graceful_plugin.server.GracefulServer}, which imports
#: this module: named here by its role only, so that imports point one way).
GracefulServer = Any

log = Logger()


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
    await Takeover(server, connect).start()


@implementer(ISuccessorEffects)
class Takeover:
    """
    One takeover: the I/O of the successor's machine (L{graceful_plugin.successor}), which
    decides what comes next and when a step took too long.
    """

    def __init__(self, server: GracefulServer, connect: Connect | None = None) -> None:
        self.server = server
        self.settings = settings = server.settings
        self.reactor = server.reactor
        self.path = settings.controlPath
        self.connect = connect or connectTo(self.reactor, self.path, settings.connectTimeout)
        self.workers = server.workers
        #: Fires once confirmed, or fails with the reason (the predecessor serves on).
        self.done: Deferred[None] = Deferred()
        self.link: ControlProtocol | None = None
        self.hello: dict[str, Any] = {}
        self.received: list[dict[str, Any]] = []
        self.adopted: list[Port] = []
        self.ports: list[Port] = []
        self.controlPort: Port | None = None
        self.dropped: list[str] = []
        self.counters: Deferred[Any] | None = None
        self.figures: list[dict[str, Any]] = []
        self.confirmWithin = 0.5
        #: When each step ended, on the reactor's clock.
        self.marks: dict[str, float] = {}
        #: Why to tell the predecessor we give up, after we accepted (a worker failed).
        self._abortReason = ""
        self._finished = False
        self.machine = makeSuccessor(
            SuccessorCore(
                clock=self.reactor,
                effects=self,
                handoffTimeout=settings.handoffTimeout,
                path=self.path,
            )
        )

    def start(self) -> Deferred[None]:
        """
        Connect and go through every step; the result is L{done}.
        """
        # Start-up left many objects behind: collected now, before the handoff starts, and kept
        # out of later collections, so that no long collection pauses our first requests.
        self.server.process.settleForHandoff()
        self.marks["started"] = self.reactor.seconds()
        connecting = self.connect(ControlProtocol(self.server.responder))
        # (An error of our own in a callback fails the step it is in, as the I/O would.)
        connecting.addCallbacks(self._connected, self._notConnected).addErrback(self._failed)
        return self.done

    def _failed(self, failure: Failure) -> None:
        self.machine.failed(failure.value)

    # -- connecting -------------------------------------------------------------------------

    def _notConnected(self, failure: Failure) -> None:
        if failure.check(ConnectError):
            self.machine.failed(
                TakeoverFailed(f"no server answers at {self.path} ({failure.type.__name__})")
            )
            return
        self._failed(failure)

    def _connected(self, link: ControlProtocol) -> None:
        assert isinstance(link, ControlProtocol) and link.transport is not None
        self.link = link
        problem = serverIdentityProblem(peerCredentials(link.transport))
        if problem is not None:
            # Before Hello: nothing was asked of it and nothing is adopted.
            self.machine.failed(
                TakeoverFailed(f"the server at {self.path} {problem}; not taking over from it")
            )
            return
        self.server.adoptPredecessorLink(link)
        self.machine.connected()

    # -- ISuccessorEffects ------------------------------------------------------------------

    def sendHello(self) -> None:
        assert self.link is not None
        hello = self.link.callRemote(Hello, version=PROTOCOL_VERSION, pid=os.getpid(), standby=True)
        hello.addCallbacks(self._greeted, self._helloFailed).addErrback(self._failed)

    def _helloFailed(self, failure: Failure) -> None:
        error = failure.value
        if failure.check(HandoffBusy, VersionMismatch):
            error = TakeoverFailed(str(error))
        elif failure.check(amp.UnknownRemoteError, NoHandoff):
            error = TakeoverFailed(f"the process at {self.path} does not speak this protocol")
        elif failure.check(ConnectionClosed, amp.ProtocolSwitched):
            error = TakeoverFailed(f"{self.path} closed the connection: {error.__class__.__name__}")
        self.machine.failed(error)

    def _greeted(self, hello: dict[str, Any]) -> None:
        self.hello = hello
        server = self.server
        server.generation = hello["generation"] + 1
        workers = self.workers
        if workers is not None and not self.settings.workers:
            # No --workers of our own: as many processes as the predecessor has.
            self.settings.workers = workers.count = hello.get("workers") or 1
        log.info(
            "taking over from pid {pid} (generation {generation})",
            pid=hello["pid"],
            generation=hello["generation"],
        )
        self.machine.greeted()

    def askListeners(self) -> None:
        self._askBatch(0)

    def _askBatch(self, start: int) -> None:
        assert self.link is not None
        asked = self.link.callRemote(TakeOver, start=start)
        asked.addCallbacks(self._batch, self._failed).addErrback(self._failed)

    def _batch(self, answer: dict[str, Any]) -> None:
        if self._finished:
            # Too late (we gave up): these descriptors are nobody's.
            _closeAll(answer["listeners"])
            return
        self.received.extend(answer["listeners"])
        if answer["next"] >= 0:
            self._askBatch(answer["next"])
            return
        self.marks["fds"] = self.reactor.seconds()
        self.machine.listenersReceived()

    def adopt(self) -> None:
        server = self.server
        try:
            ports, controlPort, missing, self.dropped = _adopt(server, self.received)
            self.controlPort = controlPort
            self.adopted = ports + [controlPort]
            opened = _openNew(server, missing)
            self.adopted.extend(opened)
            ports.extend(opened)
            metrics = _openMetrics(server, ports)
            if metrics is not None:
                self.adopted.append(metrics)
                ports.append(metrics)
        except Exception as e:
            self.machine.failed(e)
            return
        self.ports = ports
        self.marks["adopted"] = self.reactor.seconds()
        # Our workers start (and load the application) while ours gets ready: the commit waits
        # for every one of them, and none accepts before it.
        # (The first failure of either ends the wait: a worker that dies fails the handoff now.)
        waits = [maybeReady(server.ready)]
        if self.workers is not None:
            waits.append(self.workers.startWith(ports, server.generation))
        ready = defer.gatherResults(waits, consumeErrors=True)
        ready.addCallbacks(lambda _: self.machine.ready(), self._notReady).addErrback(self._failed)

    def _notReady(self, failure: Failure) -> None:
        if failure.check(defer.FirstError):
            failure = failure.value.subFailure
        self._failed(failure)

    def sendCommit(self) -> None:
        assert self.link is not None
        self.marks["ready"] = self.reactor.seconds()
        committing = self.link.callRemote(Commit, dropped=self.dropped)
        # Right behind the Commit, so answered once the predecessor has paused: final figures.
        self.counters = _askCounters(self.link, 0)
        committing.addCallbacks(self._commitAnswered, self._failed).addErrback(self._failed)

    def _commitAnswered(self, answer: dict[str, Any]) -> None:
        self.marks["committed"] = self.reactor.seconds()
        self.confirmWithin = answer["confirmWithin"]
        self.machine.commitAnswered(answer["confirmWithin"], answer.get("waited") or 0.0)

    def startAccepting(self) -> None:
        Deferred.fromCoroutine(self._confirm()).addErrback(self._failed)

    async def _confirm(self) -> None:
        link, reactor = self.link, self.reactor
        assert link is not None and self.counters is not None
        # The counters come right behind the Commit answer (asked for with it).  Take them before
        # accepting, so that from our first accept to Accepting no reactor turn passes: the
        # fewer connections we hold unconfirmed, the fewer a successor that dies there takes
        # with it.  (A predecessor that never answers resumes at its confirm deadline.)
        self.figures = await _counters(link, self.counters, self.settings.handoffTimeout, reactor)
        server = self.server
        server.listeners.install(self.ports, self.controlPort)
        server.beginServing()
        holdMetrics(self.ports)
        workers = self.workers
        if workers is not None and workers.active:
            try:
                await _timed(workers.resume(), self.confirmWithin / 2, reactor)
            except Exception as e:
                # Not confirmed yet: all or nothing, the predecessor resumes all of its own.
                self._abortReason = f"a worker did not start accepting: {e}"
                self.machine.failed(
                    TakeoverFailed(f"{self._abortReason}; the predecessor serves on")
                )
                return
        try:
            await link.callRemote(Accepting)
        except RolledBack as e:
            self.machine.failed(TakeoverFailed(f"the predecessor rolled back: {e}; it serves on"))
            return
        except ConnectionClosed:
            self.machine.linkLost()
            return
        self.machine.acceptingAnswered()

    def predecessorAlive(self) -> bool:
        return pidfile.alive(self.hello["pid"])

    def confirmed(self, exitedAtCommit: bool) -> None:
        self._finished = True
        if exitedAtCommit:
            log.info("the predecessor (pid {pid}) exited at commit", pid=self.hello["pid"])
        server, marks = self.server, self.marks
        marks["confirmed"] = self.reactor.seconds()
        if self.settings.pidfile:
            server.process.claimPidfile(self.settings.pidfile)
        _continueFigures(server, self.figures, self.hello["generation"])
        started, fdsAt, adoptedAt = marks["started"], marks["fds"], marks["adopted"]
        readyAt, committedAt, confirmedAt = marks["ready"], marks["committed"], marks["confirmed"]
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
        releaseMetrics(self.ports)
        log.info(
            "took over from pid {pid} as generation {generation}: handoff {ms:.1f} ms "
            "(connect to commit; fds {fdsMs:.1f} ms, adopt {adoptMs:.1f} ms, ready {readyMs:.1f}"
            " ms, commit {commitMs:.1f} ms, confirm {confirmMs:.1f} ms)",
            pid=self.hello["pid"],
            generation=server.generation,
            ms=(committedAt - started) * 1000,
            fdsMs=(fdsAt - started) * 1000,
            adoptMs=(adoptedAt - fdsAt) * 1000,
            readyMs=(readyAt - adoptedAt) * 1000,
            commitMs=(committedAt - readyAt) * 1000,
            confirmMs=(confirmedAt - committedAt) * 1000,
            listeners=len(self.received),
        )
        self.done.callback(None)

    def giveUp(self, error: BaseException) -> None:
        self._finished = True
        link = self.link
        if link is not None and link.transport is not None:
            link.transport.loseConnection()
        self.done.errback(error)

    def abort(self, error: BaseException) -> None:
        self._finished = True
        if self.workers is not None:
            # Every worker of ours stops (none ever accepted); the predecessor's serve on.
            self.workers.abandon()
        for port in self.adopted:
            port.release()
        _closeAll(self.received)
        told = self._tellAbort(str(error) or error.__class__.__name__)
        told.addCallback(lambda _: self.done.errback(_reason(error)))

    def stepBack(self, error: BaseException) -> None:
        self._finished = True
        _stepBack(self.server)
        if self.workers is not None:
            self.workers.abandon()
        told: Deferred[None] = succeed(None)
        if self._abortReason:
            told = self._tellAbort(self._abortReason)
        told.addCallback(lambda _: self.done.errback(error))

    def _tellAbort(self, reason: str) -> Deferred[None]:
        """
        Tell the predecessor why we give up, and close the link (C{Abort} is awaited briefly: the
        process exits right after us, and the reactor's shutdown drops unwritten data).
        """
        link = self.link
        # Not link.connected: amp.AMP never sets it, so the Abort was never sent.
        if link is None or link.transport is None or link.transport.disconnecting:  # type: ignore[attr-defined]
            return succeed(None)

        def close(_: object) -> None:
            if link.transport is not None:
                link.transport.loseConnection()

        told = _timed(link.callRemote(Abort, reason=reason), 2.0, self.reactor)

        def unanswered(failure: Failure) -> None:
            # The predecessor rolls back on the lost connection all the same.
            if not failure.check(
                ConnectionClosed, NoHandoff, amp.RemoteAmpError, defer.TimeoutError
            ):
                log.failure("telling the predecessor why we give up failed", failure)

        return told.addErrback(unanswered).addCallback(close)


def _reason(error: BaseException) -> BaseException:
    """
    What a takeover that aborted before accepting fails with: a sentence where one is known.
    """
    if isinstance(error, TakeoverFailed):
        return error
    if isinstance(error, WorkerFailed):
        return TakeoverFailed(str(error))
    if isinstance(error, ConnectionClosed):
        return TakeoverFailed("the predecessor closed the control connection")
    if isinstance(error, NoHandoff):
        return TakeoverFailed(f"the predecessor refused: {error}")
    return error


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
                    metrics = adoptMetrics(server.gen, entry, fd)
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
        return openMetrics(server.gen, ports)
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
