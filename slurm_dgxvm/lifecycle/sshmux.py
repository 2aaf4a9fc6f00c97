"""The ssh masters of a VM's user, stopped when the VM goes.

``dgxvm run`` keeps one connection per job that the job's later runs reuse
(:mod:`slurm_dgxvm.access.connection`): an ``ssh -M`` of the job's user that stays a while after
its last session. Slurm stops it with the step that started it; a master that outlived its step
(a batch script's run, a step ended under a process tracker that does not follow it) would stay
until its idle time ran out or its keepalives failed. The VM's delete stops them at once.

Which processes: those of the VM's user (``uid``), running ssh, with ``-M``, and reaching this
VM: their command line names the VM's own ``known_hosts`` (``UserKnownHostsFile=<vmdir>/
known_hosts``), which only dgxvm's ssh lines for this VM do. The user can make a process look
like that, but only one of their own: stopping it does nothing to anyone else. Each is found by
its pid, opened as a pidfd and checked again through it before the signal, so a pid reused in
between is never signalled. SIGKILL: a master ignores the signals ``dgxvm run`` forwards. The
delete then waits (a few seconds at most) until they have exited.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import time
from pathlib import Path

from ..records import KNOWN_HOSTS

log = logging.getLogger("dgxvm.lifecycle")

PROC = "/proc"
STOP_WAIT_S = 5.0        # how long a delete waits for the killed masters to be gone


def _cmdline(pid: int, proc: str = PROC) -> list[str] | None:
    try:
        raw = Path(proc, str(pid), "cmdline").read_bytes()
    except OSError:
        return None
    return raw.decode("utf-8", "replace").split("\0")[:-1] if raw else []


def _uid(pid: int, proc: str = PROC) -> int | None:
    try:
        with open(Path(proc, str(pid), "status")) as f:
            for line in f:
                if line.startswith("Uid:"):
                    return int(line.split()[1])     # the real uid
    except (OSError, ValueError, IndexError):
        return None
    return None


def is_master_of(argv: list[str] | None, known_hosts: str) -> bool:
    """Whether ``argv`` is an ssh master (``-M``) of the VM whose known_hosts is that path."""
    if not argv or os.path.basename(argv[0]) != "ssh" or "-M" not in argv:
        return False
    return f"UserKnownHostsFile={known_hosts}" in argv


def masters(vmdir: Path, uid: int, proc: str = PROC) -> list[int]:
    """The pids of ``uid``'s ssh masters of the VM in ``vmdir``."""
    known_hosts = str(vmdir / KNOWN_HOSTS)
    found = []
    try:
        pids = [int(n) for n in os.listdir(proc) if n.isdigit()]
    except OSError:
        return []
    for pid in pids:
        if pid == os.getpid() or _uid(pid, proc) != uid:
            continue
        if is_master_of(_cmdline(pid, proc), known_hosts):
            found.append(pid)
    return found


def stop_masters(vmdir: Path, uid: int | None, wait_s: float = STOP_WAIT_S) -> int:
    """Kill the VM's user's ssh masters of the VM in ``vmdir`` and wait (up to ``wait_s``)
    until they are gone; how many were killed. Never raises: a master left runs out its idle
    time (access.connection.PERSIST_S)."""
    if uid is None:
        return 0
    known_hosts = str(vmdir / KNOWN_HOSTS)
    killed: list[int] = []               # their pidfds
    for pid in masters(vmdir, uid):
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            continue                     # gone already
        try:
            # the same process still: checked through the pid it now holds
            if _uid(pid) == uid and is_master_of(_cmdline(pid), known_hosts):
                signal.pidfd_send_signal(fd, signal.SIGKILL)
                killed.append(fd)
                continue
        except OSError:
            pass
        os.close(fd)
    # a pidfd becomes readable when its process has exited
    deadline = time.monotonic() + wait_s
    waiting = list(killed)
    while waiting and time.monotonic() < deadline:
        ready, _, _ = select.select(waiting, [], [], max(0.0, deadline - time.monotonic()))
        waiting = [fd for fd in waiting if fd not in ready]
    for fd in killed:
        with contextlib.suppress(OSError):
            os.close(fd)
    if killed:
        log.info("%s: stopped %d ssh master(s) of its user%s", vmdir.name, len(killed),
                 f" ({len(waiting)} still exiting)" if waiting else "")
    return len(killed)
