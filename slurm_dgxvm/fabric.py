"""NVIDIA Fabric Manager partitions, through its partition tool ``fmpm``.

On NVSwitch systems in the *shared NVSwitch* virtualization model (DGX A100 / H100 with Fabric
Manager in ``FABRIC_MODE=1``), a VM's GPUs can talk NVLink only after the Fabric Manager
partition that holds exactly those GPUs has been activated, and the partition must be
deactivated when the VM is gone. FM ships ``fmpm`` (NVIDIA/Fabric-Manager-Client):

    fmpm -l          JSON: {"partitionInfo": [{"partitionId", "isActive", "numGpus",
                                              "gpuInfo": [{"physicalId", ...}]}], ...}
    fmpm -a ID       activate
    fmpm -d ID       deactivate

It reports failures as ``Failed to ... fmReturn: N`` on *stdout* and exits with the (negative)
``fmReturn_t`` code, so both streams are kept for error messages and the exit status is decoded.

Decisions that live here:

* **Activate refuses an active partition.** An active partition belongs to another VM; taking it
  over would join two tenants' GPUs. We list first and raise :class:`FabricError` ("already
  active") before asking FM, and FM's own refusal (a race) is a FabricError too. The ledger is
  what prevents two VMs from choosing one partition; this is the last line of defence.
* **Deactivate is idempotent.** Teardown runs after failures and twice after a crash; a
  partition that is already inactive is success (checked before, and again after an ``fmpm -d``
  failure).
* **Every failure names the partition and carries fmpm's output tail**; a missing ``fmpm`` and
  a timeout are FabricErrors too (exit 3, the host), never a traceback.
* ``fmpm`` may be a command line (``fabric.fmpm = "fmpm --unix-domain-socket /run/fm.sock"``):
  a string is split like a shell would (shlex), without running a shell.
"""

from __future__ import annotations

import json
import logging
import shlex
import subprocess
from collections.abc import Sequence

from .errors import FabricError
from .tools import output_tail, run_tool, tail

log = logging.getLogger("dgxvm.fabric")

ALL = "(all)"          # the partition named in errors of `fmpm -l`

FM_RETURN = {-1: "FM_ST_BADPARAM", -2: "FM_ST_GENERIC_ERROR", -3: "FM_ST_NOT_SUPPORTED",
             -4: "FM_ST_UNINITIALIZED", -5: "FM_ST_TIMEOUT", -6: "FM_ST_VERSION_MISMATCH",
             -7: "FM_ST_IN_USE", -8: "FM_ST_NOT_CONFIGURED", -9: "FM_ST_CONNECTION_NOT_VALID",
             -10: "FM_ST_NVLINK_ERROR"}


def _status(rc: int) -> str:
    """fmpm exits with an fmReturn_t (negative, so 256-n as an exit status): name it."""
    signed = rc - 256 if rc > 127 else rc
    name = FM_RETURN.get(signed)
    return f"exit {rc} ({name})" if name else f"exit {rc}"


class Fabric:
    """Fabric Manager partitions via ``fmpm``; every call runs the tool with ``timeout_s``."""

    def __init__(self, fmpm: str | Sequence[str] = "fmpm", timeout_s: float = 60.0):
        self.argv = shlex.split(fmpm) if isinstance(fmpm, str) else list(fmpm)
        if not self.argv:
            raise FabricError(partition=ALL, reason="fabric.fmpm is empty")
        self.timeout_s = float(timeout_s)

    @classmethod
    def from_config(cls, cfg) -> Fabric:
        return cls(cfg.fabric.fmpm, cfg.fabric.timeout_s)

    def list(self) -> dict[int, bool]:
        """``{partition id: active}`` of every partition FM supports."""
        return {pid: info["active"] for pid, info in self.partitions().items()}

    def partitions(self) -> dict[int, dict]:
        """``{partition id: {"active": bool, "gpus": (physical ids)}}`` from ``fmpm -l``."""
        out = self._run(["-l"], ALL).stdout
        try:
            doc = json.loads(out[out.index("{"):])
            parts = {}
            for p in doc["partitionInfo"]:
                pid = int(p["partitionId"])
                gpus = tuple(int(g["physicalId"]) for g in p.get("gpuInfo") or ())
                parts[pid] = {"active": bool(p["isActive"]), "gpus": gpus}
        except (ValueError, KeyError, TypeError) as e:
            raise FabricError(partition=ALL, reason=f"cannot parse `fmpm -l` output ({e}): "
                                                    f"{tail(out, 300)}") from None
        return parts

    def activate(self, pid: int) -> None:
        """Activate partition ``pid``; FabricError if it is unknown, already active (another
        VM holds it) or FM refuses."""
        pid = int(pid)
        state = self._known(pid)
        if state[pid]:
            raise FabricError(partition=pid, reason="already active (another VM holds it); "
                                                    "refusing to share it")
        self._run(["-a", str(pid)], pid, what="activate")
        log.info("fabric manager partition %d activated", pid)

    def deactivate(self, pid: int) -> None:
        """Deactivate partition ``pid``; one that is already inactive is fine (idempotent)."""
        pid = int(pid)
        if not self._known(pid)[pid]:
            log.info("fabric manager partition %d already inactive", pid)
            return
        try:
            self._run(["-d", str(pid)], pid, what="deactivate")
        except FabricError:
            try:                               # someone else deactivated it meanwhile?
                if not self.list().get(pid, True):
                    return
            except FabricError:
                pass
            raise
        log.info("fabric manager partition %d deactivated", pid)

    # internals ----------------------------------------------------------------------------------
    def _known(self, pid: int) -> dict[int, bool]:
        state = self.list()
        if pid not in state:
            known = ", ".join(str(p) for p in sorted(state)) or "none"
            raise FabricError(partition=pid, reason=f"no such partition (fmpm -l knows: {known})")
        return state

    def _run(self, args: list[str], partition, *,
             what: str = "list") -> subprocess.CompletedProcess:
        argv = [*self.argv, *args]
        cmd = shlex.join(argv)
        r = run_tool(argv, timeout=self.timeout_s, what=f"`{cmd}`", check=False,
                     error=lambda reason: FabricError(partition=partition, reason=reason),
                     hint="; install NVIDIA Fabric Manager or set fabric.fmpm",
                     timeout_hint=" (is nvidia-fabricmanager running?)")
        if r.returncode != 0:              # fmpm's own status, decoded: build the message here
            raise FabricError(partition=partition,
                              reason=f"{what} failed: `{cmd}` {_status(r.returncode)}: "
                                     f"{output_tail(r)}", returncode=r.returncode)
        return r


__all__ = ["Fabric", "FM_RETURN"]
