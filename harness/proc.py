"""/proc and iproute2 helpers shared by the harness's stacks (libvirt.py, slurm.py)."""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import subprocess
import time
from pathlib import Path


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


def terminate(proc: subprocess.Popen, name: str, kill_after: float,
              problems: list[str]) -> None:
    """SIGTERM a child, SIGKILL it after ``kill_after`` s (noted in ``problems``), reap it."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(kill_after)
        except subprocess.TimeoutExpired:
            problems.append(f"{name} (pid {proc.pid}) ignored SIGTERM for "
                            f"{kill_after:.0f} s; SIGKILLed")
            proc.kill()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                problems.append(f"{name} (pid {proc.pid}) survived SIGKILL")
    else:
        proc.wait()


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
