"""
Flask, version 2.
"""

from tests.apps.flask_app import make

app = make("2")
