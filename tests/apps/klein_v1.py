"""
Klein, version 1: ``--resource tests.apps.klein_v1.app.resource``.
"""

from tests.apps.klein_app import make

app = make("1")
