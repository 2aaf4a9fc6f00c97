"""/proc and iproute2 helpers shared by the harness's stacks (libvirt.py, slurm.py, daemons.py)."""

from __future__ import annotations

import fcntl
import os
import socket
import subprocess
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

DEAD_STATES = ("Z", "X", "x")  # zombie or dead: gone, for our purposes


@dataclass(frozen=True)
class ProcStat:
    """What the harness reads from ``/proc/PID/stat``."""
    state: str
    ppid: int
    sid: int
    start: int  # field 22, clock ticks after boot: (pid, start) names a process for good


def stat(pid: int) -> ProcStat | None:
    """``pid``'s state, parent, session and start time; None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # fields 3.. come after the parenthesised comm (which may contain spaces or parentheses)
    fields = data[data.rfind(b")") + 2:].split()
    try:
        return ProcStat(fields[0].decode(), int(fields[1]), int(fields[3]), int(fields[19]))
    except (IndexError, ValueError):
        return None


def alive(pid: int, start: int | None = None) -> bool:
    """True if ``pid`` exists, is not a zombie and (when given) started at ``start``: a pid
    with another start time is a different process that reuses the number."""
    st = stat(pid)
    if st is None or st.state in DEAD_STATES:
        return False
    return start is None or st.start == start


def exe(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return ""


def netns_inode_of_pid(pid: int) -> int | None:
    try:
        link = os.readlink(f"/proc/{pid}/ns/net")  # "net:[4026532281]"
    except OSError:
        return None
    return int(link[link.index("[") + 1:-1])


def netns_members(inode: int | Collection[int] | None) -> dict[int, ProcStat]:
    """``{pid: stat}`` of the live processes in the network namespace with ``inode``, or in
    any of several (none when ``inode`` is None or empty)."""
    inodes = {inode} if isinstance(inode, int) else set(inode or ())
    if not inodes:
        return {}
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            pid = int(entry)
            if netns_inode_of_pid(pid) in inodes:
                st = stat(pid)
                if st is not None and st.state not in DEAD_STATES:
                    out[pid] = st
    return out


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def socket_answers(path: Path) -> bool:
    if not path.exists():
        return False
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(1.0)
    try:
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


def take_lock(path: Path, refusal: str) -> int:
    """flock ``path`` (non-blocking) and write our pid into it; the fd holds the lock. Held by
    someone else: RuntimeError "<refusal> holds PATH (pid N)..."."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
        os.close(fd)
        raise RuntimeError(refusal.format(path=path, holder=holder or "?")) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def drop_lock(fd: int) -> None:
    os.ftruncate(fd, 0)
    os.close(fd)  # closing releases the flock


def create_netns(netns: str) -> int:
    """``ip netns add NETNS`` with ``lo`` up; returns the namespace's inode. One of that name
    left by a crashed run is deleted first if it is empty; with processes in it: RuntimeError,
    and it is not touched. A failure after the add deletes the namespace again."""
    path = Path("/run/netns") / netns
    if path.exists():
        left = ip("netns", "pids", netns, check=False).stdout.split()
        if left:
            raise RuntimeError(f"network namespace {netns} exists with processes "
                               f"{left} in it; not touching it")
        ip("netns", "delete", netns)  # left over by a crashed run, empty
    ip("netns", "add", netns)
    try:
        ip("-n", netns, "link", "set", "lo", "up")
        return os.stat(path).st_ino
    except BaseException:
        ip("netns", "delete", netns, check=False)
        raise


def delete_netns_if_empty(netns: str, problems: list[str], poll_s: float = 0.05) -> bool:
    """Wait up to 5 s for ``netns`` to empty, then delete it. True when deleted; otherwise
    what kept it is in ``problems``."""
    deadline = time.monotonic() + 5.0
    while True:
        left = ip("netns", "pids", netns, check=False).stdout.split()
        if not left or time.monotonic() > deadline:
            break
        time.sleep(poll_s)
    if left:
        problems.append(f"processes {left} still in namespace {netns} "
                        f"({[exe(int(p)) for p in left]}); namespace kept")
        return False
    proc = ip("netns", "delete", netns, check=False)
    if proc.returncode != 0:
        problems.append(f"ip netns delete {netns}: {proc.stderr.strip()}")
        return False
    return True
