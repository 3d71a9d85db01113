"""
A pidfile shared by generations: the serving generation owns it, and nobody removes a pidfile
that names another process.

twistd's own pidfile handling cannot do this (it refuses to start while the pid in the file is
alive, and removes the file on exit without looking at whose pid it holds), so the plugin takes
the pidfile over from twistd's options.
"""

from __future__ import annotations

import os
import secrets
import stat

from twisted.logger import Logger

log = Logger()

#: The mode of a pidfile: anyone may read it, only its owner write it.
MODE = 0o644


def read(path: str) -> int | None:
    """
    The pid in C{path}, or L{None} when there is no such file, it holds no number, or it is a
    symbolic link (a pidfile is never one: somebody else planted it).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return int(os.read(fd, 64).decode("ascii").strip())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    finally:
        os.close(fd)


def alive(pid: int) -> bool:
    """
    Whether a process C{pid} runs (a zombie, exited but not yet reaped by its parent, does not).
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            # pid (comm) state ...: comm may hold spaces and parentheses, so look after the last.
            state = f.read().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"


def livePid(path: str) -> int | None:
    """
    The pid in C{path} if that process is alive (and is not us).
    """
    pid = read(path)
    if pid is None or pid == os.getpid() or not alive(pid):
        return None
    return pid


def claim(path: str, pid: int) -> None:
    """
    Write C{pid} to C{path} atomically, so no reader ever sees an empty or half-written pidfile.

    The pid goes to a new file of a random name in the pidfile's directory, created with
    C{O_EXCL|O_NOFOLLOW} and mode 0644 (nothing another user planted is ever opened or written
    through), which is then renamed over C{path}.  The rename replaces whatever entry is at
    C{path} (a planted symbolic link is replaced, its target untouched; a file of another user
    is replaced by one of ours), and that is logged.

    @raise OSError: when the file cannot be written or renamed (it is then removed).
    """
    _warnIfPlanted(path)
    directory, base = os.path.split(os.path.abspath(path))
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(100):
        tmp = os.path.join(directory, f".{base}.{secrets.token_hex(8)}.tmp")
        try:
            fd = os.open(tmp, flags, MODE)
        except FileExistsError:
            continue
        break
    else:
        raise OSError(f"cannot create a temporary file next to {path}")
    try:
        try:
            os.fchmod(fd, MODE)
            os.write(fd, f"{pid}\n".encode())
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _warnIfPlanted(path: str) -> None:
    """
    Log what is wrong with the entry at C{path} before it is replaced: a symbolic link, not a
    regular file, or a file another user owns.
    """
    try:
        st = os.lstat(path)
    except OSError:
        return
    if stat.S_ISLNK(st.st_mode):
        problem = "a symbolic link"
    elif not stat.S_ISREG(st.st_mode):
        problem = "not a regular file"
    elif st.st_uid not in (os.geteuid(), 0):
        problem = f"owned by uid {st.st_uid}"
    else:
        return
    log.warn("pidfile {path} was {problem}: replacing it", path=path, problem=problem)


def release(path: str, pid: int) -> bool:
    """
    Remove C{path} only if it still names C{pid}.

    @return: whether it was removed.
    """
    if read(path) != pid:
        return False
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True
