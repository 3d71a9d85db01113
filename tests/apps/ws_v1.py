"""
The WebSocket application, version 1.
"""

from tests.apps.ws_app import make

root = make("1")
