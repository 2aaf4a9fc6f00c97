"""list: every dgxvm VM, from its record, libvirt's view of it and the ledger, as one row."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from ..virt import hypervisor
from ..ledger import Allocation
from ..records import VmRecord
from .env import Env


@dataclass(frozen=True)
class VmRow:
    """One line of ``dgxvm list``; :meth:`to_json` is the stable ``--json`` form."""

    name: str
    state: str                   # libvirt's (running, shut-off ...), undefined, no-record
    job_id: int | None
    user: str | None
    gpus: list[int]
    slurm_gpus: list[int] | None
    numa_nodes: list[int]
    vcpus: int | None
    memory_mib: int | None
    nvswitches: list[str]
    fm_partition: int | None
    image: str | None
    address: str | None
    uptime_s: float | None
    held: bool                   # the ledger holds its resources
    fitted: list[str]
    boot_s: float | None

    @classmethod
    def of_record(cls, rec: VmRecord, state: str, *, held: bool, now: float) -> VmRow:
        a, p = rec.allocation, rec.placement
        return cls(
            name=rec.name, state=state, job_id=rec.job_id, user=rec.user, gpus=list(a.gpus),
            slurm_gpus=list(a.slurm_gpus) if a.slurm_gpus is not None else None,
            numa_nodes=sorted(a.memory_mib), vcpus=p.vcpus, memory_mib=p.memory_mib,
            nvswitches=list(a.nvswitches), fm_partition=a.fm_partition, image=rec.image,
            address=rec.address,
            uptime_s=round(now - rec.started, 1) if state == "running" and rec.started else None,
            held=held, fitted=list(rec.fitted), boot_s=rec.boot_s)

    @classmethod
    def of_allocation(cls, alloc: Allocation) -> VmRow:
        """A ledger entry whose VM has no record (a crash between the two)."""
        return cls(
            name=alloc.domain, state="no-record", job_id=alloc.job_id, user=alloc.user,
            gpus=list(alloc.gpus),
            slurm_gpus=list(alloc.slurm_gpus) if alloc.slurm_gpus else None,
            numa_nodes=sorted(alloc.memory_mib), vcpus=len(alloc.cpus),
            memory_mib=sum(alloc.memory_mib.values()), nvswitches=list(alloc.nvswitches),
            fm_partition=alloc.fm_partition, image=None, address=None, uptime_s=None,
            held=True, fitted=[], boot_s=None)

    def to_json(self) -> dict:
        return asdict(self)


def list_vms(env: Env) -> list[VmRow]:
    """Every dgxvm VM: its record, libvirt's view of it, and whether the ledger holds it."""
    conn = env.connect()
    held = {a.domain: a for a in env.ledger.read().allocations.values()}
    now = time.time()
    rows = []
    for rec in env.vms.all():
        dom = hypervisor.lookup(conn, rec.name)
        state = hypervisor.state_name(dom) if dom is not None else "undefined"
        rows.append(VmRow.of_record(rec, state, held=rec.name in held, now=now))
    known = {r.name for r in rows}
    rows.extend(VmRow.of_allocation(a) for name, a in held.items() if name not in known)
    return sorted(rows, key=lambda r: r.name)
