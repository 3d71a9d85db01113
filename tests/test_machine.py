"""
The generation's state machine, driven by its inputs and a L{Clock}, with a fake that records
every effect it asks for.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from zope.interface import implementer
from zope.interface.verify import verifyObject

from graceful_plugin.machine import (
    GenerationCore,
    GenerationInputs,
    IGenerationEffects,
    makeGeneration,
)

HANDOFF = 30.0
CONFIRM = 10.0
DRAIN = 60.0


@implementer(IGenerationEffects)
class RecordingEffects:
    """
    Records the name (and argument, if any) of every effect, in order.

    @ivar onBeginDrain: called from L{beginDrain}, to feed an input back in re-entrantly.
    """

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.reasons: list[str] = []
        self.onBeginDrain: object = None

    def pauseAccepting(self) -> None:
        self.calls.append("pauseAccepting")

    def resumeAccepting(self) -> None:
        self.calls.append("resumeAccepting")

    def releaseListeners(self) -> None:
        self.calls.append("releaseListeners")

    def standBy(self) -> None:
        self.calls.append("standBy")

    def resumed(self, reason: str) -> None:
        self.calls.append("resumed")
        self.reasons.append(reason)

    def closeListeners(self) -> None:
        self.calls.append("closeListeners")

    def beginDrain(self) -> None:
        self.calls.append("beginDrain")
        if callable(self.onBeginDrain):
            self.onBeginDrain()

    def abortSessions(self) -> None:
        self.calls.append("abortSessions")

    def handoffStarted(self) -> None:
        self.calls.append("handoffStarted")

    def handoffAborted(self, reason: str) -> None:
        self.calls.append("handoffAborted")
        self.reasons.append(reason)

    def handoffCommitted(self) -> None:
        self.calls.append("handoffCommitted")

    def terminated(self) -> None:
        self.calls.append("terminated")

    def take(self) -> list[str]:
        """
        The effects recorded since the last call, forgetting them.
        """
        calls, self.calls = self.calls, []
        return calls


def makeMachine() -> tuple[GenerationInputs, RecordingEffects, Clock]:
    clock = Clock()
    effects = RecordingEffects()
    core = GenerationCore(
        clock=clock,
        effects=effects,
        handoffTimeout=HANDOFF,
        confirmTimeout=CONFIRM,
        drainTimeout=DRAIN,
    )
    return makeGeneration(core), effects, clock


def handingOff() -> tuple[GenerationInputs, RecordingEffects, Clock]:
    machine, effects, clock = makeMachine()
    assert machine.requestHandoff() is True
    effects.take()
    return machine, effects, clock


def committed() -> tuple[GenerationInputs, RecordingEffects, Clock]:
    machine, effects, clock = handingOff()
    assert machine.commit() is True
    effects.take()
    return machine, effects, clock


def draining() -> tuple[GenerationInputs, RecordingEffects, Clock]:
    machine, effects, clock = committed()
    assert machine.successorAccepting() is True
    effects.take()
    return machine, effects, clock


def retiring() -> tuple[GenerationInputs, RecordingEffects, Clock]:
    machine, effects, clock = draining()
    machine.standDown()
    effects.take()
    return machine, effects, clock


def terminated() -> tuple[GenerationInputs, RecordingEffects, Clock]:
    machine, effects, clock = draining()
    machine.sessionsDrained()
    effects.take()
    return machine, effects, clock


def test_fakeProvidesTheInterface() -> None:
    """
    The recording fake provides every method of L{IGenerationEffects}.
    """
    assert verifyObject(IGenerationEffects, RecordingEffects())


def test_describeNamesEveryState() -> None:
    """
    describe() names each of the six states, and asking
    does not change anything.
    """
    assert makeMachine()[0].describe() == "serving"
    assert handingOff()[0].describe() == "handing_off"
    assert committed()[0].describe() == "committed"
    assert draining()[0].describe() == "draining"
    assert retiring()[0].describe() == "retiring"
    machine, effects, clock = terminated()
    assert machine.describe() == "terminated"
    assert machine.describe() == "terminated"
    assert effects.calls == []


def test_newMachineServesWithoutEffectsOrTimers() -> None:
    """
    A new generation serves, asks for nothing and has no deadline pending.
    """
    machine, effects, clock = makeMachine()
    assert machine.describe() == "serving"
    assert effects.calls == []
    assert clock.getDelayedCalls() == []


def test_handoffRequestAccepted() -> None:
    """
    A handoff request while serving is accepted, announced, and starts the handoff deadline
    without pausing anything.
    """
    machine, effects, clock = makeMachine()
    assert machine.requestHandoff() is True
    assert effects.take() == ["handoffStarted"]
    assert machine.describe() == "handing_off"
    [deadline] = clock.getDelayedCalls()
    assert deadline.getTime() == HANDOFF


def test_secondHandoffRequestRefusedAsBusy() -> None:
    """
    A handoff request while handing off, committed, draining or terminated is refused and
    changes nothing.
    """
    for make, state in [
        (handingOff, "handing_off"),
        (committed, "committed"),
        (draining, "draining"),
        (terminated, "terminated"),
    ]:
        machine, effects, clock = make()
        assert machine.requestHandoff() is False, state
        assert effects.calls == [], state
        assert machine.describe() == state


def test_commitPausesAccepting() -> None:
    """
    Commit while handing off pauses accepting (nothing released), replaces the handoff deadline
    with the confirm deadline.
    """
    machine, effects, clock = handingOff()
    clock.advance(5)
    assert machine.commit() is True
    assert effects.take() == ["pauseAccepting"]
    assert machine.describe() == "committed"
    [deadline] = clock.getDelayedCalls()
    assert deadline.getTime() == 5 + CONFIRM


def test_commitRefusedWithoutHandoff() -> None:
    """
    Commit is refused (returns False, no effect) while serving, committed, draining or
    terminated.
    """
    for make in (makeMachine, committed, draining, terminated):
        machine, effects, clock = make()
        state = machine.describe()
        assert machine.commit() is False, state
        assert effects.calls == [], state
        assert machine.describe() == state


def test_confirmStandsByAndDrains() -> None:
    """
    The successor's confirmation neither resumes nor releases the listeners (they stay paused: a
    hot standby), announces the commit and starts draining under the drain deadline.
    """
    machine, effects, clock = committed()
    clock.advance(1)
    assert machine.successorAccepting() is True
    assert effects.take() == ["standBy", "handoffCommitted", "beginDrain"]
    assert machine.describe() == "draining"
    [deadline] = clock.getDelayedCalls()
    assert deadline.getTime() == 1 + DRAIN


def test_confirmRefusedWithoutCommit() -> None:
    """
    A confirmation that no committed handoff waits for is refused and changes nothing.
    """
    for make in (makeMachine, handingOff, draining, terminated):
        machine, effects, clock = make()
        state = machine.describe()
        assert machine.successorAccepting() is False, state
        assert effects.calls == [], state
        assert machine.describe() == state


def test_successorLostBeforeCommitRollsBack() -> None:
    """
    A successor lost before commit rolls back to serving with its reason, cancels the deadline,
    and never touches accepting (it was never paused).
    """
    machine, effects, clock = handingOff()
    machine.successorLost("the successor disconnected")
    assert effects.take() == ["handoffAborted"]
    assert effects.reasons == ["the successor disconnected"]
    assert machine.describe() == "serving"
    assert clock.getDelayedCalls() == []


def test_successorLostAfterCommitResumesAccepting() -> None:
    """
    A successor lost after commit but before confirming rolls back to serving and resumes
    accepting on the paused listeners.
    """
    machine, effects, clock = committed()
    machine.successorLost("the successor disconnected")
    assert effects.take() == ["resumeAccepting", "handoffAborted"]
    assert machine.describe() == "serving"
    assert clock.getDelayedCalls() == []


def test_handoffDeadlineRollsBack() -> None:
    """
    A successor that does not commit within the handoff timeout is dropped; the generation
    serves on, and a new handoff may start.
    """
    machine, effects, clock = handingOff()
    clock.advance(HANDOFF - 0.5)
    assert machine.describe() == "handing_off"
    clock.advance(0.5)
    assert effects.take() == ["handoffAborted"]
    assert effects.reasons == ["the successor did not commit within 30 s"]
    assert machine.describe() == "serving"
    assert clock.getDelayedCalls() == []
    assert machine.requestHandoff() is True


def test_confirmDeadlineResumesAccepting() -> None:
    """
    A successor that commits but does not confirm within the confirm timeout is dropped, and the
    generation resumes accepting.
    """
    machine, effects, clock = committed()
    clock.advance(CONFIRM - 0.5)
    assert machine.describe() == "committed"
    clock.advance(0.5)
    assert effects.take() == ["resumeAccepting", "handoffAborted"]
    assert effects.reasons == ["the successor did not confirm accepting within 10 s"]
    assert machine.describe() == "serving"
    assert clock.getDelayedCalls() == []


def test_rolledBackHandoffCanBeRetried() -> None:
    """
    After a rollback after commit, a second handoff goes all the way to draining.
    """
    machine, effects, clock = committed()
    machine.successorLost("gone")
    assert machine.requestHandoff() is True
    assert machine.commit() is True
    assert machine.successorAccepting() is True
    assert machine.describe() == "draining"


def test_stopWhileServingClosesAndDrains() -> None:
    """
    A stop while serving closes the listeners for good (unlinking paths) and drains.
    """
    machine, effects, clock = makeMachine()
    machine.stop()
    assert effects.take() == ["closeListeners", "beginDrain"]
    assert machine.describe() == "retiring"
    [deadline] = clock.getDelayedCalls()
    assert deadline.getTime() == DRAIN
    # Retiring: nothing brings it back.
    machine.successorLost("x")
    assert effects.calls == []


def test_stopWhileHandingOffAbortsClosesAndDrains() -> None:
    """
    A stop during a handoff not yet committed drops the successor, closes the listeners and
    drains; the handoff deadline no longer fires.
    """
    machine, effects, clock = handingOff()
    machine.stop()
    assert effects.take() == ["handoffAborted", "closeListeners", "beginDrain"]
    assert effects.reasons == ["this server is stopping"]
    assert machine.describe() == "retiring"
    [deadline] = clock.getDelayedCalls()
    assert deadline.getTime() == DRAIN


def test_stopWhileCommittedReleasesWithoutClosing() -> None:
    """
    A stop after commit completes the handoff: it releases the listeners without closing them
    (the successor holds the same sockets and may already accept, so no path it owns may be
    unlinked), counts the handoff as committed, and drains.
    """
    machine, effects, clock = committed()
    machine.stop()
    calls = effects.take()
    assert "closeListeners" not in calls
    assert "resumeAccepting" not in calls
    assert calls == ["releaseListeners", "handoffCommitted", "beginDrain"]
    assert machine.describe() == "retiring"
    clock.advance(CONFIRM)
    assert "resumeAccepting" not in effects.calls


def test_stopWhileStandingByReleases() -> None:
    """
    A stop while standing by releases the paused listeners (never closes them: the successor
    accepts on them) and drains on under the same deadline; the successor's loss no longer
    resumes anything.
    """
    machine, effects, clock = draining()
    clock.advance(5)
    machine.stop()
    assert effects.take() == ["releaseListeners"]
    assert machine.describe() == "retiring"
    [deadline] = clock.getDelayedCalls()
    assert deadline.getTime() == DRAIN
    machine.successorLost("gone")
    assert effects.calls == []


def test_stopWhileRetiringOrTerminatedIsIgnored() -> None:
    """
    A stop while retiring or terminated changes nothing.
    """
    for make in (retiring, terminated):
        machine, effects, clock = make()
        state = machine.describe()
        machine.stop()
        assert effects.calls == []
        assert machine.describe() == state


def test_drainedToZeroTerminates() -> None:
    """
    Draining ends when the last session is gone: terminated, without aborting anything, and the
    drain deadline is cancelled.
    """
    machine, effects, clock = draining()
    machine.sessionsDrained()
    assert effects.take() == ["releaseListeners", "terminated"]
    assert machine.describe() == "terminated"
    assert clock.getDelayedCalls() == []


def test_drainedDuringBeginDrainTerminates() -> None:
    """
    When beginDrain finds no session and says so at once (re-entrantly), the machine still ends
    terminated.
    """
    machine, effects, clock = committed()
    effects.onBeginDrain = machine.sessionsDrained
    assert machine.successorAccepting() is True
    assert effects.take() == [
        "standBy",
        "handoffCommitted",
        "beginDrain",
        "releaseListeners",
        "terminated",
    ]
    assert machine.describe() == "terminated"
    assert clock.getDelayedCalls() == []


def test_drainDeadlineAbortsSessions() -> None:
    """
    At the drain deadline the sessions still open are aborted and the generation terminates.
    """
    machine, effects, clock = draining()
    clock.advance(DRAIN - 1)
    assert machine.describe() == "draining"
    clock.advance(1)
    assert effects.take() == ["abortSessions", "releaseListeners", "terminated"]
    assert machine.describe() == "terminated"


def test_drainDeadlineReadWhenDrainingStarts() -> None:
    """
    The drain deadline is the core's drainTimeout at the moment draining starts (a Stop command
    may shorten it).
    """
    clock = Clock()
    effects = RecordingEffects()
    core = GenerationCore(clock=clock, effects=effects, drainTimeout=DRAIN)
    machine = makeGeneration(core)
    core.drainTimeout = 2.0
    machine.stop()
    [deadline] = clock.getDelayedCalls()
    assert deadline.getTime() == 2.0


def test_drainInputsIgnoredOutsideDraining() -> None:
    """
    sessionsDrained and drainTimedOut do nothing unless draining.
    """
    for make in (makeMachine, handingOff, committed, terminated):
        machine, effects, clock = make()
        state = machine.describe()
        machine.sessionsDrained()
        machine.drainTimedOut()
        assert effects.calls == [], state
        assert machine.describe() == state


def test_lostAndTimeoutIgnoredWithoutHandoff() -> None:
    """
    successorLost and handoffTimedOut do nothing while serving, retiring or terminated (and a
    handoff timeout nothing while standing by).
    """
    for make in (makeMachine, retiring, terminated, draining):
        machine, effects, clock = make()
        state = machine.describe()
        machine.handoffTimedOut()
        if make is not draining:
            machine.successorLost("late news")
        assert effects.calls == [], state
        assert machine.describe() == state


def test_terminatedIsFinal() -> None:
    """
    Once terminated, no input changes the state or asks for any effect.
    """
    machine, effects, clock = terminated()
    assert machine.requestHandoff() is False
    assert machine.commit() is False
    assert machine.successorAccepting() is False
    machine.successorLost("x")
    machine.standDown()
    machine.handoffTimedOut()
    machine.stop()
    machine.sessionsDrained()
    machine.drainTimedOut()
    clock.advance(1000)
    assert effects.calls == []
    assert machine.describe() == "terminated"


# -- any sequence of inputs keeps the invariants ------------------------------------------------

_INPUTS = [
    "requestHandoff",
    "commit",
    "successorAccepting",
    "successorLost",
    "standDown",
    "handoffTimedOut",
    "stop",
    "sessionsDrained",
    "drainTimedOut",
    "advance",
    "describe",
]

_step = st.one_of(
    st.sampled_from(_INPUTS).map(lambda name: (name, 0.0)),
    st.tuples(st.just("advance"), st.sampled_from([0.5, 5.0, CONFIRM, HANDOFF, DRAIN])),
)


class _Model:
    """
    What the effects say about the listeners, checked after every step.
    """

    def __init__(self) -> None:
        self.paused = False
        self.gone = False
        self.stopped = False
        self.committedHandoff = False
        self.openHandoffs = 0
        self.standingBy = False
        self.everStopped = False


@settings(max_examples=300, deadline=None)
@given(st.lists(_step, max_size=40))
def test_anyInputSequenceKeepsTheInvariants(steps: list[tuple[str, float]]) -> None:
    """
    Whatever inputs arrive in whatever order: accepting is paused only while committed or
    standing by (never accepting once the successor may); listeners are released only after
    commit (on a stand-down, a stop, or the end of the drain) and closed only when no commit is
    pending; only a standby resumes after draining began, and never after a stop; every started
    handoff ends exactly once; terminated is final; a deadline is pending exactly in the states
    that have one.
    """
    machine, effects, clock = makeMachine()
    model = _Model()
    for name, seconds in steps:
        before = machine.describe()
        if name == "advance":
            clock.advance(seconds)
        elif name == "successorLost":
            machine.successorLost("lost")
        else:
            getattr(machine, name)()
        after = machine.describe()
        calls = effects.take()
        if before == "terminated":
            assert calls == [] and after == "terminated"
        if name == "stop":
            model.everStopped = True
        for call in calls:
            if call == "pauseAccepting":
                assert not model.paused and not model.gone and not model.stopped
                model.paused = True
                model.committedHandoff = True
            elif call == "resumeAccepting":
                assert model.paused and not model.gone and not model.everStopped
                assert not model.stopped or model.standingBy
                model.paused = False
                model.committedHandoff = False
                model.stopped = False
                model.standingBy = False
            elif call == "standBy":
                assert model.paused and model.committedHandoff and not model.gone
                model.standingBy = True
            elif call == "resumed":
                assert not model.paused and not model.stopped
            elif call == "releaseListeners":
                assert model.committedHandoff and not model.gone
                model.gone = True
                model.standingBy = False
            elif call == "closeListeners":
                assert not model.committedHandoff and not model.gone
                model.gone = True
            elif call == "handoffStarted":
                assert not model.stopped and not model.gone
                assert model.openHandoffs == 0
                model.openHandoffs = 1
            elif call in ("handoffAborted", "handoffCommitted"):
                assert model.openHandoffs == 1
                model.openHandoffs = 0
            elif call == "beginDrain":
                assert model.gone or model.standingBy
                model.stopped = True
            elif call == "terminated":
                assert model.stopped and model.gone
            elif call == "abortSessions":
                assert model.stopped
        # Paused (and still holding the listeners) exactly while committed or standing by.
        holding = model.paused and not model.gone
        assert holding == (after == "committed" or model.standingBy)
        assert (model.openHandoffs == 1) == (after in ("handing_off", "committed"))
        if after in ("draining", "retiring", "terminated"):
            assert model.stopped and (model.gone or model.standingBy)
        if after in ("retiring", "terminated"):
            assert model.gone and not model.standingBy
        if after == "serving":
            assert not model.paused and not model.gone and not model.stopped
        pending = [c for c in clock.getDelayedCalls() if c.active()]
        deadlines = ("handing_off", "committed", "draining", "retiring")
        assert len(pending) == (1 if after in deadlines else 0)


# -- the hot standby -----------------------------------------------------------------------------


def test_successorLostWhileStandingByResumes() -> None:
    """
    A successor lost after it confirmed (while we stand by) makes the generation resume
    accepting on its paused listeners and serve again with the reason; the drain deadline is
    cancelled, and a later handoff goes through from the start.
    """
    machine, effects, clock = draining()
    clock.advance(3)
    machine.successorLost("the successor disconnected")
    assert effects.take() == ["resumeAccepting", "resumed"]
    assert effects.reasons == ["the successor disconnected"]
    assert machine.describe() == "serving"
    assert clock.getDelayedCalls() == []
    clock.advance(DRAIN)
    assert effects.calls == []
    assert machine.requestHandoff() is True
    assert machine.commit() is True
    assert machine.successorAccepting() is True
    [deadline] = clock.getDelayedCalls()
    assert deadline.getTime() == 3 + DRAIN + DRAIN


def test_standDownReleasesAndNothingResumes() -> None:
    """
    Told to stand down (the successor stops on purpose, or a newer generation takes over from
    it), the generation releases its paused listeners, keeps its drain deadline, and never
    resumes when the successor goes afterwards.
    """
    machine, effects, clock = draining()
    clock.advance(10)
    machine.standDown()
    assert effects.take() == ["releaseListeners"]
    [deadline] = clock.getDelayedCalls()
    assert deadline.getTime() == DRAIN
    machine.successorLost("the successor disconnected")
    machine.standDown()
    assert effects.calls == []
    clock.advance(DRAIN - 10)
    assert effects.take() == ["abortSessions", "terminated"]
    assert machine.describe() == "terminated"


def test_standDownIgnoredUnlessStandingBy() -> None:
    """
    standDown changes nothing while serving, handing off, committed, retiring or terminated.
    """
    for make in (makeMachine, handingOff, committed, retiring, terminated):
        machine, effects, clock = make()
        state = machine.describe()
        machine.standDown()
        assert effects.calls == [], state
        assert machine.describe() == state
