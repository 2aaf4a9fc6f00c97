"""Can this host serve GPU VMs now? The facts ``dgxvm health`` (Slurm's HealthCheckProgram)
reports, one finding per check, each with the fix an admin applies.

Checks, in order: the host's topology reads; libvirtd answers; the image store opens and holds
the default image and every partition's; the ledger is not corrupt; the GPU health record reads;
every GPU and NVSwitch no VM holds passes its check (:mod:`slurm_dgxvm.health`: the check at
host start and between jobs — a failing one is quarantined here); on a shared-NVSwitch machine
(DGX A100/H100), Fabric Manager answers; and the quarantined and missing devices still leave a
VM of ``[health] min_block_gpus`` GPUs possible.

A failure here is the node's, never a job's: the caller drains the node with the first one.

A running VM whose Fabric Manager partition is no longer active (Fabric Manager restarted
without its resiliency mode, or someone deactivated the partition) is DEGRADED, not a failure:
that one VM's GPUs have lost NVLink, but the node makes new VMs as before (each activates its
own partition), so it is said in the ``fabric-manager`` finding and never drains the node.
Fabric Manager not answering is a failure: every new VM's ``fm`` stage would fail.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import DgxvmError
from ..lifecycle.env import Env
from ..topology.model import SHARED_NVSWITCH


@dataclass(frozen=True)
class Finding:
    check: str
    ok: bool
    detail: str
    fix: str | None = None

    def to_json(self) -> dict:
        return {"check": self.check, "ok": self.ok, "detail": self.detail, "fix": self.fix}


@dataclass(frozen=True)
class HostHealth:
    findings: tuple[Finding, ...]
    quarantined: dict[str, str] = field(default_factory=dict)   # pci -> reason
    largest_block: int | None = None                             # GPUs; None: unknown
    simulated: str | None = None

    @property
    def ok(self) -> bool:
        return all(f.ok for f in self.findings)

    @property
    def failed(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if not f.ok)

    def to_json(self) -> dict:
        return {"ok": self.ok, "findings": [f.to_json() for f in self.findings],
                "quarantined": self.quarantined, "largest_block_gpus": self.largest_block,
                "simulated": self.simulated}


def largest_block(host, unusable: set[str]) -> int:
    """GPUs in the largest legal block none of whose GPUs or NVSwitches is ``unusable``
    (host.blocks already leaves out blocks with a missing GPU)."""
    sizes = [b.size for b in host.blocks
             if not any(host.gpu(i).pci in unusable for i in b.gpus)
             and not any(s in unusable for s in b.nvswitches)]
    return max(sizes, default=0)


def check_host(env: Env, *, check_gpus: bool = True) -> HostHealth:
    findings: list[Finding] = []

    def step(check: str, fix: str, fn):
        try:
            detail = fn()
        except DgxvmError as exc:
            findings.append(Finding(check, False, str(exc), fix))
            return False
        findings.append(Finding(check, True, detail or "ok"))
        return True

    host_ok = step("topology", "check the host's PCI devices and host.sysfs_root in the config",
                   lambda: f"{len(env.host.gpus)} GPU(s), {len(env.host.nvswitches)} "
                           f"NVSwitch(es)" + (f", {len(env.host.missing_gpus)} missing"
                                              if env.host.missing_gpus else ""))
    libvirt_ok = step("libvirt", "start libvirtd (systemctl start libvirtd) and check "
                                 "libvirt.uri", lambda: libvirt_answers(env))
    step("images", "install the image with `dgxvm image install` or fix the partition's image",
         lambda: partition_images(env))
    ledger_ok = step("ledger", "run `dgxvm reconcile --rebuild-ledger` (docs/admin/operations.md, "
                               "\"dgxvm reconcile\")", lambda: _ledger(env))
    health_ok = step("gpu-health-record", "inspect the file; move it aside only once every "
                                          "quarantined GPU is known (`dgxvm gpu show`)",
                     lambda: f"{len(env.health.quarantined())} device(s) quarantined")
    if host_ok and env.host.nvswitch_model == SHARED_NVSWITCH:
        step("fabric-manager", "start Fabric Manager (systemctl start nvidia-fabricmanager) and "
                               "check fabric.fmpm in the config",
             lambda: _fabric(env, with_vms=ledger_ok and libvirt_ok))
    quarantined: dict[str, str] = {}
    biggest = None
    if host_ok and health_ok:
        if check_gpus and ledger_ok:
            step("gpus", "see `dgxvm gpu show`; clear a repaired GPU with `dgxvm gpu clear`",
                 lambda: _free_devices(env))
        try:
            quarantined = {p: d.reason or "" for p, d in env.health.quarantined().items()}
        except DgxvmError:
            pass
        biggest = largest_block(env.host, set(quarantined))
        need = env.cfg.health.min_block_gpus
        unusable = len(quarantined) + len(env.host.missing_gpus)
        detail = (f"largest VM possible: {biggest} GPU(s) (needed: {need}); "
                  f"{len(quarantined)} quarantined, {len(env.host.missing_gpus)} missing")
        if need and biggest < need:
            which = ", ".join(sorted(quarantined)) or "missing GPUs"
            findings.append(Finding("capacity", False,
                                    f"{unusable} GPU(s)/NVSwitch(es) quarantined or missing "
                                    f"leave no {need}-GPU VM possible ({which})",
                                    "repair the device, then `dgxvm gpu clear ID`"))
        else:
            findings.append(Finding("capacity", True,
                                    ("DEGRADED: " if unusable else "") + detail))
    return HostHealth(tuple(findings), quarantined, biggest,
                      env.host.simulated if host_ok else None)


def libvirt_answers(env: Env) -> str:
    """libvirtd answers at the configured URI (raises DgxvmError when it does not)."""
    conn = env.connect()
    try:
        return f"libvirtd answers at {env.uri}"
    finally:
        conn.close()


def partition_images(env: Env) -> str:
    """The store holds the default image and every partition's (raises ImageError)."""
    names = {None} | {p.image or None for p in env.cfg.partitions.values()}
    found = []
    for name in sorted(names, key=lambda n: n or ""):
        found.append(env.images.get(name).name)
    return "images present: " + ", ".join(sorted(set(found)))


def _fabric(env: Env, *, with_vms: bool) -> str:
    """Fabric Manager answers; and, when the ledger and libvirt can be read, which running VMs
    hold a partition it has not active (DEGRADED: those VMs' GPUs have no NVLink)."""
    from ..lifecycle import vmlock
    from ..virt.hypervisor import is_active, lookup
    active = {p for p, on in env.fabric.list().items() if on}
    said = f"Fabric Manager answers: {len(active)} partition(s) active"
    if not with_vms:
        return said
    held = {a.fm_partition: a.domain for a in env.ledger.read().allocations.values()
            if a.fm_partition is not None and a.fm_partition not in active}
    if not held:
        return said
    lost = {}
    conn = env.connect()
    try:
        for p, name in sorted(held.items()):
            dom = lookup(conn, name)
            if dom is not None and is_active(dom) \
                    and not vmlock.is_held(env.cfg.host.state_dir, name):
                lost[p] = name
    finally:
        conn.close()
    if lost:                  # asked again: a create activates its partition before its start
        again = {p for p, on in env.fabric.list().items() if on}
        lost = {p: n for p, n in lost.items() if p not in again}
    if not lost:
        return said
    return ("DEGRADED: " + "; ".join(f"partition {p} held by VM {n}" for p, n in lost.items())
            + " not active in Fabric Manager (it restarted, or someone deactivated it): "
              "those VMs' GPUs have no NVLink until they are recreated; new VMs are not "
              "affected (see `dgxvm reconcile`)")


def _ledger(env: Env) -> str:
    return f"{len(env.ledger.read().allocations)} VM(s) hold resources"


def _free_devices(env: Env) -> str:
    from ..health import check
    state = env.ledger.read()
    held = {p for a in state.allocations.values() for p in (*a.gpu_pcis, *a.nvswitches)}
    quarantined = set(env.health.quarantined())
    free = [p for p in env.host.passthrough_pcis if p not in held and p not in quarantined]
    result = check(env.sysfs, env.health, free, by="dgxvm health")
    if result.newly:       # degraded, not failed: the capacity check decides about draining
        return (f"{len(free)} free device(s) checked; newly quarantined: "
                + "; ".join(f"{v.pci} ({v.reason})" for v in result.newly.values()))
    return f"{len(free)} free device(s) checked, all pass"
