"""
Django, version 2.
"""

from tests.apps.django_app import make

application = make("2")
