"""
The ``twistd graceful`` command: options and the service they make.
"""

from __future__ import annotations

import os
import socket
import stat
from typing import Any

from twisted.application import service
from twisted.python import usage

from graceful_plugin import pidfile, process
from graceful_plugin.apps import ApplicationError, loadApplication
from graceful_plugin.control import MAX_SECONDS
from graceful_plugin.lifecycle import SystemdNotifications, activatedSockets, planActivation
from graceful_plugin.listeners import ListenerSpec, parseListener, raiseFileLimit
from graceful_plugin.logfile import SharedLogService
from graceful_plugin.metrics import MetricsUnavailable, parseMetrics, requirePrometheus
from graceful_plugin.restart import parseRestartCommand, restartCommand
from graceful_plugin.server import GracefulServer, Settings
from graceful_plugin.systemd import Notifier
from graceful_plugin.web import demoSite


def _positiveSeconds(name: str) -> Any:
    def coerce(value: str) -> float:
        try:
            seconds = float(value)
        except ValueError:
            raise ValueError(f"--{name} takes a number of seconds, not {value!r}") from None
        if not seconds > 0:
            raise ValueError(f"--{name} must be more than 0 seconds")
        if not seconds <= MAX_SECONDS:
            # (inf included: a deadline that never comes is no deadline.)
            raise ValueError(f"--{name} must be at most {MAX_SECONDS:g} seconds (a year)")
        return seconds

    coerce.coerceDoc = "Seconds."  # type: ignore[attr-defined]
    return coerce


def _positiveCount(name: str) -> Any:
    def coerce(value: str) -> int:
        try:
            count = int(value)
        except ValueError:
            raise ValueError(f"--{name} takes a whole number, not {value!r}") from None
        if count < 1:
            raise ValueError(f"--{name} must be at least 1")
        return count

    coerce.coerceDoc = "A whole number, at least 1."  # type: ignore[attr-defined]
    return coerce


#: What a usage error prints before its sentence (instead of the whole --help).
USAGE_HINT = "(twistd graceful --help lists every option)"


class Options(usage.Options):
    """
    Options of ``twistd graceful``.
    """

    synopsis = "[options]"
    longdesc = (
        "Serve with zero-downtime restarts. Start with --port; later, start the new code with "
        "--takeover CONTROL_PATH: it takes the listening sockets over, and the old process stops "
        "accepting, drains its connections and exits."
    )

    optFlags = [
        [
            "no-fork-server",
            None,
            "Start every successor in full, not as a fork of a fork server that has imported "
            "Twisted and graceful once.",
        ],
    ]

    optParameters = [
        ["control", "c", "graceful.sock", "Path of the control socket (mode 0600)."],
        [
            "handoff-timeout",
            None,
            30.0,
            "Seconds a successor has from hello to commit before the handoff is rolled back.",
            _positiveSeconds("handoff-timeout"),
        ],
        [
            "confirm-timeout",
            None,
            0.5,
            "Seconds a successor has from commit to confirming it accepts (new connections wait"
            " this long behind a successor stalled after commit).",
            _positiveSeconds("confirm-timeout"),
        ],
        [
            "drain-timeout",
            None,
            60.0,
            "Seconds existing connections have to finish once draining; then they are closed.",
            _positiveSeconds("drain-timeout"),
        ],
        [
            "max-draining",
            None,
            4,
            "How many older generations may be draining at once; past it a takeover is refused.",
            _positiveCount("max-draining"),
        ],
    ]

    def opt_restart_command(self, command: str) -> None:
        """
        The command that starts a successor on `graceful-ctl restart`, SIGHUP or SIGUSR2 (split
        like a shell would, run without one); it must itself take over with --takeover.
        Default: this process's own command line plus --takeover CONTROL.
        """
        try:
            self["restart-command"] = parseRestartCommand(command)
        except ValueError as e:
            raise usage.UsageError(f"--restart-command: {e}") from None

    # usage.Options prints a docstring's indentation as it is: one line reads better in --help.
    opt_restart_command.__doc__ = " ".join((opt_restart_command.__doc__ or "").split())

    #: Set once parsing failed: twistd then prints our usage before the error's sentence.
    _failed = False

    #: Runs a successor's start-up at idle priority (a test gives its own, so that the test
    #: process keeps its scheduling).
    lowerPriority = staticmethod(process.lowerPriority)

    def parseOptions(self, options: Any = None) -> None:
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            self._failed = True
            # usage.Options puts this before the sentence our coercers give.
            message = str(e).removeprefix("Parameter type enforcement failed: ")
            raise usage.UsageError(message) from None

    def getUsage(self, width: int | None = None) -> str:
        if self._failed:
            # twistd prints this, then the error's sentence: a hint, not 38 lines of --help.
            return USAGE_HINT
        return str(super().getUsage(width))

    def __init__(self) -> None:
        super().__init__()
        self["ports"] = []
        self["takeover"] = None
        self["application"] = None
        self["app"] = None
        self["metrics"] = None
        self["workers"] = None

    def opt_workers(self, value: str) -> None:
        """
        How many processes serve, N or auto (one per CPU this process may run on): this one
        and N-1 worker processes accepting on the same sockets (default 1: this process
        alone). A successor that names none keeps its predecessor's count.
        """
        try:
            self["workers"] = parseWorkers(value)
        except ValueError as e:
            raise usage.UsageError(f"--workers: {e}") from None

    opt_workers.__doc__ = " ".join((opt_workers.__doc__ or "").split())

    def opt_port(self, spec: str) -> None:
        """
        A listener, repeatable: 8080, tcp:8080:interface=127.0.0.1, tcp6:8080:interface=::1,
        unix:/run/app.sock:mode=0660, ssl:8443:privateKey=K:certKey=C, udp:5353 (with
        --factory); each optionally named: web=tcp:8080.
        """
        try:
            self["ports"].append(parseListener(spec))
        except ValueError as e:
            raise usage.UsageError(f"--port {e}") from None

    opt_p = opt_port

    def opt_metrics(self, spec: str) -> None:
        """
        Serve Prometheus metrics on this listener (tcp or unix, as --port: tcp:9100:interface=
        127.0.0.1), from the serving generation; a successor without --metrics keeps it.
        """
        try:
            requirePrometheus()
            self["metrics"] = parseMetrics(spec)
        except MetricsUnavailable as e:
            raise usage.UsageError(str(e)) from None
        except ValueError as e:
            raise usage.UsageError(f"--metrics {e}") from None

    def opt_takeover(self, path: str) -> None:
        """
        Take over from the server whose control socket is PATH; the old one drains and exits.
        """
        self["takeover"] = path

    def _application(self, kind: str, name: str) -> None:
        if self["application"] is not None:
            raise usage.UsageError(
                f"--{kind}: name one application only (already --{self['application'][0]})"
            )
        self["application"] = (kind, name)

    def opt_wsgi(self, name: str) -> None:
        """
        Serve the WSGI application at this dotted name (pkg.module.app), in the reactor's thread
        pool.
        """
        self._application("wsgi", name)

    def opt_resource(self, name: str) -> None:
        """
        Serve the web resource (IResource, or a callable returning one) at this dotted name.
        """
        self._application("resource", name)

    def opt_factory(self, name: str) -> None:
        """
        Serve the protocol factory (IProtocolFactory, a factory or protocol class, or a callable
        returning a factory) at this dotted name, for raw protocols.
        """
        self._application("factory", name)

    def opt_path(self, directory: str) -> None:
        """
        Serve the static files in this directory.
        """
        self._application("path", directory)

    def _loadApplication(self) -> None:
        if self["application"] is not None:
            kind, name = self["application"]
            try:
                self["app"] = loadApplication(kind, name)
            except ApplicationError as e:
                raise usage.UsageError(str(e)) from None
        # A datagram protocol serves udp listeners, and only it does.
        datagram = self["app"] is not None and self["app"].datagram
        for spec in self["ports"]:
            if spec.kind == "udp" and not datagram:
                raise usage.UsageError(
                    f"--port {spec.name}: a udp listener needs --factory naming a DatagramProtocol"
                )
            if spec.kind != "udp" and datagram:
                raise usage.UsageError(
                    f"--factory {self['app'].name} is a datagram protocol: it serves udp listeners"
                    f" only, and --port {spec.name} is {spec.kind}"
                )

    def postOptions(self) -> None:
        ports: list[ListenerSpec] = self["ports"]
        names = [p.name for p in ports]
        duplicate = next((n for n in names if names.count(n) > 1), None)
        if duplicate is not None:
            raise usage.UsageError(f"--port: the listener name {duplicate!r} is given twice")
        metrics = self["metrics"]
        if metrics is not None and metrics.name in names:
            raise usage.UsageError(
                f"--metrics: the listener name {metrics.name!r} is also a --port's; name one"
                " of them otherwise"
            )
        if self["takeover"]:
            self["control"] = self["takeover"]
        self["control"] = os.path.abspath(self["control"])
        # twistd's pidfile would refuse a takeover and be deleted by the exiting predecessor:
        # the generations manage it themselves.
        self["pidfile"] = ""
        parent = getattr(self, "parent", None)
        if parent is not None and parent.get("pidfile"):
            self["pidfile"] = os.path.abspath(parent["pidfile"])
            parent["pidfile"] = ""
        if self["takeover"]:
            _checkControlSocket(self["control"])
            # Our own application, imported before we connect: a bad one is a usage error and
            # never disturbs the serving process.  Its import is the bulk of our start-up, so
            # it runs at idle priority (the one process effect here: loading the application
            # is what checks it, and twistd turns only postOptions' errors into sentences).
            self.lowerPriority()
            self._loadApplication()
            return
        self["activated"] = _activatedSockets()
        _checkActivation(ports, self["activated"])
        if not ports and not self["activated"]:
            raise usage.UsageError(
                "name at least one listener with --port (for example --port 8080), "
                "or take over from a running server with --takeover PATH"
            )
        running = pidfile.livePid(self["pidfile"]) if self["pidfile"] else None
        if running is not None:
            raise usage.UsageError(
                f"a server is already running (pid {running} in {self['pidfile']}); "
                f"to replace it, use --takeover {self['control']}"
            )
        self._loadApplication()


def parseWorkers(value: str) -> int:
    """
    A C{--workers} value: a whole number of at least 1, or C{auto} for one per CPU this
    process may run on.

    @raise ValueError: with a sentence, for anything else.
    """
    if value == "auto":
        return len(os.sched_getaffinity(0))
    try:
        count = int(value)
    except ValueError:
        raise ValueError(f"takes a whole number or auto, not {value!r}") from None
    if count < 1:
        raise ValueError("must be at least 1")
    return count


def _activatedSockets() -> list[Any]:
    """
    The listening sockets systemd passed us (socket activation), if any.
    """
    try:
        return activatedSockets()
    except ValueError as e:
        raise usage.UsageError(f"socket activation: {e}") from None


def _checkActivation(ports: list[ListenerSpec], activated: list[Any]) -> None:
    """
    Refuse, with a sentence, a socket systemd passed under a listener's name that the listener
    cannot serve.
    """
    if ports and activated:
        try:
            planActivation(ports, activated)
        except ValueError as e:
            raise usage.UsageError(f"socket activation: {e}") from None


def _checkControlSocket(path: str) -> None:
    """
    Fail early, with a sentence, when nothing could be taken over at C{path}.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise usage.UsageError(
            f"--takeover: there is no control socket at {path} (is the server running, and is "
            "this its --control path?)"
        ) from None
    except OSError as e:
        raise usage.UsageError(f"--takeover: cannot reach {path}: {e.strerror}") from None
    if not stat.S_ISSOCK(mode):
        raise usage.UsageError(f"--takeover: {path} is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(5)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        raise usage.UsageError(
            f"--takeover: nothing listens at {path} (a stale socket left by a server that died?)"
        ) from None
    except PermissionError:
        raise usage.UsageError(f"--takeover: permission denied on {path}") from None
    except OSError as e:
        raise usage.UsageError(f"--takeover: cannot connect to {path}: {e.strerror}") from None
    finally:
        probe.close()


def makeService(options: Options) -> service.IService:
    """
    The graceful server for C{options}, serving the application it names (the demo application
    when it names none).
    """
    raiseFileLimit()
    settings = Settings(
        listeners=list(options["ports"]),
        controlPath=options["control"],
        takeover=bool(options["takeover"]),
        pidfile=options["pidfile"],
        handoffTimeout=options["handoff-timeout"],
        confirmTimeout=options["confirm-timeout"],
        drainTimeout=options["drain-timeout"],
        maxDraining=options["max-draining"],
        restartCommand=restartCommand(options.get("restart-command"), options["control"]),
        restartDirectory=os.getcwd(),
        forkServer=not options["no-fork-server"],
        activated=options.get("activated") or [],
        metrics=options["metrics"],
        # 0: as many as the predecessor has (a takeover that names none).
        workers=options["workers"] or (0 if options["takeover"] else 1),
    )
    holder: dict[str, GracefulServer] = {}
    app = options["app"]
    if app is None:
        factory = demoSite(lambda: holder["server"].generation)
        ready = None
    else:
        factory = app.factory()
        ready = app.ready()
    server = GracefulServer(settings, factory, ready=ready)
    server.twistdConfig = getattr(options, "parent", None)
    holder["server"] = server
    server.observers.append(SystemdNotifications(Notifier.fromEnvironment(), server.reactor))
    # Every generation appends to the one log file twistd names (graceful_plugin.logfile).
    top = SharedLogService(server.twistdConfig)
    server.setServiceParent(top)
    if settings.workers != 1:
        # (Start-up cost: only a generation with workers loads their supervision.)
        from graceful_plugin.workerspawn import WorkerSupervisor

        application = list(options["application"]) if options["application"] else None
        supervisor = WorkerSupervisor(
            settings.workers,
            application,
            settings.drainTimeout,
            server.reactor,
            sessionsChanged=server.workersChanged,
            forker=server.restarter.launcher,
        )
        server.workers = supervisor
        server.observers.append(supervisor)
        supervisor.setServiceParent(top)
    return top
