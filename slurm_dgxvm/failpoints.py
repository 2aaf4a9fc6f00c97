"""Fault points: make a dgxvm process die at a named point of a create or teardown, on purpose.

What a crash at each step leaves behind is what ``dgxvm reconcile``, the Epilog and the
docs/admin/operations.md's "Failure modes" promise to handle; the tests prove it by crashing there for real. A
point fires only when the root-owned file ``<state_dir>/failpoints`` names it, one line each:

    POINT VM ACTION          e.g.  after:disks job-42 kill

POINT is ``after:<step>`` of a create (``place``, ``make_dir``, ``keys_address_seed``,
``disks``, ``design``, ``define``, ``activate_fabric``, ``start``, ``wait_for_guest``) or of a
teardown (``shutdown``, ``undefine``, ``reset``, ``release``); VM the VM's name; ACTION ``kill``
(the process SIGKILLs itself, as slurmd's PrologEpilogTimeout or the OOM killer would),
``stop`` (SIGSTOP: it waits there until someone kills or continues it) or ``fail`` (the step
raises FaultInjected, as a failing libvirt call or guest would). A warm VM's claim has the
points ``claim:committed``, ``claim:plugged`` and ``claim:applied``. A line fires once: it is
removed from the file before the action, so a rerun (the Epilog run again) goes through.

Only a file owned by root and writable by no one else is read (the state dir is root's; a job
cannot name a point). Without the file each point costs one ``stat``.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

from . import fsutil
from .errors import FaultInjected

FILE = "failpoints"
ACTIONS = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP, "fail": None}

log = logging.getLogger("dgxvm.failpoints")


def hit(state_dir: str | os.PathLike, point: str, vm: str) -> None:
    """Fire ``point`` for ``vm`` if the file names it (see the module)."""
    path = Path(state_dir) / FILE
    try:
        st = path.stat()
    except OSError:
        return
    if st.st_uid != 0 or st.st_mode & 0o022:
        log.warning("%s ignored: not owned by root or writable by others", path)
        return
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return
    for i, line in enumerate(lines):
        words = line.split()
        if len(words) == 3 and words[0] == point and words[1] == vm and words[2] in ACTIONS:
            rest = lines[:i] + lines[i + 1:]
            fsutil.atomic_write(path, "".join(f"{x}\n" for x in rest), mode=0o644)
            log.warning("fault point %s of %s: %s", point, vm, words[2])
            if ACTIONS[words[2]] is None:
                raise FaultInjected(point=point, vm=vm)
            os.kill(os.getpid(), ACTIONS[words[2]])
            return
