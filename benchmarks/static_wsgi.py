"""A WSGI application serving the files of one directory (``BUMP_FILES``), for gunicorn in
``bump.py``: ``GET /bytes/65536`` answers the file ``$BUMP_FILES/bytes/65536`` with a
Content-Length, through the server's ``wsgi.file_wrapper`` (sendfile where it can)."""

import os

ROOT = os.path.realpath(os.environ.get("BUMP_FILES", "."))


def app(environ, start_response):
    """Answer a file under ``ROOT``, 404 for anything else."""
    path = os.path.realpath(os.path.join(ROOT, environ.get("PATH_INFO", "/").lstrip("/")))
    if not path.startswith(ROOT + os.sep) or not os.path.isfile(path):
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found\n"]
    f = open(path, "rb")  # noqa: SIM115 (closed by the file wrapper)
    size = os.fstat(f.fileno()).st_size
    start_response(
        "200 OK",
        [("Content-Type", "application/octet-stream"), ("Content-Length", str(size))],
    )
    wrapper = environ.get("wsgi.file_wrapper")
    if wrapper is not None:
        return wrapper(f, 65536)
    return iter(lambda: f.read(65536), b"")
