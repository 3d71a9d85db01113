"""
A Flask application, built for a version: ``/`` names the version and pid, ``/environ`` shows
the WSGI environ keys a listener kind changes.
"""

from __future__ import annotations

import os

from flask import Flask, jsonify, request


def make(version: str) -> Flask:
    """
    The Flask application of C{version}.
    """
    app = Flask(f"flask_v{version}")

    @app.route("/")
    def index() -> str:
        return f"flask v{version} pid {os.getpid()}\n"

    @app.route("/environ")
    def environ() -> object:
        keys = ("REMOTE_ADDR", "REMOTE_PORT", "SERVER_NAME", "SERVER_PORT", "wsgi.url_scheme")
        return jsonify({key: request.environ.get(key) for key in keys} | {"url": request.url})

    return app
