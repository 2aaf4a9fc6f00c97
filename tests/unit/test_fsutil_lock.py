"""fsutil.locked on flock(2) directly: it excludes filelock's FileLock (the same lock) both ways,
keeps filelock's conveniences the callers rely on (parent directories, an explicit mode), and
gives the caller's own errors back whatever their type."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
import time

import filelock
import pytest

from slurm_dgxvm import fsutil


class Refused(Exception):
    pass


def lock(path, timeout, **kw):
    return fsutil.locked(path, timeout=timeout, timed_out=lambda: Refused("timed out"),
                         failed=lambda e: Refused(f"failed: {e.strerror}"), poll_s=0.005, **kw)


HOLD_IN_CHILD = ("import filelock, sys, time; l = filelock.FileLock(sys.argv[1]); l.acquire(); "
                 "print('held', flush=True); sys.stdin.read(); l.release()")


def test_a_filelock_held_in_another_process_keeps_locked_out(tmp_path):
    path = tmp_path / "x.lock"
    child = subprocess.Popen([sys.executable, "-c", HOLD_IN_CHILD, str(path)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "held\n"
        with pytest.raises(Refused, match="timed out"):
            with lock(path, 0.2):
                pytest.fail("filelock's holder was ignored")
    finally:
        child.communicate("", timeout=30)
    with lock(path, 5) as times:
        assert times.waited_s < 5


def test_locked_keeps_a_filelock_out(tmp_path):
    path = tmp_path / "x.lock"
    with lock(path, 1):
        with pytest.raises(filelock.Timeout):
            filelock.FileLock(str(path)).acquire(timeout=0.1)
    with filelock.FileLock(str(path)).acquire(timeout=1):
        pass


def test_a_time_out_is_the_callers_error_even_when_it_is_an_oserror(tmp_path):
    """timed_out=TimeoutError (an OSError) must not come back as failed(...)."""
    path = tmp_path / "x.lock"
    with lock(path, 1):
        with pytest.raises(TimeoutError):
            with fsutil.locked(path, timeout=0, timed_out=TimeoutError,
                               failed=lambda e: Refused("failed")):
                pytest.fail("held twice")


def test_parent_directories_are_made_and_the_mode_is_exact(tmp_path):
    path = tmp_path / "a" / "b" / "x.lock"
    old = os.umask(0o077)
    try:
        with lock(path, 1, mode=0o644):
            pass
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    os.chmod(path, 0o600)                      # an existing lock file keeps its mode
    with lock(path, 1, mode=0o644):
        pass
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_symlink_is_refused(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("")
    (tmp_path / "x.lock").symlink_to(target)
    with pytest.raises(Refused, match="failed"):
        with lock(tmp_path / "x.lock", 1):
            pass


def test_a_lock_file_unlinked_while_waiting_is_taken_again_by_its_name(tmp_path):
    """A waiter that wins the flock on an inode someone unlinked lets it go and locks the file
    that has the name: it then excludes a FileLock on that name."""
    path = tmp_path / "x.lock"
    got = threading.Event()
    release = threading.Event()
    errors = []

    def waiter():
        try:
            with lock(path, 10):
                got.set()
                release.wait(10)
        except BaseException as e:  # noqa: BLE001 - reported to the test
            errors.append(e)
            got.set()

    with lock(path, 1):
        t = threading.Thread(target=waiter)
        t.start()
        time.sleep(0.05)                       # the waiter polls the first inode
        path.unlink()
    try:
        assert got.wait(10) and not errors
        assert path.exists()
        with pytest.raises(filelock.Timeout):
            filelock.FileLock(str(path)).acquire(timeout=0.05)
    finally:
        release.set()
        t.join(10)


def test_no_descriptor_is_left_open(tmp_path):
    path = tmp_path / "x.lock"
    before = len(os.listdir("/proc/self/fd"))
    with lock(path, 1):
        for _ in range(20):
            with pytest.raises(Refused):
                with lock(path, 0):
                    pass
    (tmp_path / "file").write_text("")
    with pytest.raises(Refused, match="failed"):
        with lock(tmp_path / "file" / "x.lock", 0):
            pass
    assert len(os.listdir("/proc/self/fd")) == before


# -- pending_write: atomic_write in two halves ------------------------------------------------------
def test_a_pending_write_is_made_before_and_put_in_place_by_commit(tmp_path):
    target = tmp_path / "ledger.json"
    fsutil.atomic_write(target, b"old\n")
    with fsutil.pending_write(target, mode=0o640) as pending:
        made = [p for p in tmp_path.iterdir() if p != target]
        assert len(made) == 1 and made[0].name.startswith(".ledger.json.")
        assert stat.S_IMODE(made[0].stat().st_mode) == 0o640 and made[0].read_bytes() == b""
        assert target.read_bytes() == b"old\n"
        times = fsutil.WriteTimes()
        pending.commit(b"new\n", times=times)
        with pytest.raises(RuntimeError):
            pending.commit(b"again\n")
    assert target.read_bytes() == b"new\n" and list(tmp_path.iterdir()) == [target]
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert times.fsync_s > 0 and times.fsync_dir_s > 0


def test_a_pending_write_not_committed_leaves_nothing(tmp_path):
    target = tmp_path / "ledger.json"
    fsutil.atomic_write(target, b"old\n")
    with fsutil.pending_write(target):
        pass
    with pytest.raises(ValueError):
        with fsutil.pending_write(target) as pending:
            raise ValueError
    with pytest.raises(TypeError):
        with fsutil.pending_write(target) as pending:
            pending.commit(12345)                   # not bytes: fails before anything is renamed
    assert target.read_bytes() == b"old\n" and list(tmp_path.iterdir()) == [target]
