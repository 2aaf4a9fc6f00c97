"""reconcile, the run: read the node (:func:`collect`), plan (:mod:`.plan`), act.

Safe while jobs start and end:

* Slurm is asked first (by the caller), the node read after, and a job VM made after Slurm
  answered is left for the next run (:func:`.plan.plan`).
* Every action on a VM name happens under that name's lock, tried without waiting
  (:mod:`slurm_dgxvm.lifecycle.vmlock`): a name whose lock is held is a create or delete in
  progress, skipped. Under the lock the name's facts are read again, and anything changed since
  the plan skips it.
* The ledger's lock is taken only for the ledger: a rebuild, and for a moment to reserve a
  Fabric Manager partition before it is deactivated (so no VM can be placed on it meanwhile).
  The users' image caches are read (as each user, with a deadline) after any rebuild, outside
  every lock: a user's FIFO or ``kill -STOP`` costs this run seconds, never a Prolog its wait
  for the ledger.
* Every action is the idempotent one that undoes it everywhere else
  (:func:`slurm_dgxvm.lifecycle.delete.delete`, ``release_address``, ``Fabric.deactivate``), so a
  second run finds nothing, and a run killed midway leaves what the next run repairs.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field, replace

from ..jobnet.apply import present as job_fabrics_here, teardown as teardown_job_fabric
from ..virt import addresses, hypervisor
from ..errors import DgxvmError, DomainNotFound, LedgerCorrupt, RecordCorrupt, UserTreeRefused
from ..ledger import Allocation, domain_key
from ..lifecycle import vmlock
from ..lifecycle.delete import delete, domain_owner
from ..lifecycle.env import Env
from . import cache_partials
from .plan import (CACHE_UNREAD_HOLD, IN_PROGRESS, DomainFact, Finding, JobsOnNode,
                        NodeFacts, Outcome, VmFacts, exit_code, partitions_off_under_running_vms,
                        plan, planned, rebuild)

log = logging.getLogger("dgxvm.reconcile")

#: the name under which a partition is held while it is deactivated (see :func:`_deactivate`)
FM_HOLD = "dgxvm-reconcile-fm-{}"


@dataclass
class Report:
    """What one run found and did; :meth:`to_json` is ``dgxvm reconcile --json``."""

    node: str
    dry_run: bool
    outcomes: list[Outcome] = field(default_factory=list)
    checked: dict = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return exit_code(self.outcomes)

    def to_json(self) -> dict:
        return {"node": self.node, "dry_run": self.dry_run,
                "consistent": not self.outcomes, "exit_code": self.exit_code,
                "checked": dict(self.checked),
                "findings": [o.to_json() for o in self.outcomes]}


# -- reading the node ------------------------------------------------------------------------------
def collect(env: Env, jobs: JobsOnNode, conn) -> NodeFacts:
    """The node as it is now. Read in this order, so that what a create makes first (ledger
    entry, directory, reservation, domain) is seen whenever what it makes later is: Fabric
    Manager, reservations, locks, ledger, VM directories and records, libvirt's domains; and
    Fabric Manager once more when a running VM's partition was not active (a create activates
    it before its domain starts, so only a read after the domains' says it is lost). Not the
    users' image caches (:func:`run` adds them, outside the ledger's lock)."""
    cfg = env.cfg
    fm_active, fm_error = _fabric(env)
    reservations = hypervisor.reservations(conn, cfg.libvirt.network)
    held = addresses.held(cfg.host.state_dir)
    busy = frozenset(vmlock.held_names(cfg.host.state_dir))
    try:
        ledger, ledger_error = env.ledger.read(), None
    except LedgerCorrupt as exc:
        ledger, ledger_error = None, str(exc.reason)
    entries = {a.domain: a for a in ledger.allocations.values()} if ledger else {}
    dirs = set(env.vms.names())
    domains = _domains(conn, known=dirs | set(entries))
    vms = {}
    for name in sorted(dirs | set(entries) | set(domains)):
        vms[name] = _vm(env, name, domains.get(name), entries.get(name), name in dirs,
                        name in busy)
    job_fabrics, jobnet_error = _job_fabrics()
    facts = NodeFacts(jobs=jobs, vms=vms, ledger=ledger, ledger_error=ledger_error,
                      job_prefix=cfg.slurm.domain_prefix, network=cfg.libvirt.network,
                      reservations=reservations, held=held, fm_active=fm_active,
                      fm_error=fm_error,
                      busy=busy, job_fabrics=job_fabrics, jobnet_error=jobnet_error)
    if partitions_off_under_running_vms(facts):
        # a running VM's partition was not active when Fabric Manager was asked, before its
        # domain was seen: ask again (a create may have activated it and started the VM since)
        late, late_error = _fabric(env)
        facts = replace(facts, fm_active_late=late, fm_error=late_error)
    return facts


def facts_of(env: Env, conn, name: str) -> VmFacts:
    """One name's facts, read again (under its lock, before acting on it)."""
    dom = hypervisor.lookup(conn, name)
    domain = None
    if dom is not None:
        owner, job = domain_owner(dom)
        domain = DomainFact(name=name, active=hypervisor.is_active(dom), owner=owner, job_id=job)
    entry = next((a for a in env.ledger.read().allocations.values() if a.domain == name), None)
    return _vm(env, name, domain, entry, env.vms.dir(name).is_dir(),
               vmlock.is_held(env.cfg.host.state_dir, name))


def _vm(env: Env, name: str, domain, entry, has_dir: bool, busy: bool) -> VmFacts:
    record, record_error = None, None
    if has_dir:
        try:
            record = env.vms.load(name)
        except RecordCorrupt as exc:
            record_error = str(exc.reason)
    return VmFacts(name=name, domain=domain, record=record, record_error=record_error,
                   entry=entry, has_dir=has_dir, busy=busy)


def _domains(conn, known: set[str]) -> dict[str, DomainFact]:
    """The libvirt domains dgxvm made (its metadata) or whose name dgxvm has a piece of."""
    with hypervisor.libvirt_errors(conn.getURI(), "list domains"):
        doms = conn.listAllDomains(0)
    out = {}
    for dom in doms:
        try:
            name = dom.name()
        except Exception:  # noqa: BLE001 - a domain that went away meanwhile
            continue
        owner, job = domain_owner(dom)
        if owner is None and name not in known:
            continue                     # not dgxvm's, and nothing of dgxvm's has its name
        out[name] = DomainFact(name=name, active=hypervisor.is_active(dom), owner=owner,
                               job_id=job)
    return out


def _fabric(env: Env) -> tuple[frozenset[int] | None, str | None]:
    """(active partitions, why they could not be read); (None, None) on a machine without
    Fabric Manager (its NVSwitches go into the VMs, or it has none)."""
    from ..topology import SHARED_NVSWITCH
    if env.host.nvswitch_model != SHARED_NVSWITCH:
        return None, None
    try:
        return frozenset(p for p, active in env.fabric.list().items() if active), None
    except DgxvmError as exc:
        return None, str(exc)


def _job_fabrics() -> tuple[dict[int, int | None] | None, str | None]:
    """(the job fabrics on this node, why they could not be listed). Read after the VMs' locks
    and records: a Prolog makes its record (naming the fabric) before the fabric."""
    try:
        return job_fabrics_here(), None
    except DgxvmError as exc:
        return None, str(exc)


# -- the run ---------------------------------------------------------------------------------------
def run(env: Env, jobs: JobsOnNode, *, dry_run: bool = False,
        rebuild_ledger: bool = False) -> Report:
    """Compare, plan and (unless ``dry_run``) repair; the report says what and why.

    Raises HypervisorError when libvirt cannot be asked (nothing is judged without it). A
    corrupt ledger is reported and left as it is unless ``rebuild_ledger``."""
    conn = env.connect()
    report = Report(node=jobs.node, dry_run=dry_run)
    facts = collect(env, jobs, conn)
    if facts.ledger_error is not None and rebuild_ledger:
        outcome, facts = _rebuild(env, jobs, conn, facts, dry_run)
        if outcome is not None:
            report.outcomes.append(outcome)
    if facts.ledger_error is None:
        # each user's cache read as that user, with a deadline: after the rebuild, under no lock
        facts = replace(facts, partials=tuple(cache_partials.find(env.cfg)))
    report.checked = _checked(facts)
    if facts.ledger_error is not None:
        if not rebuild_ledger:
            report.outcomes.extend(planned(f, dry_run=dry_run) for f in plan(facts))
        return report
    for f in plan(facts):
        out = planned(f, dry_run=dry_run)
        if out is None:
            out = _act(env, conn, facts, f)
        log.info("reconcile: %s", out.line())
        report.outcomes.append(out)
    return report


def _checked(facts: NodeFacts) -> dict:
    """What was compared: counts, and for each source whether it could be read."""
    jobs = facts.jobs
    return {
        "slurm": "ok" if jobs.live is not None else f"not asked: {jobs.error}",
        "jobs_live": sorted(jobs.live) if jobs.live is not None else None,
        "domains": sum(1 for v in facts.vms.values() if v.domain is not None),
        "records": sum(1 for v in facts.vms.values() if v.record is not None),
        "vm_dirs": sum(1 for v in facts.vms.values() if v.has_dir),
        "ledger": "ok" if facts.ledger_error is None else f"corrupt: {facts.ledger_error}",
        "ledger_entries": len(facts.ledger.allocations) if facts.ledger is not None else None,
        "reservations": (len(facts.reservations) if facts.reservations is not None
                         else None),
        "fabric_manager": ("not used" if facts.fm_active is None and facts.fm_error is None
                           else "ok" if facts.fm_error is None
                           else f"not asked: {facts.fm_error}"),
        "job_fabrics": (len(facts.job_fabrics) if facts.job_fabrics is not None
                        else f"not listed: {facts.jobnet_error}"),
        "in_progress": sorted(facts.busy),
        "image_cache_partials": sum(len(c.names) for c in facts.partials),
        "guest_processes": "end with their VM: nothing of them is kept on the host",
    }


def _rebuild(env: Env, jobs: JobsOnNode, conn, facts: NodeFacts,
             dry_run: bool) -> tuple[Outcome | None, NodeFacts]:
    """Rebuild a corrupt ledger (or, with ``dry_run``, say how); the facts with the ledger that
    results. The real one holds the ledger's lock, reads the node again under it (no create can
    place a VM meanwhile, and one that had placed its VM still holds its name's lock, which
    makes the rebuild wait for a later run), keeps the corrupt file aside and writes the new
    one atomically. No outcome when the ledger parses again by then (mended meanwhile)."""
    if dry_run:
        state, finding = rebuild(facts)
        if state is None:
            return planned(finding, dry_run=True), facts
        return Outcome(finding, "would do"), facts.with_ledger(state)
    with env.ledger.locked():
        facts = collect(env, jobs, conn)
        if facts.ledger_error is None:
            return None, facts
        state, finding = rebuild(facts)
        if state is None:
            return planned(finding, dry_run=False), facts
        aside = env.ledger.replace_corrupt(state)
    return (Outcome(finding, "done", f"the corrupt file is kept as {aside}"),
            collect(env, jobs, conn))


def _act(env: Env, conn, facts: NodeFacts, f: Finding) -> Outcome:
    try:
        if f.action == "delete-vm":
            return _delete(env, conn, facts, f)
        if f.action == "release-address":
            return _release(env, conn, facts, f)
        if f.action == "give-back-address":
            return _give_back(env, conn, f)
        if f.action == "deactivate-fm-partition":
            return _deactivate(env, f)
        if f.action == "sweep-image-cache":
            return _sweep(facts, f)
        if f.action == "remove-job-fabric":
            return _remove_job_fabric(env, f)
    except DgxvmError as exc:
        return Outcome(f, "failed", str(exc))
    raise ValueError(f"no way to {f.action}")


def _delete(env: Env, conn, facts: NodeFacts, f: Finding) -> Outcome:
    assert f.name is not None
    with vmlock.try_held(env.cfg.host.state_dir, f.name) as got:
        if not got:
            return Outcome(f, "skipped", IN_PROGRESS)
        now = facts_of(env, conn, f.name)
        if now.signature() != facts.vms[f.name].signature():
            return Outcome(f, "skipped", f"changed while reconcile ran (now: {now.pieces()}); "
                                         f"run it again")
        try:
            rec = delete(env, f.name, job_id=f.job_id)
        except DomainNotFound as exc:
            if now.is_empty():
                return Outcome(f, "done", "already gone")
            return Outcome(f, "failed", str(exc))
    return Outcome(f, "done", rec.ended if rec is not None else "cleaned up (it had no record)")


@contextlib.contextmanager
def _still_nobodys(env: Env, conn, f: Finding):
    """Under the lock of ``f.name``: None while that name still has nothing else on the node
    (the network piece ``f`` is about may go), else the Outcome that skips it."""
    assert f.name is not None
    with vmlock.try_held(env.cfg.host.state_dir, f.name) as got:
        if not got:
            yield Outcome(f, "skipped", IN_PROGRESS)
            return
        now = facts_of(env, conn, f.name)
        if not now.is_empty():
            yield Outcome(f, "skipped", f"{f.name} has a VM again ({now.pieces()}): it goes "
                                        f"with that VM")
            return
        yield None


def _release(env: Env, conn, facts: NodeFacts, f: Finding) -> Outcome:
    assert f.mac is not None
    cfg = env.cfg
    with _still_nobodys(env, conn, f) as skipped:
        if skipped is not None:
            return skipped
        if f.mac not in (hypervisor.reservations(conn, cfg.libvirt.network) or {}):
            return Outcome(f, "done", "already gone")
        hypervisor.release_address(conn, cfg.libvirt.network, cfg.host.state_dir, f.mac)
    return Outcome(f, "done")


def _give_back(env: Env, conn, f: Finding) -> Outcome:
    cfg = env.cfg
    with _still_nobodys(env, conn, f) as skipped:
        if skipped is not None:
            return skipped
        if addresses.held(cfg.host.state_dir).get(f.subject) != f.name:
            return Outcome(f, "done", "already given back")
        hypervisor.give_back_address(conn, cfg.libvirt.network, cfg.host.state_dir, f.name,
                                     None)
    return Outcome(f, "done")


def _sweep(facts: NodeFacts, f: Finding) -> Outcome:
    [c] = [c for c in facts.partials if c.path == f.subject]
    try:
        gone = cache_partials.sweep(c)
    except UserTreeRefused as exc:                 # a UserTreeTimeout too: the user's files
        return Outcome(f, "skipped", f"as uid {c.uid}: {exc.reason}; {CACHE_UNREAD_HOLD}")
    if not gone:
        return Outcome(f, "skipped", "none went: a pull of each took it up meanwhile")
    return Outcome(f, "done", f"removed {', '.join(gone)}")


def _remove_job_fabric(env: Env, f: Finding) -> Outcome:
    """Under the job's VM name's lock (a Prolog making that VM holds it), and only while the
    devices still carry that job's tag."""
    assert f.name is not None and f.vni is not None
    with vmlock.try_held(env.cfg.host.state_dir, f.name) as got:
        if not got:
            return Outcome(f, "skipped", IN_PROGRESS)
        if env.vms.exists(f.name):
            return Outcome(f, "skipped", f"{f.name} has a VM again: the fabric goes with it")
        if job_fabrics_here().get(f.vni) != f.job_id:
            return Outcome(f, "done", "already gone")
        teardown_job_fabric(f.vni)
    return Outcome(f, "done")


def _deactivate(env: Env, f: Finding) -> Outcome:
    """Deactivate partition ``f.partition`` while the ledger holds it under a name of its own
    (:data:`FM_HOLD`), so no create is placed on it in between (placement never picks a held
    partition). A run killed in between leaves that entry, an admin VM without a domain, which
    the next run deletes (deactivating the partition again)."""
    p = f.partition
    assert p is not None
    name = FM_HOLD.format(p)
    key = domain_key(name)
    with contextlib.ExitStack() as stack:
        if not stack.enter_context(vmlock.try_held(env.cfg.host.state_dir, name)):
            return Outcome(f, "skipped", "another reconcile is deactivating it")
        with env.ledger.transaction() as txn:
            holder = next((k for k, a in txn.allocations.items() if a.fm_partition == p), None)
            if holder is not None:
                return Outcome(f, "skipped", f"{holder} holds it now")
            txn.allocate(Allocation(key=key, owner="domain", job_id=None, domain=name,
                                    user=None, machine="", gpus=(), gpu_pcis=(),
                                    slurm_gpus=None, aligned=False, nvswitches=(),
                                    fm_partition=p, cpus=()))
        stack.callback(env.ledger.release, key)
        env.fabric.deactivate(p)
    return Outcome(f, "done")


__all__ = ["Report", "collect", "facts_of", "run"]
