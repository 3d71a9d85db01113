"""
Sphinx configuration for graceful's documentation (MyST markdown).

Build: ``sphinx-build -W -b html docs docs/_build/html`` (needs the ``docs`` extra and graphviz's
``dot``: the state diagram is generated from graceful_plugin/machine.py at every build).
"""

from __future__ import annotations

import sys
from pathlib import Path

here = Path(__file__).resolve().parent
# The docs build from a checkout too: the package, and the diagram extension next to this file.
sys.path.insert(0, str(here.parent))
sys.path.insert(0, str(here))

project = "graceful"
author = "graceful contributors"
copyright = "graceful contributors"

extensions = ["myst_parser", "diagram"]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "_generated", "examples"]
myst_heading_anchors = 3

html_theme = "alabaster"
html_title = "graceful"
