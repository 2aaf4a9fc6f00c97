"""Warm VMs (slurm_dgxvm.lifecycle.warm) and the pieces of their claim: the ledger's commit
point, which VM a job may claim, the shares plugged into a running VM, the seed files a claim
sends. The claim itself, on a real guest, is tests/integration/test_warm_vms.py."""

from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace

import pytest

from slurm_dgxvm import seed as seed_mod
from slurm_dgxvm.ledger import Ledger
from slurm_dgxvm.lifecycle import warm
from slurm_dgxvm.shares import hotplug
from test_ledger import mk


def test_warm_names():
    assert warm.is_warm("warm-1") and warm.is_warm("warm-123")
    assert not warm.is_warm("warm-") and not warm.is_warm("job-1") and not warm.is_warm("warm-1x")


@pytest.fixture()
def ledger_env(tmp_path):
    ledger = Ledger(tmp_path)
    ledger.allocate(mk("domain:warm-1", gpus=(0, 1), cpus=(1, 2)))
    ledger.allocate(mk("job:9", gpus=(2, 3)))
    return SimpleNamespace(ledger=ledger)


def req(job_id, user="bob", slurm_gpus=(0, 1)):
    return SimpleNamespace(job_id=job_id, user=user,
                           placement=SimpleNamespace(slurm_gpus=slurm_gpus))


def test_the_claim_commits_in_one_transaction_and_a_second_claim_finds_it_gone(ledger_env):
    ledger_env.ledger.allocate(mk("domain:dgxvm-warm-1", gpus=(4, 5)))   # not its key
    assert warm._commit(ledger_env, req(42), "dgxvm-warm-1") is True     # keyed domain:NAME
    allocs = ledger_env.ledger.read().allocations
    held = allocs["job:42"]
    assert "domain:dgxvm-warm-1" not in allocs
    assert (held.owner, held.job_id, held.user, held.domain) == ("job", 42, "bob",
                                                                  "dgxvm-dgxvm-warm-1")
    assert held.gpus == (4, 5) and held.slurm_gpus == (0, 1)
    # another job racing for the same VM: nothing changes, it goes cold
    before = ledger_env.ledger.read()
    assert warm._commit(ledger_env, req(43), "dgxvm-warm-1") is False
    assert ledger_env.ledger.read().allocations == before.allocations


def test_a_job_whose_entry_exists_does_not_claim(ledger_env):
    ledger_env.ledger.allocate(mk("domain:w", gpus=(6,)))
    ledger_env.ledger.allocate(mk("job:44", gpus=(7,)))
    assert warm._commit(ledger_env, req(44), "w") is False
    assert "domain:w" in ledger_env.ledger.read().allocations


def test_waiting_lists_only_unclaimed_warm_vms(tmp_path):
    ledger = Ledger(tmp_path)
    for a in (mk("domain:a", gpus=(0,)), mk("job:5", gpus=(1,)), mk("domain:b", gpus=(2,))):
        ledger.allocate(a)
    allocs = dict(ledger.read().allocations)
    # mk names the domain dgxvm-NAME; a warm VM is warm-N under domain:warm-N
    from dataclasses import replace
    ledger2 = Ledger(tmp_path / "2")
    ledger2.allocate(replace(allocs["domain:a"], key="domain:warm-1", domain="warm-1"))
    ledger2.allocate(replace(allocs["job:5"], domain="warm-2"))          # claimed by job 5
    ledger2.allocate(replace(allocs["domain:b"], key="domain:warm-3", domain="warm-4"))
    assert set(warm.waiting(SimpleNamespace(ledger=ledger2))) == {"warm-1"}


# -- the shares plugged into a running VM ----------------------------------------------------------
PORT = "<controller type='pci' index='%d' model='pcie-root-port'><address type='pci' " \
       "bus='0x00' slot='0x01' function='%#x'/></controller>"
DOMAIN = ("<domain><devices><controller type='pci' index='0' model='pcie-root'/>"
          + "".join(PORT % (i, i - 1) for i in range(1, 5))
          + "<controller type='usb' index='0'><address type='pci' bus='0x02' slot='0x00'/>"
            "</controller><disk><address type='pci' bus='0x01' slot='0x00'/></disk>"
            "<serial><address type='virtio-serial' controller='0' bus='0' port='1'/></serial>"
            "%s</devices></domain>")


def test_a_share_is_plugged_into_the_first_root_port_nothing_uses():
    assert hotplug.free_root_port(DOMAIN % "") == 3
    plugged = "<filesystem><address type='pci' bus='0x03' slot='0x00'/></filesystem>"
    assert hotplug.free_root_port(DOMAIN % plugged) == 4
    full = plugged + "<interface><address type='pci' bus='0x04' slot='0x00'/></interface>"
    assert hotplug.free_root_port(DOMAIN % full) is None


def test_the_filesystem_xml_names_the_socket_tag_and_port():
    fs = ET.fromstring(hotplug.filesystem_xml(Path("/v/w'1/share.sock"), "dgxvm-ab", 5))
    assert fs.find("source").get("socket") == "/v/w'1/share.sock"
    assert fs.find("target").get("dir") == "dgxvm-ab"
    assert fs.find("driver").get("type") == "virtiofs"
    assert int(fs.find("address").get("bus"), 0) == 5
    assert ET.fromstring(hotplug.filesystem_xml(Path("/s"), "t")).find("address") is None


def _sleeper(*argv):
    import time
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", *argv],
                         start_new_session=True)
    for _ in range(200):                # until it has exec'd (its arguments are its own)
        if argv[-1].encode() in Path(f"/proc/{p.pid}/cmdline").read_bytes():
            break
        time.sleep(0.01)
    return p


def test_stop_ends_only_the_process_started_for_that_share(tmp_path):
    spec = tmp_path / "share.json"
    other = _sleeper("unrelated")
    try:
        (tmp_path / "share.pid").write_text(f"{other.pid}\n")
        hotplug.stop(spec)              # a PID that is not the share's: left alone
        assert other.poll() is None
        assert not (tmp_path / "share.pid").exists()
    finally:
        other.kill()
        other.wait()
    ours = _sleeper(str(spec))
    (tmp_path / "share.pid").write_text(f"{ours.pid}\n")
    (tmp_path / "share.sock").write_text("")
    hotplug.stop(spec)
    assert ours.wait(timeout=10) is not None
    assert not (tmp_path / "share.sock").exists()
    hotplug.stop(spec)                  # idempotent


# -- what a claim sends the guest ------------------------------------------------------------------
def test_a_claim_sends_the_identity_but_no_host_key():
    spec = seed_mod.SeedSpec(
        instance_id="warm-1-1", hostname="warm-1", user_name="john.doe", uid=1001, gid=1001,
        home="/home/john doe", authorized_keys=("ssh-ed25519 AAAA job",),
        host_key_private="-----BEGIN OPENSSH PRIVATE KEY-----\nx\n"
                         "-----END OPENSSH PRIVATE KEY-----\n",
        host_key_public="ssh-ed25519 BBBB host", groups=(("dömain", 5000),),
        mounts=(seed_mod.Mount(tag="dgxvm-1", path="/w d", fstype="virtiofs"),))
    files = seed_mod.claim_files(spec)
    assert tuple(files) == seed_mod.CLAIM_FILES
    assert not any("PRIVATE" in text for text, _mode in files.values())
    assert files["user"][0] == "john.doe 1001 1001 /home/john%20doe\n"
    assert files["groups"][0] == "d%C3%B6main 5000\n"
    assert files["mounts"][0] == "dgxvm-1 /w%20d virtiofs\n"
    # the guest script accepts exactly these names
    script = warm.CLAIM_SCRIPT.read_text()
    assert "|".join(seed_mod.CLAIM_FILES) in script


def test_a_warm_vms_domain_has_shared_memory_and_spare_root_ports(trees):
    from slurm_dgxvm.design import designer, domain_xml, design
    from slurm_dgxvm.placement import EMPTY, Policy, Request, place
    from slurm_dgxvm.topology import SysfsRoot, discover
    from test_design import IMAGE, vm_inputs
    from dataclasses import replace
    host = discover(SysfsRoot(str(trees["dgx2"])))
    p = place(host, EMPTY, Request(count=1), Policy())
    spec = design(host, p, IMAGE, replace(vm_inputs(workdir=None), shares_later=True),
                  domain_type="kvm")
    root = ET.fromstring(domain_xml(spec))
    assert root.find("./memoryBacking/access").get("mode") == "shared"
    spare = [c for c in root.findall("./devices/controller")
             if c.get("model") == "pcie-root-port" and c.get("index") is None]
    assert len(spare) == designer.SPARE_ROOT_PORTS
    cold = design(host, p, IMAGE, vm_inputs(workdir=None), domain_type="kvm")
    assert cold.spare_root_ports == 0 and not cold.memory_shared


# -- the policy: fixed counts and the counts of the partition's last jobs --------------------------
@pytest.fixture()
def policy_env(tmp_path):
    from slurm_dgxvm.config import from_dict
    cfg = from_dict({"host": {"state_dir": str(tmp_path)},
                     "partitions": {"fixed": {"warm": [8]},
                                    "follow": {"warm": [8], "warm_recent": 3},
                                    "only": {"warm_recent": 2}}})
    recs: dict[str, SimpleNamespace] = {}
    return SimpleNamespace(cfg=cfg, ledger=Ledger(tmp_path / "ledger"),
                           vms=SimpleNamespace(load=recs.get), recs=recs, dir=tmp_path)


def test_a_policy_follows_the_distinct_counts_of_the_last_n_jobs_after_its_fixed_ones(policy_env):
    assert warm.policy(policy_env, "follow") == [8] and warm.policy(policy_env, "only") == []
    for gpus in (2, 8, 4, 2, 1):                 # jobs ending, oldest first
        for p in ("follow", "only", "fixed"):
            warm.remember(policy_env, p, gpus)
    assert warm.recent(policy_env, "follow") == [1, 2, 4]          # last 3: 1, 2, 4
    assert warm.policy(policy_env, "follow") == [8, 1, 2, 4]
    assert warm.policy(policy_env, "only") == [1, 2]               # last 2
    assert warm.policy(policy_env, "fixed") == [8]                 # follows nothing
    doc = __import__("json").loads((policy_env.dir / warm.RECENT).read_text())
    assert doc == {"follow": [1, 2, 4, 8, 2], "only": [1, 2, 4, 8, 2]}
    assert (policy_env.dir / warm.RECENT).stat().st_mode & 0o777 == 0o600


def test_the_recorded_counts_are_bounded_and_a_damaged_file_is_a_fresh_start(policy_env):
    for _ in range(100):
        warm.remember(policy_env, "only", 2)
    doc = __import__("json").loads((policy_env.dir / warm.RECENT).read_text())
    assert doc["only"] == [2] * 64
    (policy_env.dir / warm.RECENT).write_text('{"only": [4, "x", 99, -1, 2], "fixed": 3}')
    assert warm.recent(policy_env, "only") == [4, 2]              # what is a count
    (policy_env.dir / warm.RECENT).write_text("not json")
    assert warm.recent(policy_env, "only") == []
    warm.remember(policy_env, "only", 4)
    assert warm.policy(policy_env, "only") == [4]


def test_wanted_is_the_policy_less_the_warm_vms_waiting_for_that_partition(policy_env):
    for gpus in (2, 4):
        warm.remember(policy_env, "follow", gpus)             # policy: [8, 4, 2]
    for name, gpus, part in (("warm-1", (0, 1, 2, 3), "follow"), ("warm-2", (4, 5), "only")):
        policy_env.ledger.allocate(mk(f"domain:{name}", gpus=gpus))
        policy_env.recs[name] = SimpleNamespace(extra={"partition": part},
                                                placement=SimpleNamespace(gpus=gpus))
    from dataclasses import replace
    allocs = policy_env.ledger.read().allocations
    ledger = Ledger(policy_env.dir / "ledger2")
    for name in ("warm-1", "warm-2"):
        ledger.allocate(replace(allocs[f"domain:{name}"], domain=name))
    policy_env.ledger = ledger
    assert warm.wanted(policy_env, "follow") == [8, 2]        # its 4 waits; warm-2 is another's


def test_the_refill_log_is_rotated_past_its_bound_one_old_copy_kept(tmp_path):
    log = tmp_path / warm.REFILL_LOG
    warm.rotate_log(tmp_path)                                  # none yet: nothing to do
    log.write_bytes(b"a" * (warm.REFILL_LOG_MAX - 1))
    warm.rotate_log(tmp_path)
    assert log.exists() and not (tmp_path / (warm.REFILL_LOG + ".1")).exists()
    log.write_bytes(b"b" * warm.REFILL_LOG_MAX)
    warm.rotate_log(tmp_path)
    assert not log.exists() and (tmp_path / (warm.REFILL_LOG + ".1")).read_bytes()[:1] == b"b"
    log.write_bytes(b"c" * warm.REFILL_LOG_MAX)
    warm.rotate_log(tmp_path)
    assert (tmp_path / (warm.REFILL_LOG + ".1")).read_bytes()[:1] == b"c"


def test_the_warm_vms_a_policy_no_longer_keeps_are_its_surplus_the_newest_first(policy_env):
    warm.remember(policy_env, "only", 2)                       # policy: [2]
    import time as _time
    for name, gpus, part in (("warm-1", (0, 1), "only"), ("warm-2", (2, 3), "only"),
                             ("warm-3", (4, 5, 6, 7), "only"), ("warm-4", (8,), "fixed")):
        policy_env.ledger.allocate(mk(f"domain:{name}", gpus=gpus))
        policy_env.recs[name] = SimpleNamespace(extra={"partition": part},
                                                placement=SimpleNamespace(gpus=gpus))
    from dataclasses import replace
    allocs = policy_env.ledger.read().allocations
    ledger = Ledger(policy_env.dir / "ledger2")
    now = _time.time()
    for i, name in enumerate(("warm-1", "warm-2", "warm-3", "warm-4")):
        ledger.allocate(replace(allocs[f"domain:{name}"], domain=name, created=now + i))
    policy_env.ledger = ledger
    # the oldest 2-GPU one is kept; the second 2-GPU and the 4-GPU one are beyond the policy;
    # another partition's warm VM is not this partition's to judge
    assert warm.surplus(policy_env, "only") == ["warm-2", "warm-3"]
    assert warm.surplus(policy_env, "fixed") == ["warm-4"]    # keeps [8], not 1 GPU
    assert warm.wanted(policy_env, "fixed") == [8]


@pytest.mark.parametrize("shell", [["busybox", "sh"], ["dash"]])
def test_the_claim_script_parses_in_both_guests_shells_and_brings_its_seed_readers(shell):
    """The test guest runs it with busybox sh, a Debian cloud guest with dash (its /bin/sh):
    both parse it, and it carries the readers it calls rather than trusting the image's."""
    script = warm.claim_script()
    r = subprocess.run([*shell, "-n", "-c", script], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    defined = subprocess.run([*shell, "-c", script.split("\nset -u\n")[0] + "\nfor f in "
                              "pct_decode seed_account seed_group seed_subids share_options; "
                              "do command -v $f; done"], capture_output=True, text=True)
    assert defined.stdout.split() == ["pct_decode", "seed_account", "seed_group", "seed_subids",
                                      "share_options"], defined.stderr


# -- where a claim places the job ----------------------------------------------------------------
def test_a_job_is_placed_on_the_block_of_a_warm_vm_of_its_size_when_one_is_free(trees):
    """Slurm's indices are only a count: a 2-GPU job whose Slurm GPUs (2, 3) form a free aligned
    block still goes to the 2-GPU warm VM's block (8-9), whose claim spares it the boot; with no
    warm VM of its size it goes where a cold start puts it."""
    from slurm_dgxvm.ledger import Allocation
    from slurm_dgxvm.placement import EMPTY, Occupancy, Policy, Request, place
    from slurm_dgxvm.topology import SysfsRoot, discover
    host = discover(SysfsRoot(str(trees["dgx2"])))
    job = place(host, EMPTY, Request(count=2, gpu_index=0), Policy())
    taken = Occupancy.union([Allocation.from_placement("job:7", job, owner="job", job_id=7,
                                                       domain="j7", user="u").occupancy()])
    warm2 = Allocation.from_placement("domain:warm-1", place(
        host, taken, Request(count=2, gpu_index=8), Policy()), owner="domain", domain="warm-1")
    warm4 = Allocation.from_placement("domain:warm-2", place(
        host, taken, Request(count=4, gpu_index=12), Policy()), owner="domain", domain="warm-2")
    vms = {"warm-1": warm2, "warm-2": warm4}
    req = Request(count=2, slurm_gpus=(2, 3))
    p = warm_mod_place(host, taken, req, vms)
    assert p.gpus == (8, 9)
    assert warm_mod_place(host, taken, Request(count=1, slurm_gpus=(2,)), vms).gpus \
        == place(host, taken, Request(count=1, slurm_gpus=(2,)), Policy()).gpus == (2,)
    # a warm VM's block a job holds part of (a ledger out of step) is passed over
    other = Occupancy.union([taken, Allocation.from_placement(
        "job:8", place(host, taken, Request(count=1, gpu_index=9), Policy()), owner="job",
        job_id=8, domain="j8", user="u").occupancy()])
    assert warm_mod_place(host, other, req, vms).gpus == (2, 3)


def warm_mod_place(host, taken, req, warm_vms):
    from slurm_dgxvm.placement import Policy
    return warm.place_for_claim(host, taken, req, Policy(), warm_vms)


def test_a_refill_boots_the_next_size_when_one_does_not_fit_now(policy_env, monkeypatch):
    """Policy [8, 2] on a busy node: no 8-GPU block is free, so the 2-GPU one is booted rather
    than nothing; the refill then stops saying why the 8 did not fit."""
    from slurm_dgxvm.errors import NoFit
    warm.remember(policy_env, "follow", 2)                      # follow: warm [8] + recent [2]
    booted = []

    def boot_for(env, partition, gpus, progress=None):
        if gpus == 8:
            raise NoFit(count=8, resource="gpus", reason="only 4 GPU(s) free")
        name = f"warm-{len(booted) + 1}"
        booted.append(gpus)
        env.ledger.allocate(mk(f"domain:{name}", gpus=(0, 1)))
        env.recs[name] = SimpleNamespace(extra={"partition": partition},
                                         placement=SimpleNamespace(gpus=(0, 1)), state="running")
        return SimpleNamespace(name=name)
    monkeypatch.setattr(warm, "boot_for", boot_for)
    monkeypatch.setattr(warm, "waiting", lambda env: {
        k.split(":", 1)[1]: a for k, a in env.ledger.read().allocations.items()})
    names, why = warm.refill(policy_env, "follow", lambda: "IDLE")
    assert names == ["warm-1"] and booted == [2]
    assert why.startswith("no free block of 8 GPU(s): ") and "only 4 GPU(s) free" in why


def test_a_job_cancels_the_boot_of_a_warm_vm_in_its_way_only_while_it_boots(policy_env):
    for name, state in (("warm-1", "creating"), ("warm-2", "running")):
        (policy_env.dir / "vms" / name).mkdir(parents=True)
        policy_env.recs[name] = SimpleNamespace(state=state)
    policy_env.vms.dir = lambda name: policy_env.dir / "vms" / name
    warm.cancel_boot(policy_env, "warm-1")
    warm.cancel_boot(policy_env, "warm-2")
    warm.cancel_boot(policy_env, "warm-3")                     # placed, no directory yet
    assert (policy_env.dir / "vms" / "warm-1" / warm.WARM_CANCEL).exists()
    assert not (policy_env.dir / "vms" / "warm-2" / warm.WARM_CANCEL).exists()
    assert not (policy_env.dir / "vms" / "warm-3").exists()


def test_a_job_that_fits_beside_the_warm_vms_leaves_them_and_one_that_does_not_goes_through(
        trees):
    """A 1-GPU job while a 2-GPU warm VM sits on 0-1 goes to GPU 2, not onto the warm VM; a
    16-GPU job has nowhere else to go and gets the whole node, warm VM included (in its way)."""
    from slurm_dgxvm.ledger import Allocation
    from slurm_dgxvm.placement import EMPTY, Policy, Request, place
    from slurm_dgxvm.topology import SysfsRoot, discover
    host = discover(SysfsRoot(str(trees["dgx2"])))
    w = Allocation.from_placement("domain:warm-1", place(host, EMPTY, Request(count=2),
                                                         Policy()), owner="domain",
                                  domain="warm-1")
    assert w.gpus == (0, 1)
    assert place(host, EMPTY, Request(count=1), Policy()).gpus == (0,)     # without warm VMs
    assert warm_mod_place(host, EMPTY, Request(count=1), {"warm-1": w}).gpus != (0,)
    assert set(warm_mod_place(host, EMPTY, Request(count=1), {"warm-1": w}).gpus) \
        .isdisjoint(w.gpus)
    assert warm_mod_place(host, EMPTY, Request(count=16), {"warm-1": w}).gpus == tuple(range(16))
