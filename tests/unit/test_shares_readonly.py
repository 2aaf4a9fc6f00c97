"""The image cache share is read-only on the host's side, and the share's own virtiofsd cannot
make it writable: proven with the real kernel calls, as the job's user in the share's user
namespace, trying what a compromised virtiofsd (or guest root through it) would try."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from slurm_dgxvm.shares import policy, readonly, userns, virtiofsd
from test_shares import in_child  # a forked child: its mounts and namespaces die with it

UID, GID = 54331, 54332
MS_REMOUNT, MS_BIND = 0x20, 0x1000
MNT_DETACH = 2


@pytest.fixture
def cache(traversable_tmp):
    d = traversable_tmp / "cache"
    d.mkdir(mode=0o700)
    (d / "image.json").write_text("{}\n")
    for p in (d, d / "image.json"):
        os.chown(p, UID, GID)
    return d


def _host_mounts() -> str:
    return Path("/proc/self/mountinfo").read_text()


def _attempts(point: Path, fd: int) -> dict:
    """What the user in the namespace gets for each way to write or to lift read-only."""
    out = {}

    def attempt(name, fn):
        try:
            fn()
            out[name] = "ok"
        except OSError as exc:
            out[name] = exc.errno

    attempt("create", lambda: os.close(os.open(f"/proc/self/fd/{fd}/new",
                                               os.O_WRONLY | os.O_CREAT, 0o600)))
    attempt("append", lambda: os.close(os.open(f"/proc/self/fd/{fd}/image.json",
                                               os.O_WRONLY | os.O_APPEND)))
    attempt("mkdir", lambda: os.mkdir(f"/proc/self/fd/{fd}/d"))
    lib = userns.libc

    def remount_rw():
        if lib.mount(None, os.fsencode(point), None, ctypes.c_ulong(MS_REMOUNT | MS_BIND),
                     None) != 0:
            raise OSError(ctypes.get_errno(), "remount")

    def umount():
        if lib.umount2(os.fsencode(point), MNT_DETACH) != 0:
            raise OSError(ctypes.get_errno(), "umount")

    def clear_rdonly():
        m = os.open(point, os.O_RDONLY | os.O_DIRECTORY)
        try:
            readonly.set_attr(m, 0, readonly.MOUNT_ATTR_RDONLY)
        finally:
            os.close(m)

    attempt("remount rw", remount_rw)
    attempt("clear rdonly", clear_rdonly)
    # what a compromised virtiofsd could still do: a user and mount namespace of its own, in
    # which it holds CAP_SYS_ADMIN
    if lib.unshare(userns.CLONE_NEWUSER | userns.CLONE_NEWNS) != 0:
        out["nested namespaces"] = ctypes.get_errno()
    attempt("nested remount rw", remount_rw)
    attempt("nested clear rdonly", clear_rdonly)
    attempt("nested umount", umount)
    attempt("nested create", lambda: os.close(os.open(f"/proc/self/fd/{fd}/new2",
                                                      os.O_WRONLY | os.O_CREAT, 0o600)))
    attempt("nested create at the mount point",
            lambda: os.close(os.open(point / "new3", os.O_WRONLY | os.O_CREAT, 0o600)))
    out["read"] = Path(f"/proc/self/fd/{fd}/image.json").read_text()
    return out


def test_the_users_namespace_cannot_write_the_share_or_make_it_writable(cache):
    point = cache.parent / "image-cache.ro"
    st = cache.stat()
    before = _host_mounts()
    r, w = os.pipe()

    def child() -> int:
        os.close(r)
        fd = readonly.enter_read_only(os.open(cache, os.O_RDONLY | os.O_DIRECTORY), point,
                                      uid=UID, gid=GID, groups=[GID],
                                      keep_caps=virtiofsd.KEEP_CAPS, dev=st.st_dev,
                                      ino=st.st_ino)
        os.write(w, json.dumps(_attempts(point, fd)).encode())
        return 0
    status = in_child(child)
    os.close(w)
    with os.fdopen(r) as f:
        got = json.loads(f.read() or "{}")
    assert status == 0, got
    assert got.pop("read") == "{}\n"                        # it serves what is there
    assert "nested namespaces" not in got                   # the attack could be made
    assert got == {"create": errno.EROFS, "append": errno.EROFS, "mkdir": errno.EROFS,
                   "remount rw": errno.EPERM, "clear rdonly": errno.EPERM,
                   "nested remount rw": errno.EPERM, "nested clear rdonly": errno.EPERM,
                   "nested umount": errno.EINVAL, "nested create": errno.EROFS,
                   "nested create at the mount point": errno.EROFS}
    assert sorted(os.listdir(cache)) == ["image.json"]
    assert _host_mounts() == before, "the read-only mount reached the host's namespace"


def test_only_the_checked_directory_is_served_and_only_read_only(cache, traversable_tmp):
    other = traversable_tmp / "other"
    other.mkdir()
    plain = traversable_tmp / "plain"
    plain.mkdir()
    st = cache.stat()

    def child() -> int:
        fd = os.open(other, os.O_RDONLY | os.O_DIRECTORY)
        readonly.mount_read_only(fd, traversable_tmp / "point")
        try:
            readonly.open_read_only(traversable_tmp / "point", st.st_dev, st.st_ino)
        except OSError as exc:
            if "not the checked directory" not in str(exc):
                return 2
        else:
            return 3
        try:                                    # right inode, but not a read-only mount
            readonly.open_read_only(cache, st.st_dev, st.st_ino)
        except OSError as exc:
            return 0 if "not mounted read-only" in str(exc) else 4
        return 5
    assert in_child(child) == 0


def test_a_mount_point_that_is_not_roots_is_refused(cache, traversable_tmp):
    point = traversable_tmp / "users"
    point.mkdir()
    os.chown(point, UID, GID)
    def child() -> int:
        fd = os.open(cache, os.O_RDONLY | os.O_DIRECTORY)
        try:
            readonly.mount_read_only(fd, point)
        except OSError as exc:
            return 0 if "must be a directory of root's" in str(exc) else 2
        return 1
    assert in_child(child) == 0


FAKE_VIRTIOFSD = """#!/bin/sh
# stands in for virtiofsd: what its source lets it do, as it was started
for a in "$@"; do case "$a" in *source=*) src=${a#*source=}; src=${src%%,*};; esac; done
{ echo "uid=$(id -u)"
  cat "$src/image.json" >/dev/null && echo read=ok
  touch "$src/new" 2>/dev/null && echo write=ok || echo write=refused
} > "$REPORT"
"""


def test_the_wrapper_serves_a_read_only_share_to_virtiofsd(cache, traversable_tmp):
    vmdir = traversable_tmp / "vm"
    vmdir.mkdir(mode=0o711)
    policy.pin(str(cache), UID, GID, [GID]).save(vmdir / "image-cache.json")
    fake = traversable_tmp / "fake-virtiofsd"
    fake.write_text(FAKE_VIRTIOFSD)
    fake.chmod(0o755)
    report = traversable_tmp / "report"
    report.touch()
    os.chown(report, UID, GID)
    script = virtiofsd.wrapper_script(vmdir / "image-cache.json", virtiofsd=str(fake),
                                      python=sys.executable, read_only=True)
    assert f"{virtiofsd.READ_ONLY} " in script
    (vmdir / "wrapper").write_text(script)
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(vmdir / "sock"))
    fd = sock.fileno()
    try:
        proc = subprocess.run(["/bin/sh", str(vmdir / "wrapper"), f"--fd={fd}", "-o",
                               f"source={cache},xattr"], pass_fds=[fd], timeout=60,
                              capture_output=True, text=True,
                              env={**os.environ, "REPORT": str(report)})
    finally:
        sock.close()
    assert proc.returncode == 0, proc.stderr
    assert report.read_text().split() == [f"uid={UID}", "read=ok", "write=refused"]
    assert sorted(os.listdir(cache)) == ["image.json"]
    assert (vmdir / "image-cache.ro").is_dir() and not os.listdir(vmdir / "image-cache.ro")
