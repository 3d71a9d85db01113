"""
The pidfile shared by generations: claimed atomically, released only by its owner.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from graceful_plugin import pidfile


def test_claimWritesPid(workdir: Path) -> None:
    """
    claim writes the pid and a newline, leaving no temporary file behind.
    """
    path = workdir / "app.pid"
    pidfile.claim(str(path), 1234)
    assert path.read_text() == "1234\n"
    assert pidfile.read(str(path)) == 1234
    assert os.listdir(workdir) == ["app.pid"]


def test_claimReplacesAtomically(workdir: Path) -> None:
    """
    claim replaces an existing pidfile by rename: a reader holding the old file sees the old pid
    whole, the path names the new one, and at no moment is there no file.
    """
    path = workdir / "app.pid"
    pidfile.claim(str(path), 1111)
    with open(path) as old:
        inode = os.fstat(old.fileno()).st_ino
        pidfile.claim(str(path), 2222)
        assert os.stat(path).st_ino != inode
        assert old.read() == "1111\n"
    assert pidfile.read(str(path)) == 2222


def test_releaseOnlyOwnPid(workdir: Path) -> None:
    """
    release removes the pidfile only when it names the given pid.
    """
    path = workdir / "app.pid"
    pidfile.claim(str(path), 2222)
    assert pidfile.release(str(path), 1111) is False
    assert path.exists()
    assert pidfile.release(str(path), 2222) is True
    assert not path.exists()
    assert pidfile.release(str(path), 2222) is False


def test_readBadContent(workdir: Path) -> None:
    """
    read answers None for a missing, empty or non-numeric pidfile.
    """
    path = workdir / "app.pid"
    assert pidfile.read(str(path)) is None
    path.write_text("")
    assert pidfile.read(str(path)) is None
    path.write_text("not a pid\n")
    assert pidfile.read(str(path)) is None
    assert pidfile.release(str(path), 1) is False
    assert path.exists()


def test_alive() -> None:
    """
    alive is true for a running process (ours, our parent) and false for one that does not
    exist.
    """
    assert pidfile.alive(os.getpid())
    assert pidfile.alive(os.getppid())
    assert not pidfile.alive(999999999)


def test_zombieIsNotAlive() -> None:
    """
    A process that exited but was not reaped yet (a zombie) does not count as alive.
    """
    child = subprocess.Popen(["true"])
    try:
        deadline = time.monotonic() + 30
        while _state(child.pid) != "Z":
            assert time.monotonic() < deadline, "the child never exited"
            time.sleep(0.01)
        assert not pidfile.alive(child.pid)
    finally:
        child.wait(10)


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rpartition(")")[2].split()[0]


def test_livePid(workdir: Path) -> None:
    """
    livePid names the pid in the file only when that process is alive and is not us.
    """
    path = workdir / "app.pid"
    pidfile.claim(str(path), os.getppid())
    assert pidfile.livePid(str(path)) == os.getppid()
    pidfile.claim(str(path), os.getpid())
    assert pidfile.livePid(str(path)) is None
    pidfile.claim(str(path), 999999999)
    assert pidfile.livePid(str(path)) is None


def test_claimNeverWritesThroughAPlantedSymlink(workdir: Path) -> None:
    """
    A symbolic link planted at the pidfile's path (or at the temporary name earlier versions
    used) is replaced, never written through: the file it points to keeps its content.
    """
    victim = workdir / "victim"
    victim.write_text("precious\n")
    path = workdir / "app.pid"
    os.symlink(victim, path)
    os.symlink(victim, workdir / f"app.pid.{os.getpid()}.tmp")
    pidfile.claim(str(path), os.getpid())
    assert victim.read_text() == "precious\n"
    assert not path.is_symlink()
    assert path.read_text() == f"{os.getpid()}\n"
    assert pidfile.read(str(path)) == os.getpid()


def test_readIgnoresASymlink(workdir: Path) -> None:
    """
    read does not follow a symbolic link (a pidfile never is one), so release never removes one.
    """
    target = workdir / "target"
    target.write_text("1234\n")
    os.symlink(target, workdir / "app.pid")
    assert pidfile.read(str(workdir / "app.pid")) is None
    assert pidfile.release(str(workdir / "app.pid"), 1234) is False
    assert target.exists()


def test_claimReplacesAFileOfAnotherUser(workdir: Path) -> None:
    """
    A pidfile planted by another user is replaced by one of ours with mode 0644 (the other user
    can no longer rewrite it), created under a random name, none left behind.
    """
    if os.geteuid() != 0:
        import pytest

        pytest.skip("needs root to plant a file of another uid")
    path = workdir / "app.pid"
    path.write_text("1\n")
    os.chown(path, 65534, 65534)
    os.chmod(path, 0o666)
    old = os.umask(0)
    try:
        pidfile.claim(str(path), 4321)
    finally:
        os.umask(old)
    st = os.lstat(path)
    assert st.st_uid == os.geteuid()
    assert st.st_mode & 0o777 == 0o644
    assert path.read_text() == "4321\n"
    assert sorted(os.listdir(workdir)) == ["app.pid"]
