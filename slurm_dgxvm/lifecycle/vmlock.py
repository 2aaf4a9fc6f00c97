"""The per-VM lock: one ``flock`` per VM name, ``<state_dir>/locks/<name>.lock``.

Between ``create``'s ledger write and its libvirt define, a VM being made looks exactly like
the leftovers of a create that was killed; so does a VM in the middle of ``delete``. The lock
tells them apart:

* :func:`create` holds it from before it writes the ledger until it returns or has undone a
  failure; :func:`delete` holds it for its whole run. Both wait for it (at most
  :func:`wait_s`), so an admin's ``dgxvm delete`` of a VM being created runs after the create.
* ``dgxvm reconcile`` only tries it (:func:`try_held`): a name whose lock is held is in
  progress, and is skipped; under the lock it reads the name's facts again before acting.
* A ``flock`` belongs to the open file and dies with its process: a SIGKILLed Prolog, a
  power cut, frees it, so a lock never outlives the process that took it.
* The libvirt hook (:mod:`.libvirt_hook`) never takes it: libvirtd runs the hook inside the
  ``virsh start``/``shutdown`` that ``create`` and ``delete`` themselves wait for, while they
  hold the lock, so a hook that waited for it would hold libvirtd up until the lock's time-out.
  The hook stands aside by the record's state instead (``creating``, ``deleting``).

Locks are re-entrant within one process (``reconcile`` holds a name's lock and calls
``delete``, which takes it again): a second ``flock`` of the same file from the same process
would wait for itself.

Lock files do not accumulate: the holder removes the file while it still holds the lock, and a
taker checks, once it has the lock, that the file it locked is still the one at the path (one
unlinked under it means its holder released it; it opens the path again). A file left by a
killed process stays until the next holder of that name, or ``dgxvm reconcile``, takes the
lock and removes it: an empty file, one per name at most.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

from ..config import Config
from ..errors import LockError, LockTimeout

LOCK_DIR = "locks"
SUFFIX = ".lock"
POLL_S = 0.05
#: beyond the longest create or delete it may wait for (the guest's boot, a graceful shutdown)
WAIT_MARGIN_S = 60.0

# path -> [descriptor, depth] of the locks this process holds (re-entrance)
_held: dict[str, list[int]] = {}


def lock_dir(state_dir: str | os.PathLike) -> Path:
    return Path(state_dir) / LOCK_DIR


def lock_path(state_dir: str | os.PathLike, name: str) -> Path:
    """``<state_dir>/locks/<name>.lock``; ``name`` is a checked domain name (no ``/``)."""
    return lock_dir(state_dir) / f"{name}{SUFFIX}"


def wait_s(cfg: Config) -> float:
    """How long a create or delete waits for a name's lock: another create of that name may be
    booting its guest (``ready_timeout_s``) and a delete shutting one down
    (``shutdown_timeout_s``); past that, something is stuck."""
    return cfg.libvirt.ready_timeout_s + cfg.libvirt.shutdown_timeout_s + WAIT_MARGIN_S


@contextlib.contextmanager
def held(state_dir: str | os.PathLike, name: str, *, timeout: float) -> Iterator[Path]:
    """Hold ``name``'s lock for the block, waiting at most ``timeout`` seconds.

    Raises LockTimeout (exit 5) naming the lock and the VM when another process keeps it
    longer, LockError when the lock file cannot be made or locked."""
    path = lock_path(state_dir, name)
    with _holding(path, deadline=time.monotonic() + timeout) as got:
        if not got:
            raise LockTimeout(f"lock {path}: not acquired within {timeout:g}s (another dgxvm "
                              f"is creating or deleting {name})", path=str(path),
                              timeout=timeout)
        yield path


@contextlib.contextmanager
def try_held(state_dir: str | os.PathLike, name: str) -> Iterator[bool]:
    """Yields whether ``name``'s lock was free (it is then held for the block); never waits."""
    with _holding(lock_path(state_dir, name), deadline=None) as got:
        yield got


def is_held(state_dir: str | os.PathLike, name: str) -> bool:
    """Whether another process holds ``name``'s lock now (a probe: no file is made or
    removed, so a dry run changes nothing). False when this process holds it."""
    path = lock_path(state_dir, name)
    if str(path) in _held:
        return False
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise LockError(path=str(path), reason=f"cannot open: {exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)                     # drops the probe's lock, if it got one
    return False


def held_names(state_dir: str | os.PathLike) -> list[str]:
    """The names whose lock another process holds now (creates and deletes in progress)."""
    try:
        files = sorted(p.name for p in lock_dir(state_dir).iterdir())
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise LockError(path=str(lock_dir(state_dir)),
                        reason=f"cannot list: {exc.strerror or exc}") from None
    names = [f[:-len(SUFFIX)] for f in files if f.endswith(SUFFIX) and not f.startswith(".")]
    return [n for n in names if is_held(state_dir, n)]


@contextlib.contextmanager
def _holding(path: Path, *, deadline: float | None) -> Iterator[bool]:
    key = str(path)
    mine = _held.get(key)
    if mine is not None:                 # this process holds it already: re-entrant
        mine[1] += 1
        try:
            yield True
        finally:
            mine[1] -= 1
        return
    fd = _acquire(path, deadline)
    if fd is None:
        yield False
        return
    _held[key] = [fd, 1]
    try:
        yield True
    finally:
        del _held[key]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)              # while still held: see the module's docstring
        os.close(fd)


def _acquire(path: Path, deadline: float | None) -> int | None:
    """A descriptor of ``path`` locked exclusively, or None when it stayed held until
    ``deadline`` (None: one try)."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise LockError(path=str(path.parent),
                        reason=f"cannot create: {exc.strerror or exc}") from None
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            raise LockError(path=str(path), reason=f"cannot open: {exc.strerror or exc}") \
                from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if deadline is None or time.monotonic() >= deadline:
                return None
            time.sleep(POLL_S)
            continue
        except OSError as exc:
            os.close(fd)
            raise LockError(path=str(path), reason=f"cannot lock: {exc.strerror or exc}") \
                from None
        mine = os.fstat(fd)
        try:
            now = os.stat(path, follow_symlinks=False)
        except FileNotFoundError:
            now = None
        if now is not None and (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino):
            return fd
        os.close(fd)                     # its holder removed it as it released: the path's now


__all__ = ["held", "held_names", "is_held", "lock_path", "try_held", "wait_s"]
