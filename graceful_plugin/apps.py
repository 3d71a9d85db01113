"""
Applications: what ``--wsgi``, ``--resource``, ``--factory`` and ``--path`` name, loaded by the
process whose command line names them (so a successor runs its own, new code), and the readiness
interface an application may provide.

Loading happens in two steps: L{loadApplication} imports the object and checks its kind (in
C{postOptions}, before a successor connects to anyone, so that a bad name never disturbs the
serving process), and L{Application.factory} builds the protocol factory once the reactor runs.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IProtocol, IProtocolFactory
from twisted.internet.protocol import Factory
from twisted.web.resource import IResource
from zope.interface import Interface

from graceful_plugin.listeners import isDatagramProtocol

#: The application kinds, in the order the options list them.
KINDS = ("wsgi", "resource", "factory", "path")


class IReady(Interface):
    """
    An application that needs time before it can take traffic (warming caches, opening database
    pools).  A successor calls L{ready} after adopting the listeners and commits the handoff only
    once the L{Deferred} fires; if it fails, the handoff is rolled back and the serving process
    serves on.
    """

    def ready() -> Deferred[Any]:
        """
        Prepare to serve.

        @return: a L{Deferred} that fires when the application can take traffic (a plain value
            means it can at once).
        """


class ApplicationError(Exception):
    """
    The application named on the command line cannot be used; the message is one sentence a user
    understands.
    """


@dataclass
class Application:
    """
    An application named on the command line, imported and checked.

    @ivar kind: one of L{KINDS}.
    @ivar name: what the command line said (a dotted name, or a directory for ``path``).
    @ivar obj: the imported object (the directory's absolute path for ``path``).
    """

    kind: str
    name: str
    obj: Any

    @property
    def datagram(self) -> bool:
        """
        Whether this is a datagram protocol, which serves ``udp`` listeners (and only those).
        """
        return self.kind == "factory" and isDatagramProtocol(self.obj)

    def factory(self, reactor: Any = None) -> Any:
        """
        The protocol factory that serves this application: a site draining politely for the web
        kinds, the factory itself for ``factory``.
        """
        from graceful_plugin.websocket import registerDrainAdapters

        try:
            return self._factory(reactor)
        finally:
            # After the application built its factory: if it serves WebSockets with autobahn,
            # it has imported autobahn by now.
            registerDrainAdapters()

    def _factory(self, reactor: Any) -> Any:
        from graceful_plugin.web import drainableSite

        if self.kind == "factory":
            if isDatagramProtocol(self.obj):
                return self.obj
            return _asFactory(self.obj, self.name)
        if self.kind == "wsgi":
            from graceful_plugin.wsgi import WSGIResource

            if reactor is None:
                from twisted.internet import reactor as _reactor

                reactor = _reactor
            root: Any = WSGIResource(reactor, reactor.getThreadPool(), self.obj)
        elif self.kind == "resource":
            root = _asResource(self.obj, self.name)
        else:
            from twisted.web.static import File

            root = File(self.obj)
        return drainableSite(root)

    def ready(self) -> Callable[[], Deferred[Any]] | None:
        """
        The readiness hook to await before committing a handoff, if the application has one.
        """
        provider = IReady(self.obj, None)
        if provider is None:
            return None
        return lambda: maybeDeferred(provider.ready)


def importObject(dotted: str) -> Any:
    """
    Import C{pkg.module.attribute} (or C{pkg.module:attribute}); the working directory is searched
    after C{sys.path}, as people expect of a command run from their project.

    @raise ApplicationError: with one sentence naming what is missing or failed.
    """
    if ":" in dotted:
        moduleName, _, attribute = dotted.partition(":")
    else:
        moduleName, _, attribute = dotted.rpartition(".")
    if (
        not moduleName
        or not attribute
        or not all(part.isidentifier() for part in moduleName.split(".") + attribute.split("."))
    ):
        raise ApplicationError(f"{dotted!r} is not a name like package.module.attribute")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.append(cwd)
    try:
        module = importlib.import_module(moduleName)
    except ModuleNotFoundError as e:
        if e.name and moduleName.startswith(e.name):
            raise ApplicationError(
                f"cannot import {moduleName!r} for {dotted!r}: there is no module {e.name!r}"
                " (is it on PYTHONPATH?)"
            ) from None
        raise ApplicationError(f"importing {moduleName!r} failed: {_describe(e)}") from None
    except SystemExit as e:
        # An application that exits at import would otherwise end the process with its status
        # and not a word in the log.
        raise ApplicationError(
            f"importing {moduleName!r} failed: it called sys.exit({e.code!r})"
        ) from None
    except Exception as e:
        raise ApplicationError(f"importing {moduleName!r} failed: {_describe(e)}") from None
    obj: Any = module
    for part in attribute.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ApplicationError(
                f"module {moduleName!r} has no attribute {attribute!r}"
            ) from None
    return obj


def _describe(error: BaseException) -> str:
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _asFactory(obj: Any, name: str) -> Any:
    if IProtocolFactory.providedBy(obj):
        return obj
    if isinstance(obj, type) and IProtocolFactory.implementedBy(obj):
        return _call(obj, name)
    if isinstance(obj, type) and IProtocol.implementedBy(obj):
        return Factory.forProtocol(obj)
    if callable(obj):
        made = _call(obj, name)
        if IProtocolFactory.providedBy(made):
            return made
    raise ApplicationError(
        f"--factory {name}: not a protocol factory (IProtocolFactory), a factory class, a protocol"
        " class, a callable returning a factory, or a DatagramProtocol (for udp listeners)"
    )


def _asResource(obj: Any, name: str) -> Any:
    if IResource.providedBy(obj):
        return obj
    if callable(obj):
        made = _call(obj, name)
        if IResource.providedBy(made):
            return made
    raise ApplicationError(
        f"--resource {name}: not a web resource (IResource) or a callable returning one"
    )


def _call(obj: Any, name: str) -> Any:
    try:
        return obj()
    except SystemExit as e:
        raise ApplicationError(
            f"{name}: calling it failed: it called sys.exit({e.code!r})"
        ) from None
    except Exception as e:
        raise ApplicationError(f"{name}: calling it failed: {_describe(e)}") from None


def loadApplication(kind: str, name: str) -> Application:
    """
    Import and check the application C{name} of C{kind}.

    For ``factory`` and ``resource``, a class or callable is called here (with no arguments), so
    that whatever it does at start-up happens before a successor connects.

    @raise ApplicationError: with one sentence.
    """
    if kind == "path":
        path = os.path.abspath(name)
        if not os.path.isdir(path):
            raise ApplicationError(f"--path {name}: no such directory")
        return Application(kind, name, path)
    obj = importObject(name)
    if kind == "wsgi":
        if not callable(obj):
            raise ApplicationError(
                f"--wsgi {name}: not a WSGI application (a callable taking environ and"
                " start_response)"
            )
    elif kind == "factory":
        if not isDatagramProtocol(obj):
            obj = _asFactory(obj, name)
    elif kind == "resource":
        obj = _asResource(obj, name)
    else:
        raise ApplicationError(f"unknown application kind {kind!r}")
    return Application(kind, name, obj)
