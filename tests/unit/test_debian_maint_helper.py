"""debian/maint-helper: what the package's prerm asks before a removal (which dgxvm VMs still run)
and writes down for postrm purge (which directories go). Pure parts; the packaged helper runs for
real in tests/integration/test_debian_package.py."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

HELPER = runpy.run_path(str(Path(__file__).resolve().parents[2] / "debian/maint-helper"))
live_vms, removable, purge_plan = HELPER["live_vms"], HELPER["removable"], HELPER["purge_plan"]


def test_a_vm_with_a_qemu_process_is_live_whatever_else_it_is():
    rows = [{"name": "job-1", "state": "running"}, {"name": "vm2", "state": "paused"},
            {"name": "vm3", "state": "crashed"}, {"name": "vm4", "state": "unknown"},
            {"name": "job-5", "state": "shut-off"}, {"name": "vm6", "state": "undefined"},
            {"name": "vm7", "state": "no-record"}, {"name": "vm8", "state": "shutting-down"}]
    assert live_vms(rows) == ["job-1", "vm2", "vm3", "vm4", "vm8"]
    assert live_vms([]) == []


@pytest.mark.parametrize("path, why", [
    ("/", "the root"),
    ("/var", "a top-level directory"),
    ("/var/lib", "a system directory two levels down"),
    ("/usr/local", "a system directory two levels down"),
    ("/home", "every user's files"),
    ("var/lib/dgxvm", "relative: depends on the cwd of dpkg"),
    ("", "empty"),
    ("/var/lib/../etc", "climbs out"),
    ("/var/lib/dgxvm/..", "climbs out"),
])
def test_purge_never_removes(path, why):
    assert not removable(path), why


@pytest.mark.parametrize("path", ["/var/lib/dgxvm", "/var/lib/dgxvm/", "/srv/dgxvm",
                                  "/data/node 1/dgxvm"])
def test_purge_removes_a_state_dir_below_a_top_level_directory(path):
    assert removable(path)


def test_the_default_layout_goes_in_one_piece():
    plan = purge_plan("/var/lib/dgxvm", "/var/lib/dgxvm/images", "/var/lib/dgxvm/containers",
                      "dgxvm", "qemu:///system")
    assert plan == {"DGXVM_REMOVE": "/var/lib/dgxvm", "DGXVM_KEEP": "", "DGXVM_NETWORK": "dgxvm",
                    "DGXVM_URI": "qemu:///system", "DGXVM_RUN_DIR": "/run/dgxvm"}


def test_an_image_store_or_cache_elsewhere_is_kept_and_named():
    """It may be an NFS store shared by every node, or hold a site's own files."""
    plan = purge_plan("/var/lib/dgxvm", "/nfs/images", "/scratch/dgxvm-cache", "dgxvm", "u")
    assert plan["DGXVM_REMOVE"] == "/var/lib/dgxvm"
    assert plan["DGXVM_KEEP"].splitlines() == [
        "/nfs/images: [images] store is outside the state dir /var/lib/dgxvm (kept)",
        "/scratch/dgxvm-cache: [containers] cache_dir is outside the state dir /var/lib/dgxvm "
        "(kept)"]


def test_a_state_dir_purge_may_not_remove_is_kept_with_everything_in_it():
    plan = purge_plan("/var/lib", "/var/lib/images", "", "dgxvm", "u")
    assert plan["DGXVM_REMOVE"] == ""
    assert plan["DGXVM_KEEP"] == "/var/lib: [host] state_dir is not a directory purge may remove (kept)"


def test_postrm_knows_dgxvm_domains_by_the_metadata_namespace_dgxvm_writes():
    """postrm purge runs when Python may be gone, so it carries the namespace as text."""
    from slurm_dgxvm.design.spec import XMLNS
    postrm = (Path(__file__).resolve().parents[2] / "debian/postrm").read_text()
    assert f"\nXMLNS={XMLNS}\n" in postrm


def _prerm(tmp_path, helper_exit: int, helper_out: str, env: dict | None = None,
           action: str = "remove"):
    """debian/prerm with its helper and plan dir in tmp_path, and stand-ins for the helper and
    virsh that record how they were called."""
    import subprocess
    repo = Path(__file__).resolve().parents[2]
    bin_ = tmp_path / "bin"
    bin_.mkdir(exist_ok=True)
    calls = tmp_path / "calls"
    helper = bin_ / "maint-helper"
    helper.write_text(f'#!/bin/sh\necho "helper $*" >> {calls}\n'
                      f'if [ "$1" = purge-plan ]; then echo DGXVM_NETWORK=gpunet; '
                      f'echo DGXVM_URI=qemu:///system; exit 0; fi\n'
                      f"printf '%s' '{helper_out}'\nexit {helper_exit}\n")
    (bin_ / "virsh").write_text(f'#!/bin/sh\necho "virsh $*" >> {calls}\nexit 0\n')
    for f in (helper, bin_ / "virsh"):
        f.chmod(0o755)
    text = (repo / "debian/prerm").read_text()
    text = text.replace("HELPER=/usr/lib/slurm-dgxvm/maint-helper", f"HELPER={helper}")
    text = text.replace("PLAN_DIR=/var/lib/slurm-dgxvm", f"PLAN_DIR={tmp_path / 'plan'}")
    script = tmp_path / "prerm"
    script.write_text(text)
    r = subprocess.run(["sh", str(script), action], capture_output=True, text=True, timeout=60,
                       env={"PATH": f"{bin_}:/usr/bin:/bin", **(env or {})})
    return r, (calls.read_text() if calls.exists() else "")


def test_a_removal_is_refused_while_dgxvm_vms_run_and_names_them(tmp_path):
    r, calls = _prerm(tmp_path, 1, "job-42\nvm1\n")
    assert r.returncode == 1
    assert "not removed: dgxvm VMs are running: job-42 vm1" in r.stderr
    assert "DGXVM_REMOVE_WITH_VMS=1" in r.stderr
    assert calls == "helper live-vms\n"              # nothing changed: no plan, no virsh
    assert not (tmp_path / "plan").exists()


def test_a_forced_removal_leaves_the_vms_running_and_says_so(tmp_path):
    r, calls = _prerm(tmp_path, 1, "job-42\n", env={"DGXVM_REMOVE_WITH_VMS": "1"})
    assert r.returncode == 0, r.stderr
    assert "removing while dgxvm VMs run (DGXVM_REMOVE_WITH_VMS=1): job-42: they keep" in r.stderr
    assert "virsh -q -c qemu:///system net-autostart gpunet --disable" in calls
    assert "DGXVM_NETWORK=gpunet" in (tmp_path / "plan/purge-plan").read_text()


def test_a_removal_that_cannot_ask_goes_on_and_says_why(tmp_path):
    r, calls = _prerm(tmp_path, 2, "dgxvm list failed: cannot connect to qemu:///system")
    assert r.returncode == 0, r.stderr
    assert ("cannot tell whether dgxvm VMs run (dgxvm list failed: cannot connect to "
            "qemu:///system)") in r.stderr
    assert "slurm.conf still names /usr/lib/slurm-dgxvm/dgxvm-prolog" in r.stderr


def test_an_upgrade_asks_nothing_and_changes_nothing(tmp_path):
    r, calls = _prerm(tmp_path, 1, "job-42\n", action="upgrade")
    assert (r.returncode, r.stderr, calls) == (0, "", "")
