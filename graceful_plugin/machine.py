"""
One generation's life as a state machine: serving, handing off to a successor, committed (paused,
waiting for the successor to confirm it accepts), draining (a hot standby: the successor serves,
we hold paused copies of the listeners and resume if it is lost), retiring (draining with
nothing to resume: stopped, or told to stand down), terminated.

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
        Nothing will resume: close our copies of the listening sockets without C{shutdown()} and
        without unlinking any path (another generation may accept on them).
        """

    def standBy() -> None:
        """
        The successor accepts now: close the listeners it dropped, keep paused copies of the
        others (and of the control listener) so that we can resume if it is lost, and watch it.
        """

    def resumed(reason: str) -> None:
        """
        The successor was lost while we stood by, for C{reason}, and we accept again
        (L{resumeAccepting} was called): own the pidfile and the control path again, serve as
        our own generation.
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
        The successor disconnected, died, failed or gave up (before it confirmed: a rollback;
        after, while we stand by: we resume).
        """

    def standDown(self) -> None:
        """
        The successor says it will not need us: it stops on purpose, or a newer generation takes
        over from it (the caller logs which).  We drain on without standing by.
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
        A word for status reports: serving, handing_off, committed, draining (standing by),
        retiring (draining, nothing to resume) or terminated.
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
    @ivar drainEnds: when the current drain must end (L{None}: not draining), kept from
        draining to retiring so that standing down does not restart the deadline.
    """

    clock: IReactorTime
    effects: IGenerationEffects
    handoffTimeout: float = 30.0
    confirmTimeout: float = 0.5
    drainTimeout: float = 60.0
    drainEnds: float | None = None


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
    now = core.clock.seconds()
    if core.drainEnds is None:
        core.drainEnds = now + core.drainTimeout
    return Deadline(core.clock.callLater(max(0.0, core.drainEnds - now), inputs.drainTimedOut))


builder = TypeMachineBuilder(GenerationInputs, GenerationCore)
serving = builder.state("serving")
handingOff = builder.state("handing_off", _handoffDeadline)
committed = builder.state("committed", _confirmDeadline)
draining = builder.state("draining", _drainDeadline)
retiring = builder.state("retiring", _drainDeadline)
terminated = builder.state("terminated")

# Every state names itself for status reports.
for _state in (serving, terminated):
    _state.upon(GenerationInputs.describe).loop().returns(_state.name)
for _dataState in (handingOff, committed, draining, retiring):
    _dataState.upon(GenerationInputs.describe).loop().returns(_dataState.name)

# Only a successor that confirmed (we stand by for it) can tell us to stand down.
for _notStandingBy in (serving, handingOff, committed, retiring, terminated):
    _notStandingBy.upon(GenerationInputs.standDown).loop().returns(None)

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


@serving.upon(GenerationInputs.stop).to(retiring)
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


@handingOff.upon(GenerationInputs.stop).to(retiring)
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
    # Still paused: the successor accepts, we hold our copies until we know we are not needed.
    data.cancel()
    core.effects.standBy()
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


@committed.upon(GenerationInputs.stop).to(retiring)
def _stopWhileCommitted(inputs: GenerationInputs, core: GenerationCore, data: Deadline) -> None:
    # The successor adopted these sockets and may already accept: the handoff goes through (its
    # confirmation will be answered yes), and we release, never unlinking a path it owns.
    data.cancel()
    core.effects.releaseListeners()
    core.effects.handoffCommitted()
    core.effects.beginDrain()


# draining: the successor accepts; we hold paused copies of the listeners (a hot standby).
draining.upon(GenerationInputs.requestHandoff).loop().returns(False)
draining.upon(GenerationInputs.commit).loop().returns(False)
draining.upon(GenerationInputs.successorAccepting).loop().returns(False)
draining.upon(GenerationInputs.handoffTimedOut).loop().returns(None)


@draining.upon(GenerationInputs.successorLost).to(serving)
def _successorLostWhileStandingBy(
    inputs: GenerationInputs, core: GenerationCore, data: Deadline, reason: str
) -> None:
    # Nobody accepts on the sockets any more but us: resume, and serve as our own generation.
    data.cancel()
    core.drainEnds = None
    core.effects.resumeAccepting()
    core.effects.resumed(reason)


@draining.upon(GenerationInputs.standDown).to(retiring)
def _stoodDown(inputs: GenerationInputs, core: GenerationCore, data: Deadline) -> None:
    data.cancel()
    core.effects.releaseListeners()


@draining.upon(GenerationInputs.stop).to(retiring)
def _stopWhileStandingBy(inputs: GenerationInputs, core: GenerationCore, data: Deadline) -> None:
    data.cancel()
    core.effects.releaseListeners()


@draining.upon(GenerationInputs.sessionsDrained).to(terminated)
def _drained(inputs: GenerationInputs, core: GenerationCore, data: Deadline) -> None:
    data.cancel()
    core.effects.releaseListeners()
    core.effects.terminated()


@draining.upon(GenerationInputs.drainTimedOut).to(terminated)
def _drainDeadlinePassed(inputs: GenerationInputs, core: GenerationCore, data: Deadline) -> None:
    data.cancel()
    core.effects.abortSessions()
    core.effects.releaseListeners()
    core.effects.terminated()


# retiring: draining with nothing to resume (stopped, or stood down); sessions finish.
retiring.upon(GenerationInputs.requestHandoff).loop().returns(False)
retiring.upon(GenerationInputs.commit).loop().returns(False)
retiring.upon(GenerationInputs.successorAccepting).loop().returns(False)
for _ignored in (
    GenerationInputs.successorLost,
    GenerationInputs.handoffTimedOut,
    GenerationInputs.stop,
):
    retiring.upon(_ignored).loop().returns(None)


@retiring.upon(GenerationInputs.sessionsDrained).to(terminated)
def _retired(inputs: GenerationInputs, core: GenerationCore, data: Deadline) -> None:
    data.cancel()
    core.effects.terminated()


@retiring.upon(GenerationInputs.drainTimedOut).to(terminated)
def _retireDeadlinePassed(inputs: GenerationInputs, core: GenerationCore, data: Deadline) -> None:
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
