"""
Shared fixtures: real processes that are always reaped.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.procs import Processes


@pytest.fixture
def workdir() -> Iterator[Path]:
    """
    A short temporary directory (Unix socket paths are limited to 108 bytes), removed after.
    """
    with tempfile.TemporaryDirectory(prefix="gr-") as d:
        yield Path(d)


@pytest.fixture
def procs(workdir: Path) -> Iterator[Processes]:
    """
    Servers started by the test, killed and reaped when it ends.
    """
    processes = Processes(workdir)
    try:
        yield processes
    finally:
        processes.cleanup()


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
