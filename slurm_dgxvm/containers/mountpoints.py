"""Mount points in a cached image's rootfs, made on the host before a run.

The guest runs the image read-only straight from the user's cache share, so runc cannot create
the directories (or files) it mounts on: /proc, /dev, /sys, /tmp, the work dir at its own path,
``--container-mounts`` targets, ``--container-workdir``. ``dgxvm run`` runs as the cache's
owner, so it makes them in the entry on the host: empty directories and files, nothing else.

/tmp and /var/tmp, when the image lacks them, are made 1777 as images have them: runc gives a
tmpfs the mode of the directory it is mounted on (its ``mode=1777`` option notwithstanding), so
a 0755 mount point would leave the user no scratch space in the container.

Every component is walked with ``O_NOFOLLOW`` from the rootfs's own descriptor: an image whose
``/var/run`` is a symlink (to ``/run``, or to anywhere) never makes dgxvm create a directory
outside the rootfs; such a target is refused naming it (an image's symlink on a mount target
would be followed by the runtime in the guest, too).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable
from pathlib import Path

from ..errors import BadInput

STANDARD_DIRS = ("/proc", "/dev", "/sys", "/tmp", "/run", "/var/tmp", "/etc")
STANDARD_FILES = ("/etc/resolv.conf", "/etc/hosts")
STICKY_DIRS = ("/tmp", "/var/tmp")      # made 1777 (world-writable, sticky) where missing


def _components(path: str) -> list[str]:
    parts = [p for p in path.split("/") if p]
    if not path.startswith("/") or any(p in (".", "..") for p in parts):
        raise BadInput(f"container mount point {path!r}: not an absolute normalised path",
                       value=path)
    return parts


def _walk(root_fd: int, parts: list[str], path: str) -> int:
    """A descriptor of the directory ``parts`` below ``root_fd``, made where missing."""
    fd = os.dup(root_fd)
    try:
        for i, name in enumerate(parts):
            made = False
            try:
                os.mkdir(name, 0o755, dir_fd=fd)
                made = True
            except FileExistsError:
                pass
            try:
                nxt = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise BadInput(f"container mount point {path}: {name!r} in the image is a "
                                   "symlink or not a directory", value=path) from None
                raise
            os.close(fd)
            fd = nxt
            if made and "/" + "/".join(parts[:i + 1]) in STICKY_DIRS:
                os.fchmod(fd, 0o1777)       # mkdir's mode passes the umask
        return fd
    except BaseException:
        os.close(fd)
        raise


def ensure(rootfs: Path, dirs: Iterable[str] = (), files: Iterable[str] = ()) -> list[str]:
    """Make the directories ``dirs`` and the empty files ``files`` (absolute paths in the
    container) in ``rootfs`` where missing; returns the ``files`` that are regular files now
    (one the image has as a symlink or a directory is left alone, and not bound). BadInput
    naming a path the image makes impossible."""
    made: list[str] = []
    root_fd = os.open(rootfs, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        for d in dirs:
            os.close(_walk(root_fd, _components(d), d))
        for f in files:
            parts = _components(f)
            if not parts:
                continue
            parent = _walk(root_fd, parts[:-1], f)
            try:
                fd = os.open(parts[-1], os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644,
                             dir_fd=parent)
                os.close(fd)
                made.append(f)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.EISDIR):
                    continue   # a symlink (resolv.conf -> ../run/...) or a directory
                raise
            finally:
                os.close(parent)
    finally:
        os.close(root_fd)
    return made


def ensure_links(rootfs: Path, links: dict[str, str]) -> list[str]:
    """Make each symlink ``path -> target`` of ``links`` in ``rootfs`` where ``path`` does not
    exist (one the image has, as anything, is left alone); returns those made. The parent is
    walked as :func:`ensure` does, never following the image's symlinks."""
    made: list[str] = []
    root_fd = os.open(rootfs, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        for path, target in links.items():
            parts = _components(path)
            parent = _walk(root_fd, parts[:-1], path)
            try:
                os.symlink(target, parts[-1], dir_fd=parent)
                made.append(path)
            except FileExistsError:
                pass
            finally:
                os.close(parent)
    finally:
        os.close(root_fd)
    return made
