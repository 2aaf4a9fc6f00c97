"""reconcile, the plan: what the node's state says, and what to do about it. Pure.

``dgxvm reconcile`` compares libvirt's domains, the ledger, the VM directories and records,
dgxvm's DHCP reservations, Fabric Manager's active partitions and Slurm's jobs on this node
(:class:`NodeFacts`, gathered by :mod:`.apply`), and :func:`plan` says, one
:class:`Finding` each, what belongs to no live job or admin VM and how it goes. Nothing here
touches the node: facts in, findings out, so every rule is tested with facts made by hand.

What is live, and never touched:

* a job's VM (owner ``job``) while Slurm has its job on this node in a state that is not final
  (CONFIGURING while the Prolog runs, RUNNING, COMPLETING while the Epilog runs, SUSPENDED
  ...). When Slurm cannot be asked, no job's VM is touched at all (one finding says so);
* an admin's VM (owner ``domain``) whose libvirt domain exists, whatever its state;
* any VM whose lock is held (:mod:`slurm_dgxvm.lifecycle.vmlock`): a create or a delete is in
  progress;
* a job VM made after Slurm was asked (its job may be one Slurm has only just started here).

What goes, each through the one idempotent way it is made undone:

* ``delete-vm``: the VM of a job Slurm no longer has on this node, or the pieces of an admin VM
  without a domain (a ``dgxvm create`` or ``delete`` killed midway), or a VM directory nothing
  else names: :func:`slurm_dgxvm.lifecycle.delete.delete`, which takes the domain, the FM
  partition, the DHCP reservation, the directory and the ledger entry;
* ``release-address``: a DHCP reservation dgxvm made for one VM (its MAC is :func:`mac_for` its
  name: a VM made before address slots) for a name that has nothing else on the node;
* ``give-back-address``: an address slot (:mod:`slurm_dgxvm.virt.addresses`) held by a name
  that has nothing else on the node;
* ``deactivate-fm-partition``: a Fabric Manager partition that is active while no ledger
  allocation holds it;
* ``remove-job-fabric``: a job fabric on this node (:mod:`slurm_dgxvm.jobnet`: the devices dgxvm
  tagged with a job id) whose job Slurm no longer has here and no VM here holds
  (:func:`slurm_dgxvm.jobnet.teardown`); a VM's own fabric goes with the VM's delete;
* ``sweep-image-cache``: the partial entries of a user's container image cache that pulls
  which died left, and no pull holds now (:mod:`.cache_partials`, as the user). A cache that
  refused or did not answer its user's read in time is skipped, naming it: a user's files are
  the user's, not the node's state, so they never make reconcile fail;
* ``rebuild-ledger``: a corrupt ledger, only when asked (:func:`rebuild`).

What is only reported (``left``, exit 5), never acted on:

* a running VM whose ledger allocation holds a Fabric Manager partition that Fabric Manager says
  is inactive (:func:`partitions_off_under_running_vms`): Fabric Manager was restarted without
  its resiliency mode (it comes back with every partition inactive) or someone deactivated it.
  The guest's GPUs have no NVLink until the VM is made again, but nothing is done here: the VM
  is live, and a partition is activated before its VM starts (Fabric Manager's order), never
  under a running guest.

Processes that ``dgxvm run`` started in a guest live and die with their VM: deleting the VM
ends them, and nothing of them is left on the host to compare.

Every line (:meth:`Outcome.line`) is shown with :func:`~slurm_dgxvm.names.shown`: a name from
a user's cache (a newline, a terminal escape in it) cannot forge or hide a line.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from ..design import mac_for
from ..errors import EXIT_HOST, EXIT_STATE, DgxvmError, LedgerConflict
from ..ledger import EMPTY_STATE, Allocation, LedgerState, LedgerTxn
from ..names import domain_name, is_warm, shown
from ..records import VmRecord
from .cache_partials import CachePartials

#: action -> the words a report line uses for it
ACTIONS = {"delete-vm": "delete the VM", "release-address": "release the reservation",
           "give-back-address": "give the address back",
           "deactivate-fm-partition": "deactivate the partition",
           "remove-job-fabric": "remove the job fabric",
           "rebuild-ledger": "rebuild the ledger",
           "sweep-image-cache": "remove them with the cache's own sweep", "none": "nothing"}
#: what became of a finding: repaired; would be (--dry-run); not now, and not a fault (in
#: progress, changed meanwhile, Slurm not asked); left for an admin; tried and failed
RESULTS = ("done", "would do", "skipped", "left", "failed")
IN_PROGRESS = "in progress: a dgxvm create or delete holds its lock"
#: the words of one finding's JSON form (docs/reference/json.md)
FINDING_KEYS = ("what", "subject", "name", "job_id", "why", "action", "result", "detail",
                "details")


# -- facts -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DomainFact:
    """A libvirt domain: whether it runs, and what its dgxvm metadata says (``owner`` None: it
    has none, so dgxvm did not make it)."""

    name: str
    active: bool
    owner: str | None = None
    job_id: int | None = None


@dataclass(frozen=True)
class VmFacts:
    """Everything on the node under one VM name."""

    name: str
    domain: DomainFact | None = None
    record: VmRecord | None = None
    record_error: str | None = None      # record.json does not parse: why
    entry: Allocation | None = None      # the ledger entry whose domain is this name
    has_dir: bool = False
    busy: bool = False                   # its lock is held: a create or delete in progress

    def owner(self, job_prefix: str) -> tuple[str | None, int | None]:
        """(owner, job id): from the record, else the ledger entry, else the domain's
        metadata, else a name of the job VMs' form (``job-42``); (None, None) otherwise."""
        for src in (self.record, self.entry):
            if src is not None:
                return (src.owner, src.job_id)
        if self.domain is not None and self.domain.owner is not None:
            return (self.domain.owner, self.domain.job_id)
        m = re.fullmatch(re.escape(job_prefix) + r"([0-9]{1,18})", self.name)
        if m:
            return ("job", int(m[1]))
        return (None, None)

    def created(self) -> float | None:
        """When its record or ledger entry was made (the later), if either says."""
        times = [t for t in (self.record.created if self.record else None,
                             self.entry.created if self.entry else None) if t]
        return max(times) if times else None

    def pieces(self) -> str:
        """What of it is on the node, in words."""
        out = []
        if self.domain is not None:
            out.append(f"domain ({'running' if self.domain.active else 'off'})")
        if self.record is not None:
            out.append(f"record ({self.record.state})")
        elif self.record_error is not None:
            out.append("corrupt record")
        elif self.has_dir:
            out.append("directory")
        if self.entry is not None:
            out.append(f"ledger entry {self.entry.key}")
        return ", ".join(out) or "nothing"

    def signature(self) -> tuple:
        """What a decision about it rests on: a re-read under its lock must find the same."""
        return (self.domain is not None, self.domain.active if self.domain else None,
                self.record.state if self.record else None, self.record_error,
                self.entry.key if self.entry else None, self.has_dir)

    def is_empty(self) -> bool:
        return self.signature() == (False, None, None, None, None, False)


@dataclass(frozen=True)
class JobsOnNode:
    """What Slurm said about this node's jobs (:mod:`slurm_dgxvm.slurm.liveness` asks it).

    ``live`` is None when Slurm could not be asked (``error`` says why): then no job's VM is
    touched. ``states`` has every job Slurm listed, ``asked_at`` when (epoch seconds)."""

    node: str
    live: frozenset[int] | None
    states: Mapping[int, str] = field(default_factory=dict)
    error: str | None = None
    asked_at: float = 0.0


@dataclass(frozen=True)
class NodeFacts:
    """The node as :mod:`.apply` read it."""

    jobs: JobsOnNode
    vms: Mapping[str, VmFacts]
    ledger: LedgerState | None = EMPTY_STATE     # None when corrupt (``ledger_error`` says why)
    ledger_error: str | None = None
    job_prefix: str = "job-"
    network: str = "dgxvm"
    reservations: Mapping[str, tuple[str, str]] | None = None   # mac -> (ip, name); None: none
    held: Mapping[str, str] = field(default_factory=dict)       # address slot -> its VM's name
    fm_active: frozenset[int] | None = None      # None: this machine uses no Fabric Manager
    fm_error: str | None = None                  # Fabric Manager could not be asked: why
    # Fabric Manager's active partitions asked again after libvirt's domains were read, only
    # when a running VM's partition was inactive in ``fm_active`` (a create that activated it
    # meanwhile is not taken for a lost partition); None: not asked again
    fm_active_late: frozenset[int] | None = None
    busy: frozenset[str] = frozenset()           # every name whose lock is held
    partials: tuple[CachePartials, ...] = ()     # users' image caches' dead pulls' leftovers
    # the job fabrics on this node (jobnet.present: VNI -> the job id its devices are tagged
    # with); None: not read (``jobnet_error`` says why when it failed)
    job_fabrics: Mapping[int, int | None] | None = None
    jobnet_error: str | None = None

    def with_ledger(self, state: LedgerState) -> NodeFacts:
        """These facts with ``state`` as the ledger (what a rebuild would write)."""
        by_name = {a.domain: a for a in state.allocations.values()}
        vms = {n: replace(v, entry=by_name.get(n)) for n, v in self.vms.items()}
        for n, a in by_name.items():
            vms.setdefault(n, VmFacts(name=n, entry=a, busy=n in self.busy))
        return replace(self, vms=vms, ledger=state, ledger_error=None)


# -- findings --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Finding:
    """One thing that is not as it should be: ``what`` (vm, dhcp, address, fm, ledger, record,
    slurm), its ``subject`` (the VM name, the address, the partition ...), ``why`` in words, the
    ``action`` that repairs it (:data:`ACTIONS`). ``name`` is the VM name whose lock guards the
    action. ``hold`` is the plan's own reason not to act now (the result is then ``skipped``),
    ``left`` why it is an admin's to decide (``left``)."""

    what: str
    subject: str
    why: str
    action: str = "none"
    name: str | None = None
    job_id: int | None = None
    mac: str | None = None
    partition: int | None = None
    vni: int | None = None
    hold: str | None = None
    left: str | None = None
    details: tuple[str, ...] = ()


@dataclass(frozen=True)
class Outcome:
    """A finding and what became of it (:data:`RESULTS`), with what the action said."""

    finding: Finding
    result: str
    detail: str | None = None

    def line(self) -> str:
        """``WHAT SUBJECT: WHY -> ACTION: RESULT[: DETAIL]``, every character that is not
        printable escaped (:func:`~slurm_dgxvm.names.shown`)."""
        f = self.finding
        text = f"{f.what} {f.subject}: {f.why} -> {ACTIONS[f.action]}: {self.result}"
        return shown(text + (f": {self.detail}" if self.detail else ""))

    def to_json(self) -> dict:
        f = self.finding
        return {"what": f.what, "subject": f.subject, "name": f.name, "job_id": f.job_id,
                "why": f.why, "action": f.action, "result": self.result, "detail": self.detail,
                "details": list(f.details)}


def planned(f: Finding, *, dry_run: bool) -> Outcome | None:
    """The outcome the plan already knows (held, left, nothing to do), else None: act."""
    if f.left is not None:
        return Outcome(f, "left", f.left)
    if f.hold is not None:
        return Outcome(f, "skipped", f.hold)
    if f.action == "none":
        return Outcome(f, "left", None)
    if dry_run:
        return Outcome(f, "would do")
    return None


def exit_code(outcomes: list[Outcome]) -> int:
    """0 when the node is consistent or was repaired (a create or delete in progress is not a
    fault); EXIT_STATE (5) when something was left for an admin, an action failed or the
    ledger is still corrupt (a rebuild waiting for a create in progress); else EXIT_HOST (3)
    when Slurm or Fabric Manager could not be asked, so part of the node was not checked."""
    if any(o.result in ("left", "failed")
           or (o.finding.what == "ledger" and o.result not in ("done", "would do"))
           for o in outcomes):
        return EXIT_STATE
    if any(o.finding.what in ("slurm", "fm") and o.finding.action == "none" for o in outcomes):
        return EXIT_HOST
    return 0


# -- the plan --------------------------------------------------------------------------------------
def plan(facts: NodeFacts) -> list[Finding]:
    """What is wrong on the node and what to do, in the order to do it: Slurm's answer, then
    each VM name, then the reservations and partitions no VM holds. A corrupt ledger is the one
    finding then (nothing else can be judged without it; see :func:`rebuild`)."""
    if facts.ledger_error is not None or facts.ledger is None:
        return [Finding("ledger", "ledger.json", why=f"corrupt: {facts.ledger_error}",
                        action="rebuild-ledger",
                        left="nothing was changed; after inspecting it, `dgxvm reconcile "
                             "--rebuild-ledger` rebuilds it from libvirt's domains and the VM "
                             "records and keeps this file aside")]
    out: list[Finding] = []
    jobs = facts.jobs
    if jobs.live is None:
        job_vms = sorted(n for n, v in facts.vms.items()
                         if v.owner(facts.job_prefix)[0] == "job")
        out.append(Finding("slurm", jobs.node,
                           why=f"Slurm could not be asked which jobs run on {jobs.node} "
                               f"({jobs.error})",
                           hold="no job's VM is touched"
                                + (f" ({', '.join(job_vms)})" if job_vms else "")))
    for name in sorted(facts.vms):
        f = _plan_vm(facts.vms[name], jobs, facts.job_prefix)
        if f is not None:
            out.append(f)
    going = frozenset(f.name for f in out if f.action == "delete-vm" and f.name is not None)
    out.extend(_plan_reservations(facts))
    out.extend(_plan_held(facts))
    out.extend(_plan_fabric(facts, going))
    out.extend(_plan_job_fabrics(facts))
    out.extend(_plan_partials(facts))
    return out


def _plan_vm(v: VmFacts, jobs: JobsOnNode, job_prefix: str) -> Finding | None:
    if v.record_error is not None:
        return Finding("record", v.name, why=f"its record is corrupt ({v.record_error})",
                       name=v.name,
                       left="left for an admin to inspect; once it is moved aside, `dgxvm "
                            "delete --domain NAME` removes the VM")
    owner, job = v.owner(job_prefix)
    if v.domain is not None and v.domain.owner is None and v.record is None and v.entry is None:
        return Finding("vm", v.name, why="a libvirt domain dgxvm did not make has a dgxvm VM "
                                         "directory of its name", name=v.name,
                       left="left for an admin (dgxvm touches no domain it did not make)")
    hold = IN_PROGRESS if v.busy else None
    if owner == "job" and job is not None:
        if jobs.live is None or job in jobs.live:
            return None                   # Slurm not asked (said once), or the job is live
        made = v.created()
        if hold is None and made is not None and made >= jobs.asked_at:
            hold = "made after Slurm was asked which jobs run here; run reconcile again"
        state = jobs.states.get(job)
        where = f"job {job} is {state} on {jobs.node}" if state else \
            f"Slurm has no job {job} on {jobs.node}"
        return Finding("vm", v.name, why=f"{where}, yet its VM is here: {v.pieces()}",
                       action="delete-vm", name=v.name, job_id=job, hold=hold)
    if v.domain is not None:              # an admin's VM with a domain: never touched
        rec = v.record
        if is_warm(v.name) and rec is not None and rec.state in ("creating", "deleting") \
                and not v.busy:           # dgxvm's own, no tenant's: a killed boot's is removed
            verb = "boot" if rec.state == "creating" else "delete"
            return Finding("vm", v.name, why=f"warm VM left '{rec.state}' by a {verb} that did "
                                             f"not finish: {v.pieces()}",
                           action="delete-vm", name=v.name, hold=hold)
        if rec is not None and rec.state in ("creating", "deleting") and not v.busy:
            verb = "create" if rec.state == "creating" else "delete"
            return Finding("vm", v.name, why=f"admin VM left '{rec.state}' by a dgxvm {verb} "
                                             f"that did not finish: {v.pieces()}",
                           name=v.name,
                           left=f"an admin VM with a libvirt domain is never touched; `dgxvm "
                                f"delete --domain {v.name}` removes it")
        return None
    if owner == "domain":
        why = f"admin VM without a libvirt domain (a dgxvm create or delete was killed): " \
              f"{v.pieces()}"
    else:
        why = f"nothing says whose VM this was: {v.pieces()}"
    return Finding("vm", v.name, why=why, action="delete-vm", name=v.name, hold=hold)


def _plan_reservations(facts: NodeFacts) -> list[Finding]:
    """dgxvm's reservations (MAC = mac_for(name)) of names that have nothing else here."""
    if facts.reservations is None:
        return []
    known = {mac_for(n) for n in facts.vms}
    out = []
    for mac, (ip, name) in sorted(facts.reservations.items()):
        if not _is_name(name) or mac_for(name) != mac:
            continue                      # not one dgxvm made: not ours to judge
        if mac in known or name in facts.vms:
            continue                      # goes (or stays) with its VM
        out.append(Finding("dhcp", f"{ip} ({mac})",
                           why=f"reservation for {name} on network {facts.network}, and no "
                               f"domain, record, directory or ledger entry of {name} is here",
                           action="release-address", name=name, mac=mac,
                           hold=IN_PROGRESS if name in facts.busy else None))
    return out


def _plan_held(facts: NodeFacts) -> list[Finding]:
    """Address slots held by names that have nothing else here (a VM directory removed by
    hand); a VM's own slot goes with its delete."""
    out = []
    for ip, name in sorted(facts.held.items()):
        if name in facts.vms:
            continue
        out.append(Finding("address", ip,
                           why=f"held for {shown(name)} on network {facts.network}, and no "
                               f"domain, record, directory or ledger entry of it is here",
                           action="give-back-address", name=name,
                           hold=IN_PROGRESS if name in facts.busy else None))
    return out


#: what is done about a running VM whose partition Fabric Manager has not active
#: (docs/admin/operations.md, "dgxvm reconcile")
FM_LOST_LEFT = ("report only: a live VM is never touched, and a partition is activated before its "
                "VM starts, never under a running guest; recreate the VM (a job's: requeue or end "
                "the job; an admin's: `virsh shutdown` and `virsh start` it, or `dgxvm delete` "
                "and `dgxvm create`)")


def _plan_fabric(facts: NodeFacts, going: frozenset[str] = frozenset()) -> list[Finding]:
    if facts.fm_error is not None:
        return [Finding("fm", "Fabric Manager", why=f"could not be asked ({facts.fm_error})",
                        hold="active partitions not checked")]
    if facts.fm_active is None or facts.ledger is None:
        return []
    held = {a.fm_partition for a in facts.ledger.allocations.values()
            if a.fm_partition is not None}
    out = [Finding("fm", f"partition {p}",
                   why="active in Fabric Manager, and no ledger allocation holds it",
                   action="deactivate-fm-partition", partition=p)
           for p in sorted(facts.fm_active - held)]
    for p, v in partitions_off_under_running_vms(facts, skip=going):
        out.append(Finding("fm", f"partition {p}",
                           why=f"held by VM {v.name} but not active in Fabric Manager: Fabric "
                               f"Manager restarted or someone deactivated it; its GPUs have no "
                               f"NVLink until the VM is recreated",
                           name=v.name, job_id=v.owner(facts.job_prefix)[1], partition=p,
                           left=FM_LOST_LEFT))
    return out


def partitions_off_under_running_vms(facts: NodeFacts, *,
                                     skip: frozenset[str] | set[str] = frozenset()
                                     ) -> list[tuple[int, VmFacts]]:
    """(partition, VM) of each running VM (its libvirt domain active) whose ledger allocation
    holds a Fabric Manager partition that Fabric Manager did not list as active, in the first
    read nor (when made) the one after libvirt's domains. A VM whose lock is held (a create
    before its ``fm`` stage, a delete after it) and the names in ``skip`` (deleted by this
    plan anyway) are not judged."""
    if facts.fm_active is None:
        return []
    late = facts.fm_active_late if facts.fm_active_late is not None else facts.fm_active
    out = []
    for name in sorted(facts.vms):
        v = facts.vms[name]
        if v.busy or name in skip or v.domain is None or not v.domain.active:
            continue
        p = v.entry.fm_partition if v.entry is not None else None
        if p is None or p in facts.fm_active or p in late:
            continue
        out.append((p, v))
    return out


def _plan_job_fabrics(facts: NodeFacts) -> list[Finding]:
    """Job fabrics whose job has neither a live Slurm job nor a VM here (a VM's fabric goes
    with its delete). Untagged devices of dgxvm's names are not ours to judge: reported. While
    Slurm cannot be asked, or the job's VM name is locked (its Prolog making it), held."""
    if facts.jobnet_error is not None:
        return [Finding("jobnet", "job fabrics", why=f"could not be listed ({facts.jobnet_error})",
                        hold="job fabrics not checked")]
    out: list[Finding] = []
    vm_jobs = {v.owner(facts.job_prefix)[1] for v in facts.vms.values()}
    for vni, job in sorted((facts.job_fabrics or {}).items()):
        subject = f"VNI {vni}"
        if job is None:
            out.append(Finding("jobnet", subject, why="its devices carry no job's tag", vni=vni,
                               left="not made by dgxvm, or its tag was changed: an admin's to "
                                    "judge (`ip -d link show`)"))
            continue
        if job in vm_jobs:
            continue                                   # goes (or stays) with the job's VM
        if facts.jobs.live is not None and job in facts.jobs.live:
            continue
        name = f"{facts.job_prefix}{job}"
        hold = None
        if facts.jobs.live is None:
            hold = "Slurm could not be asked whether its job runs here"
        elif name in facts.busy:
            hold = IN_PROGRESS
        out.append(Finding("jobnet", subject,
                           why=f"job fabric of job {job}, which Slurm no longer has on "
                               f"{facts.jobs.node} and no VM here holds",
                           action="remove-job-fabric", name=name, job_id=job, vni=vni,
                           hold=hold))
    return out


#: why a user's cache that could not be read as its user is left
#: (docs/admin/operations.md, "dgxvm reconcile")
CACHE_UNREAD_HOLD = ("nothing in it was touched: a user's files are theirs, not the node's "
                     "state; the next run tries again")


def _plan_partials(facts: NodeFacts) -> list[Finding]:
    out = []
    for c in facts.partials:
        if c.refused is not None:
            out.append(Finding("image-cache", c.path,
                               why=f"could not be read as uid {c.uid}: {c.refused}",
                               hold=CACHE_UNREAD_HOLD))
            continue
        n = len(c.names)
        out.append(Finding("image-cache", c.path,
                           why=f"{n} partial entr{'y' if n == 1 else 'ies'} in tmp/ of pulls "
                               f"that died (no pull holds {'its' if n == 1 else 'their'} lock)",
                           action="sweep-image-cache", details=c.names))
    return out


def _is_name(name: str | None) -> bool:
    try:
        domain_name(name or "")
        return True
    except DgxvmError:
        return False


# -- a corrupt ledger ------------------------------------------------------------------------------
def rebuild(facts: NodeFacts) -> tuple[LedgerState | None, Finding]:
    """The ledger to write in place of a corrupt one, and the finding that says what is in it.

    From the VM records: a VM whose libvirt domain exists holds its record's allocation (unless
    it was stopped outside dgxvm: its record says ``stopped`` and it held nothing), and so does
    a job's VM without a domain while its job is live here or Slurm could not be asked (its
    Epilog still has it to release). The rest (an admin VM without a domain, a job Slurm no
    longer has here) held nothing worth keeping: reconcile removes them next. Running domains
    go first, so a resource two records claim stays with the VM that runs.

    The state is None, with the finding saying why, while a create or delete is in progress
    (its allocation may be in no record yet) or when two records claim one resource.
    """
    why = f"corrupt: {facts.ledger_error}"
    if facts.busy:
        return None, Finding("ledger", "ledger.json", why=why, action="rebuild-ledger",
                             hold=f"a create or delete is in progress "
                                  f"({', '.join(sorted(facts.busy))}); run it again when it "
                                  f"has ended")
    txn = LedgerTxn(EMPTY_STATE)
    details, conflicts = [], []
    order = sorted(facts.vms.values(),
                   key=lambda v: (not (v.domain is not None and v.domain.active), v.name))
    for v in order:
        rec = v.record
        if rec is None:
            continue
        keep, because = _holds(v, facts.jobs)
        gpus = ",".join(map(str, rec.allocation.gpus)) or "none"
        if not keep:
            details.append(f"not kept: {rec.ledger_key} ({v.name}): {because}")
            continue
        try:
            txn.allocate(rec.allocation)
        except LedgerConflict as exc:
            conflicts.append(f"not kept: {rec.ledger_key} ({v.name}): {exc.reason}")
            continue
        details.append(f"kept: {rec.ledger_key} ({v.name}, GPUs {gpus}): {because}")
    unknown = sorted(v.name for v in facts.vms.values() if v.record_error is not None)
    details.extend(f"not kept: {n}: its record is corrupt too" for n in unknown)
    if conflicts:
        return None, Finding("ledger", "ledger.json", why=why, action="rebuild-ledger",
                             details=tuple(details + conflicts),
                             left="two VM records claim one resource; nothing was written")
    state = LedgerState(generation=1, allocations=dict(txn.allocations))
    return state, Finding("ledger", "ledger.json", why=why, action="rebuild-ledger",
                          details=tuple(details))


def _holds(v: VmFacts, jobs: JobsOnNode) -> tuple[bool, str]:
    rec = v.record
    assert rec is not None
    if rec.state == "stopped":
        return False, "stopped outside dgxvm, it held nothing"
    if v.domain is not None:
        return True, f"its domain exists ({'running' if v.domain.active else 'off'})"
    if rec.owner == "job" and rec.job_id is not None:
        if jobs.live is None:
            return True, "no domain, but Slurm could not be asked: kept held"
        if rec.job_id in jobs.live:
            return True, f"no domain, but job {rec.job_id} is live here: its Epilog releases it"
        return False, f"no domain and no job {rec.job_id} here: removed next"
    return False, "an admin VM without a domain: removed next"


__all__ = ["ACTIONS", "CACHE_UNREAD_HOLD", "DomainFact", "FM_LOST_LEFT", "Finding", "JobsOnNode",
           "NodeFacts", "Outcome", "RESULTS", "VmFacts", "exit_code",
           "partitions_off_under_running_vms", "plan", "planned", "rebuild"]
