"""Where a user's container image cache lives on a node: ``<cache_dir>/<uid>/``.

Made by root (the Prolog, ``dgxvm create``) before the user's VM is defined, so the VM can get it
as a read-only share at the same path, and ``dgxvm run`` (as the user) can fill it:

    <cache_dir>/          root:root 0711: nobody lists whose caches exist, each user reaches
                          their own; only root makes or removes entries here
    <cache_dir>/<uid>/    uid:gid 0700: the user's own images (slurm_dgxvm.containers.cache)

Nothing here follows a symbolic link: ``<cache_dir>`` is opened with O_NOFOLLOW, the entry is
made relative to that descriptor and looked at through an O_PATH descriptor that neither
follows a link nor crosses a mount (``fsutil.open_here``), and what was opened is checked by
fstat. Root never enters the user's entry: whatever the user mounted over it (FUSE, with its
daemon stopped) is never asked anything, and is the job's refusal, not the node's fault; only
an entry of root's (a creator killed before its chown) is opened, to give it to the user. An
entry that is there but is not a real directory of that uid (a symlink, a file, a directory of
another owner) is refused, naming it: only root can put anything in
``<cache_dir>``, so such an entry is the node's to fix, not something to serve or to repair
silently. Two Prologs of one user at once serialise on a lock of ``<cache_dir>`` itself (flock on
its descriptor, which only root can open for reading), so the second finds the entry complete.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from pathlib import Path

from .. import fsutil
from ..config import Config
from ..errors import ContainerCacheError, ImageCacheRefused

ROOT_MODE = 0o711
USER_MODE = 0o700
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def user_cache_dir(cfg: Config, uid: int, gid: int) -> Path:
    """``<cache_dir>/<uid>``, made (uid:gid, 0700) if missing, under ``<cache_dir>`` (made
    root:root 0711 if missing). Idempotent; as root. Raises ContainerCacheError naming the path
    when ``cache_dir`` is not set, or is not a real directory of root's that only root may
    write, or when the entry is not a real directory owned by ``uid``; ImageCacheRefused (the
    job is refused or its VM gets no cache, ``[vm] share_refused``; the node stays in service)
    when the entry cannot be made because the filesystem is full or over quota, or when
    something is mounted over it (only the user, FUSE, or an admin can)."""
    if not cfg.containers.cache_dir:
        raise ContainerCacheError(path="(none)", reason="containers.cache_dir is not set")
    if type(uid) is not int or uid <= 0 or type(gid) is not int or gid < 0:
        raise ContainerCacheError(path=cfg.containers.cache_dir,
                                  reason=f"no cache for uid {uid!r} gid {gid!r}")
    root = Path(cfg.containers.cache_dir)
    rfd = _open_root(root)
    try:
        fcntl.flock(rfd, fcntl.LOCK_EX)       # released with the descriptor
        path = root / str(uid)
        try:
            os.mkdir(str(uid), USER_MODE, dir_fd=rfd)
            made = True
        except FileExistsError:
            made = False
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                # what users pulled filled it (a quota, or a filesystem of the caches' own:
                # `dgxvm host check`, user-storage): no reason to take the node out of service
                raise ImageCacheRefused(value=str(path), reason=f"cannot create it: "
                                        f"{exc.strerror} (the filesystem of "
                                        f"{cfg.containers.cache_dir} is full)") from None
            raise ContainerCacheError(path=str(path),
                                      reason=f"cannot create it: {exc.strerror}") from None
        try:
            here = fsutil.open_here(str(uid), rfd)
        except OSError as exc:
            if exc.errno == errno.EXDEV:
                # only the user (a FUSE mount of theirs) or an admin mounts over it: what is
                # mounted there is never entered by root, not even to stat it
                raise ImageCacheRefused(value=str(path), reason="something is mounted over it "
                                        "(a FUSE mount of the user's?); root does not look "
                                        "inside") from None
            raise ContainerCacheError(path=str(path),
                                      reason=f"cannot open it: {exc.strerror}") from None
        try:
            st = os.fstat(here)
            if stat.S_ISLNK(st.st_mode):
                raise ContainerCacheError(path=str(path), reason="it is a symbolic link (it "
                                                                 "must be a real directory)")
            if not stat.S_ISDIR(st.st_mode):
                raise ContainerCacheError(path=str(path), reason="it is not a directory")
            if made or st.st_uid == 0:
                _give(here, path, uid, gid, made)
                st = os.fstat(here)
            if st.st_uid != uid:
                raise ContainerCacheError(path=str(path),
                                          reason=f"it is owned by uid {st.st_uid}, not by "
                                                 f"{uid} (remove it, or give it to {uid})")
        finally:
            os.close(here)
    finally:
        os.close(rfd)
    return path


def _give(here: int, path: Path, uid: int, gid: int, made: bool) -> None:
    """Give the entry ``here`` (an O_PATH descriptor of a directory of root's) to the user:
    one just made, or an empty one a creator killed before this chown left (only root makes
    entries here). A non-empty one of root's stays root's (and is refused after)."""
    fd = os.open(".", _DIR, dir_fd=here)
    try:
        if made or not os.listdir(fd):
            os.fchown(fd, uid, gid)
            os.fchmod(fd, USER_MODE)           # whatever the umask left
    finally:
        os.close(fd)


def _open_root(root: Path) -> int:
    """``<cache_dir>`` (its parents made 0755 if missing), a real directory of root's that no
    one else may write."""
    try:
        root.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    except OSError as exc:
        raise ContainerCacheError(path=str(root.parent),
                                  reason=f"cannot create it: {exc.strerror}") from None
    try:
        os.mkdir(root, ROOT_MODE)
        made = True
    except FileExistsError:
        made = False
    except OSError as exc:
        raise ContainerCacheError(path=str(root), reason=f"cannot create it: {exc.strerror}") \
            from None
    fd = _open_dir(str(root), None, root)
    if made:
        os.fchmod(fd, ROOT_MODE)               # whatever the umask left
    st = os.fstat(fd)
    if st.st_uid != 0 or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        os.close(fd)
        raise ContainerCacheError(path=str(root),
                                  reason=f"it must be root's and writable by root only "
                                         f"(owner uid {st.st_uid}, mode "
                                         f"{stat.S_IMODE(st.st_mode):04o}; expected root, 0711)")
    return fd


def _open_dir(name: str, dir_fd: int | None, path: Path) -> int:
    """Open directory ``name`` without following a symlink; an error naming ``path`` if it is
    a symlink or not a directory."""
    try:
        return os.open(name, _DIR, dir_fd=dir_fd)
    except OSError as exc:
        try:
            st = os.lstat(name, dir_fd=dir_fd)
        except OSError:
            st = None
        if st is not None and stat.S_ISLNK(st.st_mode):
            why = "it is a symbolic link (it must be a real directory)"
        elif st is not None and not stat.S_ISDIR(st.st_mode):
            why = "it is not a directory"
        else:
            why = f"cannot open it: {exc.strerror}"
        raise ContainerCacheError(path=str(path), reason=why) from None
