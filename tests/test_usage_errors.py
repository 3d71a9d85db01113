"""
A usage error of ``twistd graceful`` prints one sentence and a hint to ``--help`` (after
twistd's one-line synopsis), not the whole help text, and exits non-zero; ``--help`` itself
still prints the help.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from twisted.python import usage
from twisted.scripts.twistd import ServerOptions

from graceful_plugin.tap import USAGE_HINT
from tests.procs import TWISTD


def _twistd(directory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [TWISTD, "-n", "graceful", *args],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize(
    "args, sentence",
    [
        (["--port", "bogus:1"], "--port 'bogus:1': unknown listener kind 'bogus'"),
        (["--port", "8080", "--drain-timeout", "x"], "--drain-timeout takes a number of seconds"),
        (["--nope"], "option --nope not recognized"),
        ([], "name at least one listener with --port"),
        (["--takeover", "missing.sock"], "--takeover: there is no control socket at"),
    ],
    ids=["port", "coerced", "unknown", "postOptions", "takeover"],
)
def test_oneSentence(workdir: Path, args: list[str], sentence: str) -> None:
    """
    Each kind of usage error (a bad value, a bad type, an unknown option, a check after parsing)
    prints twistd's synopsis, the hint and the one sentence, no option list, and exits 1.
    """
    result = _twistd(workdir, *args)
    assert result.returncode == 1
    lines = (result.stdout + result.stderr).splitlines()
    assert len(lines) == 3, lines
    assert lines[0].startswith("Usage: ")
    assert lines[1] == USAGE_HINT
    assert sentence in lines[2], lines
    assert "Parameter type enforcement failed" not in lines[2]
    assert "Traceback" not in result.stderr


def test_programmaticCallersStillGetUsageError() -> None:
    """
    Parsing in-process still raises L{usage.UsageError} with the sentence (no prefix).
    """
    with pytest.raises(usage.UsageError) as raised:
        ServerOptions().parseOptions(["graceful", "--port", "8080", "--drain-timeout", "x"])
    assert str(raised.value) == "--drain-timeout takes a number of seconds, not 'x'"


def test_helpStillPrintsHelp(workdir: Path) -> None:
    """
    ``--help`` prints the options and exits 0.
    """
    result = _twistd(workdir, "--help")
    assert result.returncode == 0
    assert "--drain-timeout" in result.stdout and "--takeover" in result.stdout
