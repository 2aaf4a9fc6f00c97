"""The partial entries of the users' container image caches, for ``dgxvm reconcile``.

A pull builds its entry in ``<cache_dir>/<uid>/tmp/<hex>.<pid>.<rand>/`` under the digest's pull
lock and renames it into place whole (:mod:`slurm_dgxvm.containers.cache`); a pull killed or
out of disk leaves that directory, which nothing reads. The cache's own sweep removes such
leftovers of every digest whose pull lock it can take (``ImageCache.evict`` with no limits:
nothing else is evicted), so a pull in progress keeps its directory.

Each cache is the user's (0700, the user's files): root must not walk it, as a symlink the user
put there would send root's deletions anywhere (docs/admin/images.md, "The container image cache"). So the
listing and the sweep run as the cache's owner (its uid, its gid, no other groups) through
:func:`slurm_dgxvm.shares.asuser.run`: a child holding none of root's descriptors, which opens
nothing through a symlink and nothing that is not what it should be (a lock file that is a FIFO
is refused, never waited on), and is killed at a deadline (:data:`~.asuser.DEADLINE_S` to
list, :data:`SWEEP_DEADLINE_S` to sweep). Only the names come back. A cache that refuses or
does not answer in time is one :class:`CachePartials` with ``refused`` saying why: reconcile
reports it and goes on. A cache whose directory is not a real directory of the uid it is named
for is left alone (``cachedir`` refuses it too).
"""

from __future__ import annotations

import fcntl
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from .. import fsutil
from ..config import Config
from ..errors import UserTreeRefused
from ..shares import asuser

TMP = "tmp"


#: Seconds the sweep of one user's cache may take (what dead pulls left may be gigabytes to
#: remove); past it the sweeping process is killed: what it removed is gone, the next run goes on
SWEEP_DEADLINE_S = 60.0
#: a pull's (or an eviction's) directory in tmp/: the digest's hex, a dot, anything
_PARTIAL = re.compile(r"([0-9a-f]{64}|[0-9a-f]{128})\..*", re.S)


@dataclass(frozen=True)
class CachePartials:
    """A user's cache and the partial entries found in its ``tmp/`` whose pull is not running
    (its lock is free); or, with ``refused``, why the cache could not be read as its user
    (then ``names`` is empty and nothing in it is touched)."""

    path: str
    uid: int
    gid: int
    names: tuple[str, ...]
    refused: str | None = None


def user_caches(cfg: Config) -> list[tuple[Path, int, int]]:
    """(path, uid, gid) of every user's cache under ``[containers] cache_dir`` (root's
    ``<cache_dir>`` is listed; each entry is looked at through a descriptor that crosses no
    mount and follows no link, so whatever a user mounted over their cache is never asked
    anything by root; such a cache is left out)."""
    root = cfg.containers.cache_dir
    if not root:
        return []
    try:
        rfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return []
    out = []
    try:
        for name in sorted(os.listdir(rfd)):
            if not (name.isascii() and name.isdigit()):
                continue
            try:
                fd = fsutil.open_here(name, rfd)
            except OSError:
                continue
            try:
                st = os.fstat(fd)
            finally:
                os.close(fd)
            if stat.S_ISDIR(st.st_mode) and st.st_uid == int(name) and st.st_uid > 0:
                out.append((Path(root) / name, st.st_uid, st.st_gid))
    finally:
        os.close(rfd)
    return out


def find(cfg: Config) -> list[CachePartials]:
    """The partial entries no pull holds, of every user's cache (read as each user, each
    within :data:`~.asuser.DEADLINE_S`), and each cache that refused or did not answer."""
    out = []
    for path, uid, gid in user_caches(cfg):
        try:
            names = asuser.run(lambda p=str(path): _free_partials(p), uid=uid, gid=gid,
                               groups=[gid], subject=str(path),
                               doing="listing its partial entries").value
        except UserTreeRefused as exc:             # a UserTreeTimeout too
            out.append(CachePartials(path=str(path), uid=uid, gid=gid, names=(),
                                     refused=str(exc.reason)))
            continue
        names = [n for n in names or () if isinstance(n, str)]
        if names:
            out.append(CachePartials(path=str(path), uid=uid, gid=gid, names=tuple(names)))
    return out


def sweep(partials: CachePartials) -> list[str]:
    """Remove ``partials``' leftovers with the cache's own sweep, as the user, within
    :data:`SWEEP_DEADLINE_S`; the names that went (one a pull took up meanwhile stays).
    UserTreeRefused (UserTreeTimeout) when the user's files refused or stalled it."""
    from ..containers.cache import ImageCache      # here, in the parent: not after the fork
    path = partials.path

    def run() -> list[str]:
        before = _listing(path)
        ImageCache(path).evict(skip_if_busy=True)    # no limits: only leftovers and dead refs
        after = set(_listing(path))
        return [n for n in before if n not in after]
    gone = asuser.run(run, uid=partials.uid, gid=partials.gid, groups=[partials.gid],
                      subject=path, timeout_s=SWEEP_DEADLINE_S,
                      doing="sweeping its partial entries").value
    return [n for n in gone or () if isinstance(n, str)]


def _listing(path: str) -> list[str]:
    """The names in ``path``'s ``tmp/`` (none when there is none), opened without following
    a symlink."""
    root = asuser.open_dir(path)
    try:
        try:
            tmp = asuser.open_dir(TMP, dir_fd=root, show=f"{path}/{TMP}")
        except FileNotFoundError:
            return []
        try:
            return sorted(os.listdir(tmp))
        finally:
            os.close(tmp)
    finally:
        os.close(root)


def _free_partials(path: str) -> list[str]:
    """The ``tmp/`` entries whose digest's pull lock nobody holds (probed, never made). A lock
    that is not a regular file (a FIFO, a socket, a symlink) refuses the whole cache."""
    out = []
    names = [n for n in _listing(path) if _PARTIAL.fullmatch(n)]
    if not names:
        return out
    root = asuser.open_dir(path)
    try:
        try:
            locks = asuser.open_dir("locks", dir_fd=root, show=f"{path}/locks")
        except FileNotFoundError:
            return names                             # no lock ever made: no pull holds one
    finally:
        os.close(root)
    try:
        for name in names:
            hex_ = name.split(".", 1)[0]
            algo = "sha512" if len(hex_) == 128 else "sha256"
            lock = f"{algo}-{hex_}.lock"               # ImageCache's pull lock of it
            try:
                fd = asuser.open_file(lock, dir_fd=locks, show=f"{path}/locks/{lock}")
            except FileNotFoundError:
                out.append(name)
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                out.append(name)
            except BlockingIOError:
                pass                                 # a pull of that digest is running
            finally:
                os.close(fd)
    finally:
        os.close(locks)
    return out


__all__ = ["CachePartials", "SWEEP_DEADLINE_S", "find", "sweep", "user_caches"]
