"""
Django, version 1.
"""

from tests.apps.django_app import make

application = make("1")
