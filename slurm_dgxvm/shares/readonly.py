"""A read-only view of a directory that neither the guest nor the share's virtiofsd can make
writable again.

The image cache share must be read-only whatever guest root does: the guest's ``ro`` mount
option is the guest's to change (``mount -o remount,rw``), and a guest that could write the
cache could fill the filesystem it lives on (``/var/lib/dgxvm``, with every tenant's overlay).
So the share's virtiofsd is started in a mount namespace of its own in which the directory is
a **read-only, nosuid, nodev bind mount, locked so**:

1. as root, :func:`mount_read_only` moves the wrapper into a private mount namespace (nothing
   propagates to the host's), clones the directory's mount (``open_tree(OPEN_TREE_CLONE)``),
   makes the clone read-only (``mount_setattr``) and attaches it over a root-only directory of
   the VM (``move_mount``);
2. :func:`.userns.enter` with ``mount_ns=True`` then creates the user namespace and a new mount
   namespace together: the kernel copies the mounts into a namespace owned by a less privileged
   user namespace and *locks* their read-only, nosuid and nodev flags (``MNT_LOCK_READONLY``,
   mount_namespaces(7)): no ``remount,rw``, no ``mount_setattr`` can clear them there or in any
   namespace made from it, and the mount cannot be taken off;
3. as the job's user, :func:`open_read_only` opens the mount and checks that it is read-only and
   is the directory that was checked (device, inode); virtiofsd serves that descriptor.

Every write through the share fails with EROFS in the host's kernel. A detached clone alone
(without step 2's copy) would not do: its flags are not locked, and a process holding its
descriptor that makes a user and mount namespace of its own may clear them (tried here, on
Linux 6.18). Linux 5.12 or later (``mount_setattr``); Debian 12's 6.1 has every call used.
Through ctypes, as :mod:`.userns` does: Python 3.11 wraps none of them.
"""

from __future__ import annotations

import ctypes
import os
import stat
from collections.abc import Sequence
from pathlib import Path

from . import userns
from .userns import CLONE_NEWNS, libc

# asm-generic/unistd.h: the same on x86_64 and arm64 (syscalls added since 5.1 share numbers)
SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429
SYS_MOUNT_SETATTR = 442
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
AT_EMPTY_PATH = 0x1000
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
ST_RDONLY = 1


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def _call(rc: int, what: str) -> int:
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return rc


def set_attr(fd: int, attr_set: int, attr_clr: int = 0) -> None:
    """``mount_setattr`` of the mount whose root ``fd`` is. OSError when refused."""
    attr = _MountAttr(attr_set, attr_clr, 0, 0)
    _call(libc.syscall(SYS_MOUNT_SETATTR, ctypes.c_int(fd), ctypes.c_char_p(b""),
                        ctypes.c_uint(AT_EMPTY_PATH), ctypes.byref(attr),
                        ctypes.c_size_t(ctypes.sizeof(attr))), "mount_setattr")


def mount_read_only(fd: int, point: Path) -> None:
    """As root: move this process into a private mount namespace and attach a read-only,
    nosuid, nodev bind of directory ``fd`` over ``point`` there (``point`` is made 0700 if
    missing; it must be a real directory of root's: the VM's own, never a user's path). The
    host's mounts are untouched. OSError naming the step that failed."""
    tree = _call(libc.syscall(SYS_OPEN_TREE, ctypes.c_int(fd), ctypes.c_char_p(b""),
                               ctypes.c_uint(OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC
                                             | AT_EMPTY_PATH)), "open_tree")
    try:
        # the clone is made in the host's namespace (open_tree clones only mounts of the
        # caller's), then attached in the private one
        set_attr(tree, MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV)
        _call(libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
        _call(libc.mount(None, b"/", None, ctypes.c_ulong(MS_REC | MS_PRIVATE), None),
              "make / private")
        try:
            os.mkdir(point, 0o700)
        except FileExistsError:
            pass
        st = os.lstat(point)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0:
            raise OSError(f"{point} must be a directory of root's")
        _call(libc.syscall(SYS_MOVE_MOUNT, ctypes.c_int(tree), ctypes.c_char_p(b""),
                            ctypes.c_int(-100), ctypes.c_char_p(os.fsencode(point)),
                            ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH)), "move_mount")
    finally:
        os.close(tree)


def open_read_only(point: Path, dev: int, ino: int) -> int:
    """Directory ``point`` (O_RDONLY, inheritable): it must be a read-only mount of the
    directory ``dev``/``ino``; OSError otherwise."""
    fd = os.open(point, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (dev, ino):
            raise OSError(f"{point} is not the checked directory")
        if not os.fstatvfs(fd).f_flag & ST_RDONLY:
            raise OSError(f"{point} is not mounted read-only")
    except BaseException:
        os.close(fd)
        raise
    os.set_inheritable(fd, True)
    return fd


def enter_read_only(fd: int, point: Path, *, uid: int, gid: int, groups: Sequence[int],
                    keep_caps: Sequence[str], dev: int, ino: int) -> int:
    """Steps 1-3 of the module for the process that serves directory ``fd`` next (as root,
    single-threaded): the locked read-only mount of it over ``point``, the user namespace of
    ``uid``/``gid``/``groups`` holding ``keep_caps`` with a mount namespace of its own, and the
    descriptor to serve (``fd`` is closed). OSError naming the step that failed."""
    mount_read_only(fd, point)
    os.close(fd)
    userns.enter(uid, gid, groups, keep_caps, mount_ns=True)
    return open_read_only(point, dev, ino)


__all__ = ["enter_read_only", "mount_read_only", "open_read_only", "set_attr"]
