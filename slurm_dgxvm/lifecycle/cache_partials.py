"""The partial entries of the users' container image caches, for ``dgxvm reconcile``.

A pull builds its entry in ``<cache_dir>/<uid>/tmp/<hex>.<pid>.<rand>/`` under the digest's pull
lock and renames it into place whole (:mod:`slurm_dgxvm.containers.cache`); a pull killed or
out of disk leaves that directory, which nothing reads. The cache's own sweep removes such
leftovers of every digest whose pull lock it can take (``ImageCache.evict`` with no limits:
nothing else is evicted), so a pull in progress keeps its directory.

Each cache is the user's (0700, the user's files): root must not walk it, as a symlink the user
put there would send root's deletions anywhere (README, "Container image cache"). So the
listing and the sweep run in a child process that has become the cache's owner (its uid, its
gid, no other groups), and only the names come back. A cache whose directory is not a real
directory of the uid it is named for is left alone (``cachedir`` refuses it too).
"""

from __future__ import annotations

import fcntl
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from ..config import Config

TMP = "tmp"


@dataclass(frozen=True)
class CachePartials:
    """A user's cache and the partial entries found in its ``tmp/`` whose pull is not running
    (its lock is free)."""

    path: str
    uid: int
    gid: int
    names: tuple[str, ...]


def user_caches(cfg: Config) -> list[tuple[Path, int, int]]:
    """(path, uid, gid) of every user's cache under ``[containers] cache_dir`` (root's
    ``<cache_dir>`` is listed, nothing below it)."""
    root = cfg.containers.cache_dir
    if not root:
        return []
    try:
        names = sorted(os.listdir(root))
    except OSError:
        return []
    out = []
    for name in names:
        if not (name.isascii() and name.isdigit()):
            continue
        path = Path(root) / name
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode) and st.st_uid == int(name) and st.st_uid > 0:
            out.append((path, st.st_uid, st.st_gid))
    return out


def find(cfg: Config) -> list[CachePartials]:
    """The partial entries no pull holds, of every user's cache (read as each user)."""
    out = []
    for path, uid, gid in user_caches(cfg):
        names = _as_user(uid, gid, lambda p=path: _free_partials(p))
        if names:
            out.append(CachePartials(path=str(path), uid=uid, gid=gid, names=tuple(names)))
    return out


def sweep(partials: CachePartials) -> list[str]:
    """Remove ``partials``' leftovers with the cache's own sweep, as the user; the names that
    went (one a pull took up meanwhile stays)."""
    path = Path(partials.path)

    def run() -> list[str]:
        from ..containers.cache import ImageCache
        before = _listing(path)
        ImageCache(path).evict(skip_if_busy=True)    # no limits: only leftovers and dead refs
        after = set(_listing(path))
        return [n for n in before if n not in after]
    return _as_user(partials.uid, partials.gid, run)


def _listing(path: Path) -> list[str]:
    try:
        return sorted(os.listdir(path / TMP))
    except FileNotFoundError:
        return []


def _free_partials(path: Path) -> list[str]:
    """The ``tmp/`` entries whose digest's pull lock nobody holds (probed, never made)."""
    out = []
    for name in _listing(path):
        hex_ = name.split(".", 1)[0]
        algo = "sha512" if len(hex_) == 128 else "sha256"
        lock = path / "locks" / f"{algo}-{hex_}.lock"     # ImageCache's pull lock of it
        try:
            fd = os.open(lock, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            out.append(name)
            continue
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            out.append(name)
        except BlockingIOError:
            pass                                     # a pull of that digest is running
        finally:
            os.close(fd)
    return out


def _as_user(uid: int, gid: int, work) -> list[str]:
    """``work()`` in a child process running as ``uid``/``gid`` (no other groups); its list of
    names, or [] when the child failed (a cache that cannot be read is not one to sweep)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                                     # the child: never returns
        code = 1
        try:
            os.close(r)
            if os.geteuid() != uid:
                os.setgroups([])
                os.setgid(gid)
                os.setuid(uid)
            data = json.dumps(work()).encode()
            with os.fdopen(w, "wb") as f:
                f.write(data)
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    if not os.WIFEXITED(status) or os.WEXITSTATUS(status) != 0:
        return []
    try:
        names = json.loads(data)
    except ValueError:
        return []
    return [n for n in names if isinstance(n, str)]


__all__ = ["CachePartials", "find", "sweep", "user_caches"]
