"""
The WebSocket application, version 2.
"""

from tests.apps.ws_app import make

root = make("2")
