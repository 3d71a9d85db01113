"""
Flask, version 1.
"""

from tests.apps.flask_app import make

app = make("1")
