"""
A Sphinx extension that generates, at every build, what the docs show of the generation's state
machine, from the machine in L{graceful_plugin.machine} itself (never drawn by hand):

- ``_generated/machine.svg``: the states and the transitions that change state, labelled with
  their inputs (rendered with graphviz's ``dot``);
- ``_generated/machine-full.svg``: automat's own diagram (C{GenerationMachine.asDigraph()}),
  every input of every state, including those a state ignores;
- ``_generated/transitions.md``: a table of the state-changing transitions and the effects each
  one asks for, found by driving the real machine with a recording effects provider;
- ``_generated/workers.svg``: the leader's view of each place of its group of workers, from the
  table the group follows (L{graceful_plugin.workers.SLOT_TRANSITIONS}).

The build fails with a clear message when ``dot`` is not installed.
"""

from __future__ import annotations

import inspect
import shutil
import subprocess
from collections import deque
from pathlib import Path
from typing import Any

from sphinx.application import Sphinx
from sphinx.errors import ExtensionError
from twisted.internet.task import Clock
from zope.interface import implementer

from graceful_plugin.machine import (
    GenerationCore,
    GenerationInputs,
    GenerationMachine,
    IGenerationEffects,
    makeGeneration,
)
from graceful_plugin.successor import SuccessorMachine
from graceful_plugin.workers import SLOT_INITIAL, SLOT_TRANSITIONS

#: The order states are shown in: the life of one generation.
_ORDER = ["serving", "handing_off", "committed", "draining", "retiring", "terminated"]

#: The order of the successor's steps.
_SUCCESSOR_ORDER = [
    "connecting",
    "greeting",
    "receiving",
    "adopting",
    "committing",
    "accepting",
    "confirmed",
    "stepped_back",
]


def _rank(state: str, order: list[str] = _ORDER) -> int:
    return order.index(state) if state in order else len(order)


def _transitions(
    machine: Any = GenerationMachine, order: list[str] = _ORDER
) -> list[tuple[str, str, str]]:
    """
    Every (state, input, new state) of the machine.

    automat builds the machine from an L{automat.Automaton}, whose C{allTransitions} is the one
    place that lists them all; the attribute holding it is automat's own, so it is read here and
    nowhere else.
    """
    automaton = machine.__automat_automaton__
    return sorted(
        (
            (before.name, inputName, after.name)
            for before, inputName, after, _outputs in automaton.allTransitions()
        ),
        key=lambda t: (_rank(t[0], order), _rank(t[2], order), t[1]),
    )


def _initialState(machine: Any = GenerationMachine) -> str:
    return str(machine.__automat_automaton__.initialState.name)


@implementer(IGenerationEffects)
class _Recorder:
    """
    Records the effects a transition asks for.
    """

    def __init__(self) -> None:
        self.calls: list[str] = []

    def _record(name: str) -> Any:  # type: ignore[misc]
        def effect(self: _Recorder, *args: object) -> None:
            self.calls.append(name)

        effect.__name__ = name
        return effect

    pauseAccepting = _record("pauseAccepting")
    resumeAccepting = _record("resumeAccepting")
    releaseListeners = _record("releaseListeners")
    standBy = _record("standBy")
    resumed = _record("resumed")
    closeListeners = _record("closeListeners")
    beginDrain = _record("beginDrain")
    abortSessions = _record("abortSessions")
    handoffStarted = _record("handoffStarted")
    handoffAborted = _record("handoffAborted")
    handoffCommitted = _record("handoffCommitted")
    terminated = _record("terminated")


def _arguments(inputName: str) -> list[str]:
    """
    Placeholder arguments for an input (the reason of C{successorLost}).
    """
    signature = inspect.signature(getattr(GenerationInputs, inputName))
    return ["..." for name in list(signature.parameters)[1:]]


def _replay(path: list[str]) -> tuple[GenerationInputs, _Recorder]:
    """
    A new machine driven through the inputs in C{path}.
    """
    recorder = _Recorder()
    machine = makeGeneration(GenerationCore(clock=Clock(), effects=recorder))
    for inputName in path:
        getattr(machine, inputName)(*_arguments(inputName))
    return machine, recorder


def _effectsTable() -> list[tuple[str, str, str, list[str]]]:
    """
    For each transition that changes state: (state, input, new state, effects in order), found
    by driving the real machine along the shortest input path to the state and then the input.
    """
    transitions = _transitions()
    paths: dict[str, list[str]] = {_initialState(): []}
    queue = deque([_initialState()])
    while queue:
        state = queue.popleft()
        for before, inputName, after in transitions:
            if before == state and after not in paths:
                paths[after] = paths[state] + [inputName]
                queue.append(after)
    rows = []
    for before, inputName, after in transitions:
        if before == after or before not in paths:
            continue
        machine, recorder = _replay(paths[before])
        recorder.calls.clear()
        getattr(machine, inputName)(*_arguments(inputName))
        assert machine.describe() == after, (before, inputName, after, machine.describe())
        rows.append((before, inputName, after, list(recorder.calls)))
    return rows


def compactSource(machine: Any = GenerationMachine, order: list[str] = _ORDER) -> str:
    """
    Graphviz source for the states and the transitions that change state.
    """
    edges: dict[tuple[str, str], list[str]] = {}
    states: list[str] = []
    for before, inputName, after in _transitions(machine, order):
        for state in (before, after):
            if state not in states:
                states.append(state)
        if before != after:
            edges.setdefault((before, after), []).append(inputName)
    states.sort(key=lambda state: _rank(state, order))
    lines = [
        "digraph generation {",
        "  rankdir=LR;",
        '  node [shape=box, style="rounded", fontname="Helvetica"];',
        '  edge [fontname="Helvetica", fontsize=10];',
        '  start [shape=point, label=""];',
        f'  start -> "{_initialState(machine)}";',
    ]
    for state in states:
        lines.append(f'  "{state}";')
    for (before, after), inputs in edges.items():
        label = "\\n".join(sorted(inputs))
        lines.append(f'  "{before}" -> "{after}" [label="{label}"];')
    lines.append("}")
    return "\n".join(lines) + "\n"


#: The order a group's places are shown in: starting, serving, winding down, ended.
_GROUP_ORDER = [
    "starting",
    "ready",
    "serving",
    "paused",
    "released",
    "draining",
    "stopping",
    "ended",
    "gone",
]


def groupSource() -> str:
    """
    Graphviz source for the states of a place in a group of workers and the events that move it
    (the acknowledgement of each command, the worker's end, its replacement).
    """
    edges: dict[tuple[str, str], list[str]] = {}
    states = set()
    for (before, event), after in SLOT_TRANSITIONS.items():
        states.update((before, after))
        edges.setdefault((before, after), []).append(event)
    order = sorted(states, key=lambda s: _GROUP_ORDER.index(s) if s in _GROUP_ORDER else 99)
    lines = [
        "digraph workers {",
        "  rankdir=LR;",
        '  node [shape=box, style="rounded", fontname="Helvetica"];',
        '  edge [fontname="Helvetica", fontsize=10];',
        '  start [shape=point, label=""];',
        f'  start -> "{SLOT_INITIAL}";',
    ]
    for state in order:
        lines.append(f'  "{state}";')
    for (before, after), events in sorted(
        edges.items(), key=lambda e: (order.index(e[0][0]), order.index(e[0][1]))
    ):
        label = "\\n".join(sorted(events))
        lines.append(f'  "{before}" -> "{after}" [label="{label}"];')
    lines.append("}")
    return "\n".join(lines) + "\n"


def transitionsMarkdown() -> str:
    """
    The table of state-changing transitions and their effects, as MyST markdown.
    """
    lines = [
        "| state | input | next state | effects, in order |",
        "|---|---|---|---|",
    ]
    for before, inputName, after, effects in _effectsTable():
        shown = ", ".join(f"`{e}`" for e in effects) or "none"
        lines.append(f"| `{before}` | `{inputName}` | `{after}` | {shown} |")
    return "\n".join(lines) + "\n"


def _render(source: str, target: Path) -> None:
    dot = shutil.which("dot")
    if dot is None:
        raise ExtensionError(
            "graphviz's dot is not installed (apt-get install graphviz): it draws the state "
            "diagram from graceful_plugin/machine.py"
        )
    result = subprocess.run(
        [dot, "-Tsvg"], input=source.encode(), capture_output=True, check=False, timeout=60
    )
    if result.returncode != 0:
        raise ExtensionError(f"dot failed on {target.name}: {result.stderr.decode().strip()}")
    _write(target, result.stdout)


def _write(target: Path, content: bytes) -> None:
    # Rewrite only what changed, so that Sphinx does not rebuild pages for nothing.
    if not target.exists() or target.read_bytes() != content:
        target.write_bytes(content)


def generate(directory: Path) -> None:
    """
    Write the diagrams and the transition table into C{directory}.
    """
    directory.mkdir(parents=True, exist_ok=True)
    _render(compactSource(), directory / "machine.svg")
    _render(GenerationMachine.asDigraph().source, directory / "machine-full.svg")
    _write(directory / "transitions.md", transitionsMarkdown().encode())
    _render(compactSource(SuccessorMachine, _SUCCESSOR_ORDER), directory / "successor.svg")
    _render(groupSource(), directory / "workers.svg")


def _builderInited(app: Sphinx) -> None:
    generate(Path(app.srcdir) / "_generated")


def setup(app: Sphinx) -> dict[str, Any]:
    app.connect("builder-inited", _builderInited)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
