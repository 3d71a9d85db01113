"""
The successor's state machine (L{graceful_plugin.successor}) alone: its decisions and deadlines,
against recorded effects and a L{Clock}.
"""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock
from zope.interface import implementer
from zope.interface.verify import verifyObject

from graceful_plugin.successor import (
    ISuccessorEffects,
    SuccessorCore,
    SuccessorInputs,
    TakeoverFailed,
    makeSuccessor,
)


@implementer(ISuccessorEffects)
class Recorder:
    """
    Effects that record what the machine asked, by name (with the error's text for a failure).
    """

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.alive = True

    def sendHello(self) -> None:
        self.calls.append("sendHello")

    def askListeners(self) -> None:
        self.calls.append("askListeners")

    def adopt(self) -> None:
        self.calls.append("adopt")

    def sendCommit(self) -> None:
        self.calls.append("sendCommit")

    def startAccepting(self) -> None:
        self.calls.append("startAccepting")

    def predecessorAlive(self) -> bool:
        return self.alive

    def confirmed(self, exitedAtCommit: bool) -> None:
        self.calls.append(f"confirmed exited={exitedAtCommit}")

    def giveUp(self, error: BaseException) -> None:
        self.calls.append(f"giveUp: {error}")

    def abort(self, error: BaseException) -> None:
        self.calls.append(f"abort: {error}")

    def stepBack(self, error: BaseException) -> None:
        self.calls.append(f"stepBack: {error}")


def machine() -> tuple[SuccessorInputs, Recorder, Clock]:
    clock = Clock()
    effects = Recorder()
    core = SuccessorCore(clock=clock, effects=effects, handoffTimeout=30.0, path="c.sock")
    return makeSuccessor(core), effects, clock


def upTo(step: str) -> tuple[SuccessorInputs, Recorder, Clock]:
    """
    A machine driven, without delay, to the state named C{step}.
    """
    inputs, effects, clock = machine()
    order = ["greeting", "receiving", "adopting", "committing", "accepting"]
    moves = [
        inputs.connected,
        inputs.greeted,
        inputs.listenersReceived,
        inputs.ready,
        lambda: inputs.commitAnswered(0.5, 0.0),
    ]
    for name, move in zip(order, moves, strict=True):
        move()
        if name == step:
            break
    assert inputs.describe() == step
    return inputs, effects, clock


def test_effectsProvider() -> None:
    """
    The recorder provides the effects interface the machine is built against.
    """
    assert verifyObject(ISuccessorEffects, Recorder())


def test_confirmedInOrder() -> None:
    """
    Each answer leads to the next step, in the handoff's order, ending confirmed.
    """
    inputs, effects, clock = upTo("accepting")
    inputs.acceptingAnswered()
    assert inputs.describe() == "confirmed"
    assert effects.calls == [
        "sendHello",
        "askListeners",
        "adopt",
        "sendCommit",
        "startAccepting",
        "confirmed exited=False",
    ]
    # No deadline is left behind.
    assert clock.getDelayedCalls() == []


@pytest.mark.parametrize(
    "step, effect",
    [
        ("greeting", "giveUp: the process at c.sock did not answer Hello within 30 s"),
        ("receiving", "abort: the predecessor did not hand its listeners over within 30 s"),
        ("adopting", "abort: the application was not ready within 30 s"),
        ("committing", "abort: the predecessor did not answer the commit within 30 s"),
        (
            "accepting",
            "stepBack: the predecessor did not answer Accepting within 30 s; it serves on",
        ),
    ],
)
def test_deadlineOfEachStep(step: str, effect: str) -> None:
    """
    Each waiting step ends at the handoff deadline, counted from its own start, with the way
    out that suits it: before anything is adopted the link is just closed, before we accept the
    predecessor is told (abort), after we accept we step back.
    """
    inputs, effects, clock = upTo(step)
    clock.advance(29.9)
    assert inputs.describe() == step
    clock.advance(0.1)
    assert inputs.describe() == "stepped_back"
    assert effects.calls[-1] == effect
    assert clock.getDelayedCalls() == []


def test_acceptingDeadlineWithAGonePredecessorServesOn() -> None:
    """
    A predecessor that has exited by the time Accepting was due leaves us serving.
    """
    inputs, effects, clock = upTo("accepting")
    effects.alive = False
    clock.advance(30.0)
    assert inputs.describe() == "confirmed"
    assert effects.calls[-1] == "confirmed exited=True"


def test_commitAnswerLate() -> None:
    """
    A commit answer later than half the confirm window (less the predecessor's own wait) is
    not acted on: the machine aborts without accepting.
    """
    inputs, effects, clock = upTo("committing")
    clock.advance(0.3)
    inputs.commitAnswered(0.5, 0.0)
    assert inputs.describe() == "stepped_back"
    assert effects.calls[-1] == (
        "abort: the commit answer came 0.3 s late; the predecessor may already have resumed"
    )
    assert "startAccepting" not in effects.calls


def test_commitAnswerInTimeAfterThePredecessorsWait() -> None:
    """
    The predecessor's wait before pausing does not count against the window.
    """
    inputs, effects, clock = upTo("committing")
    clock.advance(0.3)
    inputs.commitAnswered(0.5, 0.2)
    assert inputs.describe() == "accepting"
    assert effects.calls[-1] == "startAccepting"


@pytest.mark.parametrize(
    "alive, after, outcome",
    [
        (True, 0.1, "confirmed exited=True"),
        (False, 0.3, "confirmed exited=True"),
        (True, 0.3, "stepBack: the predecessor dropped the connection too late to confirm;"),
    ],
)
def test_linkLostWhileAccepting(alive: bool, after: float, outcome: str) -> None:
    """
    The link lost before half the confirm window means the predecessor exited (we serve on);
    after it, a predecessor still alive has resumed (we step back), a gone one has exited.
    """
    inputs, effects, clock = upTo("accepting")
    effects.alive = alive
    clock.advance(after)
    inputs.linkLost()
    assert effects.calls[-1].startswith(outcome)


@pytest.mark.parametrize("step", ["greeting", "receiving", "adopting", "committing", "accepting"])
def test_failureThenLateAnswersIgnored(step: str) -> None:
    """
    After a failure nothing more happens: answers that arrive late, a second failure or a
    deadline change nothing.
    """
    inputs, effects, clock = upTo(step)
    inputs.failed(TakeoverFailed("it broke"))
    assert inputs.describe() == "stepped_back"
    calls = list(effects.calls)
    assert calls[-1].endswith(": it broke")
    inputs.greeted()
    inputs.listenersReceived()
    inputs.ready()
    inputs.commitAnswered(0.5, 0.0)
    inputs.acceptingAnswered()
    inputs.linkLost()
    inputs.failed(TakeoverFailed("again"))
    clock.advance(60.0)
    assert effects.calls == calls


def test_connectFailure() -> None:
    """
    A connection that never came up is given up on, with its reason.
    """
    inputs, effects, clock = machine()
    inputs.failed(TakeoverFailed("no server answers at c.sock (ConnectionRefusedError)"))
    assert effects.calls == ["giveUp: no server answers at c.sock (ConnectionRefusedError)"]


def test_outOfOrderAnswersIgnored() -> None:
    """
    An answer that belongs to another step (a stray or duplicated one) is ignored.
    """
    inputs, effects, clock = upTo("receiving")
    inputs.commitAnswered(0.5, 0.0)
    inputs.acceptingAnswered()
    inputs.ready()
    assert inputs.describe() == "receiving"
    assert effects.calls == ["sendHello", "askListeners"]


def test_reentrantInputsArePostponed() -> None:
    """
    Effects that answer at once (an application already ready) feed their input from inside a
    transition: it runs once that transition is over, and the steps still come in order.
    """
    clock = Clock()
    effects = Recorder()
    core = SuccessorCore(clock=clock, effects=effects, handoffTimeout=30.0)
    inputs = makeSuccessor(core)
    original = effects.adopt

    def adoptAndBeReady() -> None:
        original()
        inputs.ready()

    effects.adopt = adoptAndBeReady  # type: ignore[method-assign]
    inputs.connected()
    inputs.greeted()
    inputs.listenersReceived()
    assert inputs.describe() == "committing"
    assert effects.calls[-2:] == ["adopt", "sendCommit"]
