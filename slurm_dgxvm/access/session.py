"""One ``dgxvm run`` (or ``dgxvm shell``): two ssh sessions into the job's VM.

Why two. An OpenSSH client cannot send signals, ssh's own failures exit 255 like a command may,
and killing a client that has no terminal leaves the remote command running. So:

- the *command session* (``dgxvm-guest run ID``) inherits this process's stdin, stdout and
  stderr and nothing else: the bytes go straight between the caller's files and the command, in
  order, with no copy in Python; its exit status is the command's;
- the *control session* (``dgxvm-guest control ID``) carries the request (argv, environment,
  cwd), then one line per signal this process receives (TERM INT HUP USR1 USR2 QUIT), forwarded
  to the command's process group in the guest. Its end of file means this side is gone: the guest
  stops the command (TERM, then KILL), so a SIGKILLed ``dgxvm run`` or a lost connection leaves
  nothing running. The guest never starts a command before its control session is there.

The two sessions share one connection. For the VM's own user it is the job's shared connection
(:mod:`.connection`): both sessions are channels on a master that earlier runs of the job
started, so a run makes no handshake at all. Otherwise (root reaching a user's job, no shared
connection to be had) the control session is the run's own master (``ssh -M -S``) and the
command session a multiplexed client that starts once the master is authenticated: one handshake
per run (the guest's CPU is the job's), and a connection refused before it was authenticated,
which has run nothing in the guest, is simply tried again.

Both ssh clients ignore the forwarded signals (an ignored signal stays ignored across exec, and
ssh leaves ignored signals alone), so a ``scancel`` or ``--signal=USR1`` that Slurm sends to every
process of the step reaches the workload once, through the control session, instead of killing
the transport. When the command session ends with 255, the control session is asked for the
command's own status; if it has none, the transport failed (TransportLost).
"""

from __future__ import annotations

import os
import random
import secrets
import select
import shutil
import signal
import subprocess
import tempfile
import time

from ..errors import TransportLost
from .request import Request
from .target import GUEST_HELPER, Target, remote

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2,
             signal.SIGQUIT)
CONNECT_RETRY_S = 60.0   # how long to keep trying to get the connection authenticated
RETRY_STEP_S = 0.3       # the n-th retry waits about n times this (jittered)
SOCKET_POLL_S = 0.01
STATUS_WAIT_S = 5.0      # after a 255: how long the control session may take to answer STATUS
CONTROL_EXIT_S = 10.0    # after the command: how long the control session may take to end
SSH_FAILED = 255
GUEST_REFUSED = 125      # the guest helper's status for a run it did not start


def ignore_forwarded() -> None:
    for s in FORWARDED:
        signal.signal(s, signal.SIG_IGN)


class Session:
    """Run ``request`` in ``target``'s VM: ``verb`` is ``run`` (a command) or ``shell`` (a login
    shell, ``tty``: under a terminal)."""

    def __init__(self, target: Target, request: Request, *, verb: str = "run",
                 tty: bool = False, helper: str = GUEST_HELPER, shared: str | None = None):
        self.target = target
        self.shared = shared           # the job's shared connection's socket (.connection)
        self.request = request
        self.verb = verb
        self.tty = tty
        self.helper = helper
        self.run_id = secrets.token_hex(8)
        self.control: subprocess.Popen | None = None
        self.command: subprocess.Popen | None = None
        self._sent = False
        self._pending: list[str] = []

    # -- signals ---------------------------------------------------------------------------
    def _send(self, line: str) -> None:
        if self.control is None or self.control.stdin is None:
            return
        try:
            os.write(self.control.stdin.fileno(), line.encode() + b"\n")
        except OSError:   # the control session is gone: the guest is stopping the command
            pass

    def _on_signal(self, signum, _frame) -> None:
        name = signal.Signals(signum).name.removeprefix("SIG")
        if self._sent:
            self._send(name)
        else:
            self._pending.append(name)

    # -- the run ---------------------------------------------------------------------------
    def run(self) -> int:
        """The command's exit status (128+N when a signal N ended it). Raises TransportLost
        when the VM could not be reached or the connection died before the command's status
        was known."""
        previous = {s: signal.signal(s, self._on_signal) for s in FORWARDED}
        self._dir = None if self.shared else tempfile.mkdtemp(prefix="dgxvm-run-",
                                                              dir=socket_dir())
        try:
            if self.shared:
                sock = self.shared
                self._open_control(sock)
            else:
                sock = os.path.join(self._dir, "ssh")
                self._connect(sock)
            self.command = subprocess.Popen(
                [*self.target.ssh_argv("-S", sock, "-o", "ControlMaster=no", tty=self.tty),
                 *remote(self.verb, self.run_id, self.helper)],
                preexec_fn=ignore_forwarded)
            self._sent = True
            for name in self._pending:
                self._send(name)
            self._pending.clear()
            rc = self.command.wait()
            if rc == SSH_FAILED:
                rc = self._status_after_255()
            elif rc == GUEST_REFUSED and self.shared and self.control is not None and \
                    self.control.poll() == SSH_FAILED:
                # the control session never reached the guest: the command did not run
                raise TransportLost(job=self.target.job_id, domain=self.target.domain,
                                    reason=self._control_reason())
            return rc
        finally:
            self._close_control()
            if self._dir is not None:
                shutil.rmtree(self._dir, ignore_errors=True)
            for s, h in previous.items():
                signal.signal(s, h)

    def _open_control(self, sock: str) -> None:
        """The control session as a channel on the job's shared connection; the command session
        starts at once (the guest starts no command before its control session is there). If
        the master has gone since it answered, ssh makes a connection of its own."""
        self.control = subprocess.Popen(
            [*self.target.ssh_argv("-S", sock, "-o", "ControlMaster=no"),
             *remote("control", self.run_id, self.helper)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            preexec_fn=ignore_forwarded)
        try:
            os.write(self.control.stdin.fileno(), self.request.line())
        except OSError:
            pass  # it failed already: the command session's status says so

    def _connect(self, sock: str) -> None:
        """Start the control session as the connection's master (``-M -S sock``) and wait until
        it is authenticated (its socket exists). A master that ends before that never ran
        anything in the guest, so it is safe to try again: an sshd refuses connections beyond
        a few unauthenticated ones at a time (dropbear: 5 per address; OpenSSH: MaxStartups),
        which eight tasks of one step starting together reach."""
        deadline = time.monotonic() + CONNECT_RETRY_S
        attempt = 0
        while True:
            attempt += 1
            self.control = subprocess.Popen(
                [*self.target.ssh_argv("-M", "-S", sock, "-o", "ControlPersist=no"),
                 *remote("control", self.run_id, self.helper)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                preexec_fn=ignore_forwarded)
            try:
                os.write(self.control.stdin.fileno(), self.request.line())
            except OSError:
                pass  # it failed already: seen below
            while not os.path.exists(sock):
                if self.control.poll() is not None:
                    break
                time.sleep(SOCKET_POLL_S)
            else:
                return
            reason = self._control_reason()
            self._close_control()
            if time.monotonic() + attempt * RETRY_STEP_S > deadline:
                raise TransportLost(job=self.target.job_id, domain=self.target.domain,
                                    reason=f"{reason}; tried {attempt} times")
            time.sleep(random.uniform(0.5, 1.5) * attempt * RETRY_STEP_S)

    def _status_after_255(self) -> int:
        """Whether 255 was the command's own status (the control session knows) or ssh's."""
        assert self.control is not None and self.control.stdout is not None
        self._send("STATUS")
        out = self.control.stdout
        deadline = time.monotonic() + STATUS_WAIT_S
        buf = b""
        while time.monotonic() < deadline and b"\n" not in buf:
            ready, _, _ = select.select([out], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            chunk = os.read(out.fileno(), 4096)
            if not chunk:
                break
            buf += chunk
        words = buf.split(b"\n", 1)[0].split()
        if len(words) == 2 and words[0] == b"status" and words[1].isdigit():
            return int(words[1])
        raise TransportLost(job=self.target.job_id, domain=self.target.domain,
                            reason=self._control_reason())

    def _control_reason(self) -> str:
        """One line on why the control session failed, if it said so."""
        c = self.control
        if c is None or c.stderr is None:
            return "ssh failed"
        if c.poll() is None:
            return "ssh failed (see the lines above)"
        err = c.stderr.read().decode(errors="replace").strip().splitlines()
        return err[-1] if err else "ssh failed (see the lines above)"

    def _close_control(self) -> None:
        c, self.control = self.control, None
        if c is None:
            return
        try:
            if c.stdin is not None:
                c.stdin.close()
        except OSError:
            pass
        try:
            c.wait(timeout=CONTROL_EXIT_S)
        except subprocess.TimeoutExpired:
            c.kill()
            c.wait()
        for f in (c.stdout, c.stderr):
            if f is not None:
                f.close()


def socket_dir(tail: int = 31) -> str:
    """Where a unix socket ``tail`` characters below the directory goes: $TMPDIR unless the
    path would be too long for a socket (108 bytes; ssh first binds the path plus a
    17-character temporary suffix), then /tmp."""
    d = tempfile.gettempdir()
    return d if len(d) + tail + 17 < 108 else "/tmp"


def run(target: Target, request: Request, *, verb: str = "run", tty: bool = False,
        helper: str = GUEST_HELPER, shared: str | None = None) -> int:
    return Session(target, request, verb=verb, tty=tty, helper=helper, shared=shared).run()

