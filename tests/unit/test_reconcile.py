"""dgxvm reconcile's plan (reconcile/plan.py): the node's facts in, findings out. Pure, so
every rule an admin relies on is a table of facts made by hand: what is live is never in the
plan, what belongs to nothing live is, and why."""

from __future__ import annotations

import pytest

from slurm_dgxvm.design import mac_for
from slurm_dgxvm.ledger import EMPTY_STATE, Allocation, LedgerState, domain_key, job_key
from slurm_dgxvm.reconcile.plan import (IN_PROGRESS, DomainFact, Finding, JobsOnNode, NodeFacts, Outcome,
                                             VmFacts, exit_code, plan, planned, rebuild)
from slurm_dgxvm.placement import EMPTY, Policy, Request, place
from slurm_dgxvm.records import VmRecord
from slurm_dgxvm.slurm.liveness import is_live

NODE = "dgx01"
ASKED = 2000.0          # when Slurm answered; every VM below was made before (1000.0)


def jobs(states: dict[int, str] | None = None) -> JobsOnNode:
    states = states or {}
    return JobsOnNode(node=NODE, live=frozenset(j for j, s in states.items() if is_live(s)),
                      states=states, asked_at=ASKED)


SLURM_DOWN = JobsOnNode(node=NODE, live=None, error="slurm: `squeue`: exit 1: timed out",
                        asked_at=ASKED)


def vm(host, name, *, job=None, domain=None, record="running", entry=True, has_dir=True,
       busy=False, gpu_index=0, created=1000.0) -> VmFacts:
    """A VM's facts: a job's (``job``) or an admin's; ``domain`` None (none), "running" or
    "off"; ``record`` its state or None."""
    owner = "job" if job is not None else "domain"
    p = place(host, EMPTY, Request(count=4, gpu_index=gpu_index), Policy())
    key = job_key(job) if job is not None else domain_key(name)
    a = Allocation.from_placement(key, p, owner=owner, job_id=job, domain=name, user="u",
                                  now=created)
    rec = None
    if record is not None:
        rec = VmRecord(name=name, uuid="u", state=record, owner=owner, ledger_key=key,
                       job_id=job, user="u", uid=1000, gid=1000, workdir=None, image="img",
                       image_version="1", address="10.213.0.2", mac=mac_for(name),
                       network="dgxvm", allocation=a, placement=p, created=created)
    dom = None
    if domain is not None:
        dom = DomainFact(name=name, active=domain == "running", owner=owner, job_id=job)
    return VmFacts(name=name, domain=dom, record=rec, entry=a if entry else None,
                   has_dir=has_dir or rec is not None, busy=busy)


def facts(*vms: VmFacts, slurm: JobsOnNode | None = None, **kw) -> NodeFacts:
    ledger = LedgerState(allocations={v.entry.key: v.entry for v in vms if v.entry})
    kw.setdefault("ledger", ledger)
    return NodeFacts(jobs=slurm or jobs(), vms={v.name: v for v in vms},
                     busy=frozenset(v.name for v in vms if v.busy) | kw.pop("busy", frozenset()),
                     **kw)


def names(findings: list[Finding]) -> list[str | None]:
    return [f.name for f in findings]


# -- what is live ----------------------------------------------------------------------------------
@pytest.mark.parametrize("state", ["RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED",
                                   "STOPPED", "SIGNALING", "SOME_STATE_SLURM_ADDS_LATER"])
@pytest.mark.parametrize("shape", [
    dict(domain="running"),                          # a job at work
    dict(domain="off"),                              # its guest powered off
    dict(domain=None),                               # a Prolog before its define, or a crash
    dict(domain=None, record=None),                  # a Prolog before it wrote the record
    dict(domain=None, record=None, has_dir=False),   # a Prolog just after its ledger write
])
def test_a_live_jobs_vm_is_never_in_the_plan(host, state, shape):
    assert plan(facts(vm(host, "job-42", job=42, **shape), slurm=jobs({42: state}))) == []


@pytest.mark.parametrize("state, said", [
    (None, "Slurm has no job 42 on dgx01"),
    ("COMPLETED", "job 42 is COMPLETED on dgx01"),
    ("CANCELLED", "job 42 is CANCELLED on dgx01"),
    ("NODE_FAIL", "job 42 is NODE_FAIL on dgx01"),
])
def test_the_vm_of_a_job_slurm_no_longer_has_here_is_deleted_as_that_jobs(host, state, said):
    slurm = jobs({7: "RUNNING", **({42: state} if state else {})})
    live = vm(host, "job-7", job=7, domain="running", gpu_index=4)
    [f] = plan(facts(vm(host, "job-42", job=42, domain="running"), live, slurm=slurm))
    assert (f.what, f.name, f.action, f.job_id, f.hold) == ("vm", "job-42", "delete-vm", 42, None)
    assert f.why.startswith(said) and "domain (running)" in f.why and "ledger entry job:42" in f.why


def test_when_slurm_cannot_be_asked_no_job_vm_is_touched_and_it_says_so(host):
    stale_admin = vm(host, "vm1", domain=None, gpu_index=8)
    f = facts(vm(host, "job-42", job=42, domain="running"),
              vm(host, "job-43", job=43, domain=None, record=None, gpu_index=4),
              stale_admin, slurm=SLURM_DOWN)
    findings = plan(f)
    assert names(findings) == [None, "vm1"]          # the admin's leftovers still go
    slurm = findings[0]
    assert slurm.what == "slurm" and "timed out" in slurm.why
    assert slurm.hold == "no job's VM is touched (job-42, job-43)"
    outcomes = [planned(x, dry_run=True) for x in findings]
    assert [o.result for o in outcomes] == ["skipped", "would do"]
    assert exit_code(outcomes) == 3                  # part of the node was not checked


def test_a_job_vm_made_after_slurm_answered_is_left_for_the_next_run(host):
    """Slurm may have started the job here after it listed the node's jobs."""
    [f] = plan(facts(vm(host, "job-42", job=42, domain=None, created=ASKED + 1)))
    assert f.action == "delete-vm" and f.hold.startswith("made after Slurm was asked")


def test_a_vm_whose_lock_is_held_is_in_progress(host):
    [f] = plan(facts(vm(host, "job-42", job=42, domain=None, busy=True)))
    assert f.hold == "in progress: a dgxvm create or delete holds its lock"
    assert planned(f, dry_run=False).result == "skipped"


# -- admins' VMs -----------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [
    dict(domain="running"), dict(domain="off"), dict(domain="off", entry=False),
    dict(domain="running", record=None), dict(domain="running", record=None, entry=False,
                                              has_dir=False),
    dict(domain="running", record="creating", busy=True),
])
def test_an_admin_vm_with_a_domain_is_never_touched(host, shape):
    assert plan(facts(vm(host, "vm1", **shape))) == []


@pytest.mark.parametrize("state, verb", [("creating", "create"), ("deleting", "delete")])
def test_an_admin_vm_a_killed_command_left_with_a_domain_is_left_for_the_admin(host, state, verb):
    [f] = plan(facts(vm(host, "vm1", domain="off", record=state)))
    assert f.action == "none" and f"left '{state}' by a dgxvm {verb}" in f.why
    assert "dgxvm delete --domain vm1" in f.left
    assert exit_code([planned(f, dry_run=False)]) == 5


@pytest.mark.parametrize("shape, pieces", [
    (dict(record="creating"), "record (creating), ledger entry domain:vm1"),
    (dict(record=None), "directory, ledger entry domain:vm1"),
    (dict(record=None, has_dir=False), "ledger entry domain:vm1"),
    (dict(record="deleting", entry=False), "record (deleting)"),
])
def test_the_pieces_of_an_admin_vm_without_a_domain_are_removed(host, shape, pieces):
    """A dgxvm create or delete killed midway (its lock died with it)."""
    [f] = plan(facts(vm(host, "vm1", domain=None, **shape)))
    assert (f.action, f.name, f.job_id, f.hold) == ("delete-vm", "vm1", None, None)
    assert f.why == f"admin VM without a libvirt domain (a dgxvm create or delete was killed): " \
                    f"{pieces}"


def test_a_lone_directory_of_a_job_name_is_judged_as_that_jobs(host):
    lone = VmFacts(name="job-42", has_dir=True)
    assert plan(facts(lone, slurm=jobs({42: "RUNNING"}))) == []
    [f] = plan(facts(lone))
    assert f.job_id == 42 and f.action == "delete-vm"
    [f] = plan(facts(VmFacts(name="scratch", has_dir=True)))
    assert f.why == "nothing says whose VM this was: directory" and f.action == "delete-vm"


def test_a_corrupt_record_is_left_for_an_admin(host):
    bad = VmFacts(name="job-42", record_error="invalid JSON", has_dir=True)
    [f] = plan(facts(bad))
    assert f.what == "record" and f.action == "none" and "invalid JSON" in f.why
    assert planned(f, dry_run=False).result == "left"


def test_a_domain_dgxvm_did_not_make_is_never_touched(host):
    theirs = VmFacts(name="win10", domain=DomainFact(name="win10", active=True), has_dir=True)
    [f] = plan(facts(theirs))
    assert f.action == "none" and f.left.startswith("left for an admin")


# -- what has no VM name ---------------------------------------------------------------------------
def test_a_reservation_of_a_name_with_nothing_else_here_is_released(host):
    kept = vm(host, "job-7", job=7, domain="running")
    res = {mac_for("job-7"): ("10.213.0.2", "job-7"),
           mac_for("job-9"): ("10.213.0.3", "job-9"),
           "52:54:00:11:22:33": ("10.213.0.4", "hand-made"),      # not dgxvm's MAC for it
           mac_for("gone"): ("10.213.0.5", "gone")}
    findings = plan(facts(kept, slurm=jobs({7: "RUNNING"}), reservations=res))
    assert [(f.what, f.name, f.mac) for f in findings] == [
        ("dhcp", "gone", mac_for("gone")), ("dhcp", "job-9", mac_for("job-9"))]
    assert findings[0].action == "release-address" and findings[0].subject.startswith("10.213.0.5")


def test_a_reservation_whose_name_is_locked_is_in_progress(host):
    f = NodeFacts(jobs=jobs(), vms={}, reservations={mac_for("vm1"): ("10.213.0.2", "vm1")},
                  busy=frozenset({"vm1"}))
    [r] = plan(f)
    assert r.hold.startswith("in progress")


def test_an_address_held_by_a_name_with_nothing_else_here_is_given_back(host):
    """A VM's address slot goes with its delete; one whose VM has nothing else left (its
    directory removed by hand) is given back, and one of a create in progress waits."""
    kept = vm(host, "job-7", job=7, domain="running")
    held = {"10.213.0.2": "job-7", "10.213.0.3": "job-9", "10.213.0.4": "vm1"}
    findings = plan(facts(kept, slurm=jobs({7: "RUNNING"}), held=held,
                          busy=frozenset({"vm1"})))
    assert [(f.what, f.subject, f.name, f.action, f.hold) for f in findings] == [
        ("address", "10.213.0.3", "job-9", "give-back-address", None),
        ("address", "10.213.0.4", "vm1", "give-back-address", IN_PROGRESS)]
    assert "held for job-9 on network" in findings[0].why


@pytest.mark.parametrize("machine", ["dgx-a100", "dgx-h100"])
def test_an_active_partition_no_allocation_holds_is_deactivated(host, machine):
    holder = vm(host, "job-7", job=7, domain="running")
    fm = holder.entry.fm_partition
    assert fm is not None
    findings = plan(facts(holder, slurm=jobs({7: "RUNNING"}), fm_active=frozenset({fm, 99})))
    assert [(f.what, f.partition, f.action) for f in findings] == [
        ("fm", 99, "deactivate-fm-partition")]


@pytest.mark.parametrize("machine", ["dgx-a100"])
def test_fabric_manager_that_cannot_be_asked_is_said_and_not_acted_on(host, machine):
    [f] = plan(facts(fm_error="fmpm: timed out"))
    assert f.what == "fm" and f.action == "none" and "timed out" in f.why
    assert exit_code([planned(f, dry_run=False)]) == 3


LOST = ("held by VM {} but not active in Fabric Manager: Fabric Manager restarted or someone "
        "deactivated it; its GPUs have no NVLink until the VM is recreated")


@pytest.mark.parametrize("machine", ["dgx-a100", "dgx-h100"])
@pytest.mark.parametrize("who", ["job", "admin"])
def test_a_running_vm_whose_partition_fabric_manager_lost_is_reported_never_acted_on(host, machine,
                                                                                     who):
    """Fabric Manager restarted without its resiliency mode: every partition is inactive while
    the VMs run on. Said, with the VM and what it means; nothing is done (a live VM, and a
    partition is activated before its VM starts, never under it): exit 5, left for an admin."""
    if who == "job":
        v, slurm = vm(host, "job-7", job=7, domain="running"), jobs({7: "RUNNING"})
    else:
        v, slurm = vm(host, "vm1", domain="running"), jobs()
    p = v.entry.fm_partition
    for late in (None, frozenset()):             # asked once, or again after the domains
        [f] = plan(facts(v, slurm=slurm, fm_active=frozenset(), fm_active_late=late))
        assert (f.what, f.subject, f.partition, f.name) == ("fm", f"partition {p}", p, v.name)
        assert f.job_id == (7 if who == "job" else None)
        assert f.why == LOST.format(v.name) and f.action == "none"
        assert f.left.startswith("report only: a live VM is never touched")
        for dry_run in (True, False):
            out = planned(f, dry_run=dry_run)
            assert out.result == "left" and exit_code([out]) == 5
            assert out.line() == (f"fm partition {p}: {LOST.format(v.name)} -> nothing: left: "
                                  f"{f.left}")
            assert out.to_json()["what"] == "fm" and out.to_json()["result"] == "left"


@pytest.mark.parametrize("machine", ["dgx-a100"])
@pytest.mark.parametrize("case", ["active", "activated-meanwhile", "busy", "domain-off",
                                  "no-domain-yet", "job-gone", "no-fabric-manager"])
def test_a_partition_is_not_taken_for_lost_while_its_vm_has_it_or_is_not_running(host, machine,
                                                                                  case):
    """Its partition active (in the first read, or only in the read after the domains: a create
    activated it and started its VM between the two), a create or delete in progress (its lock),
    a guest that is off or not defined yet, a VM this plan deletes anyway (its teardown
    deactivates the partition, idempotently), a machine without Fabric Manager."""
    v = vm(host, "job-7", job=7, domain="running", busy=case == "busy")
    if case == "domain-off":
        v = vm(host, "job-7", job=7, domain="off")
    if case == "no-domain-yet":
        v = vm(host, "job-7", job=7, domain=None, record="creating")
    p = v.entry.fm_partition
    fm = dict(fm_active=frozenset({p}) if case == "active" else frozenset())
    if case == "activated-meanwhile":
        fm["fm_active_late"] = frozenset({p})
    if case == "no-fabric-manager":
        fm = dict(fm_active=None)
    slurm = jobs() if case == "job-gone" else jobs({7: "RUNNING"})
    findings = plan(facts(v, slurm=slurm, **fm))
    assert not [f for f in findings if f.what == "fm"]
    if case == "job-gone":
        assert [(f.what, f.action) for f in findings] == [("vm", "delete-vm")]


@pytest.mark.parametrize("machine", ["dgx-h100"])
def test_a_lost_partition_and_one_nobody_holds_are_two_findings(host, machine):
    lost = vm(host, "vm1", domain="running", gpu_index=0)
    f = plan(facts(lost, fm_active=frozenset({99})))
    assert [(x.partition, x.action, x.left is not None) for x in f] == [
        (99, "deactivate-fm-partition", False), (lost.entry.fm_partition, "none", True)]
    assert exit_code([planned(x, dry_run=True) for x in f]) == 5


# -- the ledger ------------------------------------------------------------------------------------
def test_a_corrupt_ledger_is_the_one_finding_and_nothing_is_acted_on(host):
    f = facts(vm(host, "job-42", job=42, domain=None), ledger=None,
              ledger_error="checksum mismatch")
    [only] = plan(f)
    assert only.what == "ledger" and "checksum mismatch" in only.why
    assert "--rebuild-ledger" in only.left
    assert exit_code([planned(only, dry_run=True)]) == 5


def test_rebuild_keeps_what_the_records_say_is_held_and_says_why(host):
    vms = (vm(host, "vm1", domain="running", gpu_index=0),            # kept
           vm(host, "vm2", domain="off", record="stopped", gpu_index=4),  # virsh shutdown
           vm(host, "job-7", job=7, domain=None, gpu_index=8),        # live: its Epilog
           vm(host, "job-8", job=8, domain=None, gpu_index=12),       # stale: removed next
           vm(host, "vm3", domain=None, record="creating", gpu_index=12))  # a killed create
    state, f = rebuild(facts(*vms, slurm=jobs({7: "RUNNING"}), ledger=None,
                             ledger_error="empty file"))
    assert sorted(state.allocations) == ["domain:vm1", "job:7"]
    assert state.allocations["domain:vm1"] == vms[0].record.allocation
    assert f.action == "rebuild-ledger" and f.hold is None and f.left is None
    lines = "\n".join(f.details)
    assert "kept: domain:vm1 (vm1, GPUs 0,1,2,3): its domain exists (running)" in lines
    assert "kept: job:7 (job-7, GPUs 8,9,10,11): no domain, but job 7 is live here" in lines
    assert "not kept: domain:vm2 (vm2): stopped outside dgxvm" in lines
    assert "not kept: job:8 (job-8): no domain and no job 8 here" in lines
    assert "not kept: domain:vm3 (vm3): an admin VM without a domain" in lines
    # planned against what would be written: the stale ones go next, the kept ones stay
    after = facts(*vms, slurm=jobs({7: "RUNNING"})).with_ledger(state)
    assert names(plan(after)) == ["job-8", "vm3"]


def test_rebuild_keeps_every_job_vm_when_slurm_cannot_be_asked(host):
    state, _ = rebuild(facts(vm(host, "job-8", job=8, domain=None), slurm=SLURM_DOWN,
                             ledger=None, ledger_error="x"))
    assert list(state.allocations) == ["job:8"]


def test_rebuild_waits_while_a_create_or_delete_is_in_progress(host):
    state, f = rebuild(facts(vm(host, "vm1", domain="running"), VmFacts(name="vm2", busy=True),
                             ledger=None, ledger_error="x"))
    assert state is None and "in progress (vm2)" in f.hold


def test_rebuild_writes_nothing_when_two_records_claim_one_gpu(host):
    """The running VM is tried first; the other claim makes it an admin's to sort out."""
    state, f = rebuild(facts(vm(host, "vm1", domain="running"), vm(host, "vm2", domain="off"),
                             ledger=None, ledger_error="x"))
    assert state is None and f.left.startswith("two VM records claim one resource")
    assert any(d.startswith("kept: domain:vm1") for d in f.details)
    assert any(d.startswith("not kept: domain:vm2") and "held by domain:vm1" in d
               for d in f.details)


# -- results and exit codes ------------------------------------------------------------------------
def test_a_consistent_node_has_no_findings_and_exits_0(host):
    assert plan(facts(vm(host, "job-7", job=7, domain="running"), vm(host, "vm1",
                                                                     domain="running",
                                                                     gpu_index=4),
                      slurm=jobs({7: "RUNNING"}), reservations={}, fm_active=frozenset())) == []
    assert exit_code([]) == 0


def test_exit_codes_say_what_was_not_repaired():
    vmf = Finding("vm", "x", why="w", action="delete-vm", name="x")
    slurm = Finding("slurm", NODE, why="w", hold="h")
    assert exit_code([Outcome(vmf, "done")]) == 0
    assert exit_code([Outcome(vmf, "skipped", "in progress")]) == 0
    assert exit_code([Outcome(vmf, "done"), Outcome(slurm, "skipped")]) == 3
    assert exit_code([Outcome(vmf, "failed", "libvirt"), Outcome(slurm, "skipped")]) == 5
    assert exit_code([Outcome(vmf, "left")]) == 5


def test_a_line_says_what_why_action_and_result():
    f = Finding("vm", "job-42", why="Slurm has no job 42 on dgx01", action="delete-vm")
    assert Outcome(f, "done", "deleted (agent)").line() == \
        "vm job-42: Slurm has no job 42 on dgx01 -> delete the VM: done: deleted (agent)"
    assert set(Outcome(f, "would do").to_json()) == {"what", "subject", "name", "job_id", "why",
                                                     "action", "result", "detail", "details"}


def test_the_empty_ledger_state_is_a_consistent_start(host):
    assert plan(NodeFacts(jobs=jobs(), vms={}, ledger=EMPTY_STATE)) == []


def test_partial_image_cache_entries_no_pull_holds_are_swept():
    from slurm_dgxvm.reconcile.cache_partials import CachePartials
    c = CachePartials(path="/var/lib/dgxvm/containers/1000", uid=1000, gid=1000,
                      names=("aa.1.x", "bb.2.y"))
    [f] = plan(NodeFacts(jobs=jobs(), vms={}, partials=(c,)))
    assert (f.what, f.subject, f.action, f.details) == (
        "image-cache", c.path, "sweep-image-cache", ("aa.1.x", "bb.2.y"))
    assert f.why.startswith("2 partial entries in tmp/ of pulls that died")


def test_a_users_cache_that_could_not_be_read_is_skipped_and_fails_nothing():
    """A user's files are not the node's state: a cache that refused or stalled its user's
    read is named and skipped, the exit status stays 0 (the node-start unit must not fail for
    what a user did), and the line shows what the user named escaped."""
    from slurm_dgxvm.reconcile.cache_partials import CachePartials
    c = CachePartials(path="/var/lib/dgxvm/containers/1000", uid=1000, gid=1000, names=(),
                      refused="/var/lib/dgxvm/containers/1000/tmp/x\nreconcile: consistent")
    [f] = plan(NodeFacts(jobs=jobs(), vms={}, partials=(c,)))
    assert (f.what, f.subject, f.action) == ("image-cache", c.path, "none")
    out = planned(f, dry_run=False)
    assert out.result == "skipped" and exit_code([out]) == 0
    assert out.line() == (
        "image-cache /var/lib/dgxvm/containers/1000: could not be read as uid 1000: "
        "/var/lib/dgxvm/containers/1000/tmp/x\\nreconcile: consistent -> nothing: skipped: "
        "nothing in it was touched: a user's files are theirs, not the node's state; the next "
        "run tries again")


# -- job fabrics -----------------------------------------------------------------------------------
def jobnet_findings(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.what == "jobnet"]


def test_the_fabric_of_a_job_slurm_no_longer_has_here_is_removed(host):
    """Job 7's Epilog never ran here (its node was lost): its fabric goes. Job 8 runs: kept.
    Job 9's fabric goes with its VM's delete, not on its own."""
    found = jobnet_findings(plan(facts(vm(host, "job-9", job=9, domain=None),
                                       slurm=jobs({8: "RUNNING"}),
                                       job_fabrics={7007: 7, 8008: 8, 9009: 9})))
    assert [(f.subject, f.action, f.job_id, f.vni, f.name, f.hold) for f in found] == [
        ("VNI 7007", "remove-job-fabric", 7, 7007, "job-7", None)]
    assert "job 7, which Slurm no longer has on dgx01" in found[0].why


def test_a_fabric_is_held_while_slurm_cannot_be_asked_or_its_vm_is_being_made(host):
    [f] = jobnet_findings(plan(facts(slurm=SLURM_DOWN, job_fabrics={7007: 7})))
    assert f.hold == "Slurm could not be asked whether its job runs here"
    assert planned(f, dry_run=False).result == "skipped"
    [f] = jobnet_findings(plan(facts(job_fabrics={7007: 7}, busy=frozenset({"job-7"}))))
    assert f.hold == "in progress: a dgxvm create or delete holds its lock"


def test_untagged_fabric_devices_are_left_for_an_admin_and_a_failed_listing_is_said(host):
    [f] = jobnet_findings(plan(facts(job_fabrics={5: None})))
    assert f.action == "none" and planned(f, dry_run=False).result == "left"
    [f] = jobnet_findings(plan(facts(jobnet_error="ip: not found")))
    assert f.why == "could not be listed (ip: not found)"
    assert planned(f, dry_run=False).result == "skipped"
    assert jobnet_findings(plan(facts(job_fabrics={}))) == []


@pytest.mark.parametrize("state", ["creating", "deleting"])
def test_a_warm_vm_a_killed_boot_or_delete_left_with_a_domain_is_removed(host, state):
    [f] = plan(facts(vm(host, "warm-3", domain="running", record=state)))
    assert f.action == "delete-vm" and f.name == "warm-3" and f"warm VM left '{state}'" in f.why
    # one being booted right now (its lock held) is left to its boot
    assert plan(facts(vm(host, "warm-3", domain="running", record=state, busy=True))) == []
    # a waiting warm VM is kept, as any admin VM with a domain
    assert plan(facts(vm(host, "warm-3", domain="running"))) == []
