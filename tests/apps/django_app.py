"""
A minimal Django project in one module: ``/`` names the version (from the module that imports
this one) and pid.
"""

from __future__ import annotations

import os
from typing import Any


def make(version: str) -> Any:
    """
    The Django WSGI application of C{version} (one per process: Django's settings are global).
    """
    from django.conf import settings
    from django.http import HttpResponse
    from django.urls import path

    def index(request: Any) -> HttpResponse:
        return HttpResponse(f"django v{version} pid {os.getpid()}\n", content_type="text/plain")

    settings.configure(
        DEBUG=False,
        SECRET_KEY="graceful-tests",
        ALLOWED_HOSTS=["*"],
        ROOT_URLCONF=__name__,
        MIDDLEWARE=[],
        INSTALLED_APPS=[],
    )
    global urlpatterns
    urlpatterns = [path("", index)]
    from django.core.wsgi import get_wsgi_application

    return get_wsgi_application()


urlpatterns: list[Any] = []
