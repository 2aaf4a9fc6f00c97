"""As the job's user: the one way dgxvm touches what a user controls on the host (DESIGN 13).

A job's user controls everything under their uid on the host: their container image cache
(``<cache_dir>/<uid>/``) and their work dir -- its modes, FIFOs, sockets and symlinks placed in
it, FUSE mounts over it, and every process running as them, which they may ``kill -STOP``. So
root never opens, lists or removes anything there itself. :func:`run` does it in a forked child
that:

1. leaves every descriptor it inherited but the socket it answers on: stdin, stdout and stderr
   go to ``/dev/null``, all others are closed (root's libvirt connection, the ledger's and
   the VM's locks, slurmd's pipes never reach a process the user can signal);
2. sets no-new-privs and clears its dumpable flag (the user can stop or kill it, never trace
   it or open its ``/proc`` files);
3. becomes the user: ``setgroups``, ``setresgid``, ``setresuid``, then checks that it holds
   those ids and nothing else and that ``setuid(0)`` fails;
4. runs the work, and sends back one JSON answer and, optionally, descriptors (SCM_RIGHTS).

The parent waits for the answer on that socket with ``poll`` against a monotonic deadline
(:data:`DEADLINE_S` by default), not for ever: at the deadline it SIGKILLs the child (root may
always; a stopped process dies of it too) and reaps it, so no child is left behind, stopped or
a zombie, whatever the user did. The helpers the work uses (:func:`open_dir`,
:func:`open_file`, :func:`read_file`) open relative to a directory descriptor with
``O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC`` and accept only what they expect (a directory, a regular
file, checked by ``fstat``): a FIFO, socket, device or symbolic link is refused with a reason
that names it.

What the parent raises: :class:`~slurm_dgxvm.errors.UserTreeRefused` (the work refused, or the
child ended without an answer: the user may kill their own processes) and
:class:`~slurm_dgxvm.errors.UserTreeTimeout` (no answer by the deadline) -- both the job's
fault, never the node's; :class:`~slurm_dgxvm.errors.HostError` only when the node could not
fork or the child could not become the user.

Example: ``run(lambda: sorted(os.listdir(open_dir("tmp", dir_fd=...))), uid=1000, gid=1000,
subject="/var/lib/dgxvm/containers/1000")``; see :mod:`.policy` (``open_as_user``) and
:mod:`slurm_dgxvm.reconcile.cache_partials`.
"""

from __future__ import annotations

import array
import errno
import gc
import json
import os
import select
import signal
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import HostError, UserTreeRefused, UserTreeTimeout
from ..names import shown

#: Seconds a user's files get to answer one call (open a directory, list a cache). The pin of a
#: directory takes about a millisecond; anything that takes seconds is a FIFO, a stopped FUSE
#: daemon or a stopped process of the user's, and the Prolog must not wait for it.
DEADLINE_S = 5.0
#: Seconds to wait for a SIGKILLed child to be gone before a thread is left to reap it.
REAP_S = 5.0
#: Seconds a child that has answered gets to exit before it is killed (it has nothing left to do)
EXIT_GRACE_S = 1.0
MAX_ANSWER = 32 << 20         # bytes of JSON a child may send (a listing of many names)
MAX_FDS = 8                   # descriptors a child may send
NOFOLLOW = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_DIR = os.O_RDONLY | os.O_DIRECTORY | NOFOLLOW
_LEN = struct.Struct("!I")    # the answer: its length, then that many bytes of JSON

_PR_SET_DUMPABLE = 4
_PR_SET_NO_NEW_PRIVS = 38


class Refused(Exception):
    """Raised by the work in the child: why it will not use something, in words (one line,
    names in it shown with :func:`~slurm_dgxvm.names.shown`), and ``at``: the path it stopped
    at, where the work knows it. The parent raises UserTreeRefused with both."""

    def __init__(self, reason: str, at: str | None = None):
        super().__init__(reason)
        self.at = at


@dataclass(frozen=True)
class Answer:
    """What a child sends back: a JSON-able ``value`` and descriptors (``fds``). The work may
    return one to send descriptors; the parent owns the ones it receives (close-on-exec)."""

    value: Any = None
    fds: tuple[int, ...] = ()


# -- the parent ------------------------------------------------------------------------------------
def run(work: Callable[[], Any], *, uid: int, gid: int, groups: Sequence[int] = (),
        subject: str, timeout_s: float | None = None, doing: str | None = None) -> Answer:
    """``work()`` in a child running as ``uid``/``gid``/``groups`` (see the module), its
    :class:`Answer` (a plain return value is its ``value``) within ``timeout_s`` seconds
    (:data:`DEADLINE_S` when None).

    ``subject`` (the path the work is about) and ``doing`` name it in the errors:
    UserTreeRefused when the work raised (:class:`Refused`, OSError, anything else) or the
    child ended without an answer; UserTreeTimeout at the deadline (the child is killed and
    reaped first); HostError when the node could not fork or the child could not become the
    user. Any signal or error in the parent kills and reaps the child too."""
    if type(uid) is not int or uid <= 0 or type(gid) is not int or gid < 0:
        raise HostError(reason=f"as the user: refusing uid {uid!r} gid {gid!r} "
                               f"(only an ordinary user's ids)")
    groups = sorted({int(g) for g in groups})
    timeout_s = DEADLINE_S if timeout_s is None else timeout_s
    libc = _libc()
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        pid = os.fork()
    except OSError as exc:
        parent.close()
        child.close()
        raise HostError(reason=f"as uid {uid}: cannot fork ({exc.strerror})") from None
    if pid == 0:                                  # the child: never returns
        _child(child.fileno(), work, uid, gid, groups, libc)
    child.close()
    return _wait(parent, pid, subject=subject, timeout_s=timeout_s, doing=doing, uid=uid)


def _wait(sock: socket.socket, pid: int, *, subject: str, timeout_s: float,
          doing: str | None, uid: int) -> Answer:
    deadline = time.monotonic() + timeout_s
    pidfd = _pidfd(pid)
    data = bytearray()
    fds: list[int] = []
    status: int | None = None
    try:
        with sock:
            poller = select.poll()
            poller.register(sock, select.POLLIN)
            whole = False               # the length the child sends first, then that much
            while not whole:
                left = deadline - time.monotonic()
                if left <= 0 or not poller.poll(max(1, int(left * 1000) + 1)):
                    if time.monotonic() >= deadline:
                        raise UserTreeTimeout(value=subject, timeout=timeout_s, doing=doing)
                    continue
                chunk, fds_now, truncated = _recv(sock)
                fds += fds_now
                if truncated or len(data) + len(chunk) > MAX_ANSWER:
                    raise UserTreeRefused(value=subject, reason=f"the answer read as uid {uid} "
                                                                f"was too large")
                data += chunk
                whole = not chunk or (len(data) >= _LEN.size
                                      and len(data) >= _LEN.size + _LEN.unpack_from(data)[0])
        # read to the answer's end, or to EOF. None: the child did not exit within
        # EXIT_GRACE_S (stopped after it answered): killed below, the answer stands
        status = _reap(pid, pidfd, min(deadline, time.monotonic() + EXIT_GRACE_S))
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    finally:
        if status is None:
            _kill(pid, pidfd)
        if pidfd is not None:
            os.close(pidfd)
    try:
        size = _LEN.unpack_from(data)[0]
        msg = json.loads(bytes(data[_LEN.size:])) if len(data) == _LEN.size + size else None
    except (ValueError, struct.error):
        msg = None
    if isinstance(msg, dict) and "ok" in msg:
        return Answer(value=msg["ok"], fds=tuple(fds))
    for fd in fds:
        os.close(fd)
    if isinstance(msg, dict) and "failed" in msg:
        raise HostError(reason=f"as uid {uid}: {msg['failed']}")
    if isinstance(msg, dict) and isinstance(msg.get("refused"), str):
        at = msg.get("at")
        raise UserTreeRefused(value=subject, reason=msg["refused"],
                              at=at if isinstance(at, str) else None)
    raise UserTreeRefused(value=subject, reason=f"the process reading it as uid {uid} ended "
                                                f"without an answer ({_ended(status)})", at=None)


def _recv(sock: socket.socket) -> tuple[bytes, list[int], bool]:
    """One read: (bytes, descriptors received, whether anything was cut off)."""
    msg, anc, flags, _addr = sock.recvmsg(1 << 16, socket.CMSG_SPACE(MAX_FDS * 4),
                                          socket.MSG_CMSG_CLOEXEC | socket.MSG_DONTWAIT)
    fds: list[int] = []
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            got = array.array("i")
            got.frombytes(payload[:len(payload) - len(payload) % got.itemsize])
            fds += list(got)
    return msg, fds, bool(flags & socket.MSG_CTRUNC)


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def _reap(pid: int, pidfd: int | None, deadline: float) -> int | None:
    """The child's wait status once it has exited, or None at ``deadline`` (still running:
    stopped after it answered, or not yet gone)."""
    while True:
        try:
            got, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return 0
        if got == pid:
            return status
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        if pidfd is not None:
            select.select([pidfd], [], [], left)
        else:
            time.sleep(min(left, 0.005))


def _kill(pid: int, pidfd: int | None) -> None:
    """SIGKILL the child and reap it (a stopped one dies of it too); if it is not gone in
    REAP_S (a hung NFS server keeps it in the kernel), a thread reaps it when it goes."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if _reap(pid, pidfd, time.monotonic() + REAP_S) is None:
        threading.Thread(target=_reap_late, args=(pid,), daemon=True,
                         name=f"dgxvm-reap-{pid}").start()


def _reap_late(pid: int) -> None:
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


def _ended(status: int | None) -> str:
    if status is None:
        return "killed at the deadline"
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        return f"killed by {name}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"


# -- the child -------------------------------------------------------------------------------------
_LIBC: Any = None


def _libc():
    """libc through ctypes, loaded in the parent (an import in a forked child could wait for
    an import lock another thread held at the fork); None where it cannot be loaded."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes
            _LIBC = ctypes.CDLL(None, use_errno=True)
        except OSError:
            _LIBC = False
    return _LIBC or None


def _child(sock_fd: int, work: Callable[[], Any], uid: int, gid: int, groups: list[int],
           libc) -> None:
    """The forked child (see the module). Never returns."""
    code = 0
    try:
        gc.disable()             # no finaliser of a root object (a libvirt connection) runs here
        # the parent's signal handlers stay: one that raises (the Prolog's SIGTERM) ends this
        # child without an answer, which the parent reports; resetting them cost 0.1 ms a call
        try:
            _drop(sock_fd, uid, gid, groups, libc)
        except Exception as exc:  # noqa: BLE001 - the node's: reported as failed
            msg, fds = {"failed": f"could not become the user: {type(exc).__name__}: {exc}"}, ()
        else:
            try:
                result = work()
                answer = result if isinstance(result, Answer) else Answer(result)
                msg, fds = {"ok": answer.value}, tuple(answer.fds)
            except Refused as exc:
                msg, fds = {"refused": str(exc), "at": exc.at}, ()
            except OSError as exc:
                where = f"{shown(exc.filename)}: " if isinstance(exc.filename, str) else ""
                msg, fds = {"refused": f"{where}{exc.strerror or exc}"}, ()
            except Exception as exc:  # noqa: BLE001 - what the user's files did to the work
                msg, fds = {"refused": f"{type(exc).__name__}: {shown(exc)}"}, ()
        sock = socket.socket(fileno=sock_fd)
        body = json.dumps(msg).encode()
        data = _LEN.pack(len(body)) + body
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        sent = sock.sendmsg([data], anc)
        sock.sendall(data[sent:])
    except BaseException:  # noqa: BLE001 - no answer: the parent says so
        code = 1
    finally:
        os._exit(code)


def _drop(sock_fd: int, uid: int, gid: int, groups: list[int], libc) -> None:
    """Descriptors, privileges, credentials (steps 1-3 of the module)."""
    null = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):
        if fd != null:
            os.dup2(null, fd, inheritable=False)
    os.closerange(3, sock_fd)
    os.closerange(sock_fd + 1, _max_fd())
    os.chdir("/")
    if libc is not None:
        if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise OSError(errno.EPERM, "prctl(PR_SET_NO_NEW_PRIVS) failed")
        libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)
    os.setgroups(groups)
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if (os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid)
            or sorted(set(os.getgroups())) != groups):
        raise OSError(errno.EPERM, f"ids are {os.getresuid()} {os.getresgid()} "
                                   f"{os.getgroups()}, not the user's")
    try:
        os.setuid(0)
    except PermissionError:
        return
    raise OSError(errno.EPERM, "setuid(0) succeeded after the drop")


def _max_fd() -> int:
    try:
        n = os.sysconf("SC_OPEN_MAX")
    except (ValueError, OSError):
        n = -1
    return n if n > 0 else 1 << 20


# -- opening what the user controls (in the child) -------------------------------------------------
_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISREG, "a regular file"),
          (stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"))


def kind(mode: int) -> str:
    """What a file of ``mode`` is, in words ("a FIFO (named pipe)", "a symbolic link" ...)."""
    for test, words in _KINDS:
        if test(mode):
            return words
    return f"a file of type {stat.S_IFMT(mode):o}"


def open_dir(name: str, *, dir_fd: int | None = None, show: str | None = None) -> int:
    """Directory ``name`` (relative to ``dir_fd``) opened O_RDONLY without following a
    symbolic link or blocking; :class:`Refused` naming it (``show``, else ``name``) when it is
    anything else or cannot be opened. FileNotFoundError passes (the caller may expect an
    absent directory)."""
    try:
        fd = os.open(name, _DIR, dir_fd=dir_fd)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise _refusal(name, dir_fd, show, exc, "a directory") from None
    return _expect(fd, stat.S_ISDIR, "a directory", name, show)


def open_file(name: str, *, dir_fd: int | None = None, flags: int = os.O_RDONLY,
              show: str | None = None) -> int:
    """Regular file ``name`` (relative to ``dir_fd``) opened with ``flags`` (O_RDONLY; O_RDWR
    for a lock), never through a symbolic link and never blocking; anything else there (a
    FIFO, a socket, a device, a directory) is refused without being opened, and what was opened
    is checked again (it may have been swapped in between). :class:`Refused` naming it;
    FileNotFoundError passes (the caller may expect an absent file)."""
    try:
        st = os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise _refusal(name, dir_fd, show, exc, "a regular file") from None
    if not stat.S_ISREG(st.st_mode):
        raise Refused(f"{shown(show or name)} is {kind(st.st_mode)}, not a regular file")
    try:
        fd = os.open(name, flags | NOFOLLOW, dir_fd=dir_fd)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise _refusal(name, dir_fd, show, exc, "a regular file") from None
    return _expect(fd, stat.S_ISREG, "a regular file", name, show)


def read_file(name: str, *, dir_fd: int | None = None, limit: int = 1 << 20,
              show: str | None = None) -> bytes:
    """The bytes of regular file ``name`` (:func:`open_file`), at most ``limit``; a longer
    one is refused (a user's file is read whole only when it is the size it should be)."""
    fd = open_file(name, dir_fd=dir_fd, show=show)
    try:
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise Refused(f"{shown(show or name)} is larger than {limit} bytes")
    return data


def _expect(fd: int, test, what: str, name: str, show: str | None) -> int:
    st = os.fstat(fd)
    if test(st.st_mode):
        return fd
    os.close(fd)
    raise Refused(f"{shown(show or name)} is {kind(st.st_mode)}, not {what}")


def _refusal(name: str, dir_fd: int | None, show: str | None, exc: OSError,
             what: str) -> Refused:
    label = shown(show or name)
    try:
        st = os.lstat(name, dir_fd=dir_fd)
    except OSError:
        st = None
    if st is not None and (stat.S_ISLNK(st.st_mode)
                           or (what == "a directory" and not stat.S_ISDIR(st.st_mode))):
        return Refused(f"{label} is {kind(st.st_mode)}, not {what}")
    if exc.errno == errno.ENOENT:
        return Refused(f"{label} does not exist")
    if exc.errno == errno.EACCES:
        return Refused(f"the job's user cannot open {label} (permission denied)")
    return Refused(f"{label}: {exc.strerror or exc}")


__all__ = ["Answer", "DEADLINE_S", "NOFOLLOW", "Refused", "kind", "open_dir", "open_file",
           "read_file", "run"]
