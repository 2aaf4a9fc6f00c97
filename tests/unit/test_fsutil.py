"""fsutil: the one way state is written and locked. A crash between write and rename is a real
crash (a forked child that dies with os._exit at that point), not a mocked one."""

from __future__ import annotations

import json
import os
import stat
import threading

import pytest

from slurm_dgxvm import fsutil


class Refused(Exception):
    pass


def _crash_in_child(at: str, path, data: bytes, mode: int = 0o600) -> None:
    """Fork; in the child, make ``at`` (os.replace or fsync_dir) kill the process, then write."""
    pid = os.fork()
    if pid == 0:                                  # the child: never returns
        try:
            if at == "replace":
                os.replace = lambda *a, **k: os._exit(17)
            else:
                fsutil.fsync_dir = lambda *a, **k: os._exit(17)
            fsutil.atomic_write(path, data, mode=mode)
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 17, "the child did not crash where it should"


def test_crash_between_write_and_rename_leaves_the_old_file_whole(tmp_path):
    target = tmp_path / "ledger.json"
    fsutil.atomic_write(target, b'{"old": true}\n')
    _crash_in_child("replace", target, b'{"new": true}\n' * 1000)
    assert target.read_bytes() == b'{"old": true}\n'
    leftovers = [p for p in tmp_path.iterdir() if p != target]
    # the dead writer's temp file: complete, never wider than asked, named so nothing reads it
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".ledger.json.")
    assert leftovers[0].read_bytes() == b'{"new": true}\n' * 1000
    assert stat.S_IMODE(leftovers[0].stat().st_mode) == 0o600


def test_crash_after_rename_leaves_the_new_file_whole(tmp_path):
    target = tmp_path / "record.json"
    fsutil.atomic_write(target, b"old\n")
    _crash_in_child("fsync_dir", target, b"new\n")
    assert target.read_bytes() == b"new\n"
    assert list(tmp_path.iterdir()) == [target]


def test_atomic_write_sets_mode_and_owner_before_the_name_exists(tmp_path):
    target = tmp_path / "job.json"
    fsutil.atomic_write_json(target, {"b": 1, "a": [2]}, mode=0o640, uid=65534, gid=65534)
    st = target.stat()
    assert stat.S_IMODE(st.st_mode) == 0o640 and (st.st_uid, st.st_gid) == (65534, 65534) \
        or os.geteuid() != 0 and stat.S_IMODE(st.st_mode) == 0o640
    assert json.loads(target.read_text()) == {"a": [2], "b": 1}
    assert target.read_text().endswith("\n")


def test_atomic_write_ignores_the_umask(tmp_path):
    old = os.umask(0o077)
    try:
        fsutil.atomic_write(tmp_path / "image.json", "x", mode=0o644)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "image.json").stat().st_mode) == 0o644


def test_a_failed_write_leaves_nothing(tmp_path):
    target = tmp_path / "x.json"
    fsutil.atomic_write(target, "old")
    with pytest.raises(TypeError):
        fsutil.atomic_write(target, 12345)          # not bytes: fails after mkstemp
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]


def test_atomic_write_replaces_a_symlink_rather_than_writing_through_it(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("keep")
    link = tmp_path / "state.json"
    link.symlink_to(victim)
    fsutil.atomic_write(link, "new")
    assert victim.read_text() == "keep" and not link.is_symlink() and link.read_text() == "new"


def test_link_into_place_never_replaces(tmp_path):
    tmp, dst = tmp_path / ".d.tmp", tmp_path / "d"
    tmp.write_text("new")
    dst.write_text("old")
    with pytest.raises(FileExistsError):
        fsutil.link_into_place(tmp, dst)
    assert dst.read_text() == "old"
    dst.unlink()
    fsutil.link_into_place(tmp, dst)
    assert dst.read_text() == "new"


def test_locked_times_out_with_the_callers_error(tmp_path):
    lock = tmp_path / "x.lock"
    held = threading.Event()
    release = threading.Event()

    def holder():
        with fsutil.locked(lock, timeout=5, timed_out=lambda: Refused("t"),
                           failed=lambda e: Refused(str(e))):
            held.set()
            release.wait(10)

    t = threading.Thread(target=holder)
    t.start()
    try:
        assert held.wait(5)
        times = fsutil.LockTimes()
        with pytest.raises(Refused, match="^t$"):
            with fsutil.locked(lock, timeout=0.2, poll_s=0.01, times=times,
                               timed_out=lambda: Refused("t"), failed=lambda e: Refused("f")):
                pytest.fail("the lock was held by another")
        assert times.waited_s >= 0.2 and times.held_s is None
    finally:
        release.set()
        t.join()
    with fsutil.locked(lock, timeout=1, timed_out=lambda: Refused("t"),
                       failed=lambda e: Refused("f")) as got:
        assert got.waited_s < 1
    assert got.held_s is not None and got.held_s >= 0


def test_locked_names_an_unusable_lock_file(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(Refused, match="(Not a directory|File exists)"):
        with fsutil.locked(tmp_path / "file" / "x.lock", timeout=1,
                           timed_out=lambda: Refused("t"),
                           failed=lambda e: Refused(e.strerror)):
            pass


@pytest.mark.parametrize("bavail,favail,full", [
    (1000, 50, False),       # 4 MB and inodes left
    (200, 50, True),         # 800 KB: less than a MiB
    (1000, 0, True),         # blocks but no inode
])
def test_filesystem_full_is_under_a_mib_or_no_inode_for_a_user(monkeypatch, bavail, favail, full):
    real = os.statvfs("/")
    fake = os.statvfs_result((4096, 4096, 10**6, 10**5, bavail, 10**5, 10**4, favail, *real[8:]))
    monkeypatch.setattr(fsutil.os, "statvfs", lambda path: fake)
    assert fsutil.filesystem_full("/x") is full

