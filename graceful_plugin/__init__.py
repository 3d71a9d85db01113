"""
graceful: zero-downtime restarts for Twisted servers.

A serving process hands its listening sockets to its successor over a Unix socket (SCM_RIGHTS);
the successor starts accepting, and only then does the old process stop accepting, drain its
connections and exit.
"""

__version__ = "0.1.0"
