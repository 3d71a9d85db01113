"""
The documentation site: it builds without warnings, and its state diagrams and transition table
are generated from the code (the generation's machine, the group's table).
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"

_missing = [
    name for name in ("sphinx", "myst_parser", "graphviz") if importlib.util.find_spec(name) is None
]
needsSphinx = pytest.mark.skipif(
    bool(_missing),
    reason=f"the docs extra is not installed (no {', '.join(_missing)}): pip install '.[docs]'",
)
needsDot = pytest.mark.skipif(
    shutil.which("dot") is None,
    reason="graphviz's dot is not installed (apt-get install graphviz)",
)


@needsSphinx
@needsDot
def test_docsBuildWithoutWarnings(tmp_path: Path) -> None:
    """
    sphinx-build -W builds the site, with the How it works page and the state diagram rendered
    from graceful_plugin/machine.py.
    """
    out = tmp_path / "html"
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "-q", "-b", "html"]
        + ["-d", str(tmp_path / "doctrees"), str(DOCS), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    page = (out / "how-it-works.html").read_text()
    assert "_images/machine.svg" in page
    svg = (out / "_images" / "machine.svg").read_text()
    for word in (
        "serving",
        "handing_off",
        "committed",
        "draining",
        "retiring",
        "terminated",
        "commit",
        "successorLost",
        "standDown",
    ):
        assert word in svg
    assert "releaseListeners" in page
    workers = (out / "workers.html").read_text()
    assert "_images/workers.svg" in workers
    svg = (out / "_images" / "workers.svg").read_text()
    for word in ("starting", "serving", "paused", "draining", "ended", "gone", "replaced"):
        assert word in svg


@needsSphinx
def test_generatedFromTheMachine() -> None:
    """
    The diagram names every state-changing transition of the machine, and the table lists the
    effects the machine really asks for (a stop after commit releases, never closes; a successor
    lost while standing by resumes) of a recorder that provides IGenerationEffects.
    """
    sys.path.insert(0, str(DOCS))
    try:
        import diagram
    finally:
        sys.path.remove(str(DOCS))
    from zope.interface.verify import verifyObject

    from graceful_plugin.machine import GenerationMachine, IGenerationEffects

    assert verifyObject(IGenerationEffects, diagram._Recorder())

    automaton = GenerationMachine.__automat_automaton__
    changes = {
        (before.name, inputName, after.name)
        for before, inputName, after, _ in automaton.allTransitions()
        if before is not after
    }
    rows = {(b, i, a): effects for b, i, a, effects in diagram._effectsTable()}
    assert set(rows) == changes
    assert rows[("draining", "successorLost", "serving")] == ["resumeAccepting", "resumed"]
    assert rows[("committed", "stop", "retiring")] == [
        "releaseListeners",
        "handoffCommitted",
        "beginDrain",
    ]
    source = diagram.compactSource()
    for before, inputName, after in changes:
        assert f'"{before}" -> "{after}"' in source
        assert inputName in source


@needsSphinx
def test_groupDiagramFromTheTable() -> None:
    """
    The group's diagram draws every transition of the table the group follows
    (SLOT_TRANSITIONS), each labelled with its event, and no other.
    """
    sys.path.insert(0, str(DOCS))
    try:
        import diagram
    finally:
        sys.path.remove(str(DOCS))
    from graceful_plugin.workers import SLOT_TRANSITIONS

    source = diagram.groupSource()
    drawn = [line for line in source.splitlines() if " -> " in line and "start ->" not in line]
    pairs = {(before, after) for (before, _), after in SLOT_TRANSITIONS.items()}
    assert len(drawn) == len(pairs)
    for (before, event), after in SLOT_TRANSITIONS.items():
        [line] = [d for d in drawn if d.strip().startswith(f'"{before}" -> "{after}"')]
        assert event in line
