"""The one way slurm-dgxvm writes state and locks it.

- :func:`atomic_write`: a temp file in the same directory, written, chmodded (and chowned)
  before it has its name, fsynced, renamed over the target, and the directory fsynced. A crash
  at any point leaves the old file or the new one, never a mix, and never a wider mode; the temp
  file of a failed write is removed.
- :func:`link_into_place`: give a finished temp file its name without ever replacing a file
  that is there (disks, images).
- :func:`locked`: an exclusive ``flock(2)`` on a lock file with a bounded wait; the caller says
  which error a time-out or an unusable lock file becomes, and reads how long it waited and held
  the lock.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable, Iterator

PathLike = str | os.PathLike[str]


FULL_BELOW_BYTES = 1 << 20


def filesystem_full(path: PathLike) -> bool:
    """Whether the filesystem holding ``path`` has less than :data:`FULL_BELOW_BYTES` or no inode
    left for an unprivileged writer: what a tool that failed while writing there most likely ran
    into, whatever it managed to say before it died (umoci can panic on the error path of a full
    disk, its tail a goroutine dump). False when ``path`` cannot be looked at.

    >>> filesystem_full("/nonexistent/dgxvm")
    False
    """
    try:
        st = os.statvfs(path)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < FULL_BELOW_BYTES or (st.f_files > 0 and st.f_favail == 0)


def fsync_dir(path: PathLike) -> None:
    """Make a rename or a new name in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class WriteTimes:
    """Where one :func:`atomic_write` spent its time (seconds): creating and writing the temp
    file, its fsync, the rename, the directory's fsync."""

    write_s: float = 0.0
    fsync_s: float = 0.0
    rename_s: float = 0.0
    fsync_dir_s: float = 0.0


def atomic_write(path: PathLike, data: bytes | str, *, mode: int = 0o600,
                 uid: int | None = None, gid: int | None = None,
                 times: WriteTimes | None = None) -> None:
    """Replace ``path`` with ``data`` atomically and durably.

    The file has ``mode`` (and, with ``uid``/``gid``, that owner) before it is renamed into
    place, so it is never readable by anyone it should not be, not even for a moment. OSError
    propagates; the caller names the file in its own error. ``times``, when given, gets the
    duration of each step (for benchmarks).
    """
    t0 = time.perf_counter()
    with _pending_write(path, mode=mode, uid=uid, gid=gid, sync=False) as pending:
        made = time.perf_counter() - t0
        pending.commit(data, times=times)
    if times is not None:
        times.write_s += made


class PendingWrite:
    """The second half of :func:`pending_write`: :meth:`commit` writes the data into the temp
    file made by the first half, fsyncs it, renames it over the target and fsyncs the
    directory, exactly as :func:`atomic_write` does."""

    def __init__(self, path: Path, fd: int, tmp: str):
        self.path = path
        self._fd: int | None = fd
        self._tmp: str | None = tmp

    def commit(self, data: bytes | str, *, times: WriteTimes | None = None) -> None:
        """Write ``data`` and put it in place, atomically and durably. Once only."""
        if self._fd is None:
            raise RuntimeError(f"pending write of {self.path} already committed or discarded")
        clock = time.perf_counter
        t0 = clock()
        if isinstance(data, str):
            data = data.encode("utf-8")
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]
        t1 = clock()
        os.fsync(self._fd)
        t2 = clock()
        os.close(self._fd)
        self._fd = None
        os.replace(self._tmp, self.path)
        self._tmp = None
        t3 = clock()
        fsync_dir(self.path.parent)
        if times is not None:
            times.write_s, times.fsync_s = t1 - t0, t2 - t1
            times.rename_s, times.fsync_dir_s = t3 - t2, clock() - t3

    def _discard(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        if self._tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._tmp)
            self._tmp = None


@contextlib.contextmanager
def _pending_write(path: PathLike, *, mode: int = 0o600, uid: int | None = None,
                   gid: int | None = None, sync: bool = True) -> Iterator[PendingWrite]:
    """:func:`atomic_write` in two halves: the temp file is made now (its mode and owner set),
    the data is written and put in place by ``commit(data)`` later in the block, or never: a
    temp file not committed is removed when the block ends.

    With ``sync`` (the default) the empty temp file is fsynced at once. On a journalling
    filesystem that commits, now, whatever the filesystem had pending (other processes'
    metadata, and in ext4's data=ordered mode their newly allocated data): a writer that takes a
    lock between the halves then pays, under the lock, only for its own small change. It is an
    extra fsync; the two that make the write durable are still commit()'s.
    """
    path = Path(path)
    # the writer's pid in the name: sweep_dead_temps() removes what a killed writer left
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp",
                               dir=path.parent)
    pending = PendingWrite(path, fd, tmp)
    try:
        os.fchmod(fd, mode)
        if uid is not None or gid is not None:
            os.fchown(fd, -1 if uid is None else uid, -1 if gid is None else gid)
        if sync:
            os.fsync(fd)
        yield pending
    finally:
        pending._discard()


pending_write = _pending_write    # atomic_write uses the one behind the public name


def sweep_dead_temps(path: PathLike) -> int:
    """Remove the temp files of :func:`pending_write` for ``path`` whose writer is dead (a
    process SIGKILLed between making its temp file and committing it: a Prolog killed while
    it waited for the ledger's lock). A temp file of a live process, or one whose name has no
    pid, is left alone. Returns how many were removed."""
    path = Path(path)
    prefix = f".{path.name}."
    removed = 0
    try:
        names = os.listdir(path.parent)
    except OSError:
        return 0
    for name in names:
        if not (name.startswith(prefix) and name.endswith(".tmp")):
            continue
        pid = name[len(prefix):].split(".", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
            continue                      # alive (or not ours to signal): its file
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path.parent / name)
            removed += 1
    return removed


def atomic_write_json(path: PathLike, doc, *, mode: int = 0o600, uid: int | None = None,
                      gid: int | None = None, indent: int = 1) -> None:
    """:func:`atomic_write` of ``doc`` as JSON (sorted keys, a final newline)."""
    text = json.dumps(doc, indent=indent, sort_keys=True) + "\n"
    atomic_write(path, text, mode=mode, uid=uid, gid=gid)


def link_into_place(tmp: PathLike, path: PathLike) -> None:
    """Give ``tmp`` the name ``path`` without ever replacing an existing ``path``
    (FileExistsError if one is there). ``tmp`` keeps its name where hard links work; the caller
    removes it."""
    try:
        os.link(tmp, path)                    # EEXIST if someone was quicker: never clobber
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        if os.path.lexists(path):             # no hard links here: check, then rename
            raise FileExistsError(errno.EEXIST, "File exists", str(path)) from None
        os.rename(tmp, path)


@dataclass
class LockTimes:
    """How long a :func:`locked` block waited for its lock and held it (seconds)."""

    waited_s: float | None = None
    held_s: float | None = None


# flock(2) reports a lock held elsewhere as EWOULDBLOCK (= EAGAIN); some filesystems say EACCES
_CONTENDED = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES})
_OPEN_FLAGS = os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK


def _open_lock_file(path: str, mode: int) -> int | None:
    """An fd on the lock file, created with ``mode`` (umask or not) if it is not there, and its
    missing parent directories with it (as filelock does); None when it vanished between two
    attempts (the caller tries again)."""
    create = _OPEN_FLAGS | os.O_CREAT | os.O_EXCL
    try:
        try:
            fd = os.open(path, create, mode)
        except FileNotFoundError:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, create, mode)
    except FileExistsError:
        try:
            return os.open(path, _OPEN_FLAGS)
        except FileNotFoundError:
            return None
    with contextlib.suppress(PermissionError):
        os.fchmod(fd, mode)                   # mode= of open() is filtered by the umask
    return fd


@contextlib.contextmanager
def locked(path: PathLike, *, timeout: float, timed_out: Callable[[], Exception],
           failed: Callable[[OSError], Exception], poll_s: float = 0.05, mode: int = 0o644,
           times: LockTimes | None = None) -> Iterator[LockTimes]:
    """Hold the lock file ``path`` for the block.

    Waits at most ``timeout`` seconds (a negative one: for ever), trying every ``poll_s``. Past
    it, raises ``timed_out()``; a lock file that cannot be opened or locked raises
    ``failed(oserror)``: the caller's own errors, naming its lock. ``times`` (or the yielded
    object) gets the wait and the hold, measured with a monotonic clock.

    The lock is an exclusive ``flock(2)`` on the file, the lock filelock's ``FileLock`` takes on
    Unix, so the two exclude each other. It is taken here with a non-blocking ``flock`` per
    attempt on one open fd: filelock 4 costs ~40 ms to import and tens of microseconds of Python
    per attempt, which 15 waiting Prologs spent on the CPU the lock's holder needed. The file is
    never removed (a waiter may hold its inode); one found unlinked after the lock was taken is
    let go and the lock taken again on the file that has the name. Symbolic links are refused.
    Nested ``locked`` of one file (even in one process) waits for itself, and times out.
    """
    times = times if times is not None else LockTimes()
    start = time.perf_counter()
    deadline = None if timeout < 0 else start + timeout
    try:
        fd = _acquire(os.fspath(path), mode, deadline, poll_s)
    except OSError as e:
        times.waited_s, times.held_s = time.perf_counter() - start, None
        raise failed(e) from e
    acquired = time.perf_counter()
    times.waited_s = acquired - start
    if fd is None:
        times.held_s = None
        raise timed_out()
    try:
        yield times
    finally:
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
            times.held_s = time.perf_counter() - acquired


def _acquire(path: str, mode: int, deadline: float | None, poll_s: float) -> int | None:
    """An fd holding the lock on ``path``, or None at ``deadline``. OSError propagates."""
    fd: int | None = None
    try:
        while True:
            if fd is None:
                fd = _open_lock_file(path, mode)
            if fd is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as e:
                    if e.errno not in _CONTENDED:
                        raise
                else:
                    if os.fstat(fd).st_nlink > 0:
                        held, fd = fd, None
                        return held
                    os.close(fd)              # unlinked while we waited: take the named one
                    fd = None
                    continue
            now = time.perf_counter()
            if deadline is not None and now >= deadline:
                return None
            time.sleep(poll_s if deadline is None else min(poll_s, deadline - now))
    finally:
        if fd is not None:
            os.close(fd)


# openat2(2), Linux 5.6: the same number on x86_64 and arm64
_SYS_OPENAT2 = 437
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_SYMLINKS = 0x04


def open_here(name: str, dir_fd: int) -> int:
    """An O_PATH descriptor of ``name`` in directory ``dir_fd`` that is on the directory's own
    mount and reached through no symbolic link (``openat2`` with RESOLVE_NO_XDEV and
    RESOLVE_NO_SYMLINKS): whatever is mounted over ``name`` is never entered, so no filesystem
    of a user's (a FUSE daemon they stopped) is ever asked anything. OSError: EXDEV when
    something is mounted there, ELOOP for a symbolic link, as open(2) otherwise."""
    import ctypes

    class OpenHow(ctypes.Structure):
        _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                    ("resolve", ctypes.c_uint64)]
    libc = ctypes.CDLL(None, use_errno=True)
    how = OpenHow(os.O_PATH | os.O_CLOEXEC | os.O_NOFOLLOW, 0,
                  RESOLVE_NO_XDEV | RESOLVE_NO_SYMLINKS)
    fd = libc.syscall(_SYS_OPENAT2, ctypes.c_int(dir_fd), ctypes.c_char_p(os.fsencode(name)),
                      ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), name)
    return fd


__all__ = ["LockTimes", "PendingWrite", "WriteTimes", "atomic_write", "atomic_write_json",
           "fsync_dir", "link_into_place", "locked", "open_here", "pending_write",
           "sweep_dead_temps"]
