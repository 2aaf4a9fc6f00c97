"""A job's shared connection: one authenticated ssh connection to the job's VM that every
``dgxvm run`` and ``dgxvm shell`` of the job's own user reuses.

Why. An ssh handshake with the guest costs more than everything else a short ``dgxvm run`` does
(most of plain ssh's 0.8 s against OpenSSH in a TCG guest here, the guest's CPU being the
job's): ``srun -n 64 dgxvm run`` on one node, or a batch script with many steps, would pay it on
every run, and 64 handshakes at once also reach the guest sshd's limit of unauthenticated
connections. With a master connection
(``ssh -M``, OpenSSH's connection multiplexing) a run opens its two sessions as channels on it.

How it is kept:

- The socket is ``<dir>/dgxvm-<uid>/<node>-<job>-<vm>.ssh``, ``<dir>`` being ``$TMPDIR`` (``/tmp``
  when that path is too long for a socket). The directory is the user's own: used only when it
  is a real directory (not a symlink) owned by the caller with no access for anyone else, so a
  directory another user made in ``/tmp`` is never used (the run then makes its own connection,
  as when there is no shared one). ``<vm>`` hashes the VM's domain, address and key: a VM made
  again for the same job never reaches the old one's master. ``<node>`` hashes the host name:
  the nodes of a multi-node job whose ``$TMPDIR`` is one shared directory keep apart (a socket
  file of another node's never answers here, and is never taken for one that is gone).
- The first run of the job starts the master under a lock (the directory, flock'ed), so runs
  starting together wait for its one handshake instead of making their own; later runs find it
  by connecting to its socket.
- The master stays ``PERSIST_S`` seconds after its last session ends, then exits (OpenSSH's
  ControlPersist). It ignores the signals ``dgxvm run`` forwards (a ``scancel`` reaches the
  workload once, through the control session, not by killing the transport). It lives in the
  step that started it: Slurm stops it with the step; the VM's delete stops any left
  (:func:`slurm_dgxvm.lifecycle.sshmux.stop_masters`). The sockets of masters that are gone
  (killed with their VM) are removed when the user's next master starts on that node.
- Only the VM's own user shares a connection. Root reaching a user's job (``dgxvm run --job``
  as root, which becomes the user) makes its own: a master is the user's process, and a mux
  client hands it its standard descriptors.

Anything wrong (no such directory, not ours, the lock held too long, the master failing to
start) means no shared connection: the session makes its own, as it always could.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import socket
import stat
import subprocess
import time

from .session import ignore_forwarded, socket_dir
from .target import CONNECT_TIMEOUT_S, Target

PERSIST_S = 30             # how long the master stays after its last session
LOCK_WAIT_S = 20.0         # runs waiting for another's master start
START_TIMEOUT_S = CONNECT_TIMEOUT_S + 30
# sockaddr_un holds 108 bytes; ssh binds a temporary name (the path plus 17 characters) first
SOCKET_PATH_MAX = 90
LOCK_POLL_S = 0.02
# what follows the base directory: /dgxvm-UID/NODE-JOB-VM.ssh (uid and job id up to 10 digits)
SOCKET_TAIL = len("/dgxvm-4294967294/012345-4294967294-0123456789ab.ssh")


def base_dir() -> str:
    """Where the caller's sockets go: ``$TMPDIR`` unless its path is too long, then /tmp."""
    return socket_dir(SOCKET_TAIL)


def socket_path(target: Target, uid: int | None = None) -> str:
    """The shared connection's socket for ``target``'s VM, for the caller (``uid``)."""
    uid = os.geteuid() if uid is None else uid
    vm = hashlib.sha256(f"{target.domain}\0{target.address}\0{target.key}".encode())
    return os.path.join(base_dir(), f"dgxvm-{uid}",
                        f"{node_tag()}-{target.job_id}-{vm.hexdigest()[:12]}.ssh")


def node_tag() -> str:
    """This node, in the names of its sockets: 6 hex digits of its host name."""
    return hashlib.sha256(os.uname().nodename.encode()).hexdigest()[:6]


def _own_dir(path: str) -> bool:
    """Make ``path`` (0700) if missing; whether it is a directory of this user's alone."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError:
        return False
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return (stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid()
            and not st.st_mode & 0o077)


def answers(path: str) -> bool:
    """Whether a master listens on ``path`` (a connect, closed at once)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(1.0)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def _lock(path: str, deadline: float) -> int | None:
    """The master-start lock (the socket directory itself, flock'ed: no lock file is left
    behind), held; None past ``deadline``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES) or time.monotonic() > deadline:
                os.close(fd)
                return None
        time.sleep(LOCK_POLL_S)


def shared_socket(target: Target) -> str | None:
    """The socket of the job's shared connection, its master started when none answers; None
    when this caller shares none (see the module's text): the session then connects itself."""
    if os.geteuid() != target.uid:
        return None
    path = socket_path(target)
    if len(path) > SOCKET_PATH_MAX or not _own_dir(os.path.dirname(path)):
        return None
    if answers(path):
        return path
    fd = _lock(os.path.dirname(path), time.monotonic() + LOCK_WAIT_S)
    if fd is None:
        return None
    try:
        if answers(path):              # another run started it while this one waited
            return path
        try:
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                return None
        except FileNotFoundError:
            pass
        except OSError:
            return None
        _sweep(os.path.dirname(path))
        return path if _start_master(target, path) else None
    finally:
        os.close(fd)


def _sweep(directory: str) -> None:
    """Remove the sockets of this node's masters that are gone from the user's directory (this
    one's included): a master the VM's delete killed could not remove its own."""
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return
    mine = node_tag() + "-"
    for entry in entries:
        try:
            if entry.name.startswith(mine) and entry.name.endswith(".ssh") and \
                    stat.S_ISSOCK(entry.stat(follow_symlinks=False).st_mode) and \
                    not answers(entry.path):
                os.unlink(entry.path)
        except OSError:
            continue


def _start_master(target: Target, path: str) -> bool:
    """Start the master on ``path``: ssh goes to the background once authenticated (the
    foreground process then exits 0). Whether it answers."""
    argv = target.ssh_argv("-M", "-N", "-S", path, "-o", f"ControlPersist={PERSIST_S}")
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, timeout=START_TIMEOUT_S,
                              preexec_fn=ignore_forwarded)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0 and answers(path)
