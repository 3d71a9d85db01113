"""
One generation's life as a state machine: serving, handing off to a successor, committed (paused,
waiting for the successor to confirm it accepts), draining, terminated.

The machine decides; the L{IGenerationEffects} provider it is given does the I/O.  Nobody reads
the machine's state: callers give it inputs, and the inputs that answer return what the caller
needs to know.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from automat import TypeMachineBuilder
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from zope.interface import Interface


class IGenerationEffects(Interface):
    """
    What a generation's state machine asks of the world around it.
    """

    def pauseAccepting() -> None:
        """
        Stop calling C{accept()} on every listener; keep the sockets open.
        """

    def resumeAccepting() -> None:
        """
        Call C{accept()} again on every listener (a handoff rolled back after commit).
        """

    def releaseListeners() -> None:
        """
        The successor accepts now: close our copies of the listening sockets without
        C{shutdown()} and without unlinking any path.
        """

    def closeListeners() -> None:
        """
        Stop for good (no successor): close the listening sockets and unlink Unix paths.
        """

    def beginDrain() -> None:
        """
        Tell every live session that this generation drains, and check whether any are left.
        """

    def abortSessions() -> None:
        """
        The drain deadline passed: close every session still open.
        """

    def handoffStarted() -> None:
        """
        A successor asked to take over.
        """

    def handoffAborted(reason: str) -> None:
        """
        The handoff was rolled back for C{reason}; drop the successor if it is still connected.
        """

    def handoffCommitted() -> None:
        """
        The successor confirmed it accepts; this generation only drains from now on.
        """

    def terminated() -> None:
        """
        Every session is gone (or the deadline passed): the process may exit.
        """


class GenerationInputs(Protocol):
    """
    The inputs of a generation's state machine.
    """

    def requestHandoff(self) -> bool:
        """
        A successor said hello and wants to take over.

        @return: whether it may (C{False}: a handoff is in progress or we are draining).
        """

    def commit(self) -> bool:
        """
        The successor has adopted our listeners and its application is ready: pause accepting.

        @return: whether the commit was accepted (C{False}: no handoff in progress).
        """

    def successorAccepting(self) -> bool:
        """
        The successor accepts on the listeners: from now on we only drain.

        @return: C{False} when no committed handoff was waiting for this.
        """

    def successorLost(self, reason: str) -> None:
        """
        The successor disconnected, failed or gave up before confirming it accepts.
        """

    def handoffTimedOut(self) -> None:
        """
        The successor did not finish its part in time.
        """

    def stop(self) -> None:
        """
        A graceful stop (SIGTERM): stop accepting for good and drain.
        """

    def sessionsDrained(self) -> None:
        """
        No session is open any more.
        """

    def drainTimedOut(self) -> None:
        """
        The drain deadline passed.
        """

    def describe(self) -> str:
        """
        A word for status reports: serving, handing_off, committed, draining or terminated.
        """


@dataclass
class GenerationCore:
    """
    What every state shares.

    @ivar clock: for the handoff and drain deadlines.
    @ivar effects: the I/O the machine commands.
    @ivar handoffTimeout: seconds a successor has from hello to commit.
    @ivar confirmTimeout: seconds a successor has from commit to confirming it accepts.
    @ivar drainTimeout: seconds the sessions have to finish once draining.
    """

    clock: IReactorTime
    effects: IGenerationEffects
    handoffTimeout: float = 30.0
    confirmTimeout: float = 10.0
    drainTimeout: float = 60.0


@dataclass
class Deadline:
    """
    The data of a state that ends by itself after a while.
    """

    call: IDelayedCall

    def cancel(self) -> None:
        if self.call.active():
            self.call.cancel()


def _handoffDeadline(inputs: GenerationInputs, core: GenerationCore) -> Deadline:
    return Deadline(core.clock.callLater(core.handoffTimeout, inputs.handoffTimedOut))


def _confirmDeadline(inputs: GenerationInputs, core: GenerationCore) -> Deadline:
    return Deadline(core.clock.callLater(core.confirmTimeout, inputs.handoffTimedOut))


def _drainDeadline(inputs: GenerationInputs, core: GenerationCore, *args: object) -> Deadline:
    return Deadline(core.clock.callLater(core.drainTimeout, inputs.drainTimedOut))


builder = TypeMachineBuilder(GenerationInputs, GenerationCore)
serving = builder.state("serving")
handingOff = builder.state("handing_off", _handoffDeadline)
committed = builder.state("committed", _confirmDeadline)
draining = builder.state("draining", _drainDeadline)
terminated = builder.state("terminated")

# Every state names itself for status reports.
for _state in (serving, terminated):
    _state.upon(GenerationInputs.describe).loop().returns(_state.name)
for _dataState in (handingOff, committed, draining):
    _dataState.upon(GenerationInputs.describe).loop().returns(_dataState.name)

# serving
serving.upon(GenerationInputs.commit).loop().returns(False)
serving.upon(GenerationInputs.successorAccepting).loop().returns(False)
for _ignored in (
    GenerationInputs.successorLost,
    GenerationInputs.handoffTimedOut,
    GenerationInputs.sessionsDrained,
    GenerationInputs.drainTimedOut,
):
    serving.upon(_ignored).loop().returns(None)


@serving.upon(GenerationInputs.requestHandoff).to(handingOff)
def _startHandoff(inputs: GenerationInputs, core: GenerationCore) -> bool:
    core.effects.handoffStarted()
    return True


@serving.upon(GenerationInputs.stop).to(draining)
def _stopServing(inputs: GenerationInputs, core: GenerationCore) -> None:
    core.effects.closeListeners()
    core.effects.beginDrain()


# handing_off: the successor has (or is getting) our descriptors; we still accept.
handingOff.upon(GenerationInputs.requestHandoff).loop().returns(False)
handingOff.upon(GenerationInputs.successorAccepting).loop().returns(False)
handingOff.upon(GenerationInputs.sessionsDrained).loop().returns(None)
handingOff.upon(GenerationInputs.drainTimedOut).loop().returns(None)


@handingOff.upon(GenerationInputs.commit).to(committed)
def _commit(inputs: GenerationInputs, core: GenerationCore, data: Deadline) -> bool:
    data.cancel()
    core.effects.pauseAccepting()
    return True


@handingOff.upon(GenerationInputs.successorLost).to(serving)
def _lostBeforeCommit(
    inputs: GenerationInputs, core: GenerationCore, data: Deadline, reason: str
) -> None:
    data.cancel()
    core.effects.handoffAborted(reason)


@handingOff.upon(GenerationInputs.handoffTimedOut).to(serving)
def _timedOutBeforeCommit(inputs: GenerationInputs, core: GenerationCore, data: Deadline) -> None:
    data.cancel()
    core.effects.handoffAborted(f"the successor did not commit within {core.handoffTimeout:g} s")


@handingOff.upon(GenerationInputs.stop).to(draining)
def _stopWhileHandingOff(inputs: GenerationInputs, core: GenerationCore, data: Deadline) -> None:
    data.cancel()
    core.effects.handoffAborted("this server is stopping")
    core.effects.closeListeners()
    core.effects.beginDrain()


# committed: we paused accepting; the successor is about to accept.
committed.upon(GenerationInputs.requestHandoff).loop().returns(False)
committed.upon(GenerationInputs.commit).loop().returns(False)
committed.upon(GenerationInputs.sessionsDrained).loop().returns(None)
committed.upon(GenerationInputs.drainTimedOut).loop().returns(None)


@committed.upon(GenerationInputs.successorAccepting).to(draining)
def _confirmed(inputs: GenerationInputs, core: GenerationCore, data: Deadline) -> bool:
    data.cancel()
    core.effects.releaseListeners()
    core.effects.handoffCommitted()
    core.effects.beginDrain()
    return True


def _resume(core: GenerationCore, data: Deadline, reason: str) -> None:
    data.cancel()
    core.effects.resumeAccepting()
    core.effects.handoffAborted(reason)


@committed.upon(GenerationInputs.successorLost).to(serving)
def _lostAfterCommit(
    inputs: GenerationInputs, core: GenerationCore, data: Deadline, reason: str
) -> None:
    _resume(core, data, reason)


@committed.upon(GenerationInputs.handoffTimedOut).to(serving)
def _timedOutAfterCommit(inputs: GenerationInputs, core: GenerationCore, data: Deadline) -> None:
    _resume(core, data, f"the successor did not confirm accepting within {core.confirmTimeout:g} s")


@committed.upon(GenerationInputs.stop).to(draining)
def _stopWhileCommitted(inputs: GenerationInputs, core: GenerationCore, data: Deadline) -> None:
    # The successor adopted these sockets and may already accept: the handoff goes through (its
    # confirmation will be answered yes), and we release, never unlinking a path it owns.
    data.cancel()
    core.effects.releaseListeners()
    core.effects.handoffCommitted()
    core.effects.beginDrain()


# draining: no accepting; sessions finish.
draining.upon(GenerationInputs.requestHandoff).loop().returns(False)
draining.upon(GenerationInputs.commit).loop().returns(False)
draining.upon(GenerationInputs.successorAccepting).loop().returns(False)
for _ignored in (
    GenerationInputs.successorLost,
    GenerationInputs.handoffTimedOut,
    GenerationInputs.stop,
):
    draining.upon(_ignored).loop().returns(None)


@draining.upon(GenerationInputs.sessionsDrained).to(terminated)
def _drained(inputs: GenerationInputs, core: GenerationCore, data: Deadline) -> None:
    data.cancel()
    core.effects.terminated()


@draining.upon(GenerationInputs.drainTimedOut).to(terminated)
def _drainDeadlinePassed(inputs: GenerationInputs, core: GenerationCore, data: Deadline) -> None:
    data.cancel()
    core.effects.abortSessions()
    core.effects.terminated()


# terminated: nothing more happens.
terminated.upon(GenerationInputs.requestHandoff).loop().returns(False)
terminated.upon(GenerationInputs.commit).loop().returns(False)
terminated.upon(GenerationInputs.successorAccepting).loop().returns(False)
for _ignored in (
    GenerationInputs.successorLost,
    GenerationInputs.handoffTimedOut,
    GenerationInputs.stop,
    GenerationInputs.sessionsDrained,
    GenerationInputs.drainTimedOut,
):
    terminated.upon(_ignored).loop().returns(None)

GenerationMachine = builder.build()


def makeGeneration(core: GenerationCore) -> GenerationInputs:
    """
    A new generation's machine, serving.
    """
    return GenerationMachine(core)


__all__ = [
    "GenerationCore",
    "GenerationInputs",
    "GenerationMachine",
    "IGenerationEffects",
    "makeGeneration",
]
