"""The installed package's life on this host, as an admin lives it: an upgrade while a VM is
being created and runs, then ``apt-get purge`` (which undoes ``dgxvm host setup`` too, as
purging dgx-kvm-sw returns a DGX to bare metal), then an install again.

tests/run builds the package from this checkout, installs it (``apt-get install ./...deb``) and
runs every integration test against ``/usr/bin/dgxvm`` (``DGXVM_UNDER_TEST``); these tests
(marker ``package_lifecycle``) replace and remove it, so they run in a pytest of their own, the
last stage of tests/run, after the other integration tests (which run without them). The upgrade is to the
same package with a later version (``dpkg-deb`` repacks it): dpkg runs the whole upgrade (old
prerm upgrade, unpack with every file renamed over the old, conffile handling, new postinst).
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import time
from pathlib import Path

import pytest

from harness.node import UNDER_TEST, installed_dgxvm

pytestmark = [pytest.mark.integration, pytest.mark.package_lifecycle]

PACKAGE = "slurm-dgxvm"
CONF = Path("/etc/dgxvm/dgxvm.toml")
# the maintainer scripts get what an admin's shell has: none of the tests' DGXVM_* variables
PLAIN = {k: v for k, v in os.environ.items() if not k.startswith("DGXVM_")}
APT_ENV = {**PLAIN, "DEBIAN_FRONTEND": "noninteractive"}


@pytest.fixture(scope="module")
def deb() -> Path:
    if installed_dgxvm() is None or not os.environ.get("DGXVM_TEST_DEB"):
        pytest.skip(f"no installed package under test ({UNDER_TEST}, DGXVM_TEST_DEB: "
                    "bash tests/run sets both)")
    return Path(os.environ["DGXVM_TEST_DEB"])


def sh(*cmd, timeout=300, env=None, check=True) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if check:
        assert r.returncode == 0, f"{' '.join(cmd)} -> {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r


def apt(*args) -> subprocess.CompletedProcess:
    return sh("apt-get", "-y", "-q", "--no-install-recommends", *args, env=APT_ENV,
              timeout=600, check=False)


def installed_version() -> str | None:
    r = sh("dpkg-query", "-W", "-f", "${db:Status-Abbrev} ${Version}", PACKAGE, check=False)
    fields = r.stdout.split()
    return fields[1] if r.returncode == 0 and fields[:1] == ["ii"] else None


def later_version(deb: Path, dest: Path) -> tuple[Path, str]:
    """The same package as version ``<version>+upgrade1``: what an admin's next release is
    to dpkg."""
    tree = dest / "tree"
    sh("dpkg-deb", "-R", str(deb), str(tree))
    control = tree / "DEBIAN" / "control"
    text = control.read_text()
    old = next(line.split(": ", 1)[1] for line in text.splitlines()
               if line.startswith("Version: "))
    new = f"{old}+upgrade1"
    control.write_text(text.replace(f"Version: {old}\n", f"Version: {new}\n"))
    out = dest / f"{PACKAGE}_{new}_all.deb"
    sh("dpkg-deb", "--root-owner-group", "-b", str(tree), str(out))
    return out, new


@pytest.fixture(scope="module")
def later(deb, tmp_path_factory) -> tuple[Path, str]:
    return later_version(deb, tmp_path_factory.mktemp("later"))


def back_to(deb: Path, version: str) -> None:
    """The build under test again, as the next tests find it."""
    r = apt("install", "--allow-downgrades", str(deb))
    assert r.returncode == 0 and installed_version() == version, r.stdout + r.stderr


def test_an_upgrade_while_a_vm_is_created_and_runs_keeps_it_and_the_admins_config(
        deb, later, vmenv):
    v1 = installed_version()
    assert v1 is not None, "tests/run installs the package first"
    v2_deb, v2 = later
    original = CONF.read_text()
    CONF.write_text(original + "\n# an admin's edit, kept across upgrades\n")
    env = {**os.environ, "DGXVM_CONFIG": str(vmenv.config)}
    create = subprocess.Popen(
        ["/usr/bin/dgxvm", "create", "--gpu-count", "1", "--domain", "upg", "--user",
         vmenv.user], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        # mid-create: the domain is defined and its guest is booting (the Prolog's wait)
        deadline = time.monotonic() + 240
        while vmenv.virsh("domstate", "upg", check=False).stdout.strip() != "running":
            assert create.poll() is None, create.communicate()
            assert time.monotonic() < deadline, "the VM never started"
            time.sleep(0.5)
        assert create.poll() is None, "the create ended before the upgrade began"
        r = apt("install", str(v2_deb))
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert installed_version() == v2
        out, err = create.communicate(timeout=400)
        assert create.returncode == 0, out + err    # it finished on what it started with
        # the admin's edit is still there, asked nothing (same conffile in both versions)
        assert CONF.read_text().endswith("# an admin's edit, kept across upgrades\n")
        assert "Configuration file" not in r.stdout
        # the new version reads the ledger and record the old one wrote
        rows = {row["name"]: row for row in json.loads(
            sh("/usr/bin/dgxvm", "list", "--json", env=env).stdout)}
        assert rows["upg"]["state"] == "running", rows
        sh("/usr/bin/dgxvm", "delete", "--domain", "upg", env=env, timeout=200)
        assert json.loads(sh("/usr/bin/dgxvm", "list", "--json", env=env).stdout) == []
    finally:
        if create.poll() is None:
            create.kill()
            create.wait()
        vmenv.dgxvm("delete", "--domain", "upg")
        CONF.write_text(original)
        back_to(deb, v1)


def cmdlines() -> list[bytes]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                out.append((entry / "cmdline").read_bytes())
            except OSError:
                pass
    return out


UPGRADED_JOB = """#!/bin/sh
set -e
srun dgxvm run -- sh -c 'echo "before: $(hostname)"'
sleep 2
srun dgxvm run -- sh -c 'echo "after: $(hostname)"'
"""


def test_an_upgrade_under_a_slurm_job_whose_prolog_is_booting_its_vm_lets_it_finish(
        deb, later, slurm_node):
    """The packaged Prolog is replaced while it waits for the job's VM; the job's steps then
    run the new dgxvm against the VM the old one made, and the new Epilog tears it down."""
    node = slurm_node
    v1 = installed_version()
    v2_deb, v2 = later
    job = node.jobs.sbatch(UPGRADED_JOB, gpus=2)
    try:
        deadline = time.monotonic() + 300
        while node.env.virsh("domstate", f"job-{job}", check=False).stdout.strip() \
                != "running":
            assert time.monotonic() < deadline, "the job's VM never started"
            time.sleep(0.5)
        prolog_running = any(b"/dgxvm\0prolog" in cmdline for cmdline in cmdlines())
        r = apt("install", str(v2_deb))
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert installed_version() == v2
        assert prolog_running, "the Prolog ended before the upgrade began"
        node.jobs.wait_done([job], timeout=600)
        row = node.jobs.sacct([job])[job]
        assert row["State"] == "COMPLETED", row
        out = (node.jobs.workdir / f"slurm-{job}.out").read_text()
        assert f"before: job-{job}" in out and f"after: job-{job}" in out, out
        assert "dgxvm/1 state=ended" in row["AdminComment"], row
        assert json.loads(sh("/usr/bin/dgxvm", "list", "--json",
                             env={**PLAIN, "DGXVM_CONFIG": str(node.env.config)}).stdout) == []
    finally:
        back_to(deb, v1)


def test_a_removal_while_a_vm_runs_is_refused_naming_it_and_leaves_dpkg_sound(deb, vmenv):
    """prerm asks the installed dgxvm which VMs run (here those of the tests' configuration,
    which the maintainer scripts get from apt's environment as an admin's shell would give
    it): a running one stops the removal, named; the package stays configured, the VM runs."""
    v1 = installed_version()
    r = vmenv.dgxvm("create", "--gpu-count", "1", "--domain", "held", "--user", vmenv.user)
    assert r.returncode == 0, r.stderr
    try:
        r = sh("apt-get", "-y", "-q", "remove", PACKAGE,
               env={**APT_ENV, "DGXVM_CONFIG": str(vmenv.config)}, timeout=600, check=False)
        said = r.stdout + r.stderr
        assert r.returncode != 0, said
        assert "slurm-dgxvm: not removed: dgxvm VMs are running: held" in said, said
        assert "DGXVM_REMOVE_WITH_VMS=1" in said
        assert installed_version() == v1                 # still "ii": prerm's refusal undone
        assert sh("dpkg", "--audit").stdout.strip() == ""  # nothing half-installed or wedged
        assert vmenv.virsh("domstate", "held").stdout.strip() == "running"
    finally:
        vmenv.dgxvm("delete", "--domain", "held")


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under ``root``: (kind, mode, bytes or link target)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                out[os.path.relpath(p, root)] = ("link", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[os.path.relpath(p, root)] = ("dir", stat.S_IMODE(st.st_mode))
            else:
                out[os.path.relpath(p, root)] = ("file", stat.S_IMODE(st.st_mode),
                                                  Path(p).read_bytes())
    return out


def test_purge_reverts_host_setup_removes_what_it_installed_and_made_then_installs_again(
        deb, vmenv, tmp_path):
    files = [Path(p) for p in sh("dpkg-query", "-L", PACKAGE).stdout.split()]
    # its files and links, not the directories it shares (usrmerge's /lib is a link to one)
    ours = [p for p in files if not p.is_dir() and (p.is_file() or p.is_symlink())]
    assert Path("/usr/bin/dgxvm") in ours and CONF in ours
    plain = PLAIN
    # run-time state in the default places (/etc/dgxvm/dgxvm.toml): the image store inside
    # the state dir, as an admin's `dgxvm image install` makes it
    r = sh("/usr/bin/dgxvm", "image", "install", str(vmenv.manifest), "--name", "purgeme",
           timeout=300, env=plain)
    state = Path("/var/lib/dgxvm")
    assert any((state / "images").rglob("*")), r.stdout
    # `dgxvm host setup` on a bare-metal DGX H100 (simulated: its sysfs, /etc, /proc and /dev
    # in one tree, DGXVM_SYSFS_ROOT), its record in the state dir as on a real node
    from slurm_dgxvm.simulate.hostops import as_bare_metal
    host = tmp_path / "h100"
    sh("/usr/bin/dgxvm", "simulate", "dgx-h100", "--out", str(host), env=plain)
    as_bare_metal(host)
    bare = snapshot(host)
    on_host = {**plain, "DGXVM_SYSFS_ROOT": str(host)}
    sh("/usr/bin/dgxvm", "host", "setup", env=on_host)
    assert (state / "host-setup.json").is_file() and snapshot(host) != bare
    r = sh("apt-get", "-y", "-q", "purge", PACKAGE, env={**APT_ENV, "DGXVM_SYSFS_ROOT": str(host)},
           timeout=600, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    said = r.stdout + r.stderr
    assert "reverted; removed" in said and "SIMULATED host (dgx-h100)" in said, said
    assert snapshot(host) == bare            # back to bare metal: GPUs, pools, files
    assert "slurm.conf still names /usr/lib/slurm-dgxvm/dgxvm-prolog" in said, said
    assert installed_version() is None
    left = [str(p) for p in ours if p.exists() or p.is_symlink()]
    assert left == [], left
    for path in (state, Path("/etc/dgxvm"), Path("/var/lib/slurm-dgxvm"), Path("/run/dgxvm"),
                 Path("/etc/libvirt/hooks/qemu.d/slurm-dgxvm"),
                 Path("/etc/systemd/system/slurmd.service.wants/dgxvm-reconcile.service")):
        assert not path.exists(), f"{path} is left after purge"
    # and it installs again on the purged host
    r = apt("install", str(deb))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert sh("/usr/bin/dgxvm", "version", "show").stdout.startswith("dgxvm ")
