"""Become a host user inside a fresh user namespace, keeping a few capabilities there.

The namespace maps only the user's uid and the user's groups onto themselves, so a capability
held in it applies to files owned by those ids and to nothing else; uid 0 does not exist in it.
libc calls go through ctypes: Python 3.11 has no os.unshare and no capset.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Iterable, Sequence

CLONE_NEWUSER = 0x10000000
CLONE_NEWNS = 0x00020000
PR_SET_KEEPCAPS = 8
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_RAISE = 2
_CAP_VERSION_3 = 0x20080522

# linux/capability.h
CAPS = {"chown": 0, "dac_override": 1, "dac_read_search": 2, "fowner": 3, "fsetid": 4,
        "kill": 5, "setgid": 6, "setuid": 7, "setpcap": 8, "sys_chroot": 18,
        "sys_admin": 21, "sys_resource": 24, "mknod": 27, "setfcap": 31}

libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def check(rc: int, what: str) -> None:
    """Raise OSError (errno and its text, naming ``what``) for a libc call that did not
    return 0."""
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def id_map(ids: Iterable[int]) -> str:
    """``/proc/PID/uid_map`` text mapping each id onto itself: ``"1000 1000 1\\n..."``."""
    return "".join(f"{i} {i} 1\n" for i in sorted(set(ids)))


def enter(uid: int, gid: int, groups: Sequence[int], keep_caps: Sequence[str], *,
          mount_ns: bool = False) -> None:
    """Move this (single-threaded) process into a new user namespace as ``uid``/``gid`` with
    ``groups``, holding ``keep_caps`` (names from CAPS) as ambient capabilities of that namespace,
    so that they survive the execve that follows. With ``mount_ns``, into a new mount namespace
    too, owned by the new user namespace: the kernel locks the flags of the mounts it copies
    there (a read-only mount stays read-only, :mod:`.readonly`).

    Must be called as root. A process cannot write an arbitrary id map for itself once it is in
    the new namespace, so a forked helper that stays outside writes it.
    """
    if uid == 0 or gid == 0:
        raise ValueError("refusing to map root into a share's namespace")
    gids = [gid, *groups]
    me = os.getpid()
    go_r, go_w = os.pipe()
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:                                   # the helper, outside the namespace
        status = b"\0"
        try:
            os.close(go_w)
            os.close(done_r)
            if os.read(go_r, 1) == b"u":
                with open(f"/proc/{me}/uid_map", "w") as f:
                    f.write(id_map([uid]))
                with open(f"/proc/{me}/gid_map", "w") as f:
                    f.write(id_map(gids))
                status = b"\1"
        except BaseException:  # noqa: BLE001 - the parent reports the failure
            pass
        finally:
            try:
                os.write(done_w, status)
            finally:
                os._exit(0)
    os.close(go_r)
    os.close(done_w)
    try:
        flags = CLONE_NEWUSER | (CLONE_NEWNS if mount_ns else 0)
        check(libc.unshare(flags), "unshare(CLONE_NEWUSER)")
        os.write(go_w, b"u")
        ok = os.read(done_r, 1) == b"\1"
    finally:
        os.close(go_w)
        os.close(done_r)
        os.waitpid(pid, 0)
    if not ok:
        raise OSError(f"cannot write the id maps of the user namespace (uid {uid}, gids {gids})")
    check(libc.prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0), "prctl(PR_SET_KEEPCAPS)")
    os.setgroups(sorted(set(groups)))
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    mask = 0
    for name in keep_caps:
        mask |= 1 << CAPS[name]
    header = _CapHeader(_CAP_VERSION_3, 0)
    data = (_CapData * 2)(_CapData(mask, mask, mask), _CapData(0, 0, 0))
    check(libc.capset(ctypes.byref(header), data), "capset")
    for name in keep_caps:
        check(libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, CAPS[name], 0, 0),
               f"raise ambient capability {name}")
