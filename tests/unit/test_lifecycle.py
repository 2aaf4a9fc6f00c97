"""Lifecycle pieces that need no hypervisor: the libvirt hook's bookkeeping, VM records, the
network's address plan, and the hook script shipped in etc/."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from slurm_dgxvm import config as config_mod
from slurm_dgxvm.errors import LedgerConflict, RecordCorrupt
from slurm_dgxvm.virt.hypervisor import network_layout
from slurm_dgxvm.ledger import Allocation, domain_key
from slurm_dgxvm.lifecycle import Env, hook, libvirt_hook_script
from slurm_dgxvm.placement import EMPTY, Placement, Policy, Request, place
from slurm_dgxvm.records import VmRecord

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def env(tmp_path, trees):
    cfg = config_mod.from_dict({"host": {"sysfs_root": str(trees["dgx2"]),
                                         "state_dir": str(tmp_path / "state")}})
    return Env(cfg)


def make_vm(env, name, gpu_index=0, state="running", hold=True):
    p = place(env.host, EMPTY, Request(count=4, gpu_index=gpu_index), Policy())
    alloc = Allocation.from_placement(domain_key(name), p, owner="domain", domain=name, user="u")
    if hold:
        env.ledger.allocate(alloc)
    env.vms.make_dir(name)
    rec = VmRecord(name=name, uuid="u", state=state, owner="domain", ledger_key=alloc.key,
                   job_id=None, user="u", uid=1000, gid=1000, workdir=None, image="img",
                   image_version="1", address="10.213.0.2", mac="52:54:00:00:00:01",
                   network="dgxvm", allocation=alloc, placement=p)
    env.vms.save(rec)
    return rec


def test_release_gives_resources_back_and_keeps_the_drives(env):
    make_vm(env, "a")
    (env.vms.dir("a") / "os.qcow2").write_bytes(b"x")
    line = hook(env, "a", "release", "end")
    assert "drives are kept" in line
    assert env.ledger.read().allocations == {}
    rec = env.vms.load("a")
    assert rec.state == "stopped" and rec.ended.startswith("stopped outside dgxvm")
    assert (env.vms.dir("a") / "os.qcow2").exists()
    assert set(rec.gpu_resets) == {*rec.allocation.gpu_pcis, *rec.allocation.nvswitches}


def test_a_crashed_vms_gpu_that_fails_its_reset_is_quarantined_before_it_is_released(
        tmp_path, monkeypatch):
    from slurm_dgxvm.simulate import render
    from slurm_dgxvm.simulate.faults import inject
    root = render("dgx2", tmp_path / "sys")
    env = Env(config_mod.from_dict({"host": {"sysfs_root": str(root),
                                             "state_dir": str(tmp_path / "state")}}))
    rec = make_vm(env, "a")
    bad = rec.allocation.gpu_pcis[1]
    inject(root, bad, "reset-fail")
    seen = {}
    real = env.ledger.release
    monkeypatch.setattr(env.ledger, "release",
                        lambda key: (seen.setdefault("q", set(env.health.quarantined())),
                                     real(key))[1])
    line = hook(env, "a", "release", "end")
    assert "(1 quarantined)" in line and seen["q"] == {bad}
    assert list(env.vms.load("a").quarantined) == [bad]
    assert env.ledger.read().allocations == {}


def test_prepare_takes_the_same_resources_again(env):
    rec = make_vm(env, "a", state="stopped", hold=False)
    hook(env, "a", "prepare", "begin")
    held = env.ledger.read().allocations[rec.ledger_key]
    assert held.gpu_pcis == rec.allocation.gpu_pcis
    assert env.vms.load("a").state == "running"


def test_prepare_refuses_when_another_vm_holds_the_gpus_and_names_it(env):
    make_vm(env, "a", state="stopped", hold=False)
    make_vm(env, "b")            # same block, held
    with pytest.raises(LedgerConflict) as exc:
        hook(env, "a", "prepare", "begin")
    assert "cannot start a" in str(exc.value) and "domain:b" in str(exc.value)
    assert set(env.ledger.read().allocations) == {"domain:b"}
    assert env.vms.load("a").state == "stopped"


def test_prepare_is_a_no_op_while_dgxvm_itself_creates_the_vm(env):
    make_vm(env, "a", state="creating")
    before = env.ledger.read()
    assert hook(env, "a", "prepare", "begin") is None
    assert hook(env, "a", "release", "end") is None
    assert env.ledger.read() == before


@pytest.mark.parametrize("name", ["not-ours", "../../etc", "x y"])
def test_domains_without_a_dgxvm_record_are_left_alone(env, name):
    assert hook(env, name, "prepare", "begin") is None
    assert hook(env, name, "release", "end") is None
    assert not env.ledger.read().allocations


def test_a_damaged_record_is_an_error_not_a_guess(env):
    make_vm(env, "a")
    (env.vms.dir("a") / "record.json").write_text("{not json")
    with pytest.raises(RecordCorrupt):
        hook(env, "a", "release", "end")


def test_records_round_trip(env):
    rec = make_vm(env, "a")
    assert env.vms.load("a") == rec
    assert json.loads((env.vms.dir("a") / "record.json").read_text())["format"] == "dgxvm-vm"
    assert [r.name for r in env.vms.all()] == ["a"]
    with pytest.raises(FileExistsError):
        env.vms.make_dir("a")


def test_the_image_cache_path_is_in_the_record_and_the_users_view(env):
    from slurm_dgxvm.records import job_view
    rec = make_vm(env, "a")
    assert rec.image_cache is None and job_view(rec, env.vms.dir("a"))["image_cache"] is None
    rec = rec.with_(image_cache="/var/lib/dgxvm/containers/1000")
    env.vms.save(rec)
    assert env.vms.load("a") == rec
    assert env.vms.load_view("a")["image_cache"] == "/var/lib/dgxvm/containers/1000"
    # a record written before the key existed still loads: no cache
    path = env.vms.dir("a") / "record.json"
    doc = json.loads(path.read_text())
    del doc["image_cache"]
    path.write_text(json.dumps(doc))
    assert env.vms.load("a").image_cache is None


def test_stage_times_are_in_the_record_and_an_older_record_has_none(env):
    rec = make_vm(env, "a").with_(create_stages={"placement": 0.004, "ready": 8.25},
                                  teardown_stages={"shutdown": 1.5})
    env.vms.save(rec)
    assert env.vms.load("a") == rec
    path = env.vms.dir("a") / "record.json"
    doc = json.loads(path.read_text())
    assert doc["create_stages"] == {"placement": 0.004, "ready": 8.25}
    del doc["create_stages"], doc["teardown_stages"]          # written before they existed
    path.write_text(json.dumps(doc))
    old = env.vms.load("a")
    assert old.create_stages == {} and old.teardown_stages == {}


@pytest.mark.parametrize("stages", [[1, 2], {"ready": "8s"}, {"ready": True}, "ready:8"])
def test_damaged_stage_times_make_a_corrupt_record(env, stages):
    make_vm(env, "a")
    path = env.vms.dir("a") / "record.json"
    doc = json.loads(path.read_text())
    doc["create_stages"] = stages
    path.write_text(json.dumps(doc))
    with pytest.raises(RecordCorrupt) as info:
        env.vms.load("a")
    assert str(path) in str(info.value)


def test_network_plan_keeps_reservations_apart_from_the_dynamic_range():
    lay = network_layout("10.213.0.0/24")
    assert lay["gateway"] == "10.213.0.1"
    assert lay["reserved"][0] == "10.213.0.2" and lay["reserved"][-1] == "10.213.0.127"
    assert (lay["range_start"], lay["range_end"]) == ("10.213.0.128", "10.213.0.254")


def test_the_hook_script_in_etc_is_the_one_dgxvm_writes():
    from slurm_dgxvm.netfilter import network_hook_script
    assert (REPO / "etc/libvirt/hooks/network").read_text() == network_hook_script()
    assert os.access(REPO / "etc/libvirt/hooks/network", os.X_OK)
    assert "'/opt/my dgxvm/bin/dgxvm' hook network" in network_hook_script(
        "/opt/my dgxvm/bin/dgxvm", "/etc/dgxvm/a b.toml")
    assert (REPO / "etc/libvirt/hooks/qemu").read_text() == libvirt_hook_script()
    text = libvirt_hook_script("/opt/my dgxvm/bin/dgxvm", "/etc/dgxvm/a b.toml")
    assert "'/opt/my dgxvm/bin/dgxvm' hook qemu" in text
    assert "DGXVM_CONFIG='/etc/dgxvm/a b.toml'" in text


def test_a_network_of_that_name_on_another_subnet_is_refused(tmp_path, monkeypatch):
    """A network left by another config (another subnet) would never serve the reservations:
    every guest would wait out its DHCP. libvirt's test driver has "default" on
    192.168.122.0/24."""
    import libvirt
    from slurm_dgxvm.errors import HypervisorError
    from slurm_dgxvm.virt.hypervisor import ensure_network
    monkeypatch.setenv("DGXVM_RUN_DIR", str(tmp_path / "run"))
    conn = libvirt.open("test:///default")
    try:
        with pytest.raises(HypervisorError) as exc:
            ensure_network(conn, "default", "10.213.0.0/24", str(tmp_path))
        assert "network default exists on 192.168.122.0/24, but libvirt.network_cidr is " \
               "10.213.0.0/24" in str(exc.value)
        with pytest.raises(HypervisorError, match="runs without dgxvm's firewall"):
            ensure_network(conn, "default", "192.168.122.0/24", str(tmp_path))
        _hook_marks(conn, "default")
        assert ensure_network(conn, "default", "192.168.122.0/24", str(tmp_path)).name() == "default"
    finally:
        conn.close()


def _hook_marks(conn, name, **override):
    """Write the marker dgxvm's network hook leaves once its nft table is applied."""
    import json
    from slurm_dgxvm.netfilter import marker_path, network_info
    info = network_info(conn.networkLookupByName(name).XMLDesc(0))
    path = marker_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"uuid": info.uuid, "bridge": info.bridge, **override}))


def test_a_running_network_without_its_firewall_is_refused_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("DGXVM_RUN_DIR", str(tmp_path / "run"))
    """No marker (the network hook is not installed), or a marker of another instance of the
    network (a stale one): a node fault naming the fix, never a VM on a flat network."""
    import libvirt
    from slurm_dgxvm.errors import HypervisorError
    from slurm_dgxvm.virt.hypervisor import ensure_network
    conn = libvirt.open("test:///default")
    try:
        with pytest.raises(HypervisorError) as exc:
            ensure_network(conn, "default", "192.168.122.0/24", str(tmp_path))
        assert exc.value.exit_code == 6
        assert "install dgxvm's libvirt network hook" in str(exc.value)
        assert "virsh net-destroy default; virsh net-start default" in str(exc.value)
        _hook_marks(conn, "default", bridge="virbr9")
        with pytest.raises(HypervisorError, match="is for another instance"):
            ensure_network(conn, "default", "192.168.122.0/24", str(tmp_path))
        _hook_marks(conn, "default")
        ensure_network(conn, "default", "192.168.122.0/24", str(tmp_path))
    finally:
        conn.close()


def test_a_ready_network_is_served_without_its_lock(tmp_path, monkeypatch):
    """Every create checks the network; only making it takes network.lock. 16 Prologs at once
    on a fresh node queued past the lock's timeout when each check took it (load bench), and
    exit 1 drains the node."""
    import filelock
    import libvirt
    from slurm_dgxvm.virt import hypervisor
    from slurm_dgxvm.errors import LockTimeout
    monkeypatch.setenv("DGXVM_RUN_DIR", str(tmp_path / "run"))
    monkeypatch.setattr(hypervisor, "NETWORK_LOCK_TIMEOUT_S", 0.2)
    conn = libvirt.open("test:///default")
    try:
        with filelock.FileLock(str(tmp_path / "network.lock")):     # a Prolog reserving
            with pytest.raises(LockTimeout):                          # no marker: the locked path
                hypervisor.ensure_network(conn, "default", "192.168.122.0/24", str(tmp_path))
            _hook_marks(conn, "default")
            net = hypervisor.ensure_network(conn, "default", "192.168.122.0/24", str(tmp_path))
            assert net.name() == "default"
            net.destroy()                                             # stopped: made under it
            try:
                with pytest.raises(LockTimeout):
                    hypervisor.ensure_network(conn, "default", "192.168.122.0/24",
                                              str(tmp_path))
            finally:
                net.create()        # the test driver's state is the process's, shared
    finally:
        conn.close()


def test_a_domain_that_went_away_since_its_lookup_is_undefined():
    """`dgxvm list` while a VM is being deleted: the domain it looked up vanishes before its
    state is read (this made `dgxvm list` fail with an internal error in the demo)."""
    import libvirt
    from slurm_dgxvm.virt.hypervisor import state_name
    conn = libvirt.open("test:///default")
    try:
        dom = conn.defineXML("<domain type='test'><name>gone</name><memory>1024</memory>"
                             "<os><type>hvm</type></os></domain>")
        assert state_name(dom) == "shut-off"
        dom.undefine()
        assert state_name(dom) == "undefined"
    finally:
        conn.close()


# -- typed records ---------------------------------------------------------------------------------
@pytest.mark.parametrize("machine", ["dgx2", "dgx-a100", "dgx-h100"])
@pytest.mark.parametrize("count", [1, 2, 4, 8])
def test_a_placement_survives_its_record(host, count):
    p = place(host, EMPTY, Request(count=count, slurm_gpus=tuple(range(count))), Policy())
    assert Placement.from_json(json.loads(json.dumps(p.to_json()))) == p


def test_a_record_holds_a_typed_allocation_and_placement(env):
    rec = make_vm(env, "a")
    loaded = env.vms.load("a")
    assert isinstance(loaded.allocation, Allocation) and isinstance(loaded.placement, Placement)
    assert loaded.allocation == env.ledger.read().allocations[domain_key("a")]
    doc = json.loads((env.vms.dir("a") / "record.json").read_text())
    # the file keeps the ledger's and `plan --json`'s own forms: readable without dgxvm
    assert doc["allocation"] == rec.allocation.to_json()
    assert doc["placement"] == rec.placement.to_json()


@pytest.mark.parametrize("damage, named", [
    (lambda d: d.pop("placement"), "missing 'placement'"),
    (lambda d: d["placement"].update(gpus="0-3"), "list of integers"),
    (lambda d: d["allocation"].pop("gpus"), "missing field(s) gpus"),
    (lambda d: d["allocation"].update(colour="red"), "unknown field(s) colour"),
    (lambda d: d.update(version=9), "not a dgxvm-vm v1 record"),
])
def test_a_record_with_a_damaged_field_is_a_corrupt_record(env, damage, named):
    make_vm(env, "a")
    path = env.vms.dir("a") / "record.json"
    doc = json.loads(path.read_text())
    damage(doc)
    path.write_text(json.dumps(doc))
    with pytest.raises(RecordCorrupt) as info:
        env.vms.load("a")
    assert named in str(info.value) and str(path) in str(info.value)
    assert info.value.exit_code == 5
    assert json.loads(path.read_text()) == doc          # left as it is for an admin


def test_list_rows_come_from_records_and_from_ledger_entries_without_one(env, monkeypatch):
    from slurm_dgxvm.lifecycle import list_vms
    import libvirt
    rec = make_vm(env, "a")
    p = place(env.host, env.ledger.read().occupancy(), Request(count=2), Policy())
    orphan = Allocation.from_placement(domain_key("b"), p, owner="domain", domain="b", user="u")
    env.ledger.allocate(orphan)
    monkeypatch.setattr(Env, "connect", lambda self: libvirt.open("test:///default"))
    a, b = list_vms(env)
    assert (a.name, a.state, a.held, a.gpus, a.vcpus) == \
        ("a", "undefined", True, list(rec.placement.gpus), rec.placement.vcpus)
    assert (b.name, b.state, b.held, b.gpus, b.image) == ("b", "no-record", True, list(p.gpus),
                                                          None)
    assert set(a.to_json()) == {"name", "state", "job_id", "user", "gpus", "slurm_gpus",
                                "numa_nodes", "vcpus", "memory_mib", "nvswitches",
                                "fm_partition", "image", "address", "uptime_s", "held",
                                "fitted", "boot_s"}


def test_the_job_of_a_domain_is_read_from_its_dgxvm_metadata():
    import libvirt
    from slurm_dgxvm.design.spec import XMLNS
    from slurm_dgxvm.lifecycle.delete import domain_job
    conn = libvirt.open("test:///default")
    try:
        def define(name, meta):
            return conn.defineXML(
                f"<domain type='test' xmlns:dgxvm='{XMLNS}'><name>{name}</name>"
                f"<memory>1024</memory><os><type>hvm</type></os>"
                f"<metadata>{meta}</metadata></domain>")
        assert domain_job(define("j", "<dgxvm:vm><dgxvm:job>42</dgxvm:job></dgxvm:vm>")) == 42
        # someone else's namespace, or a job id that is not one, names no job
        assert domain_job(define("k", "<x:vm xmlns:x='urn:x'><x:job>42</x:job></x:vm>")) is None
        assert domain_job(define("l", "<dgxvm:vm><dgxvm:job>4 2</dgxvm:job></dgxvm:vm>")) is None
    finally:
        conn.close()
