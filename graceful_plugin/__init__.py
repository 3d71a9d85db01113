"""
graceful: zero-downtime restarts for Twisted servers.

A serving process hands its listening sockets to its successor over a Unix socket (SCM_RIGHTS);
the successor starts accepting, and only then does the old process stop accepting, drain its
connections and exit.
"""

import os as _os

from graceful_plugin import priority as _priority

# A successor started by hand (twistd graceful --takeover) goes idle here, at the first import of
# graceful (twistd's plugin discovery imports the dropin, which imports us), until it connects.
_priority.idleIfTakingOver()

__version__ = "0.1.0"

#: Socket activation's variables as this process found them, read before anything else can
#: remove them (importing twisted.internet.endpoints does): see lifecycle.activatedSockets.
_ACTIVATION = {
    _k: _os.environ[_k]
    for _k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
    if _k in _os.environ
}
