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
