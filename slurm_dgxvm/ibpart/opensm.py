"""OpenSM's partition file: one line per job's key, the file rewritten whole and OpenSM told.

partitions.conf (linux-rdma/opensm doc/partition-config.txt) [DOC]: ``Name=PKey : GUID=full,
GUID=full ;`` per partition; "it is possible to split partition configuration in more than one
definition, but then PKey should be explicitly specified"; only the low 15 bits of PKey count,
so dgxvm writes the 15-bit key and marks each member ``=full``. OpenSM reads the file when it
builds partitions on a heavy sweep, and SIGHUP makes it sweep (opensm(8)) [DOC]; the file is
written to a temporary name and renamed over the old one, so OpenSM never reads half a file.

dgxvm keeps each job's line in ``<state_dir>/ib-partitions/job-<id>.conf`` and writes the file
as ``[ib] opensm_base`` (the site's own partitions) followed by every job's line, under
``<state_dir>/ib-partitions.lock``. Upstream OpenSM has no virtualization support for VF GUIDs
(``virt_enabled``, doc/opensm-sriov.txt describes alias GUIDs only) [DOC]: VMs' VFs in a
partition need NVIDIA's OpenSM (MLNX OFED / UFM) with it enabled.
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

from ..errors import IbPartitionError
from ..fsutil import atomic_write, locked
from .plan import IbPlan

FRAGMENTS = "ib-partitions"
LOCK = "ib-partitions.lock"
HEADER = "# dgxvm: one partition per job below (written by dgxvm; edit [ib] opensm_base instead)\n"
_PKEY_RE = re.compile(r"=(0x[0-9a-f]{4})\s*:")


def fragment(plan: IbPlan) -> str:
    """The job's line: ``dgxvm_job_42=0x102a : 0x02f60300000c0003=full, ... ;``."""
    members = ", ".join(f"{g}=full" for g in plan.guids)
    return f"dgxvm_job_{plan.job_id}={plan.pkey_hex} : {members} ;\n"


class OpenSm:
    """The partition file at ``partitions``, the site's ``base``, OpenSM's ``pid_file``."""

    def __init__(self, partitions: str, base: str, pid_file: str, state_dir: str,
                 timeout_s: float = 10.0):
        self.partitions = Path(partitions)
        self.base = Path(base) if base else None
        self.pid_file = Path(pid_file)
        self.dir = Path(state_dir) / FRAGMENTS
        self.lock = Path(state_dir) / LOCK
        self.timeout_s = float(timeout_s)

    def add(self, plan: IbPlan) -> None:
        """Write the job's line (refused when another job's line has its key) and apply."""
        with self._locked(plan):
            mine = self.dir / f"job-{plan.job_id}.conf"
            for other in sorted(self.dir.glob("job-*.conf")):
                m = _PKEY_RE.search(other.read_text())
                if other != mine and m and m.group(1) == plan.pkey_hex:
                    raise IbPartitionError(pkey=plan.pkey_hex, call=f"write {mine}",
                                           reason=f"the key is held by {other.name} (a running "
                                                  f"job whose id gives the same key)")
            self._write(mine, fragment(plan), plan, mode=0o600)
            self._apply(plan)

    def remove(self, plan: IbPlan) -> None:
        """Drop the job's line and apply; a line already gone is fine (teardown runs twice)."""
        with self._locked(plan):
            mine = self.dir / f"job-{plan.job_id}.conf"
            try:
                mine.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise IbPartitionError(pkey=plan.pkey_hex, call=f"remove {mine}",
                                       reason=str(exc)) from None
            self._apply(plan)

    # internals ----------------------------------------------------------------------------------
    def _locked(self, plan: IbPlan):
        try:
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise IbPartitionError(pkey=plan.pkey_hex, call=f"mkdir {self.dir}",
                                   reason=str(exc)) from None
        return locked(self.lock, timeout=self.timeout_s, mode=0o600,
                      timed_out=lambda: IbPartitionError(
                          pkey=plan.pkey_hex, call=f"lock {self.lock}",
                          reason=f"not acquired in {self.timeout_s:g}s"),
                      failed=lambda exc: IbPartitionError(
                          pkey=plan.pkey_hex, call=f"lock {self.lock}", reason=str(exc)))

    def _write(self, path: Path, text: str, plan: IbPlan, *, mode: int) -> None:
        try:
            atomic_write(path, text, mode=mode)
        except OSError as exc:
            raise IbPartitionError(pkey=plan.pkey_hex, call=f"write {path}",
                                   reason=exc.strerror or str(exc)) from None

    def _apply(self, plan: IbPlan) -> None:
        try:
            base = self.base.read_text() if self.base else ""
            lines = "".join(p.read_text() for p in sorted(self.dir.glob("job-*.conf")))
        except OSError as exc:
            raise IbPartitionError(pkey=plan.pkey_hex, call=f"read {exc.filename}",
                                   reason=exc.strerror or str(exc)) from None
        if base and not base.endswith("\n"):
            base += "\n"
        self._write(self.partitions, base + HEADER + lines, plan, mode=0o644)
        call = f"SIGHUP opensm (pid from {self.pid_file})"
        try:
            pid = int(self.pid_file.read_text().split()[0])
            os.kill(pid, signal.SIGHUP)
        except (OSError, ValueError, IndexError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise IbPartitionError(pkey=plan.pkey_hex, call=call,
                                   reason=f"{reason or 'empty pid file'}; {self.partitions} is "
                                          f"written, OpenSM has not read it") from None
