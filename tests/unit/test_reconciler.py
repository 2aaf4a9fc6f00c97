"""dgxvm reconcile on a node: real state files, libvirt's test driver (test:///default), the
fmpm stand-in, a child process holding a VM's lock. What an admin relies on: a live VM is never
touched, what belongs to nothing live goes entirely, a second run finds nothing, --dry-run
changes nothing, a corrupt ledger is rebuilt only when asked and kept aside."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import libvirt
import pytest

from slurm_dgxvm import config as config_mod
from slurm_dgxvm.virt import addresses, hypervisor
from slurm_dgxvm.design import mac_for
from slurm_dgxvm.design.spec import XMLNS
from slurm_dgxvm.ledger import Allocation, domain_key, job_key
from slurm_dgxvm.lifecycle import Env
from slurm_dgxvm.reconcile import apply as reconciler
from slurm_dgxvm.reconcile.plan import JobsOnNode
from slurm_dgxvm.placement import Policy, Request, place
from slurm_dgxvm.records import VmRecord

from test_vmlock import Holder

REPO = Path(__file__).resolve().parents[2]
STANDIN = REPO / "tools" / "fmpm-standin" / "fmpm"
NODE = "dgx01"


class Node:
    """A node's state dir and libvirt (the test driver, shared by connections of a process:
    the domains made here are undefined at the end).

    NOTE: the test driver takes no flags in shutdownFlags (a guest that will not stop: delete
    destroys it after shutdown_timeout_s) nor undefine's NVRAM flag (the rest are kept)."""

    def __init__(self, tmp_path: Path, tree: Path, monkeypatch, **cfg):
        monkeypatch.setattr(hypervisor, "undefine", lambda dom: dom.undefineFlags(
            libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
            | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA))
        doc = {"host": {"sysfs_root": str(tree), "state_dir": str(tmp_path / "state")},
               "libvirt": {"uri": "test:///default", "shutdown_timeout_s": 0.1,
                           **cfg.pop("libvirt", {})},
               "containers": {"cache_dir": "", **cfg.pop("containers", {})}, **cfg}
        self.env = Env(config_mod.from_dict(doc))
        self.conn = libvirt.open("test:///default")
        self.made: list[str] = []

    def close(self) -> None:
        for name in self.made:
            dom = hypervisor.lookup(self.conn, name)
            if dom is not None:
                hypervisor.destroy(dom)
                hypervisor.undefine(dom)
        self.conn.close()

    def vm(self, name: str, *, job: int | None = None, gpu_index: int = 0,
           domain: str | None = "running", record: str | None = "running",
           entry: bool = True) -> Allocation:
        """A VM as create leaves it (``domain`` running/off/None, ``record`` its state or
        None), made a while ago."""
        env = self.env
        owner = "job" if job is not None else "domain"
        key = job_key(job) if job is not None else domain_key(name)
        p = place(env.host, env.ledger.read().occupancy(), Request(count=4, gpu_index=gpu_index),
                  Policy())
        a = Allocation.from_placement(key, p, owner=owner, job_id=job, domain=name, user="u",
                                      now=time.time() - 100)
        if entry:
            env.ledger.allocate(a)
        env.vms.make_dir(name)
        if record is not None:
            env.vms.save(VmRecord(
                name=name, uuid="u", state=record, owner=owner, ledger_key=key, job_id=job,
                user="u", uid=1000, gid=1000, workdir=None, image="img", image_version="1",
                address="10.213.0.2", mac=mac_for(name), network=env.cfg.libvirt.network,
                allocation=a, placement=p, created=time.time() - 100))
        if domain is not None:
            meta = f"<dgxvm:owner>{owner}</dgxvm:owner>" + \
                (f"<dgxvm:job>{job}</dgxvm:job>" if job is not None else "")
            dom = self.conn.defineXML(
                f"<domain type='test' xmlns:dgxvm='{XMLNS}'><name>{name}</name>"
                f"<memory>1024</memory><os><type>hvm</type></os>"
                f"<metadata><dgxvm:vm>{meta}</dgxvm:vm></metadata></domain>")
            self.made.append(name)
            if domain == "running":
                dom.create()
        return a

    def domain(self, name: str) -> str | None:
        dom = hypervisor.lookup(self.conn, name)
        return None if dom is None else hypervisor.state_name(dom)

    def keys(self) -> list[str]:
        return sorted(self.env.ledger.read().allocations)

    def run(self, live=(), **kw) -> reconciler.Report:
        jobs = JobsOnNode(node=NODE, live=frozenset(live),
                          states={j: "RUNNING" for j in live}, asked_at=time.time())
        return reconciler.run(self.env, jobs, **kw)

    def snapshot(self) -> dict:
        """Every file under the state dir with its bytes, and libvirt's domains' states."""
        root = Path(self.env.cfg.host.state_dir)
        files = {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
                 if p.is_file()}
        doms = {d.name(): hypervisor.state_name(d) for d in self.conn.listAllDomains(0)}
        return {"files": files, "domains": doms}


@pytest.fixture
def node(tmp_path, trees, monkeypatch):
    n = Node(tmp_path, trees["dgx2"], monkeypatch)
    yield n
    n.close()


def results(report) -> dict[str, tuple[str, str]]:
    return {o.finding.subject: (o.finding.action, o.result) for o in report.outcomes}


# -- job VMs ---------------------------------------------------------------------------------------
def test_a_stale_job_vm_goes_entirely_and_a_second_run_finds_nothing(node):
    node.vm("job-7", job=7, gpu_index=0)
    node.vm("job-42", job=42, gpu_index=4)
    report = node.run(live={7})
    assert results(report) == {"job-42": ("delete-vm", "done")}
    assert report.exit_code == 0
    assert node.domain("job-42") is None and not node.env.vms.exists("job-42")
    assert node.keys() == [job_key(7)]
    assert node.domain("job-7") == "running" and node.env.vms.load("job-7").state == "running"
    again = node.run(live={7})
    assert again.outcomes == [] and again.exit_code == 0
    assert again.to_json()["consistent"] is True


def test_dry_run_changes_nothing(node):
    node.vm("job-42", job=42, gpu_index=4)
    node.vm("vm1", domain=None, record="creating", gpu_index=8)
    before = node.snapshot()
    report = node.run(dry_run=True)
    assert results(report) == {"job-42": ("delete-vm", "would do"),
                               "vm1": ("delete-vm", "would do")}
    assert node.snapshot() == before
    assert report.to_json()["dry_run"] is True


def test_when_slurm_cannot_be_asked_no_job_vm_is_touched(node):
    node.vm("job-42", job=42, gpu_index=4, domain=None)
    node.vm("vm1", domain=None, gpu_index=8)
    jobs = JobsOnNode(node=NODE, live=None, error="slurm: `squeue`: not found",
                      asked_at=time.time())
    report = reconciler.run(node.env, jobs)
    assert results(report) == {NODE: ("none", "skipped"), "vm1": ("delete-vm", "done")}
    assert report.exit_code == 3
    assert node.env.vms.load("job-42") is not None and job_key(42) in node.keys()


def test_an_admin_vm_with_a_domain_is_never_touched(node):
    node.vm("vm1", domain="off", gpu_index=0)
    node.vm("vm2", domain="running", record=None, entry=False, gpu_index=4)
    before = node.snapshot()
    assert node.run().outcomes == []
    assert node.snapshot() == before


# -- a create or delete in progress ----------------------------------------------------------------
def test_a_vm_whose_lock_is_held_is_skipped_until_its_holder_dies(node):
    """A Prolog between its ledger write and its define looks like a killed one's leftovers:
    its lock tells them apart. SIGKILLed, it frees the lock, and the next run cleans up."""
    node.vm("job-42", job=42, domain=None, record=None)
    holder = Holder(Path(node.env.cfg.host.state_dir), "job-42")
    try:
        report = node.run()
        assert results(report) == {"job-42": ("delete-vm", "skipped")}
        assert report.outcomes[0].detail.startswith("in progress")
        assert report.exit_code == 0
        assert job_key(42) in node.keys() and node.env.vms.exists("job-42")
        assert report.to_json()["checked"]["in_progress"] == ["job-42"]
    finally:
        holder.kill()
    report = node.run()
    assert results(report) == {"job-42": ("delete-vm", "done")}
    assert node.keys() == [] and not node.env.vms.exists("job-42")
    assert node.run().outcomes == []


def test_a_vm_that_changed_since_it_was_read_is_left_for_the_next_run(node, monkeypatch):
    """Read again under its lock: a domain defined meanwhile means it is not what was judged."""
    node.vm("vm1", domain=None, record="creating")
    real = reconciler.facts_of

    def defined_meanwhile(env, conn, name):
        node.made.append(name)
        node.conn.defineXML(f"<domain type='test'><name>{name}</name><memory>1024</memory>"
                            f"<os><type>hvm</type></os></domain>")
        return real(env, conn, name)
    monkeypatch.setattr(reconciler, "facts_of", defined_meanwhile)
    report = node.run()
    assert results(report) == {"vm1": ("delete-vm", "skipped")}
    assert "changed while reconcile ran" in report.outcomes[0].detail
    assert node.env.vms.exists("vm1") and node.keys() == [domain_key("vm1")]


# -- the ledger ------------------------------------------------------------------------------------
def test_a_corrupt_ledger_is_reported_and_rebuilt_only_when_asked(node):
    node.vm("vm1", gpu_index=0)                                   # running: kept
    node.vm("job-7", job=7, gpu_index=4, domain=None)             # its job is live: kept
    node.vm("job-8", job=8, gpu_index=8)                          # stale: kept out, removed
    ledger = Path(node.env.ledger.path)
    torn = ledger.read_bytes()[:-25]                              # a power cut mid-write
    ledger.write_bytes(torn)

    before = node.snapshot()
    report = node.run(live={7})
    assert report.exit_code == 5
    [o] = report.outcomes
    assert (o.finding.what, o.result) == ("ledger", "left") and "--rebuild-ledger" in o.detail
    assert node.snapshot() == before                              # nothing at all changed

    dry = node.run(live={7}, rebuild_ledger=True, dry_run=True)
    assert results(dry) == {"ledger.json": ("rebuild-ledger", "would do"),
                            "job-8": ("delete-vm", "would do")}
    assert node.snapshot() == before

    report = node.run(live={7}, rebuild_ledger=True)
    assert results(report) == {"ledger.json": ("rebuild-ledger", "done"),
                               "job-8": ("delete-vm", "done")}
    rebuilt = report.outcomes[0]
    assert "kept: domain:vm1 (vm1, GPUs 0,1,2,3)" in "\n".join(rebuilt.finding.details)
    aside = rebuilt.detail.split("kept as ", 1)[1]
    assert Path(aside).read_bytes() == torn
    assert node.keys() == [domain_key("vm1"), job_key(7)]
    assert node.env.ledger.read().allocations[job_key(7)] == node.env.vms.load("job-7").allocation
    assert report.exit_code == 0
    assert node.run(live={7}).outcomes == []


def test_a_rebuild_waits_for_a_create_in_progress(node):
    node.vm("vm1")
    Path(node.env.ledger.path).write_bytes(b"")
    holder = Holder(Path(node.env.cfg.host.state_dir), "job-9")
    try:
        report = node.run(rebuild_ledger=True)
    finally:
        holder.kill()
    [o] = report.outcomes
    assert o.result == "skipped" and "in progress (job-9)" in o.detail
    assert report.exit_code == 5                       # the ledger is still corrupt
    assert Path(node.env.ledger.path).read_bytes() == b""


# -- what has no name ------------------------------------------------------------------------------
def test_a_reservation_of_no_vm_is_released_and_a_vms_is_kept(tmp_path, trees, monkeypatch):
    node = Node(tmp_path, trees["dgx2"], monkeypatch, libvirt={"network": "default"})
    net = node.conn.networkLookupByName("default")

    def reserve(name, ip):
        net.update(libvirt.VIR_NETWORK_UPDATE_COMMAND_ADD_LAST,
                   libvirt.VIR_NETWORK_SECTION_IP_DHCP_HOST, -1,
                   f"<host mac='{mac_for(name)}' name='{name}' ip='{ip}'/>",
                   libvirt.VIR_NETWORK_UPDATE_AFFECT_LIVE
                   | libvirt.VIR_NETWORK_UPDATE_AFFECT_CONFIG)
    try:
        node.vm("job-7", job=7)
        reserve("job-7", "192.168.122.71")
        reserve("ghost", "192.168.122.72")
        report = node.run(live={7})
        assert results(report) == {f"192.168.122.72 ({mac_for('ghost')})":
                                   ("release-address", "done")}
        left = hypervisor.reservations(node.conn, "default")
        assert mac_for("job-7") in left and mac_for("ghost") not in left
        assert node.run(live={7}).outcomes == []
    finally:
        hypervisor.release_address(node.conn, "default", str(tmp_path), mac_for("job-7"))
        hypervisor.release_address(node.conn, "default", str(tmp_path), mac_for("ghost"))
        node.close()


def test_an_address_held_for_no_vm_is_given_back_and_a_vms_is_kept(tmp_path, trees, monkeypatch):
    """A VM directory removed by hand leaves its address slot held: reconcile gives it back
    (the slot's reservation stays with the network) and keeps a live VM's."""
    node = Node(tmp_path, trees["dgx2"], monkeypatch, libvirt={"network": "default"})
    state = node.env.cfg.host.state_dir
    net = node.conn.networkLookupByName("default")
    try:
        node.vm("job-7", job=7)
        hypervisor.take_address(node.conn, net, state, "job-7", "192.168.122.0/24")
        _, ip = hypervisor.take_address(node.conn, net, state, "ghost", "192.168.122.0/24")
        dry = node.run(live={7}, dry_run=True)
        assert results(dry) == {ip: ("give-back-address", "would do")}
        assert addresses.held(state)[ip] == "ghost"
        report = node.run(live={7})
        assert results(report) == {ip: ("give-back-address", "done")}
        assert addresses.held(state) == {"192.168.122.2": "job-7"}
        assert addresses.slot_mac(ip) in hypervisor.reservations(node.conn, "default")
        assert node.run(live={7}).outcomes == []
    finally:
        for mac in hypervisor.reservations(node.conn, "default"):
            if addresses.is_slot_mac(mac):
                hypervisor.release_address(node.conn, "default", state, mac)
        node.close()


def test_an_active_partition_no_vm_holds_is_deactivated(tmp_path, trees, monkeypatch):
    from slurm_dgxvm.fabric import Fabric
    monkeypatch.setenv("FMPM_STANDIN_STATE", str(tmp_path / "fm.json"))
    monkeypatch.delenv("FMPM_STANDIN_PARTITIONS", raising=False)
    node = Node(tmp_path, trees["dgx-a100"], monkeypatch, fabric={"fmpm": str(STANDIN)})
    try:
        held = node.vm("job-7", job=7, gpu_index=0)          # GPUs 0-3: its partition active
        fm = Fabric(str(STANDIN))
        fm.activate(held.fm_partition)
        fm.activate(2)                                       # GPUs 5-8: nobody's
        report = node.run(live={7})
        assert results(report) == {"partition 2": ("deactivate-fm-partition", "done")}
        assert fm.list()[2] is False and fm.list()[held.fm_partition] is True
        assert node.keys() == [job_key(7)]                   # its hold is gone again
        assert report.to_json()["checked"]["fabric_manager"] == "ok"
        assert node.run(live={7}).outcomes == []
    finally:
        node.close()


def test_a_running_vm_whose_partition_fabric_manager_lost_is_reported_and_left_alone(
        tmp_path, trees, monkeypatch):
    """The stand-in's simulated restart of Fabric Manager (no resiliency mode): every partition
    inactive under running VMs. reconcile says so, changes nothing (dry run or not: no
    partition activated, no domain, file or ledger entry touched), exits 5; once the job is
    gone its VM is deleted as any other, and the inactive partition does not stop it."""
    from slurm_dgxvm.fabric import Fabric
    monkeypatch.setenv("FMPM_STANDIN_STATE", str(tmp_path / "fm.json"))
    monkeypatch.delenv("FMPM_STANDIN_PARTITIONS", raising=False)
    node = Node(tmp_path, trees["dgx-h100"], monkeypatch, fabric={"fmpm": str(STANDIN)})
    try:
        held = node.vm("job-7", job=7, gpu_index=0)
        fm = Fabric(str(STANDIN))
        fm.activate(held.fm_partition)
        r = subprocess.run([str(STANDIN), "--standin-restart"], capture_output=True, text=True,
                           timeout=30)
        assert r.returncode == 0 and "every partition is inactive" in r.stderr
        assert not any(fm.list().values())
        before = node.snapshot()
        for dry_run in (True, False):
            report = node.run(live={7}, dry_run=dry_run)
            assert results(report) == {f"partition {held.fm_partition}": ("none", "left")}
            assert report.exit_code == 5
            doc = report.to_json()
            [f] = doc["findings"]
            assert f["name"] == "job-7" and f["job_id"] == 7
            assert f["why"].startswith("held by VM job-7 but not active in Fabric Manager")
            assert doc["checked"]["fabric_manager"] == "ok"
            assert node.snapshot() == before and not any(fm.list().values())
        report = node.run(live=())                   # the job ended: its VM goes
        assert results(report) == {"job-7": ("delete-vm", "done")}
        assert node.keys() == [] and node.domain("job-7") is None
        assert not any(fm.list().values())
        assert node.run(live=()).outcomes == []
    finally:
        node.close()


def test_a_partition_activated_between_the_two_reads_is_not_taken_for_lost(tmp_path, trees,
                                                                            monkeypatch):
    """A create activates its partition before it starts its domain: reconcile's first read of
    Fabric Manager (before the domains) may miss it. It asks again, and only a partition
    inactive both times is said."""
    node = Node(tmp_path, trees["dgx-a100"], monkeypatch)
    try:
        held = node.vm("vm1", gpu_index=4)
        answers = [{held.fm_partition: False}, {held.fm_partition: True}]
        monkeypatch.setattr(type(node.env.fabric), "list", lambda self: answers.pop(0))
        report = node.run()
        assert report.outcomes == [] and answers == []
    finally:
        node.close()


# -- the command -----------------------------------------------------------------------------------
def test_the_command_prints_one_line_per_finding_and_exits_with_the_reports_code(node, tmp_path,
                                                                              trees,
                                                                              monkeypatch,
                                                                              capsys):
    from slurm_dgxvm.cli.main import main
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "squeue").write_text('#!/bin/sh\n[ "$*" = "-h -w dgx01 -o %A|%T" ] || exit 1\n'
                                   'echo "7|RUNNING"\necho "9|COMPLETING"\n')
    (bindir / "squeue").chmod(0o755)
    cfg = tmp_path / "dgxvm.toml"
    cfg.write_text(f'[host]\nsysfs_root = "{trees["dgx2"]}"\n'
                   f'state_dir = "{node.env.cfg.host.state_dir}"\n'
                   f'[libvirt]\nuri = "test:///default"\nshutdown_timeout_s = 0.1\n'
                   f'[slurm]\nbin_dir = "{bindir}"\n[containers]\ncache_dir = ""\n')
    monkeypatch.setenv("SLURMD_NODENAME", NODE)
    node.vm("job-7", job=7)
    node.vm("job-42", job=42, gpu_index=4)
    assert main(["--config", str(cfg), "reconcile", "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("vm job-42: Slurm has no job 42 on dgx01, yet its VM is here: ")
    assert out[0].endswith("-> delete the VM: would do")
    assert out[-1] == "reconcile dgx01 (dry run): 1 finding(s): 1 would do; exit 0"
    assert main(["--config", str(cfg), "reconcile", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc) == {"node", "dry_run", "consistent", "exit_code", "checked", "findings"}
    assert doc["checked"]["jobs_live"] == [7, 9]
    [f] = doc["findings"]
    assert (f["name"], f["job_id"], f["action"], f["result"]) == ("job-42", 42, "delete-vm", "done")
    assert main(["--config", str(cfg), "reconcile"]) == 0
    assert capsys.readouterr().out == "reconcile dgx01: consistent, nothing to do\n"
    Path(node.env.ledger.path).write_text("{")
    assert main(["--config", str(cfg), "reconcile"]) == 5
    assert "ledger ledger.json: corrupt: invalid JSON" in capsys.readouterr().out
    monkeypatch.delenv("SLURMD_NODENAME")
    assert main(["--config", str(cfg), "reconcile", "--node", "elsewhere", "--json",
                 "--rebuild-ledger"]) == 3        # squeue refuses: job VMs kept, said so
    doc = json.loads(capsys.readouterr().out)
    assert doc["checked"]["slurm"].startswith("not asked: slurm: ")
    assert [f["what"] for f in doc["findings"]] == ["ledger", "slurm"]
    assert node.keys() == [job_key(7)]


# -- the users' image caches -----------------------------------------------------------------------
def test_partial_entries_of_dead_pulls_go_as_the_user_and_a_running_pulls_stays(
        tmp_path, trees, monkeypatch, traversable_tmp):
    """Swept by the cache's own sweep, run as the cache's owner (nobody here): root never walks
    a directory a user controls."""
    import fcntl
    nobody = 65534
    cache_dir = traversable_tmp / "containers"
    cache_dir.mkdir(mode=0o711)
    user = cache_dir / str(nobody)
    dead, running = "a" * 64, "b" * 64
    for sub in ("tmp", "locks", "sha256", "refs", f"tmp/{dead}.4242.0a0b",
                f"tmp/{running}.4343.0c0d", f"tmp/{dead}.4242.0a0b/bundle"):
        (user / sub).mkdir(parents=True)
    (user / f"tmp/{dead}.4242.0a0b/bundle/layer").write_text("half a layer")
    for p in [user, *user.rglob("*")]:
        os.chown(p, nobody, nobody)
    user.chmod(0o700)
    node = Node(tmp_path, trees["dgx2"], monkeypatch, containers={"cache_dir": str(cache_dir)})
    lock = user / "locks" / f"sha256-{running}.lock"
    lock.touch()
    os.chown(lock, nobody, nobody)                    # the user's, as the pull made it
    fd = os.open(lock, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)                    # a pull of that digest is running
    try:
        before = node.snapshot()
        dry = node.run(dry_run=True)
        assert results(dry) == {str(user): ("sweep-image-cache", "would do")}
        assert dry.outcomes[0].finding.details == (f"{dead}.4242.0a0b",)
        assert node.snapshot() == before and (user / f"tmp/{dead}.4242.0a0b").exists()
        report = node.run()
        assert results(report) == {str(user): ("sweep-image-cache", "done")}
        assert sorted(os.listdir(user / "tmp")) == [f"{running}.4343.0c0d"]
        assert node.run().outcomes == []
    finally:
        os.close(fd)
        node.close()
    report = Node(tmp_path, trees["dgx2"], monkeypatch,
                  containers={"cache_dir": str(cache_dir)}).run()
    assert results(report) == {str(user): ("sweep-image-cache", "done")}   # its pull died
    assert os.listdir(user / "tmp") == []


# -- what a user does to their own cache never hangs, fails or forges reconcile ----------------------
NOBODY = 65534
DEAD = "d" * 64


def users_cache(traversable_tmp: Path, *entries: tuple[str, str]) -> tuple[Path, Path]:
    """``<cache_dir>/65534`` (nobody's, 0700) with ``entries``: (relative path, "dir" | "file"
    | "fifo"), all nobody's as the user would have made them."""
    cache_dir = traversable_tmp / "containers"
    cache_dir.mkdir(mode=0o711, exist_ok=True)
    user = cache_dir / str(NOBODY)
    for sub in ("tmp", "locks", "sha256", "refs"):
        (user / sub).mkdir(parents=True, exist_ok=True)
    for rel, kind in entries:
        p = user / rel
        if kind == "dir":
            p.mkdir()
        elif kind == "file":
            p.write_text("x")
        else:
            os.mkfifo(p)
    for p in [user, *user.rglob("*")]:
        os.lchown(p, NOBODY, NOBODY)
    user.chmod(0o700)
    return cache_dir, user


def cache_node(tmp_path, trees, monkeypatch, cache_dir: Path) -> Node:
    return Node(tmp_path, trees["dgx2"], monkeypatch, containers={"cache_dir": str(cache_dir)})


def test_a_fifo_at_a_pull_lock_skips_that_cache_naming_it_and_reconcile_ends(
        tmp_path, trees, monkeypatch, traversable_tmp):
    """Before: the lock was opened without O_NONBLOCK, and reconcile waited on the FIFO for
    ever. Now the cache is skipped with a line that names it and why; the exit status is 0 (a
    user's files are not the node's state, and must not fail the node-start unit)."""
    cache_dir, user = users_cache(traversable_tmp, (f"tmp/{DEAD}.1.aa", "dir"),
                                  (f"locks/sha256-{DEAD}.lock", "fifo"))
    node = cache_node(tmp_path, trees, monkeypatch, cache_dir)
    try:
        for dry_run in (True, False):
            t0 = time.monotonic()
            report = node.run(dry_run=dry_run)
            assert time.monotonic() - t0 < 3.0
            [o] = report.outcomes
            assert (o.finding.what, o.finding.subject, o.result) == \
                ("image-cache", str(user), "skipped")
            assert o.line().startswith(
                f"image-cache {user}: could not be read as uid {NOBODY}: {user}/locks/sha256-"
                f"{DEAD}.lock is a FIFO (named pipe), not a regular file -> nothing: skipped: ")
            assert report.exit_code == 0
        assert (user / f"tmp/{DEAD}.1.aa").is_dir()                  # nothing touched
    finally:
        node.close()


def test_a_user_stopping_the_reader_costs_reconcile_the_deadline_and_leaves_no_process(
        tmp_path, trees, monkeypatch, traversable_tmp):
    """kill -STOP of the process reading the cache as the user (here it stops itself, as the
    user's kill would): reconcile goes on at the deadline, names the cache, and the stopped
    process is gone (killed and reaped, not left stopped or a zombie)."""
    from slurm_dgxvm.reconcile import cache_partials
    from slurm_dgxvm.shares import asuser
    cache_dir, user = users_cache(traversable_tmp, (f"tmp/{DEAD}.1.aa", "dir"))
    pids = traversable_tmp / "pids"
    pids.mkdir(mode=0o777)
    pids.chmod(0o777)

    def stalled(path):
        (pids / str(os.getpid())).touch()
        os.kill(os.getpid(), 19)                    # SIGSTOP
    monkeypatch.setattr(cache_partials, "_free_partials", stalled)
    monkeypatch.setattr(asuser, "DEADLINE_S", 0.5)
    node = cache_node(tmp_path, trees, monkeypatch, cache_dir)
    try:
        t0 = time.monotonic()
        report = node.run()
        assert time.monotonic() - t0 < 0.5 + 2.5
    finally:
        node.close()
    [o] = report.outcomes
    assert o.result == "skipped" and report.exit_code == 0
    assert f"image-cache {user}: could not be read as uid {NOBODY}: the user's files did " \
           f"not answer within 0.5s (listing its partial entries)" in o.line()
    [pid] = [int(p.name) for p in pids.iterdir()]
    assert not Path(f"/proc/{pid}").exists()


def test_rebuild_ledger_does_not_hold_the_ledger_lock_while_a_users_cache_stalls(
        tmp_path, trees, monkeypatch, traversable_tmp):
    """With --rebuild-ledger the node was read under the ledger's lock, the users' caches with
    it: a user stopping that read held every Prolog at the ledger. Now the caches are read
    after the rebuild, under no lock."""
    from slurm_dgxvm import fsutil
    from slurm_dgxvm.reconcile import cache_partials
    from slurm_dgxvm.shares import asuser
    cache_dir, user = users_cache(traversable_tmp, (f"tmp/{DEAD}.1.aa", "dir"))
    monkeypatch.setattr(cache_partials, "_free_partials", lambda p: os.kill(os.getpid(), 19))
    monkeypatch.setattr(asuser, "DEADLINE_S", 0.5)
    node = cache_node(tmp_path, trees, monkeypatch, cache_dir)
    real_find, free = cache_partials.find, []

    def find(cfg):
        try:                                        # what a Prolog would meet meanwhile
            with fsutil.locked(node.env.ledger.lock_path, timeout=0, timed_out=TimeoutError,
                               failed=lambda e: e):
                free.append(True)
        except TimeoutError:
            free.append(False)
        return real_find(cfg)
    monkeypatch.setattr(cache_partials, "find", find)
    try:
        node.vm("vm1", gpu_index=0)
        Path(node.env.ledger.path).write_bytes(b"{")
        report = node.run(rebuild_ledger=True)
    finally:
        node.close()
    assert free == [True]
    assert results(report) == {"ledger.json": ("rebuild-ledger", "done"),
                               str(user): ("none", "skipped")}
    assert report.exit_code == 0


def test_a_fifo_among_the_partials_is_swept_not_waited_on(tmp_path, trees, monkeypatch,
                                                          traversable_tmp):
    """rmtree opens what it removes before it looks: a FIFO a user left in tmp/ made the sweep
    wait for a writer. Now it is unlinked like any file."""
    from slurm_dgxvm.reconcile import cache_partials
    monkeypatch.setattr(cache_partials, "SWEEP_DEADLINE_S", 3.0)
    cache_dir, user = users_cache(traversable_tmp, (f"tmp/{DEAD}.1.aa", "fifo"),
                                  (f"tmp/{'e' * 64}.2.bb", "dir"))
    node = cache_node(tmp_path, trees, monkeypatch, cache_dir)
    try:
        report = node.run()
    finally:
        node.close()
    [o] = report.outcomes
    assert (o.finding.action, o.result) == ("sweep-image-cache", "done"), o.line()
    assert os.listdir(user / "tmp") == []


def test_names_in_a_users_cache_cannot_forge_reconciles_output(tmp_path, trees, monkeypatch,
                                                               traversable_tmp, capsys):
    from slurm_dgxvm.cli.main import main
    evil = f"{DEAD}.1.\n\x1b[1Avm job-1: fake -> delete the VM: done\x1b[K"
    cache_dir, user = users_cache(traversable_tmp, (f"tmp/{evil}", "dir"))
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "squeue").write_text("#!/bin/sh\nexit 0\n")
    (bindir / "squeue").chmod(0o755)
    cfg = tmp_path / "dgxvm.toml"
    cfg.write_text(f'[host]\nsysfs_root = "{trees["dgx2"]}"\n'
                   f'state_dir = "{tmp_path / "state"}"\n'
                   f'[libvirt]\nuri = "test:///default"\n'
                   f'[slurm]\nbin_dir = "{bindir}"\n[containers]\ncache_dir = "{cache_dir}"\n')
    assert main(["--config", str(cfg), "reconcile", "--dry-run", "--node", NODE]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out
    assert out.splitlines() == [
        f"image-cache {user}: 1 partial entry in tmp/ of pulls that died (no pull holds its "
        f"lock) -> remove them with the cache's own sweep: would do",
        f"  {DEAD}.1.\\n\\x1b[1Avm job-1: fake -> delete the VM: done\\x1b[K",
        f"reconcile {NODE} (dry run): 1 finding(s): 1 would do; exit 0"]
    assert main(["--config", str(cfg), "reconcile", "--node", NODE]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "removed " + DEAD + ".1.\\n\\x1b[1Avm job-1" in out
    assert os.listdir(user / "tmp") == []


def test_a_cache_something_is_mounted_over_is_left_out_without_root_entering_it(
        traversable_tmp):
    """A user's FUSE mount over their own cache (here a tmpfs stands for it): root lists
    ``<cache_dir>`` and looks at each entry through a descriptor that crosses no mount, so a
    stopped daemon is never asked anything; that cache is left out, the others are listed."""
    from slurm_dgxvm.reconcile import cache_partials
    cache_dir, user = users_cache(traversable_tmp, (f"tmp/{DEAD}.1.aa", "dir"))
    other = cache_dir / "54999"
    other.mkdir(mode=0o700)
    os.chown(other, 54999, 54999)
    cfg = config_mod.from_dict({"containers": {"cache_dir": str(cache_dir)}})
    assert [p for p, _, _ in cache_partials.user_caches(cfg)] == [other, user]
    # the mount's root looks like the user's cache (their uid, 0700): only not entering it
    # tells it apart
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size=64k,uid={NOBODY},gid={NOBODY},"
                    "mode=0700", "tmpfs", str(user)], check=True)
    try:
        assert cache_partials.user_caches(cfg) == [(other, 54999, 54999)]
    finally:
        subprocess.run(["umount", str(user)], check=True)
