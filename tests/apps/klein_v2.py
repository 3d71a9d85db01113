"""
Klein, version 2: ``--resource tests.apps.klein_v2.app.resource``.
"""

from tests.apps.klein_app import make

app = make("2")
