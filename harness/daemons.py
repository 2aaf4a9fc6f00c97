"""The daemons of one harness stack, started and stopped by PID: what LibvirtStack
(libvirt.py) and SlurmCluster (slurm.py) share (harness/README.md shows how).

A stack runs each daemon in the foreground as a child of this process, inside the stack's
network namespace, its output in a log file of its own (:class:`Daemons`). What the daemons
leave behind is stopped with :func:`stop_pids`. A process is named by its pid *and* its start
time (field 22 of /proc/PID/stat): a pid whose start time differs is someone else's process now
(the number was reused) and is never signalled. Nothing is ever killed by name.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from .proc import ProcStat, alive, netns_members, stat, tail

POLL_S = 0.05
KILL_WAIT_S = 5.0  # after SIGKILL: how long to wait before calling a process a survivor


@dataclass(frozen=True)
class Daemon:
    """One process a stack started: ``start`` is its start time (None: it was gone before it
    could be read), ``log`` gets its stdout and stderr, ``own_log`` is the log file the daemon
    writes itself, if it has one."""
    name: str
    proc: subprocess.Popen
    start: int | None
    log: Path
    own_log: Path | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid


class Daemons:
    """A stack's daemons: started through ``enter`` (the command prefix that runs a program in
    the stack's namespace and execs it, so each Popen pid is the daemon's own) with the
    environment ``env()`` and the working directory ``cwd``, output in
    ``log_dir/NAME + log_suffix``.

    ``netns_inode`` is the inode of the stack's namespace once the stack has it (None
    before): :meth:`members` lists the processes in it, and in the namespaces of
    ``more_netns_inodes`` (a cluster's nodes, whose daemons :meth:`spawn` started through
    an ``enter`` of their own)."""

    def __init__(self, *, enter: list[str], env: Callable[[], dict[str, str]], log_dir: Path,
                 log_suffix: str, cwd: Path | None = None):
        self.enter = enter
        self.env = env
        self.log_dir = log_dir
        self.log_suffix = log_suffix
        self.cwd = cwd
        self.netns_inode: int | None = None
        self.more_netns_inodes: set[int] = set()
        self._daemons: dict[str, Daemon] = {}   # started and not yet stopped, in start order
        self._logs: list = []

    def __len__(self) -> int:
        return len(self._daemons)

    def launch(self, name: str, argv: list[str], *, own_log: Path | None = None,
               enter: list[str] | None = None) -> Daemon:
        """Start ``argv`` in the namespace (through ``enter`` instead of the stack's prefix,
        when given), in a session of its own, output to its log file; its start time is read
        at once. Not held as a daemon (for a one-shot helper such as mariadb-install-db): the
        caller waits for it."""
        if signal.SIGTERM in signal.pthread_sigmask(signal.SIG_BLOCK, set()):
            raise RuntimeError("SIGTERM is blocked in the calling thread: the daemons would "
                               "inherit the mask and ignore stop()'s SIGTERM")
        log_path = self.log_dir / f"{name}{self.log_suffix}"
        log = open(log_path, "ab")
        self._logs.append(log)
        proc = subprocess.Popen(
            [*(self.enter if enter is None else enter), *argv], stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True, env=self.env(), close_fds=True,
            cwd=self.cwd)
        st = stat(proc.pid)  # our unreaped child: the pid cannot have been reused yet
        return Daemon(name, proc, st.start if st is not None else None, log_path, own_log)

    def spawn(self, name: str, argv: list[str], *, own_log: Path | None = None,
              enter: list[str] | None = None) -> Daemon:
        """:meth:`launch` ``argv`` as the stack's daemon ``name``."""
        if name in self._daemons:
            raise RuntimeError(f"{name} already started (pid {self._daemons[name].pid})")
        self._daemons[name] = daemon = self.launch(name, argv, own_log=own_log, enter=enter)
        return daemon

    def get(self, name: str) -> Daemon | None:
        return self._daemons.get(name)

    def items(self) -> list[tuple[str, Daemon]]:
        return list(self._daemons.items())

    def running(self, name: str) -> bool:
        daemon = self._daemons.get(name)
        return daemon is not None and daemon.proc.poll() is None

    def pids(self) -> dict[str, int]:
        """``{name: pid}`` of the daemons started and still alive."""
        return {name: d.pid for name, d in self._daemons.items() if d.proc.poll() is None}

    def wait_for(self, name: str, ready: Callable[[], bool], what: str, timeout: float) -> None:
        """Poll ``ready()`` until it is true. RuntimeError naming the daemon, ``what`` was
        awaited and the tail of its logs if it exits first or ``timeout`` s pass."""
        daemon = self._daemons[name]
        deadline = time.monotonic() + timeout
        while True:
            if daemon.proc.poll() is not None:
                raise RuntimeError(f"{name} (pid {daemon.pid}) exited with "
                                   f"{daemon.proc.returncode} before {what} answered; "
                                   f"{self._tails(daemon)}")
            if ready():
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} (pid {daemon.pid}): {what} did not answer within "
                                   f"{timeout:.0f} s; {self._tails(daemon)}")
            time.sleep(POLL_S)

    def stop(self, name: str, kill_after: float, problems: list[str]) -> None:
        """SIGTERM daemon ``name``, SIGKILL it after ``kill_after`` s (noted in ``problems``),
        reap it, and let go of it. Signalled through its Popen: the pid of a child that has
        not been reaped cannot be reused, and Popen signals nothing once it has reaped it."""
        daemon = self._daemons.pop(name, None)
        if daemon is None:
            return
        proc = daemon.proc
        if proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(kill_after)
        except subprocess.TimeoutExpired:
            problems.append(f"{name} (pid {proc.pid}) ignored SIGTERM for "
                            f"{kill_after:.0f} s; SIGKILLed")
            proc.kill()
            try:
                proc.wait(KILL_WAIT_S)
            except subprocess.TimeoutExpired:
                problems.append(f"{name} (pid {proc.pid}) survived SIGKILL")

    def close_logs(self) -> None:
        for f in self._logs:
            f.close()
        self._logs.clear()

    def members(self) -> dict[int, ProcStat]:
        """``{pid: stat}`` of the live processes in the stack's namespaces."""
        inodes = set(self.more_netns_inodes)
        if self.netns_inode is not None:
            inodes.add(self.netns_inode)
        return netns_members(inodes)

    @staticmethod
    def _tails(daemon: Daemon) -> str:
        logs = [p for p in (daemon.own_log, daemon.log) if p is not None]
        return "\n".join(f"{p}:\n{tail(p)}" for p in logs)


def stop_pids(procs: Mapping[int, int], kill_after: float, problems: list[str]) -> None:
    """Stop processes that are not our children, each named by ``{pid: start time}``: SIGTERM
    those still alive, wait up to ``kill_after`` s, SIGKILL what is left, wait up to 5 s; a
    process alive after that is reported in ``problems`` ("survived SIGKILL: [pids]"). A pid
    that now has another start time is someone else's process: never signalled."""
    for sig, wait_s in ((signal.SIGTERM, kill_after), (signal.SIGKILL, KILL_WAIT_S)):
        for pid, start in procs.items():
            _signal(pid, start, sig)
        deadline = time.monotonic() + wait_s
        while any(alive(p, s) for p, s in procs.items()) and time.monotonic() < deadline:
            time.sleep(POLL_S)
    still = sorted(p for p, s in procs.items() if alive(p, s))
    if still:
        problems.append(f"survived SIGKILL: {still}")


def _signal(pid: int, start: int, sig: signal.Signals) -> None:
    """Send ``sig`` to ``pid`` if it is still the process that started at ``start``. Through a
    pidfd, checked after it is open: the pid cannot be reused between the check and the
    signal."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:  # gone (or not a process): left to the survivor check
        return
    try:
        if alive(pid, start):
            signal.pidfd_send_signal(fd, sig)
    except ProcessLookupError:
        pass
    finally:
        os.close(fd)
