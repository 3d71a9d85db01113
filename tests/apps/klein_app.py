"""
A Klein application, built for a version, served with ``--resource`` (its C{resource()}).
"""

from __future__ import annotations

import os
from typing import Any

from klein import Klein


def make(version: str) -> Any:
    """
    The Klein application of C{version}.
    """
    app = Klein()

    @app.route("/")
    def index(request: Any) -> str:
        request.setHeader(b"content-type", b"text/plain")
        return f"klein v{version} pid {os.getpid()}\n"

    return app
