"""
The successor's side of a handoff as a state machine: connecting, greeting (Hello sent),
receiving (the listeners), adopting (adopted, waiting for the application), committing (Commit
sent), accepting (we accept, waiting for the predecessor's confirmation), confirmed; or stepped
back from any of them.

Each waiting state has a deadline, a call on the clock, so every path runs in memory with a
L{twisted.internet.task.Clock}.  The machine decides; the L{ISuccessorEffects} provider it is
given does the I/O (L{graceful_plugin.takeover}).  Nobody reads its state: callers give it
inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from automat import TypeMachineBuilder
from twisted.internet.interfaces import IReactorTime
from zope.interface import Interface

from graceful_plugin.machine import Deadline


class ISuccessorEffects(Interface):
    """
    What the successor's machine asks of the world around it.
    """

    def sendHello() -> None:
        """
        Say Hello to the predecessor.
        """

    def askListeners() -> None:
        """
        Ask for every batch of the predecessor's listeners.
        """

    def adopt() -> None:
        """
        Adopt the listeners received (not accepting), open our own, and wait for the application
        (and our workers) to be ready.
        """

    def sendCommit() -> None:
        """
        Ask the predecessor to pause accepting.
        """

    def startAccepting() -> None:
        """
        Accept on every listener, then tell the predecessor (Accepting).
        """

    def predecessorAlive() -> bool:
        """
        Whether the predecessor's process still lives.
        """

    def confirmed(exitedAtCommit: bool) -> None:
        """
        The handoff is done: we serve (C{exitedAtCommit}: the predecessor exited right after
        our commit rather than confirm).
        """

    def giveUp(error: BaseException) -> None:
        """
        Before anything was adopted: close the link, and fail with C{error}.
        """

    def abort(error: BaseException) -> None:
        """
        Before we accepted: let go of everything adopted or received, tell the predecessor why
        (Abort), and fail with C{error}.
        """

    def stepBack(error: BaseException) -> None:
        """
        We accepted, but the predecessor serves on: stop accepting, let go, and fail with
        C{error}.
        """


class TakeoverFailed(Exception):
    """
    A takeover could not be completed; the predecessor serves on.
    """


class SuccessorInputs(Protocol):
    """
    The inputs of the successor's machine.
    """

    def connected(self) -> None:
        """
        The link to the predecessor is up (and it is one we take over from).
        """

    def greeted(self) -> None:
        """
        The predecessor answered Hello.
        """

    def listenersReceived(self) -> None:
        """
        Every batch of listeners arrived.
        """

    def ready(self) -> None:
        """
        The application (and every worker) is ready.
        """

    def commitAnswered(self, confirmWithin: float, waited: float) -> None:
        """
        The predecessor paused: it resumes by itself C{confirmWithin} seconds after it did,
        which was C{waited} seconds after it got our Commit.
        """

    def acceptingAnswered(self) -> None:
        """
        The predecessor confirmed: it only drains now.
        """

    def linkLost(self) -> None:
        """
        The link to the predecessor closed.
        """

    def failed(self, error: BaseException) -> None:
        """
        A step failed with C{error}.
        """

    def commitInTime(self) -> None:
        """
        (The machine's own decision: the commit answer left enough of the confirm window.)
        """

    def predecessorExited(self) -> None:
        """
        (The machine's own decision: the predecessor, gone, exited at our commit.)
        """

    def timedOut(self) -> None:
        """
        The current step's deadline passed.
        """

    def describe(self) -> str:
        """
        The current step, in a word (for the log).
        """


@dataclass
class SuccessorCore:
    """
    What every state shares.

    @ivar handoffTimeout: seconds each step may take.
    @ivar readyAt: when we sent Commit (the confirm window is counted from about then).
    @ivar committedAt: when the Commit answer arrived.
    @ivar confirmWithin: the predecessor's confirm window.
    """

    clock: IReactorTime
    effects: ISuccessorEffects
    handoffTimeout: float = 30.0
    path: str = ""
    readyAt: float = 0.0
    committedAt: float = 0.0
    confirmWithin: float = 0.5
    marks: dict[str, float] = field(default_factory=dict)


def _deadline(inputs: SuccessorInputs, core: SuccessorCore) -> Deadline:
    return Deadline(core.clock.callLater(core.handoffTimeout, inputs.timedOut))


builder = TypeMachineBuilder(SuccessorInputs, SuccessorCore)
connecting = builder.state("connecting")
greeting = builder.state("greeting", _deadline)
receiving = builder.state("receiving", _deadline)
adopting = builder.state("adopting", _deadline)
committing = builder.state("committing", _deadline)
accepting = builder.state("accepting", _deadline)
confirmed = builder.state("confirmed")
steppedBack = builder.state("stepped_back")

_waiting = (greeting, receiving, adopting, committing, accepting)
for _state in (connecting, confirmed, steppedBack):
    _state.upon(SuccessorInputs.describe).loop().returns(_state.name)
for _dataState in _waiting:
    _dataState.upon(SuccessorInputs.describe).loop().returns(_dataState.name)

# Inputs that mean nothing in a state are ignored there (a late answer, a second failure).
_INPUTS = (
    SuccessorInputs.connected,
    SuccessorInputs.greeted,
    SuccessorInputs.listenersReceived,
    SuccessorInputs.ready,
    SuccessorInputs.commitAnswered,
    SuccessorInputs.acceptingAnswered,
    SuccessorInputs.linkLost,
    SuccessorInputs.failed,
    SuccessorInputs.timedOut,
    SuccessorInputs.commitInTime,
    SuccessorInputs.predecessorExited,
)
for _final in (confirmed, steppedBack):
    for _input in _INPUTS:
        _final.upon(_input).loop().returns(None)


def _late(core: SuccessorCore, what: str) -> TakeoverFailed:
    return TakeoverFailed(f"{what} within {core.handoffTimeout:g} s")


# connecting: no deadline of ours (the connection attempt has its own).
@connecting.upon(SuccessorInputs.connected).to(greeting)
def _connected(inputs: SuccessorInputs, core: SuccessorCore) -> None:
    core.effects.sendHello()


@connecting.upon(SuccessorInputs.failed).to(steppedBack)
def _notConnected(inputs: SuccessorInputs, core: SuccessorCore, error: BaseException) -> None:
    core.effects.giveUp(error)


for _input in _INPUTS:
    if _input not in (SuccessorInputs.connected, SuccessorInputs.failed):
        connecting.upon(_input).loop().returns(None)


# greeting: Hello sent.
@greeting.upon(SuccessorInputs.greeted).to(receiving)
def _greeted(inputs: SuccessorInputs, core: SuccessorCore, data: Deadline) -> None:
    data.cancel()
    core.effects.askListeners()


@greeting.upon(SuccessorInputs.failed).to(steppedBack)
def _helloFailed(
    inputs: SuccessorInputs, core: SuccessorCore, data: Deadline, error: BaseException
) -> None:
    data.cancel()
    core.effects.giveUp(error)


@greeting.upon(SuccessorInputs.timedOut).to(steppedBack)
def _helloTimedOut(inputs: SuccessorInputs, core: SuccessorCore, data: Deadline) -> None:
    data.cancel()
    core.effects.giveUp(_late(core, f"the process at {core.path} did not answer Hello"))


# receiving, adopting, committing: nothing accepts yet; any failure aborts.
def _abortOn(state: Any, what: str) -> None:
    @state.upon(SuccessorInputs.failed).to(steppedBack)
    def _failed(
        inputs: SuccessorInputs, core: SuccessorCore, data: Deadline, error: BaseException
    ) -> None:
        data.cancel()
        core.effects.abort(error)

    @state.upon(SuccessorInputs.timedOut).to(steppedBack)
    def _timedOut(inputs: SuccessorInputs, core: SuccessorCore, data: Deadline) -> None:
        data.cancel()
        core.effects.abort(_late(core, what))

    # (The failing call reports the lost link, as failed.)
    state.upon(SuccessorInputs.linkLost).loop().returns(None)


_abortOn(receiving, "the predecessor did not hand its listeners over")


@receiving.upon(SuccessorInputs.listenersReceived).to(adopting)
def _received(inputs: SuccessorInputs, core: SuccessorCore, data: Deadline) -> None:
    data.cancel()
    core.effects.adopt()


_abortOn(adopting, "the application was not ready")


@adopting.upon(SuccessorInputs.ready).to(committing)
def _ready(inputs: SuccessorInputs, core: SuccessorCore, data: Deadline) -> None:
    data.cancel()
    core.readyAt = core.clock.seconds()
    core.effects.sendCommit()


_abortOn(committing, "the predecessor did not answer the commit")


@committing.upon(SuccessorInputs.commitAnswered).loop()
def _commitAnswered(
    inputs: SuccessorInputs,
    core: SuccessorCore,
    data: Deadline,
    confirmWithin: float,
    waited: float,
) -> None:
    core.committedAt = core.clock.seconds()
    core.confirmWithin = confirmWithin
    # The predecessor's confirm deadline started when it paused, some time within our round
    # trip (less what it says it waited before pausing).  If the round trip took more than half
    # of the window, too little of it may be left to confirm: give up rather than risk accepting
    # after the predecessor resumed.
    late = core.committedAt - core.readyAt - waited
    if late > confirmWithin / 2:
        inputs.failed(
            TakeoverFailed(
                f"the commit answer came {late:.1f} s late; the predecessor may already have"
                " resumed"
            )
        )
    else:
        inputs.commitInTime()


@committing.upon(SuccessorInputs.commitInTime).to(accepting)
def _committed(inputs: SuccessorInputs, core: SuccessorCore, data: Deadline) -> None:
    data.cancel()
    core.effects.startAccepting()


for _step in (receiving, adopting, committing):
    for _input in _INPUTS:
        if _input in (
            SuccessorInputs.failed,
            SuccessorInputs.timedOut,
            SuccessorInputs.linkLost,
            SuccessorInputs.listenersReceived if _step is receiving else None,
            SuccessorInputs.ready if _step is adopting else None,
            SuccessorInputs.commitAnswered if _step is committing else None,
            SuccessorInputs.commitInTime if _step is committing else None,
        ):
            continue
        _step.upon(_input).loop().returns(None)
for _input in _INPUTS:
    if _input not in (
        SuccessorInputs.greeted,
        SuccessorInputs.failed,
        SuccessorInputs.timedOut,
    ):
        greeting.upon(_input).loop().returns(None)


# accepting: we accept; the predecessor is paused until it confirms or its window ends.
@accepting.upon(SuccessorInputs.acceptingAnswered).to(confirmed)
def _confirmed(inputs: SuccessorInputs, core: SuccessorCore, data: Deadline) -> None:
    data.cancel()
    core.effects.confirmed(False)


@accepting.upon(SuccessorInputs.failed).to(steppedBack)
def _notConfirmed(
    inputs: SuccessorInputs, core: SuccessorCore, data: Deadline, error: BaseException
) -> None:
    data.cancel()
    core.effects.stepBack(error)


@accepting.upon(SuccessorInputs.linkLost).loop()
def _lostWhileAccepting(inputs: SuccessorInputs, core: SuccessorCore, data: Deadline) -> None:
    # The predecessor resumes on its own only after its confirm deadline: before half of it has
    # passed here, a lost connection means it exited or died, and we serve on.
    late = core.clock.seconds() - core.committedAt > core.confirmWithin / 2
    if late and core.effects.predecessorAlive():
        inputs.failed(
            TakeoverFailed(
                "the predecessor dropped the connection too late to confirm; it serves on"
            )
        )
    else:
        inputs.predecessorExited()


@accepting.upon(SuccessorInputs.timedOut).loop()
def _confirmTimedOut(inputs: SuccessorInputs, core: SuccessorCore, data: Deadline) -> None:
    # Long past its confirm window: a predecessor still alive has resumed.
    if core.effects.predecessorAlive():
        inputs.failed(
            TakeoverFailed(
                f"the predecessor did not answer Accepting within {core.handoffTimeout:g} s;"
                " it serves on"
            )
        )
    else:
        inputs.predecessorExited()


@accepting.upon(SuccessorInputs.predecessorExited).to(confirmed)
def _exitedAtCommit(inputs: SuccessorInputs, core: SuccessorCore, data: Deadline) -> None:
    data.cancel()
    core.effects.confirmed(True)


for _input in _INPUTS:
    if _input not in (
        SuccessorInputs.acceptingAnswered,
        SuccessorInputs.failed,
        SuccessorInputs.linkLost,
        SuccessorInputs.timedOut,
        SuccessorInputs.predecessorExited,
    ):
        accepting.upon(_input).loop().returns(None)

SuccessorMachine = builder.build()


def makeSuccessor(core: SuccessorCore) -> SuccessorInputs:
    """
    A new successor's machine, connecting.
    """
    return SuccessorMachine(core)
