"""``dgxvm host setup`` and ``revert`` on simulated DGX-2, A100 and H100 hosts as they are before
setup (GPUs on nvidia, no huge pages): setup makes the host pass its checks; revert leaves the
whole tree (sysfs, etc, state dir) byte for byte, mode for mode and link for link as it was;
a dry run changes nothing; setup twice is setup once; a setup that died half way reverts."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess

import pytest

from slurm_dgxvm.config import Config
from slurm_dgxvm.errors import HostError
from slurm_dgxvm.host import apparmor as AA
from slurm_dgxvm.host import roots as R
from slurm_dgxvm.host.check import FAIL, OK, WARN, Probes, check_host
from slurm_dgxvm.host.kernel import for_roots
from slurm_dgxvm.host.roots import HostRoots
from slurm_dgxvm.host.setup import MARK, apply, plan_setup, revert
from slurm_dgxvm.simulate.hostops import SimulatedBinder, SimulatedHugepages, as_bare_metal
from slurm_dgxvm.topology import discover

pytestmark = pytest.mark.usefixtures("clean_env")

MACHINES = ("dgx2", "dgx-a100", "dgx-h100")


def snapshot(root) -> dict[str, tuple]:
    """Every path under ``root``: (kind, mode, bytes or link target)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root)
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode))
            else:
                with open(p, "rb") as f:
                    out[rel] = ("file", stat.S_IMODE(st.st_mode), f.read())
    return out


def diff(a: dict, b: dict) -> list[str]:
    return sorted(f"{k}: {a.get(k, 'absent')!s:.60} -> {b.get(k, 'absent')!s:.60}"
                  for k in set(a) | set(b) if a.get(k) != b.get(k))


@pytest.fixture(scope="session")
def bare_trees(trees, tmp_path_factory) -> dict:
    """Each machine as it is before setup, made once; tests copy it."""
    base = tmp_path_factory.mktemp("bare")
    out = {}
    for m in MACHINES:
        subprocess.run(["cp", "-a", str(trees[m]), str(base / m)], check=True)
        as_bare_metal(base / m)
        out[m] = base / m
    return out


class Bare:
    def __init__(self, root):
        self.root = root
        self.roots = HostRoots.make(root, root / "state")
        self.host = discover(self.roots.sysfs)
        self.binder, self.pages = for_roots(self.roots)

    def plan(self, cfg=None):
        return plan_setup(self.roots, cfg or Config(), self.host, self.binder, self.pages,
                          dgxvm_path="/usr/bin/dgxvm")

    def setup(self, cfg=None):
        return apply(self.plan(cfg), self.roots, self.binder, self.pages)

    def revert(self, **kw):
        return revert(self.roots, self.binder, self.pages, **kw)


@pytest.fixture
def bare(bare_trees, machine, tmp_path):
    subprocess.run(["cp", "-a", str(bare_trees[machine]), str(tmp_path / "host")], check=True)
    return Bare(tmp_path / "host")


def probes():
    return Probes(libvirtd=lambda: "up", fabric=lambda: "up", images=lambda: "ok",
                  which=lambda t: "/usr/bin/" + t)


@pytest.mark.parametrize("machine", MACHINES)
def test_setup_then_revert_leaves_the_host_exactly_as_it_was(bare, machine):
    before = snapshot(bare.root)
    failing = {f.check for f in check_host(bare.roots, Config(), probes()).findings
               if f.status == FAIL}
    assert {"vfio-binding", "hugepages", "libvirt-hook", "gres-conf"} <= failing
    bare.setup()
    report = check_host(bare.roots, Config(), probes())
    for name in ("vfio-binding", "vfio-at-boot", "hugepages", "libvirt-hook", "gres-conf"):
        assert report.get(name).status == OK, report.get(name)
    assert diff(before, snapshot(bare.root))            # it did change something
    result = bare.revert()
    assert result.done and not result.left
    assert diff(before, snapshot(bare.root)) == []
    assert not bare.roots.record_path.exists()


@pytest.mark.parametrize("machine", MACHINES)
def test_setup_binds_the_gpus_and_on_a_dgx2_the_nvswitches_but_leaves_fabric_managers(
        bare, machine):
    bare.setup()
    sysfs = bare.roots.sysfs
    assert {sysfs.pci_link_name(g.pci, "driver") for g in bare.host.gpus} == {"vfio-pci"}
    switches = {sysfs.pci_link_name(s.pci, "driver") for s in bare.host.nvswitches}
    if bare.host.nvswitches:
        assert switches == ({"vfio-pci"} if machine == "dgx2" else {"nvidia-nvswitch"})
    conf = (bare.roots.etc / R.MODPROBE_CONF).read_text()
    assert "softdep nvidia pre: vfio-pci" in conf
    ids = conf.split("ids=")[1].split()[0].split(",")
    assert f"10de:{bare.host.gpus[0].device_id}" in ids
    assert len(ids) == (2 if machine == "dgx2" else 1)   # DGX-2: GPU and NVSwitch ids


@pytest.mark.parametrize("machine", ["dgx-h100"])
def test_every_file_setup_writes_is_marked_as_dgxvms_and_the_boot_unit_sizes_each_node(bare):
    bare.setup()
    etc = bare.roots.etc
    for rel in (R.MODPROBE_CONF, R.MODULES_LOAD_CONF, R.HUGEPAGES_UNIT, R.QEMU_HOOK_DGXVM,
                R.GRES_CONF):
        assert MARK in (etc / rel).read_text(), rel
    hook = (etc / R.QEMU_HOOK_DGXVM)
    assert hook.read_text().startswith("#!/bin/sh\n") and os.access(hook, os.X_OK)
    assert "exec env /usr/bin/dgxvm hook qemu" in hook.read_text()
    unit = (etc / R.HUGEPAGES_UNIT).read_text()
    for n in (0, 1):
        assert (f"ExecStart=/bin/sh -c 'echo 1016 > /sys/devices/system/node/node{n}/hugepages/"
                "hugepages-1048576kB/nr_hugepages'") in unit
    assert os.readlink(etc / R.HUGEPAGES_WANTS) == "../dgxvm-hugepages.service"
    assert (etc / R.HUGEPAGES_WANTS).resolve() == (etc / R.HUGEPAGES_UNIT).resolve()


@pytest.mark.parametrize("machine", ["dgx2"])
def test_a_dry_run_prints_every_change_and_makes_none(bare, machine, capsys):
    from slurm_dgxvm.cli.main import main
    before = snapshot(bare.root)
    args = ["--sysfs-root", str(bare.root), "--state-dir", str(bare.root / "state"), "host"]
    assert main([*args, "setup", "--dry-run", "--dgxvm-path", "/usr/bin/dgxvm"]) == 0
    out = capsys.readouterr().out
    assert diff(before, snapshot(bare.root)) == []
    lines = [line for line in out.splitlines() if " would " in line]
    assert len(lines) == len(bare.plan().changes) == 16 + 12 + 2 + 6  # binds, pools, files, link
    assert all(line.startswith("SIMULATED host (dgx2): ") for line in out.splitlines())
    assert "by hand: update-initramfs -u" in out and "hugepages=0:760,1:760" in out


@pytest.mark.parametrize("machine", ["dgx-a100"])
def test_setup_twice_is_setup_once(bare):
    bare.setup()
    once = snapshot(bare.root)
    assert bare.plan().changes == []
    bare.setup()
    assert diff(once, snapshot(bare.root)) == []


class FailingBinder(SimulatedBinder):
    def __init__(self, root, after: int):
        super().__init__(root)
        self.left = after

    def bind(self, bdf, driver):
        if self.left == 0:
            raise HostError(reason=f"simulated: {bdf} refuses {driver}")
        self.left -= 1
        super().bind(bdf, driver)


@pytest.mark.parametrize("machine", MACHINES)
def test_a_setup_that_died_half_way_reverts_to_the_host_as_it_was(bare, machine):
    before = snapshot(bare.root)
    bare.setup_binder = FailingBinder(bare.root, after=3)
    with pytest.raises(HostError, match="refuses vfio-pci"):
        apply(bare.plan(), bare.roots, bare.setup_binder, bare.pages)
    record = json.loads(bare.roots.record_path.read_text())
    assert len(record["changes"]) == 4          # three made, the fourth recorded before it failed
    result = bare.revert()
    assert len(result.done) == 3 and not result.left
    assert diff(before, snapshot(bare.root)) == []


@pytest.mark.parametrize("machine", ["dgx-h100"])
def test_a_sites_own_gres_conf_is_replaced_and_restored_with_its_mode(bare):
    gres = bare.roots.etc / R.GRES_CONF
    gres.parent.mkdir(parents=True)
    gres.write_text("# the site's\nName=gpu File=/dev/nvidia[0-7]\n")
    gres.chmod(0o640)
    before = snapshot(bare.root)
    bare.setup()
    assert "File=/dev/vfio/" in gres.read_text()
    bare.revert()
    assert diff(before, snapshot(bare.root)) == []


@pytest.mark.parametrize("machine", ["dgx-h100"])
def test_an_existing_dgxvm_hook_is_kept_and_a_pool_already_large_enough_is_not_lowered(bare):
    hook = bare.roots.etc / R.QEMU_HOOK
    hook.parent.mkdir(parents=True)
    hook.write_text("#!/bin/sh\nexec /usr/bin/dgxvm hook qemu \"$@\"\n")
    hook.chmod(0o755)
    SimulatedHugepages(bare.root).set(0, 1048576, 2000)
    paths = {c.entry.get("path") for c in bare.plan().changes}
    nodes = {c.entry.get("node") for c in bare.plan().changes if c.entry["kind"] == "hugepages"}
    assert R.QEMU_HOOK_DGXVM not in paths and nodes == {1}
    bare.setup()
    assert SimulatedHugepages(bare.root).get(0, 1048576) == 2000
    assert "echo 2000 > /sys/devices/system/node/node0" in (
        bare.roots.etc / R.HUGEPAGES_UNIT).read_text()


@pytest.mark.parametrize("machine", ["dgx-h100"])
def test_revert_leaves_what_changed_since_setup_names_it_and_keeps_the_record(bare, capsys):
    from slurm_dgxvm.cli.main import main
    bare.setup()
    (bare.roots.etc / R.GRES_CONF).write_text("Name=gpu File=/dev/vfio/1 # edited by hand\n")
    gpu = bare.host.gpus[2].pci
    SimulatedBinder(bare.root).bind(gpu, None)        # unbound by hand (not its "before")
    args = ["--sysfs-root", str(bare.root), "--state-dir", str(bare.root / "state"), "host"]
    assert main([*args, "revert"]) == 1
    captured = capsys.readouterr()
    assert f"left {bare.roots.etc / R.GRES_CONF}: changed since setup" in captured.out
    assert f"left {gpu}: bound to no driver since setup" in captured.out
    assert "2 change(s) left as they are" in captured.err
    assert bare.roots.record_path.exists()
    assert "edited by hand" in (bare.roots.etc / R.GRES_CONF).read_text()
    assert not (bare.roots.etc / R.MODPROBE_CONF).exists()


@pytest.mark.parametrize("machine", ["dgx2"])
def test_revert_with_no_record_says_so_and_succeeds(bare, capsys):
    from slurm_dgxvm.cli.main import main
    args = ["--sysfs-root", str(bare.root), "--state-dir", str(bare.root / "state"), "host"]
    assert main([*args, "revert"]) == 0
    assert "nothing to revert: no setup record at" in capsys.readouterr().out


@pytest.mark.parametrize("machine", ["dgx-a100"])
def test_the_cli_setup_then_revert_dry_run_changes_nothing_and_revert_restores(bare, capsys):
    from slurm_dgxvm.cli.main import main
    before = snapshot(bare.root)
    args = ["--sysfs-root", str(bare.root), "--state-dir", str(bare.root / "state"), "host"]
    assert main([*args, "setup", "--dgxvm-path", "/usr/bin/dgxvm"]) == 0
    assert "recorded in" in capsys.readouterr().out
    after = snapshot(bare.root)
    assert main([*args, "revert", "--dry-run"]) == 0
    assert "would bind 0000:" in capsys.readouterr().out
    assert diff(after, snapshot(bare.root)) == []
    assert main([*args, "revert"]) == 0
    assert diff(before, snapshot(bare.root)) == []


def test_a_record_this_dgxvm_did_not_write_is_refused(tmp_path, trees):
    subprocess.run(["cp", "-a", str(trees["dgx2"]), str(tmp_path / "h")], check=True)
    b = Bare(tmp_path / "h")
    b.roots.record_path.parent.mkdir()
    b.roots.record_path.write_text('{"version": 99, "changes": []}')
    with pytest.raises(HostError, match="not one this dgxvm wrote"):
        b.revert()


# -- the real sysfs writes (the kernel's files; a plain tree does not react, so the read-back
#    after the writes shows the device still on its driver) -----------------------------------
def test_the_real_binder_writes_override_unbind_and_probe_then_checks_the_result(tmp_path):
    from slurm_dgxvm.host.kernel import SysfsBinder
    bdf = "0000:1b:00.0"
    dev = tmp_path / "sys/devices/pci0000:00" / bdf
    dev.mkdir(parents=True)
    for d in ("nvidia", "vfio-pci"):
        (tmp_path / "sys/bus/pci/drivers" / d).mkdir(parents=True)
    (tmp_path / "sys/bus/pci/devices").mkdir()
    os.symlink(dev, tmp_path / "sys/bus/pci/devices" / bdf)
    os.symlink(tmp_path / "sys/bus/pci/drivers/nvidia", dev / "driver")
    with pytest.raises(HostError, match="is bound to nvidia after binding it to vfio-pci"):
        SysfsBinder(tmp_path).bind(bdf, "vfio-pci")
    assert (dev / "driver_override").read_text() == "vfio-pci\n"
    assert (tmp_path / "sys/bus/pci/drivers/nvidia/unbind").read_text() == bdf
    assert (tmp_path / "sys/bus/pci/drivers_probe").read_text() == bdf


def test_the_real_pool_writes_nr_hugepages_and_reads_back_what_the_kernel_gave(tmp_path):
    from slurm_dgxvm.host.kernel import SysfsHugepages
    d = tmp_path / "sys/devices/system/node/node1/hugepages/hugepages-1048576kB"
    d.mkdir(parents=True)
    (d / "nr_hugepages").write_text("0\n")
    assert SysfsHugepages(tmp_path).set(1, 1048576, 120) == 120
    assert (d / "nr_hugepages").read_text() == "120\n"
    with pytest.raises(HostError, match="cannot read"):
        SysfsHugepages(tmp_path).get(0, 1048576)


@pytest.mark.parametrize("machine", ["dgx-a100"])
def test_with_the_iommu_off_setup_binds_nothing_and_prints_the_kernel_command_line(bare):
    import shutil
    shutil.rmtree(bare.root / "sys/kernel/iommu_groups")
    (bare.root / "sys/kernel/iommu_groups").mkdir()
    plan = bare.plan()
    assert not [c for c in plan.changes if c.entry["kind"] == "bind"]
    said = "\n".join(plan.manual)
    assert "the IOMMU is off" in said
    assert "add amd_iommu=on iommu=pt to GRUB_CMDLINE_LINUX" in said      # an AMD EPYC host
    assert (bare.root / "proc/cmdline").read_text().count("iommu") == 2   # printed, not edited


# -- AppArmor: libvirtd's profile and the VMs' virtiofsd scripts ----------------------------------
LOCAL_AS_LIBVIRT_MAKES_IT = "# Site-specific additions and overrides for usr.sbin.libvirtd\n"


def _apparmor_on(root, mode="enforce"):
    """AppArmor on, libvirtd confined in ``mode`` (as /sys says on a stock Debian 12 host), and
    the site file libvirt's postinst leaves."""
    for rel, text in ((AA.ENABLED, "Y\n"),
                      (AA.PROFILES, f"/usr/sbin/virtlogd (enforce)\nlibvirtd ({mode})\n"
                                    "libvirtd//qemu_bridge_helper (enforce)\n"),
                      (f"etc/{AA.LOCAL}", LOCAL_AS_LIBVIRT_MAKES_IT)):
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


@pytest.mark.parametrize("machine", ["dgx-h100"])
@pytest.mark.parametrize("mode, status", [("enforce", FAIL), ("complain", WARN)])
def test_a_confined_libvirtd_is_named_with_its_rule_and_setup_adds_it_and_revert_takes_it_out(
        bare, machine, mode, status):
    bare.setup()
    _apparmor_on(bare.root, mode)
    before = snapshot(bare.root)
    f = check_host(bare.roots, Config(), probes()).get("apparmor")
    assert f.status == status, f
    assert f"under {bare.roots.state_dir}/vms/" in f.detail
    assert AA.rule(bare.roots.state_dir) in f.fix and "apparmor_parser -r" in f.fix
    plan = bare.plan()
    assert [c.entry["path"] for c in plan.changes] == [AA.LOCAL]
    assert any(m.startswith("apparmor_parser -r ") for m in plan.manual)
    bare.setup()
    local = (bare.root / "etc" / AA.LOCAL).read_text()
    assert local.startswith(LOCAL_AS_LIBVIRT_MAKES_IT)          # the site's lines stay first
    assert local.endswith(AA.rule(bare.roots.state_dir) + "\n")
    assert check_host(bare.roots, Config(), probes()).get("apparmor").status == OK
    assert bare.plan().changes == []                            # setup twice is setup once
    assert bare.revert().done
    after = snapshot(bare.root)
    assert after[f"etc/{AA.LOCAL}"] == before[f"etc/{AA.LOCAL}"]


@pytest.mark.parametrize("machine", ["dgx2"])
def test_without_apparmor_or_without_a_libvirtd_profile_nothing_is_added(bare, machine):
    _apparmor_on(bare.root)
    (bare.root / AA.ENABLED).write_text("N\n")
    assert check_host(bare.roots, Config(), probes()).get("apparmor").status == OK
    _apparmor_on(bare.root)
    (bare.root / AA.PROFILES).write_text("/usr/sbin/virtlogd (enforce)\n")
    assert check_host(bare.roots, Config(), probes()).get("apparmor").status == OK
    assert not any(c.entry.get("path") == AA.LOCAL for c in bare.plan().changes)


def _aa_glob(pattern: str) -> re.Pattern:
    """AppArmor's globbing as far as the rule uses it: `*` within one path component and
    `{a,b}` alternatives (apparmor.d(5), Globbing)."""
    out, i = "", 0
    while i < len(pattern):
        c = pattern[i]
        if c == "*":
            out += "[^/]*"
        elif c == "{":
            j = pattern.index("}", i)
            out += "(?:" + "|".join(map(re.escape, pattern[i + 1:j].split(","))) + ")"
            i = j
        else:
            out += re.escape(c)
        i += 1
    return re.compile(out + r"\Z")


def test_the_rule_covers_both_share_scripts_of_every_vm_and_nothing_beside_them(tmp_path):
    from slurm_dgxvm.records import IMAGE_CACHE_WRAPPER, SHARE_WRAPPER, VmStore
    state = tmp_path / "state"
    path = AA.rule(state).split()[0]
    match = _aa_glob(path)
    vmdir = VmStore(state).dir("dgxvm-job-42")
    for name in (SHARE_WRAPPER, IMAGE_CACHE_WRAPPER):
        assert match.match(str(vmdir / name)), (path, vmdir / name)
    for other in (vmdir / "share.json", vmdir / "disk.qcow2", state / "vms" / "virtiofsd",
                  vmdir / "sub" / SHARE_WRAPPER, state / "ledger.json"):
        assert not match.match(str(other)), other


def test_debians_apparmor_parser_takes_libvirtds_profile_with_the_rule(tmp_path):
    """The real profile (libvirt-daemon-system) with the rule in its local file, compiled by
    the real parser without loading it (-Q); a rule with a typo is refused (the control)."""
    assert os.path.isfile("/etc/apparmor.d/usr.sbin.libvirtd"), "libvirt-daemon-system's profile"
    assert shutil.which("apparmor_parser"), "scripts/bootstrap installs apparmor"
    base = tmp_path / "apparmor.d"
    shutil.copytree("/etc/apparmor.d", base, symlinks=True)
    local = base / "local" / "usr.sbin.libvirtd"
    site = local.read_text() if local.is_file() else ""

    def parse(text):
        local.write_text(text)
        return subprocess.run(["apparmor_parser", "-Q", "-K", "-b", str(base),
                               str(base / "usr.sbin.libvirtd")],
                              capture_output=True, text=True, timeout=120)
    r = parse(AA.with_rule(site, "/var/lib/dgxvm"))
    assert r.returncode == 0, r.stderr
    assert parse(AA.with_rule(site, "/var/lib/dgxvm").rstrip(",\n") + "\n").returncode != 0
