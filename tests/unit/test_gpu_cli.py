"""``dgxvm gpu show|check|clear``, ``dgxvm health`` and the degraded topology, as an admin
runs them against a simulated DGX-2 with injected faults; Slurm's scontrol is a stand-in that
keeps the node's state in files (what it was asked is what the test checks)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from slurm_dgxvm.cli.main import main
from slurm_dgxvm.simulate import render
from slurm_dgxvm.simulate.faults import inject
from test_slurm_hooks import image_store  # noqa: F401 - a fixture

SCONTROL = r"""#!/bin/sh
d=$(dirname "$0")
echo "$*" >> "$d/calls"
case "$1 $2" in
  "show node") printf 'NodeName=%s Arch=x86_64 State=%s Reason=%s [root@2026-11-27T06:00:00]\n' \
                 "$4" "$(cat "$d/state")" "$(cat "$d/reason")";;
  "update NodeName="*)
    case "$3" in
      State=DRAIN) echo "IDLE+DRAIN" > "$d/state"; echo "${4#Reason=}" > "$d/reason";;
      State=RESUME) echo IDLE > "$d/state"; : > "$d/reason";;
    esac;;
esac
"""


@pytest.fixture
def node(tmp_path, image_store):  # noqa: F811
    """A simulated DGX-2 of the test's own, its config, and a stand-in scontrol."""
    root = render("dgx2", tmp_path / "sys")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "scontrol").write_text(SCONTROL)
    (bindir / "scontrol").chmod(0o755)
    (bindir / "state").write_text("IDLE\n")
    (bindir / "reason").write_text("\n")
    cfg = tmp_path / "dgxvm.toml"

    def configure(min_block_gpus=1):
        cfg.write_text(f'[host]\nsysfs_root = "{root}"\nstate_dir = "{tmp_path / "state"}"\n'
                       f'[libvirt]\nuri = "test:///default"\n'
                       f'[images]\nstore = "{image_store}"\n'
                       f'[health]\nmin_block_gpus = {min_block_gpus}\n'
                       f'[slurm]\nbin_dir = "{bindir}"\n')
    configure()

    class Node:
        pass
    n = Node()
    n.root, n.bin, n.configure = root, bindir, configure

    def dgxvm(*args):
        return main(["--config", str(cfg), *args])
    n.dgxvm = dgxvm
    n.calls = lambda: (bindir / "calls").read_text().splitlines() if (bindir / "calls").exists() else []
    n.state = lambda: ((bindir / "state").read_text().strip(), (bindir / "reason").read_text().strip())
    return n


def test_a_fresh_node_shows_every_gpu_and_nvswitch_free_and_says_it_is_simulated(node, capsys):
    assert node.dgxvm("gpu", "show", "--json") == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["simulated"] == "dgx2" and doc["missing"] == []
    assert [d["kind"] for d in doc["devices"]].count("gpu") == 16
    assert [d["kind"] for d in doc["devices"]].count("nvswitch") == 12
    assert {d["state"] for d in doc["devices"]} == {"free"}
    assert node.dgxvm("gpu", "show") == 0
    out = capsys.readouterr().out
    assert "SIMULATED (dgx2)" in out and "28 device(s): 0 quarantined" in out


def test_a_faulty_free_gpu_is_found_quarantined_shown_and_cleared_only_once_repaired(
        node, capsys):
    inject(node.root, 3, "fell-off-bus")
    assert node.dgxvm("gpu", "check") == 0
    out = capsys.readouterr().out
    pci = next(line.split()[0] for line in out.splitlines() if "QUARANTINED" in line)
    assert "QUARANTINED: config space reads all ones (fell off the bus)" in out
    assert "1 newly quarantined" in out
    assert node.dgxvm("gpu", "show") == 0
    out = capsys.readouterr().out
    assert "1 quarantined" in out and "DEGRADED" in out
    assert f"{pci}  quarantined by dgxvm gpu check: config space reads all ones" in out
    assert "simulated fault: " + pci + " fell-off-bus" in out
    assert node.dgxvm("topology", "show") == 0
    out = capsys.readouterr().out
    assert "DEGRADED       1 device(s) quarantined (Q)" in out and f"Q {pci}: config" in out
    # still broken: the clear is refused with the reason, and nothing changes
    assert node.dgxvm("gpu", "clear", "3") == 5
    assert "still fails its check: config space reads all ones" in capsys.readouterr().err
    inject(node.root, pci, "clear")
    assert node.dgxvm("gpu", "clear", "3", "--note", "reseated") == 0
    assert f"{pci}: cleared" in capsys.readouterr().out
    assert node.dgxvm("gpu", "show", "--json") == 0
    dev = next(d for d in json.loads(capsys.readouterr().out)["devices"] if d["pci"] == pci)
    assert dev["state"] == "free"
    assert [(e["event"], e.get("reason")) for e in dev["history"]] == [
        ("quarantined", "config space reads all ones (fell off the bus)"),
        ("cleared", "reseated")]


def test_clear_names_what_is_wrong_with_its_argument(node, capsys):
    assert node.dgxvm("gpu", "clear", "99") == 2
    assert "'99' is not a GPU or NVSwitch of this host" in capsys.readouterr().err
    assert node.dgxvm("gpu", "clear", "0") == 5
    assert "is not quarantined; nothing to clear" in capsys.readouterr().err


def test_health_on_a_healthy_node_is_one_line_exit_0_and_touches_no_drain(node, capsys):
    assert node.dgxvm("health", "--node", "dgx01") == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("dgxvm health: dgx01 OK (SIMULATED host): ")
    assert not any("update" in c for c in node.calls())


def test_health_drains_when_quarantine_leaves_no_vm_large_enough_then_resumes_its_own_drain(
        node, capsys):
    node.configure(min_block_gpus=16)
    inject(node.root, 0, "aer-fatal")
    assert node.dgxvm("health", "--node", "dgx01") == 1
    line = capsys.readouterr().out.strip()
    assert line.startswith("dgxvm health: capacity: 1 GPU(s)/NVSwitch(es) quarantined or "
                           "missing leave no 16-GPU VM possible")
    assert line.endswith("; node drained")
    state, reason = node.state()
    assert state == "IDLE+DRAIN" and reason.startswith("dgxvm health: capacity:")
    # 8-GPU jobs are enough for this site: degraded, not drained; its own drain is lifted
    node.configure(min_block_gpus=8)
    assert node.dgxvm("health", "--node", "dgx01") == 0
    assert "OK (SIMULATED host): DEGRADED: largest VM possible: 8 GPU(s)" in \
        capsys.readouterr().out
    assert node.state() == ("IDLE", "")


def test_health_leaves_a_node_drained_by_someone_else_alone(node, capsys):
    (node.bin / "state").write_text("IDLE+DRAIN\n")
    (node.bin / "reason").write_text("bad fan\n")
    assert node.dgxvm("health", "--node", "dgx01") == 0
    assert node.state() == ("IDLE+DRAIN", "bad fan")


def test_health_reports_a_corrupt_ledger_with_its_fix_and_no_drain_only_reports(node, capsys,
                                                                                tmp_path):
    (tmp_path / "state").mkdir(exist_ok=True)
    (tmp_path / "state" / "ledger.json").write_text("")
    assert node.dgxvm("health", "--node", "dgx01", "--no-drain") == 1
    line = capsys.readouterr().out.strip()
    assert line.startswith("dgxvm health: ledger: ledger ")
    assert "fix: run `dgxvm reconcile --rebuild-ledger`" in line
    assert node.calls() == []                                 # --no-drain: Slurm not asked


# -- a shared-NVSwitch machine: Fabric Manager ----------------------------------------------------
STANDIN = Path(__file__).resolve().parents[2] / "tools" / "fmpm-standin" / "fmpm"


@pytest.fixture
def h100(node, tmp_path, image_store, monkeypatch):  # noqa: F811
    """``node`` made a simulated DGX H100 whose Fabric Manager is the fmpm stand-in, with a
    running VM ``vm1`` (a libvirt test-driver domain) holding its partition in the ledger."""
    import libvirt

    from slurm_dgxvm import config as config_mod
    from slurm_dgxvm.ledger import Allocation, domain_key
    from slurm_dgxvm.lifecycle import Env
    from slurm_dgxvm.placement import Policy, Request, place
    monkeypatch.setenv("FMPM_STANDIN_STATE", str(tmp_path / "fm.json"))
    monkeypatch.delenv("FMPM_STANDIN_PARTITIONS", raising=False)
    root = render("dgx-h100", tmp_path / "sys-h100")
    cfg = tmp_path / "dgxvm.toml"
    text = (f'[host]\nsysfs_root = "{root}"\nstate_dir = "{tmp_path / "state"}"\n'
            f'[libvirt]\nuri = "test:///default"\n[images]\nstore = "{image_store}"\n'
            f'[slurm]\nbin_dir = "{node.bin}"\n[fabric]\nfmpm = "{STANDIN}"\n')
    cfg.write_text(text)
    env = Env(config_mod.load(cfg))
    p = place(env.host, env.ledger.read().occupancy(), Request(count=2), Policy())
    a = Allocation.from_placement(domain_key("vm1"), p, owner="domain", job_id=None,
                                  domain="vm1", user="u", now=1000.0)
    env.ledger.allocate(a)
    env.fabric.activate(a.fm_partition)
    conn = libvirt.open("test:///default")
    dom = conn.defineXML("<domain type='test'><name>vm1</name><memory>1024</memory>"
                         "<os><type>hvm</type></os></domain>")
    dom.create()
    node.fm_partition, node.fabric = a.fm_partition, env.fabric
    try:
        yield node
    finally:
        dom.destroy()
        dom.undefine()
        conn.close()


def test_health_on_a_fabric_manager_machine_says_fabric_manager_answers(h100, capsys):
    assert h100.dgxvm("health", "--node", "dgx01", "--no-gpu-check", "--json") == 0
    doc = json.loads(capsys.readouterr().out)
    [f] = [f for f in doc["findings"] if f["check"] == "fabric-manager"]
    assert f == {"check": "fabric-manager", "ok": True, "fix": None,
                 "detail": "Fabric Manager answers: 1 partition(s) active"}


def test_health_says_a_vm_whose_partition_fabric_manager_lost_is_degraded_and_never_drains(
        h100, capsys):
    """Fabric Manager restarted without resiliency mode: vm1's GPUs lost NVLink, but the node
    makes new VMs as before. DEGRADED in the line and the JSON; exit 0; no drain."""
    subprocess.run([str(STANDIN), "--standin-restart"], check=True, capture_output=True)
    assert h100.dgxvm("health", "--node", "dgx01", "--no-gpu-check") == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("dgxvm health: dgx01 OK (SIMULATED host): largest VM possible: ")
    assert (f"; fabric-manager: DEGRADED: partition {h100.fm_partition} held by VM vm1 not "
            f"active in Fabric Manager (it restarted, or someone deactivated it)") in line
    assert not any("update" in c for c in h100.calls())
    assert h100.dgxvm("health", "--node", "dgx01", "--no-gpu-check", "--json") == 0
    doc = json.loads(capsys.readouterr().out)
    [f] = [f for f in doc["findings"] if f["check"] == "fabric-manager"]
    assert doc["ok"] is True and f["ok"] is True and f["detail"].startswith("DEGRADED: ")
    assert not any(h100.fabric.list().values())          # reported only: nothing activated


def test_health_fails_when_fabric_manager_does_not_answer(h100, capsys, monkeypatch, tmp_path):
    """No new VM can start without its partition: the node is drained, with the fix."""
    (tmp_path / "fm.json").write_text("{not json")
    assert h100.dgxvm("health", "--node", "dgx01", "--no-gpu-check") == 1
    line = capsys.readouterr().out.strip()
    assert line.startswith("dgxvm health: fabric-manager: ")
    assert "fix: start Fabric Manager" in line and line.endswith("; node drained")
    assert h100.state()[1].startswith("dgxvm health: fabric-manager:")
