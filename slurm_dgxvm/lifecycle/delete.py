"""delete: the user's ssh masters of the VM (:mod:`.sshmux`) -> graceful shutdown (bounded) ->
destroy -> undefine -> FM partition off -> GPU (and NVSwitch) reset and check, quarantining a
device that fails (:mod:`slurm_dgxvm.health`) -> the job's InfiniBand partition key -> the job
fabric on this node (a multi-node job's) -> address -> VM directory -> ledger.
Idempotent: whatever a failed create or a crash left is cleaned.

Timed as the teardown stages of :mod:`slurm_dgxvm.observe.stages` (shutdown, destroy, undefine,
reset, release) and counted in :mod:`slurm_dgxvm.observe.opstats`."""

from __future__ import annotations

import logging
import time
import xml.etree.ElementTree as ET

from .. import failpoints, ibpart
from ..jobnet.apply import present as job_fabrics_here, teardown as teardown_job_fabric
from ..jobnet.plan import vni_for
from ..virt import hypervisor
from ..observe import opstats
from ..design import mac_for
from ..design.spec import XMLNS
from ..errors import DomainNotFound, NotOurDomain
from ..ledger import Allocation, domain_key
from ..names import domain_name
from ..records import IMAGE_CACHE_SPEC, SHARE_SPEC, VmRecord
from ..observe.stages import StageTimer
from . import sshmux, vmlock
from .env import Env, Progress, quiet

log = logging.getLogger("dgxvm.lifecycle")


def delete(env: Env, name: str, progress: Progress = quiet, *,
           job_id: int | None = None, graceful: bool = True,
           unclaimed_only: bool = False) -> VmRecord | None:
    """Stop and remove the VM ``name`` and everything it holds; return its last record.

    Works on whatever is left: a record without a domain, a domain that is off, a ledger entry
    whose record is gone, a VM directory a crashed create left without a record, a DHCP
    reservation. Raises DomainNotFound when there is nothing of that name, and refuses a libvirt
    domain that dgxvm did not make (NotOurDomain): one with no record and no ledger entry,
    unless ``job_id`` is given and the domain's dgxvm metadata names that job (the Epilog after
    a crash).

    Holds the name's lock (:mod:`.vmlock`) throughout, waiting for a create or delete of the
    same name to end first (LockTimeout past :func:`.vmlock.wait_s`). ``graceful=False``
    destroys the guest without asking it to shut down (a warm VM no tenant has used: nothing in
    it to flush). ``unclaimed_only``: only while the VM is a warm VM no job has claimed (its
    ledger entry still ``domain:NAME``), checked under the lock; otherwise nothing is done and
    None is returned, so a warm VM a Prolog claimed meanwhile is that job's, untouched.
    """
    t0 = time.monotonic()
    name = domain_name(name)
    timer = StageTimer()
    try:
        with vmlock.held(env.cfg.host.state_dir, name, timeout=vmlock.wait_s(env.cfg)):
            if unclaimed_only and domain_key(name) not in env.ledger.read().allocations:
                log.info("%s: not deleted: no longer a warm VM no job has claimed", name)
                return None
            how, rec = _teardown(env, name, job_id, progress, timer, graceful)
    except DomainNotFound:
        raise                             # nothing to tear down (or not ours): not counted
    except BaseException as exc:
        opstats.observe(env.cfg.host.state_dir, "teardown", timer, failure=exc)
        raise
    teardown = round(time.monotonic() - t0, 3)
    opstats.observe(env.cfg.host.state_dir, "teardown", timer)
    log.info("%s: deleted (%s) in %.2fs", name, how, teardown)
    if rec is None:
        return None
    return rec.with_(state="deleted", teardown_s=teardown, ended=f"deleted ({how})",
                     held_s=round(time.time() - rec.created, 3) if rec.created else None,
                     teardown_stages=timer.seconds())


def _teardown(env: Env, name: str, job_id: int | None, progress: Progress,
              timer: StageTimer, graceful: bool = True) -> tuple[str, VmRecord | None]:
    """:func:`delete` after the name: find what is left of the VM, then each step in its
    stage. Returns how the VM stopped and its record (None: none was left)."""
    rec = env.vms.load(name)
    conn = env.connect()
    dom = hypervisor.lookup(conn, name)
    held = None if rec else _ledger_entry_of(env, name)
    key = rec.ledger_key if rec else (held.key if held else None)
    if rec is None and key is None:
        if dom is not None and (job_id is None or domain_job(dom) != job_id):
            raise NotOurDomain(name=name)
        if dom is None and not env.vms.dir(name).exists():
            raise DomainNotFound(name=name)
    if rec is not None:
        env.vms.save(rec.with_(state="deleting"))
        sshmux.stop_masters(env.vms.dir(name), rec.uid)   # the job's shared connections
    how = "not running"
    if dom is not None:
        progress("shutting down")
        with timer.stage("shutdown"):
            how = hypervisor.shutdown_gracefully(dom, env.cfg.libvirt.shutdown_timeout_s) \
                if graceful else None
        failpoints.hit(env.cfg.host.state_dir, "after:shutdown", name)
        if how is None:                   # still running at the deadline
            with timer.stage("destroy"):
                hypervisor.destroy(dom)
            how = "destroyed"
        progress("undefining")
        with timer.stage("undefine"), hypervisor.libvirt_errors(env.uri,
                                                                f"undefine domain {name}"):
            hypervisor.undefine(dom)
        failpoints.hit(env.cfg.host.state_dir, "after:undefine", name)
    # only what the ledger still holds for this VM: a VM stopped outside dgxvm (a crash) gave
    # its devices back through the hook, which reset them then; another VM may hold them now
    held_now = env.ledger.read().allocations.get(key) if key is not None else None
    fm = held_now.fm_partition if held_now else None
    devices = (tuple(held_now.gpu_pcis) + tuple(held_now.nvswitches)) if held_now else ()
    checked = None
    if fm is not None or devices:
        progress("resetting GPUs")
        with timer.stage("reset"):
            # the FM partition is deactivated before its GPUs are reset (Fabric Manager user
            # guide, shared NVSwitch model); devices are quarantined before the ledger gives
            # them out again (health.store)
            if fm is not None:
                env.fabric.deactivate(fm)
            checked = check_devices(env, name, devices, rec.job_id if rec else job_id)
        failpoints.hit(env.cfg.host.state_dir, "after:reset", name)
    progress("releasing")
    with timer.stage("release"):
        _leave_ib_partition(env, rec)
        _remove_job_fabric(env, rec, rec.job_id if rec else job_id)
        hypervisor.give_back_address(conn, rec.network if rec else env.cfg.libvirt.network,
                                     env.cfg.host.state_dir, name,
                                     rec.mac if rec else mac_for(name))
        _stop_plugged_shares(env.vms.dir(name))
        env.vms.remove_dir(name)
        if key is not None:
            env.ledger.release(key)
    failpoints.hit(env.cfg.host.state_dir, "after:release", name)
    if rec is not None and checked is not None:
        rec = rec.with_(gpu_resets=checked.reset_s,
                        quarantined={v.pci: v.reason for v in checked.bad})
    return how, rec


def _stop_plugged_shares(vmdir) -> None:
    """The virtiofsd of a share plugged into a claimed warm VM, if QEMU's end left it running
    (:mod:`slurm_dgxvm.shares.hotplug`); a cold VM's are libvirt's and end with the domain."""
    from ..shares import hotplug
    for spec in (SHARE_SPEC, IMAGE_CACHE_SPEC):
        hotplug.stop(vmdir / spec)


def _leave_ib_partition(env: Env, rec: VmRecord | None) -> None:
    """A job's VM's InfiniBand functions out of the job's partition key (the subnet manager's
    side; the functions themselves go back with the ledger)."""
    if rec is None or rec.job_id is None or not rec.placement.ib:
        return
    cfg = env.cfg
    ibpart.remove(ibpart.plan_for(rec.job_id, rec.placement, env.host,
                                  pkey_min=cfg.ib.pkey_min, pkey_max=cfg.ib.pkey_max), cfg)


def _remove_job_fabric(env: Env, rec: VmRecord | None, job_id: int | None) -> None:
    """The job fabric this VM's job has on this node: the VNI its record names, or (no record:
    a create killed part-way) the job's VNI when a device there carries this job's tag. Never
    another job's: a VNI whose devices name another job is left to that job."""
    vni = rec.jobnet.get("vni") if rec is not None and rec.jobnet else None
    if vni is None:
        if job_id is None or not env.cfg.jobnet.enabled:
            return
        candidate = vni_for(job_id)
        if job_fabrics_here().get(candidate) != job_id:
            return
        vni = candidate
    if teardown_job_fabric(int(vni)):
        log.info("job %s: job fabric VNI %s removed from this node", job_id, vni)


def check_devices(env: Env, name: str, devices: tuple[str, ...], job_id: int | None):
    """Reset ``devices`` (unless ``[health] reset`` is off) and check them; a device that
    fails is quarantined. None when there are none."""
    if not devices:
        return None
    from ..health import check
    h = env.cfg.health
    result = check(env.sysfs, env.health, devices,
                   by=f"teardown of {name}" + (f" (job {job_id})" if job_id else ""),
                   job=job_id, vm=name, reset=h.reset, reset_timeout_s=h.reset_timeout_s,
                   diag_command=h.diag_command, diag_timeout_s=h.diag_timeout_s)
    for v in result.bad:
        log.warning("%s: %s quarantined: %s", name, v.pci, v.reason)
    return result


def domain_job(dom) -> int | None:
    """The job id in a domain's dgxvm metadata (``<dgxvm:vm><dgxvm:job>``), or None."""
    return domain_owner(dom)[1]


def domain_owner(dom) -> tuple[str | None, int | None]:
    """(owner, job id) from a domain's dgxvm metadata (``<dgxvm:vm><dgxvm:owner>``,
    ``<dgxvm:job>``); owner None when it has no dgxvm metadata (dgxvm did not make it)."""
    try:
        root = ET.fromstring(dom.XMLDesc(0))
    except Exception:  # noqa: BLE001 - a domain that vanished (or is not XML) has no job
        return None, None
    vm = root.find(f"metadata/{{{XMLNS}}}vm")
    if vm is None:
        return None, None
    owner = (vm.findtext(f"{{{XMLNS}}}owner") or "").strip() or "domain"
    text = (vm.findtext(f"{{{XMLNS}}}job") or "").strip()
    return owner, int(text) if text.isascii() and text.isdigit() else None


def _ledger_entry_of(env: Env, name: str) -> Allocation | None:
    for alloc in env.ledger.read().allocations.values():
        if alloc.domain == name:
            return alloc
    return None
