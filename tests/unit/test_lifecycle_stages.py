"""The stages a create and a teardown record, and what they count, without a hypervisor.

The ledger, the VM directory, placement and the record are real (so is what a failure unwinds);
the steps that need a booting guest (keys and seed, disks, design, define, start, the guest's
readiness) are stand-ins that take a known time on the timer's clock. What the Prolog keeps of
a failed create is in test_slurm_hooks.py."""

from __future__ import annotations

import logging

import pytest

from slurm_dgxvm import config as config_mod
from slurm_dgxvm.virt import hypervisor
from slurm_dgxvm.observe import opstats
from slurm_dgxvm.errors import GuestTimeout
from slurm_dgxvm.lifecycle import CreateRequest, Env, create, delete
from slurm_dgxvm.lifecycle.create import _Creation, fabric_record
from slurm_dgxvm.placement import Request
from slurm_dgxvm.records import VmRecord
from slurm_dgxvm.observe.stages import StageTimer
from test_slurm_hooks import image_store  # noqa: F401 - a fixture

# seconds each stand-in step takes on the test's clock
TAKES = {"keys_address_seed": 1.25, "disks": 0.5, "design": 0.125, "define": 0.0625,
         "activate_fabric": 3.0, "start": 2.0, "wait_for_guest": 8.0}


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeDom:
    """A libvirt domain that stops when asked (or never, ``stubborn``)."""

    def __init__(self, stubborn: bool = False):
        self.active, self.stubborn, self.calls = True, stubborn, []

    def isActive(self):
        return self.active

    def shutdownFlags(self, _flags):
        self.calls.append("shutdown")
        self.active = self.stubborn

    def destroy(self):
        self.calls.append("destroy")
        self.active = False

    def undefineFlags(self, _flags):
        self.calls.append("undefine")


class FakeFabric:
    def __init__(self):
        self.active: set[int] = set()

    def activate(self, fm):
        self.active.add(fm)

    def deactivate(self, fm):
        self.active.discard(fm)


@pytest.fixture
def stand_ins(monkeypatch):
    """The steps that need a real guest, replaced; returns the clock they advance and a dict
    ``fail`` ({step name: exception}) to make one of them fail."""
    clock, fail = Clock(), {}

    def step(name, body=lambda self: None):
        def run(self):
            clock.now += TAKES[name]
            if name in fail:
                raise fail[name]
            body(self)
        monkeypatch.setattr(_Creation, name, run)

    def keys(self):
        self.address, self.mac = "10.213.0.9", "52:54:00:00:00:09"

    def design(self):
        self.record = VmRecord(
            name=self.name, uuid="u", state="creating", owner=self.req.owner,
            ledger_key=self.key, job_id=self.req.job_id, user="u", uid=0, gid=0, workdir=None,
            image=self.image.name, image_version=self.image.version, address=self.address,
            mac=self.mac, network="dgxvm", allocation=self.alloc, placement=self.placement,
            jobnet=fabric_record(self.req.fabric))
        self.env.vms.save(self.record)

    def define(self):
        self.dom = FakeDom()

    def start(self):
        self.started = 1.0

    step("keys_address_seed", keys)
    step("disks")
    step("design", design)
    step("define", define)
    step("start", start)
    step("wait_for_guest")
    real_fabric = _Creation.activate_fabric

    def fabric(self):
        clock.now += TAKES["activate_fabric"]
        real_fabric(self)
    monkeypatch.setattr(_Creation, "activate_fabric", fabric)
    monkeypatch.setattr(hypervisor, "release_address", lambda *a, **k: None)
    return clock, fail


def make_env(tmp_path, trees, image_store, machine="dgx2", **libvirt) -> Env:  # noqa: F811
    env = Env(config_mod.from_dict({
        "host": {"sysfs_root": str(trees[machine]), "state_dir": str(tmp_path / "state")},
        "libvirt": {"uri": "test:///default", **libvirt},
        "images": {"store": str(image_store)}}))
    env.__dict__["fabric"] = FakeFabric()
    return env


def request(count=4, name="t4") -> CreateRequest:
    return CreateRequest(name=name, placement=Request(count=count))


def test_a_create_records_each_stage_it_ran_in_order(tmp_path, trees, image_store, stand_ins):
    clock, _ = stand_ins
    env = make_env(tmp_path, trees, image_store)
    rec = create(env, request(), timer=StageTimer(clock))
    # a DGX-2 has no Fabric Manager: no fm stage (absent, not 0); preflight and placement are
    # real and take no time on the test's clock
    assert list(rec.create_stages.items()) == [
        ("preflight", 0.0), ("placement", 0.0), ("seed", 1.25), ("disks", 0.5),
        ("define", 0.188), ("start", 2.0), ("ready", 8.0)]
    assert rec.state == "running"
    assert env.vms.load("t4").create_stages == rec.create_stages      # the record on disk
    counted = opstats.read(env.cfg.host.state_dir)
    assert counted.ops == {("create", "ok"): 1} and counted.failures == {}
    assert {stage for op, stage in counted.stages} == set(rec.create_stages)


def test_a_machine_with_fabric_manager_has_an_fm_stage_before_start(tmp_path, trees, image_store,
                                                                   stand_ins):
    clock, _ = stand_ins
    env = make_env(tmp_path, trees, image_store, machine="dgx-a100")
    rec = create(env, request(count=2), timer=StageTimer(clock))
    assert rec.placement.fm_partition is not None
    assert list(rec.create_stages) == ["preflight", "placement", "seed", "disks", "define", "fm",
                                       "start", "ready"]
    assert rec.create_stages["fm"] == 3.0
    assert env.fabric.active == {rec.placement.fm_partition}


def test_a_failed_create_keeps_the_stages_it_reached_and_leaves_nothing(tmp_path, trees,
                                                                        image_store, stand_ins):
    clock, fail = stand_ins
    fail["wait_for_guest"] = GuestTimeout(name="t4", timeout=300, reason="no agent", tail="")
    env = make_env(tmp_path, trees, image_store)
    timer = StageTimer(clock)
    with pytest.raises(GuestTimeout):
        create(env, request(), timer=timer)
    assert timer.failed == "ready"
    assert list(timer.seconds()) == ["preflight", "placement", "seed", "disks", "define", "start",
                                     "ready"]
    assert env.ledger.read().allocations == {} and not env.vms.exists("t4")
    counted = opstats.read(env.cfg.host.state_dir)
    assert counted.ops == {("create", "failed"): 1}
    assert counted.failures == {("create", "node", "vm"): 1}
    assert ("create", "ready") not in counted.stages           # it never finished
    assert counted.stages[("create", "start")].count == 1


def test_counters_that_cannot_be_written_do_not_fail_the_create(tmp_path, trees, image_store,
                                                                stand_ins, caplog):
    clock, _ = stand_ins
    env = make_env(tmp_path, trees, image_store)
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / opstats.FILE).mkdir()               # cannot be read nor replaced
    with caplog.at_level(logging.WARNING, logger="dgxvm.opstats"):
        rec = create(env, request(), timer=StageTimer(clock))
    assert rec.state == "running" and env.vms.load("t4").state == "running"
    assert "not updated (the VM is not affected)" in caplog.text


@pytest.mark.parametrize("stubborn, stages, how", [
    (False, ["shutdown", "undefine", "reset", "release"], "deleted (agent)"),
    (True, ["shutdown", "destroy", "undefine", "reset", "release"], "deleted (destroyed)"),
])
def test_a_teardown_records_its_stages_and_destroy_only_when_the_guest_would_not_stop(
        tmp_path, trees, image_store, stand_ins, monkeypatch, stubborn, stages, how):
    clock, _ = stand_ins
    env = make_env(tmp_path, trees, image_store, shutdown_timeout_s=0.2)
    create(env, request(), timer=StageTimer(clock))
    dom = FakeDom(stubborn=stubborn)
    monkeypatch.setattr(hypervisor, "lookup", lambda conn, name: dom)
    rec = delete(env, "t4")
    assert list(rec.teardown_stages) == stages and rec.ended == how
    assert set(rec.gpu_resets) == {*rec.allocation.gpu_pcis, *rec.allocation.nvswitches}
    if stubborn:
        assert rec.teardown_stages["shutdown"] >= 0.2         # it waited out the timeout
    assert env.ledger.read().allocations == {} and not env.vms.exists("t4")
    counted = opstats.read(env.cfg.host.state_dir)
    assert counted.ops[("teardown", "ok")] == 1
    assert {stage for op, stage in counted.stages if op == "teardown"} == set(stages)


def test_a_teardown_of_what_a_crash_left_resets_what_the_ledger_held_and_releases(
        tmp_path, trees, image_store, stand_ins):
    clock, _ = stand_ins
    env = make_env(tmp_path, trees, image_store)
    create(env, request(), timer=StageTimer(clock))
    env.vms.remove_dir("t4")                       # a ledger entry without record or domain
    assert delete(env, "t4") is None
    counted = opstats.read(env.cfg.host.state_dir)
    # the ledger entry still names the GPUs: they are reset and checked before release
    assert {stage for op, stage in counted.stages if op == "teardown"} == {"reset", "release"}


def test_a_delete_of_an_unclaimed_warm_vm_leaves_one_a_job_claimed_meanwhile(
        tmp_path, trees, image_store, stand_ins):
    """An admin's `dgxvm warm stop`, a refill's trim or another job's claim read the warm VMs
    waiting, then delete; a Prolog may claim one in between. Under the name's lock the delete
    sees the claim (the ledger entry is job:N now) and leaves that job's VM whole."""
    from dataclasses import replace
    clock, _ = stand_ins
    env = make_env(tmp_path, trees, image_store)
    create(env, request(), timer=StageTimer(clock))
    with env.ledger.transaction() as txn:          # what a claim's commit does
        held = txn.allocations["domain:t4"]
        txn.release(held.key)
        txn.allocate(replace(held, key="job:42", owner="job", job_id=42))
    assert delete(env, "t4", graceful=False, unclaimed_only=True) is None
    assert env.vms.load("t4").state == "running" and "job:42" in env.ledger.read().allocations
    create(env, request(name="t8"), timer=StageTimer(clock))
    rec = delete(env, "t8", graceful=False, unclaimed_only=True)  # still unclaimed: deleted
    assert rec.state == "deleted" and not env.vms.exists("t8")
    assert set(env.ledger.read().allocations) == {"job:42"}


# -- a multi-node job's fabric ---------------------------------------------------------------------
def job_fabric(job_id=42):
    from slurm_dgxvm import config as cfg
    from slurm_dgxvm.jobnet.plan import plan
    j = cfg.from_dict({"jobnet": {"enabled": True, "nodes": {"dgxa": "192.168.213.11",
                                                             "dgxb": "192.168.213.12"}}}).jobnet
    return plan(j, job_id, "dgxa,dgxb", "dgxb")


@pytest.fixture
def kernel(monkeypatch):
    """The fabric's kernel side (jobnet.apply): what was made and removed, by VNI."""
    import importlib
    create_mod = importlib.import_module("slurm_dgxvm.lifecycle.create")
    delete_mod = importlib.import_module("slurm_dgxvm.lifecycle.delete")
    made: dict[int, int] = {}
    calls: list[tuple[str, int]] = []

    def apply(fab):
        calls.append(("apply", fab.vni))
        made[fab.vni] = fab.job_id

    def teardown(vni):
        calls.append(("teardown", vni))
        return made.pop(vni, None) is not None
    monkeypatch.setattr(create_mod, "apply_job_fabric", apply)
    monkeypatch.setattr(create_mod, "teardown_job_fabric", teardown)
    monkeypatch.setattr(delete_mod, "teardown_job_fabric", teardown)
    monkeypatch.setattr(delete_mod, "job_fabrics_here", lambda: dict(made))
    return made, calls


def test_a_multi_node_jobs_fabric_is_made_before_start_and_goes_with_the_vm(
        tmp_path, trees, image_store, stand_ins, kernel):
    clock, _ = stand_ins
    made, calls = kernel
    env = make_env(tmp_path, trees, image_store, machine="dgx-h100")
    fab = job_fabric()
    req = CreateRequest(name="job-42", placement=Request(count=2), owner="job", job_id=42,
                        fabric=fab)
    rec = create(env, req, timer=StageTimer(clock))
    assert list(rec.create_stages)[-4:] == ["fm", "jobnet", "start", "ready"]
    assert made == {fab.vni: 42}
    delete(env, "job-42", job_id=42)
    assert made == {} and calls == [("apply", fab.vni), ("teardown", fab.vni)]


def test_a_bad_ssh_secret_is_refused_before_anything_is_placed(tmp_path, trees, image_store,
                                                               stand_ins, kernel):
    """[jobnet] ssh_secret readable by others: the create stops in its preflight, naming the
    file, with nothing placed, made or written."""
    from dataclasses import replace

    from slurm_dgxvm.errors import ConfigError
    clock, _ = stand_ins
    made, calls = kernel
    secret = tmp_path / "jobnet-ssh.key"
    secret.write_bytes(bytes(64))
    secret.chmod(0o644)
    env = make_env(tmp_path, trees, image_store, machine="dgx-h100")
    env = Env(replace(env.cfg, jobnet=replace(env.cfg.jobnet, ssh_secret=str(secret))))
    env.__dict__["fabric"] = FakeFabric()
    timer = StageTimer(clock)
    with pytest.raises(ConfigError, match=f"{secret}: must be root's alone"):
        create(env, CreateRequest(name="job-42", placement=Request(count=2), owner="job",
                                  job_id=42, fabric=job_fabric()), timer=timer)
    assert timer.failed == "preflight" and list(timer.seconds()) == ["preflight"]
    assert calls == [] and env.ledger.read().allocations == {}
    assert not env.vms.exists("job-42")


def test_a_create_that_fails_after_the_fabric_removes_it(tmp_path, trees, image_store,
                                                         stand_ins, kernel):
    clock, fail = stand_ins
    made, calls = kernel
    fail["start"] = GuestTimeout(name="job-42", timeout=1, reason="x", tail="")
    env = make_env(tmp_path, trees, image_store, machine="dgx-h100")
    fab = job_fabric()
    with pytest.raises(GuestTimeout):
        create(env, CreateRequest(name="job-42", placement=Request(count=2), owner="job",
                                  job_id=42, fabric=fab), timer=StageTimer(clock))
    assert made == {} and calls == [("apply", fab.vni), ("teardown", fab.vni)]
    assert env.ledger.read().allocations == {}


def test_a_killed_prologs_fabric_without_a_record_is_found_by_its_jobs_tag(
        tmp_path, trees, image_store, stand_ins, kernel):
    """No record names the fabric (the Prolog was killed before it wrote one): the Epilog's
    delete finds it by the job's VNI, only when its devices carry that job's tag."""
    from slurm_dgxvm.errors import DomainNotFound
    from slurm_dgxvm.jobnet.plan import vni_for
    made, calls = kernel
    env = make_env(tmp_path, trees, image_store, machine="dgx-h100")
    made[vni_for(42)] = 42
    made[vni_for(43)] = 99              # that VNI is another job's: never touched
    env.vms.make_dir("job-42")          # what the killed Prolog left
    env.vms.make_dir("job-43")
    from dataclasses import replace
    env = Env(replace(env.cfg, jobnet=replace(env.cfg.jobnet, enabled=True)))
    env.__dict__["fabric"] = FakeFabric()
    delete(env, "job-42", job_id=42)
    delete(env, "job-43", job_id=43)
    assert made == {vni_for(43): 99}
    with pytest.raises(DomainNotFound):
        delete(env, "job-42", job_id=42)
