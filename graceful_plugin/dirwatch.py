"""
Whether anything happened in a set of directories since the last look, without looking at every
file: Linux's inotify, through C{ctypes} (the standard library has no binding).

The fork server checks before each fork that the files it imported are still what is on disk:
about 550 C{stat} calls, 1-3 ms of CPU at the moment a takeover starts.  With a watch on their
directories it stats them only when something happened there since its last check.  Events are
queued by the system call that changes a file, before it returns, so a change made before a
restart is asked for is always seen by that restart's check.

Standard library only.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

IN_MODIFY = 0x2
IN_ATTRIB = 0x4
IN_CLOSE_WRITE = 0x8
IN_MOVED_FROM = 0x40
IN_MOVED_TO = 0x80
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800

#: Every way a file in a directory, or the directory itself, can change.
MASK = (
    IN_MODIFY
    | IN_ATTRIB
    | IN_CLOSE_WRITE
    | IN_MOVED_FROM
    | IN_MOVED_TO
    | IN_CREATE
    | IN_DELETE
    | IN_DELETE_SELF
    | IN_MOVE_SELF
)

IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = 0o2000000


class DirectoryWatch:
    """
    An inotify descriptor watching some directories.
    """

    def __init__(self, fd: int, missed: frozenset[str] = frozenset()) -> None:
        self.fd = fd
        #: The directories that could not be watched (gone, not a directory, the system's limit
        #: on watches reached): their files must be looked at every time.
        self.missed = missed

    @classmethod
    def of(cls, directories: Iterable[str]) -> DirectoryWatch | None:
        """
        A watch on C{directories}, or L{None} when there cannot be one (not Linux, no C{libc},
        the system's limit on watches or instances reached, a directory that cannot be watched):
        the caller then looks at every file, every time.  A directory that cannot be watched
        is left out and named in L{missed}.
        """
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            init = libc.inotify_init1
            add = libc.inotify_add_watch
        except (OSError, AttributeError):
            return None
        add.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        fd = init(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            return None
        missed = set()
        for directory in sorted(set(directories)):
            if add(fd, os.fsencode(directory), MASK) < 0:
                missed.add(directory)
        return cls(fd, frozenset(missed))

    def happened(self) -> bool:
        """
        Whether anything happened since the last call (or since the watch began): the queued
        events are read and forgotten.  A watch that cannot be read says yes.
        """
        seen = False
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return seen
            except OSError:
                return True
            if not data:
                return seen
            seen = True

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:
        try:
            self.close()
        except OSError:
            pass
