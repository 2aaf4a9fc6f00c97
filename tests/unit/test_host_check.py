"""``dgxvm host check``: on a prepared simulated DGX-2, A100 and H100 every check is OK; with each
prerequisite taken away in turn, that check (and only the checks that depend on it) FAILs or
WARNs, naming what is missing and its fix."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace

import pytest

from slurm_dgxvm.config import Config, PartitionConfig
from slurm_dgxvm.errors import FabricError, HostError, ImageError
from slurm_dgxvm.host import check as C
from slurm_dgxvm.host.check import FAIL, OK, WARN, Probes, check_host, hugepage_need
from slurm_dgxvm.host.kernel import for_roots
from slurm_dgxvm.host.roots import HostRoots
from slurm_dgxvm.host.setup import apply, plan_setup
from slurm_dgxvm.simulate.hostops import SimulatedBinder, SimulatedHugepages, as_bare_metal
from slurm_dgxvm.topology import SysfsRoot, discover
from slurm_dgxvm.topology import sysfs as S

pytestmark = pytest.mark.usefixtures("clean_env")

MACHINES = ("dgx2", "dgx-a100", "dgx-h100")
SHARED = ("dgx-a100", "dgx-h100")
SLURM_CONF = """# slurm.conf of a dgxvm node
GresTypes=gpu
Prolog=/opt/slurm-dgxvm/prolog/dgxvm-prolog
Epilog=/opt/slurm-dgxvm/epilog/dgxvm-epilog
PrologFlags=Alloc
NodeName=dgx01 Gres=gpu:16
"""


def stub_probes(**raise_in) -> Probes:
    def probe(name, detail):
        def fn():
            if name in raise_in:
                raise raise_in[name]
            return detail
        return fn
    return Probes(libvirtd=probe("libvirtd", "libvirtd answers"),
                  fabric=probe("fabric", "Fabric Manager answers"),
                  images=probe("images", "images present: base"),
                  which=lambda tool: None if "which" in raise_in else f"/usr/bin/{tool}")


def copy_tree(src, dest):
    """``cp -a``: modes and symlinks kept, and three times faster than shutil.copytree."""
    subprocess.run(["cp", "-a", str(src), str(dest)], check=True)


def ready_host(tree, dest):
    """A copy of the rendered ``tree`` made into a host that passes every check: setup run on
    it (modprobe.d, the boot unit, the hook, gres.conf) and dgxvm's lines in slurm.conf."""
    copy_tree(tree, dest)
    roots = HostRoots.make(dest, dest / "state")
    host = discover(roots.sysfs)
    binder, pages = for_roots(roots)
    apply(plan_setup(roots, Config(), host, binder, pages, dgxvm_path="/usr/bin/dgxvm"),
          roots, binder, pages)
    (dest / "etc/slurm/slurm.conf").write_text(SLURM_CONF)
    return roots


# the users' image caches on a filesystem of their own (tmpfs), as a prepared node has them
OWN_FS_CACHE = "/dev/shm/dgxvm-test-cache"


def run_check(roots, probes=None, cfg=None):
    cfg = cfg or Config()
    cfg = replace(cfg, containers=replace(cfg.containers, cache_dir=OWN_FS_CACHE))
    return check_host(roots, cfg, probes or stub_probes())


def statuses(report) -> dict[str, str]:
    return {f.check: f.status for f in report.findings}


@pytest.fixture(scope="session")
def ready_trees(trees, tmp_path_factory) -> dict:
    """A prepared host per machine, made once: tests copy it."""
    base = tmp_path_factory.mktemp("ready")
    return {m: ready_host(trees[m], base / m).sysfs.root for m in MACHINES}


@pytest.fixture
def ready(ready_trees, machine, tmp_path):
    copy_tree(ready_trees[machine], tmp_path / "host")
    return HostRoots.make(tmp_path / "host", tmp_path / "host/state")


@pytest.mark.parametrize("machine", MACHINES)
def test_a_prepared_host_passes_every_check_and_says_it_is_simulated(ready, machine):
    report = run_check(ready)
    assert report.ok and report.simulated == machine
    assert set(statuses(report).values()) == {OK}, [f for f in report.findings if f.status != OK]
    names = [f.check for f in report.findings]
    assert ("fabric-manager" in names) == (machine in SHARED)
    assert all(f.fix is None for f in report.findings)


# -- each prerequisite taken away in turn ----------------------------------------------------------
def _iommu_off(root, host):
    """IOMMU off: no groups, and no device has an iommu_group link."""
    shutil.rmtree(root / S.IOMMU_GROUPS)
    (root / S.IOMMU_GROUPS).mkdir()
    for bdf in os.listdir(root / S.PCI_DEVICES):
        (root / S.PCI_DEVICE.format(bdf=bdf) / "iommu_group").unlink(missing_ok=True)


def _cmdline_without_pt(root, host):
    p = root / "proc/cmdline"
    p.write_text(p.read_text().replace(" iommu=pt", ""))


def _group_shared_with_nic(root, host):
    gpu = host.gpus[0].pci
    group = os.readlink(root / S.PCI_DEVICE.format(bdf=gpu) / "iommu_group").rsplit("/", 1)[-1]
    nic = host.nics[0].pci
    os.symlink("../../../../bus/pci/devices/" + nic,
               root / S.IOMMU_GROUPS / group / "devices" / nic)


def _group_dir_gone(root, host):
    group = os.readlink(root / S.PCI_DEVICE.format(bdf=host.gpus[0].pci) / "iommu_group")
    shutil.rmtree(root / S.IOMMU_GROUPS / group.rsplit("/", 1)[-1])


def _no_vfio_pci_module(root, host):
    (root / S.MODULE.format(name="vfio_pci")).rmdir()


def _gpu_on_nvidia(root, host):
    (root / "sys/bus/pci/drivers/nvidia").mkdir()
    SimulatedBinder(root).bind(host.gpus[3].pci, "nvidia")


def _gpu_unbound(root, host):
    SimulatedBinder(root).bind(host.gpus[3].pci, None)


def _no_modprobe_conf(root, host):
    (root / "etc/modprobe.d/dgxvm-vfio.conf").unlink()


def _no_hugepages_on_first_gpu_node(root, host):
    SimulatedHugepages(root).set(host.gpus[0].numa_node, 1048576, 0)


def _fewer_hugepages(root, host):
    pages = SimulatedHugepages(root)
    node = host.gpus[0].numa_node
    pages.set(node, 1048576, pages.get(node, 1048576) - 1)


def _no_kvm(root, host):
    (root / "dev/kvm").unlink()


def _no_hook(root, host):
    (root / "etc/libvirt/hooks/qemu.d/slurm-dgxvm").unlink()


def _hook_not_executable(root, host):
    (root / "etc/libvirt/hooks/qemu.d/slurm-dgxvm").chmod(0o644)


def _no_prolog(root, host):
    p = root / "etc/slurm/slurm.conf"
    p.write_text(p.read_text().replace("Prolog=/opt/slurm-dgxvm/prolog/dgxvm-prolog\n", ""))


def _no_prolog_flags(root, host):
    p = root / "etc/slurm/slurm.conf"
    p.write_text(p.read_text().replace("PrologFlags=Alloc", "PrologFlags=X11"))


def _no_slurm_conf(root, host):
    (root / "etc/slurm/slurm.conf").unlink()


def _gres_conf_other_group(root, host):
    p = root / "etc/slurm/gres.conf"
    g = host.gpus[1].iommu_group
    p.write_text(p.read_text().replace(f"File=/dev/vfio/{g} ", "File=/dev/vfio/999 "))


def _nothing(root, host):
    pass


# (case, break the host, probes' failures, machines, {check: status} expected, words the FAIL's
#  detail or fix must hold)
CASES = [
    ("iommu off", _iommu_off, {}, MACHINES,
     {"iommu": FAIL, "iommu-groups": FAIL, "gres-conf": FAIL}, ["no IOMMU groups", "iommu_iommu"]),
    ("no iommu=pt", _cmdline_without_pt, {}, MACHINES, {"iommu": WARN}, ["iommu=pt"]),
    ("a GPU's group holds a NIC", _group_shared_with_nic, {}, MACHINES,
     {"iommu-groups": FAIL}, ["also holds", "ACS"]),
    ("a GPU's group unreadable", _group_dir_gone, {}, MACHINES,
     {"iommu-groups": FAIL}, ["cannot read", "/devices"]),
    ("vfio_pci not loaded", _no_vfio_pci_module, {}, MACHINES,
     {"vfio-modules": FAIL}, ["vfio_pci", "modprobe vfio-pci"]),
    ("a GPU on nvidia", _gpu_on_nvidia, {}, MACHINES,
     {"vfio-binding": FAIL}, ["(nvidia)", "dgxvm host setup"]),
    ("a GPU on no driver", _gpu_unbound, {}, MACHINES, {"vfio-binding": WARN}, ["bindable"]),
    ("not bound at boot", _no_modprobe_conf, {}, MACHINES,
     {"vfio-at-boot": WARN}, ["after a reboot", "dgxvm host setup"]),
    ("no huge pages on a GPU node", _no_hugepages_on_first_gpu_node, {}, MACHINES,
     {"hugepages": FAIL}, ["has no 1048576 kB pages", "reserves them"]),
    ("fewer huge pages than needed", _fewer_hugepages, {}, MACHINES,
     {"hugepages": WARN}, ["less memory"]),
    ("no /dev/kvm", _no_kvm, {}, MACHINES, {"kvm": FAIL}, ["does not exist", "kvm_intel"]),
    ("libvirtd down", _nothing, {"libvirtd": HostError(reason="libvirtd: connection refused")},
     MACHINES, {"libvirtd": FAIL}, ["connection refused", "systemctl start libvirtd"]),
    ("no qemu hook", _no_hook, {}, MACHINES,
     {"libvirt-hook": FAIL}, ["dgxvm hook qemu", "restart libvirtd"]),
    ("qemu hook not executable", _hook_not_executable, {}, MACHINES,
     {"libvirt-hook": FAIL}, ["executable"]),
    ("no fmpm", _nothing, {"which": True}, SHARED,
     {"fabric-manager": FAIL}, ["fmpm 'fmpm' not found", "nvidia-fabricmanager"]),
    ("Fabric Manager down", _nothing,
     {"fabric": FabricError(partition="all", reason="fmpm -l: connection refused")}, SHARED,
     {"fabric-manager": FAIL}, ["connection refused", "nvidia-fabricmanager"]),
    ("no Prolog", _no_prolog, {}, MACHINES, {"slurm-hooks": FAIL},
     ["Prolog=(unset)", "slurm.conf.fragment"]),
    ("no PrologFlags=Alloc", _no_prolog_flags, {}, MACHINES, {"slurm-hooks": FAIL},
     ["PrologFlags=X11", "want Alloc"]),
    ("no slurm.conf", _no_slurm_conf, {}, MACHINES, {"slurm-hooks": FAIL}, ["cannot read"]),
    ("gres.conf differs", _gres_conf_other_group, {}, MACHINES, {"gres-conf": FAIL},
     ["line 2", "/dev/vfio/999", "dgxvm gres-conf"]),
    ("an image missing", _nothing, {"images": ImageError(name="base", reason="not installed")},
     MACHINES, {"images": FAIL}, ["not installed", "dgxvm image install"]),
]


@pytest.mark.parametrize("case, machine", [(c[0], m) for c in CASES for m in c[3]])
def test_each_missing_prerequisite_is_named_with_its_fix_and_nothing_else_fails(
        ready, machine, case):
    _, breaks, fail_probes, _, expected, words = next(c for c in CASES if c[0] == case)
    host = discover(SysfsRoot(ready.sysfs.root))
    breaks(ready.sysfs.root, host)
    report = run_check(ready, stub_probes(**fail_probes))
    got = statuses(report)
    assert {k: v for k, v in got.items() if v != OK} == expected
    assert report.ok == (FAIL not in expected.values())
    for name in expected:
        f = report.get(name)
        assert f.fix, f
    said = " ".join(f"{report.get(n).detail} {report.get(n).fix}" for n in expected)
    for word in words:
        if word == "iommu_iommu":       # the vendor's own switch: Intel hosts intel_, AMD amd_
            word = "amd_iommu=on" if machine == "dgx-a100" else "intel_iommu=on"
        assert word in said, (word, said)


def test_a_dgx2_nvswitch_on_the_host_driver_fails_but_an_a100_one_is_fabric_managers(
        trees, tmp_path):
    for machine, status in (("dgx2", FAIL), ("dgx-a100", OK)):
        roots = ready_host(trees[machine], tmp_path / machine)
        host = discover(roots.sysfs)
        (roots.sysfs.root / "sys/bus/pci/drivers/nvidia-nvswitch").mkdir(exist_ok=True)
        SimulatedBinder(roots.sysfs.root).bind(host.nvswitches[0].pci, "nvidia-nvswitch")
        f = run_check(roots).get("vfio-binding")
        assert f.status == status, (machine, f)
        if status == FAIL:
            assert host.nvswitches[0].pci in f.detail and "nvidia-nvswitch" in f.detail


@pytest.mark.parametrize("machine", ["dgx2", "dgx-a100", "dgx-h100"])
def test_a_rendered_vm_host_gives_dgx2_nvswitches_to_vfio_and_leaves_fabric_managers(
        trees, host, machine):
    """As each machine runs under dgxvm: a DGX-2's NVSwitches pass into VMs (vfio-pci); an A100's
    or H100's stay with Fabric Manager on the host (nvidia-nvswitch, Shared NVSwitch mode)."""
    sysfs = SysfsRoot(trees[machine])
    want = "vfio-pci" if machine == "dgx2" else "nvidia-nvswitch"
    assert host.nvswitches
    assert {sysfs.pci_link_name(s.pci, "driver") for s in host.nvswitches} == {want}
    assert {g.driver for g in host.gpus} == {"vfio-pci"}


def test_a_bare_metal_host_fails_binding_and_huge_pages_and_names_every_gpu(trees, tmp_path):
    copy_tree(trees["dgx-h100"], tmp_path / "h")
    as_bare_metal(tmp_path / "h")
    report = run_check(HostRoots.make(tmp_path / "h", tmp_path / "h/state"))
    assert report.get("vfio-binding").status == FAIL
    assert "8 of 8 device(s)" in report.get("vfio-binding").detail
    assert report.get("hugepages").status == FAIL
    assert not report.ok


def _without_nvidia_devices(root):
    """The host's NVIDIA functions gone from the PCI bus, as on a node whose GPUs fell off it."""
    for bdf in os.listdir(root / S.PCI_DEVICES):
        dev = root / S.PCI_DEVICE.format(bdf=bdf)
        if (dev / "vendor").read_text().strip() == "0x10de":
            (root / S.PCI_DEVICES / bdf).unlink()


@pytest.mark.parametrize("machine", ["dgx-h100"])
def test_a_host_with_no_gpu_fails_devices_and_setup_binds_nothing(ready, machine):
    root = ready.sysfs.root
    (root / "etc/modprobe.d/dgxvm-vfio.conf").unlink()
    _without_nvidia_devices(root)
    host = discover(ready.sysfs)
    assert host.passthrough_pcis == ()
    report = run_check(ready)
    f = report.get("devices")
    assert f.status == FAIL and "no NVIDIA GPU" in f.detail and "lspci -d 10de:" in f.fix
    # the per-device checks have nothing to say about no devices: left out, not OK
    assert not {"iommu-groups", "vfio-binding", "vfio-at-boot", "hugepages"} & \
        set(statuses(report))
    binder, pages = for_roots(ready)
    plan = plan_setup(ready, Config(), host, binder, pages, dgxvm_path="/usr/bin/dgxvm")
    assert not any("vfio-pci at boot" in c.text for c in plan.changes), plan.changes
    assert any("nothing to bind" in m for m in plan.manual)


@pytest.mark.parametrize("machine", ["dgx2"])
def test_a_host_without_python3_libvirt_fails_its_daemon_checks_naming_the_package(ready):
    report = run_check(ready, probes=Probes.without("libvirt"))
    for name in ("libvirtd", "images"):
        f = report.get(name)
        assert f.status == FAIL and "apt-get install python3-libvirt" in f.detail, f
    assert report.get("kvm").status == OK


def test_a_command_on_a_host_without_python3_libvirt_names_the_package(tmp_path):
    """`dgxvm host check` runs its other checks; `dgxvm list` fails in one line naming the
    package, exit 3 (the host's fault), not an internal error."""
    block = ("import sys; sys.modules['libvirt'] = None; "
             "from slurm_dgxvm.cli.main import main; sys.exit(main(sys.argv[1:]))")
    env = {**os.environ, "DGXVM_STATE_DIR": str(tmp_path / "state")}
    r = subprocess.run([sys.executable, "-c", block, "list"], capture_output=True, text=True,
                       env=env, timeout=60)
    assert r.returncode == 3, r
    assert r.stderr.strip() == ("dgxvm: error: this command needs the Python module 'libvirt',"
                                " which is not installed (apt-get install python3-libvirt)")
    r = subprocess.run([sys.executable, "-c", block, "host", "check"], capture_output=True,
                       text=True, env=env, timeout=60)
    assert "FAIL libvirtd: this command needs the Python module 'libvirt'" in r.stdout, r
    assert "internal error" not in r.stdout + r.stderr


# -- how the huge pages needed are derived ---------------------------------------------------------
@pytest.mark.parametrize("machine", MACHINES)
def test_huge_pages_needed_per_gpu_node_are_its_memory_less_the_reserve(host, machine):
    need = hugepage_need(host, Config())
    assert set(need) == {g.numa_node for g in host.gpus}
    for node, (size, pages, how) in need.items():
        assert size == 1048576
        assert pages == (host.node(node).memory_mib - 8192) // 1024
        assert "reserved_memory_mib_per_node" in how


@pytest.mark.parametrize("machine", ["dgx-h100"])
def test_a_node_with_no_memory_beyond_the_reserve_fails_and_setup_reserves_no_pool(ready):
    host = discover(ready.sysfs)
    cfg = Config()
    cfg = replace(cfg, placement=replace(cfg.placement, reserved_memory_mib_per_node=10**9))
    f = run_check(ready, cfg=cfg).get("hugepages")
    assert f.status == FAIL and f.detail.startswith("no memory is left for VMs on node 0: ")
    assert "reserved_memory_mib_per_node" in f.fix
    binder, pages = for_roots(ready)
    plan = plan_setup(ready, cfg, host, binder, pages, dgxvm_path="/usr/bin/dgxvm")
    assert not any(c.entry["kind"] == "hugepages" for c in plan.changes)


def test_a_partitions_memory_per_gpu_sets_the_huge_pages_needed(host):
    cfg = Config(partitions={"a": PartitionConfig(memory_mib_per_gpu=40960),
                             "b": PartitionConfig(memory_mib_per_gpu=65536 + 1)})
    need = hugepage_need(host, cfg)
    assert {n: p for n, (_, p, _) in need.items()} == {0: 8 * 65, 1: 8 * 65}   # DGX-2: 8 GPUs a node


def test_no_huge_pages_are_needed_when_vms_use_ordinary_pages(host):
    cfg = Config()
    cfg = replace(cfg, placement=replace(cfg.placement, hugepage_size="none"))
    assert hugepage_need(host, cfg) == {}


# -- parsing ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, want", [
    ("Prolog=/a/dgxvm-prolog\n", {"prolog": "/a/dgxvm-prolog"}),
    ("prolog = /a/x # comment\nPrologFlags=Alloc,Contain\n",
     {"prolog": "/a/x", "prologflags": "Alloc,Contain"}),
    ("NodeName=dgx01 Gres=gpu:8\nPartitionName=batch Nodes=dgx01\n", {}),
    ("Prolog=/first\nProlog=/second\n", {"prolog": "/second"}),       # the last one wins, as Slurm
])
def test_slurm_conf_keys_are_read_case_insensitively(text, want):
    assert C.read_slurm_conf(text) == want


def test_gres_lines_ignore_comments_nodename_and_spacing():
    assert C.gres_lines("# c\nNodeName=a  Name=gpu File=/dev/vfio/3 Cores=0-3  # x\n"
                        "Name=mps Count=1\n") == ["Name=gpu File=/dev/vfio/3 Cores=0-3"]


# -- the command -----------------------------------------------------------------------------------
@pytest.fixture
def cli(monkeypatch, tmp_path):
    """``dgxvm`` with the daemon probes stubbed (no libvirtd, no Fabric Manager here), the
    users' image caches on a filesystem of their own."""
    from slurm_dgxvm.cli.main import main
    probes = {}
    monkeypatch.setattr(Probes, "real", classmethod(lambda cls, cfg: stub_probes(**probes)))
    config = tmp_path / "dgxvm.toml"
    config.write_text(f'[containers]\ncache_dir = "{OWN_FS_CACHE}"\n')

    def dgxvm(root, *args):
        return main(["--config", str(config), "--sysfs-root", str(root), "--state-dir",
                     str(root / "state"), *args])
    dgxvm.probes = probes
    return dgxvm


@pytest.mark.parametrize("machine", ["dgx-h100"])
def test_check_exits_0_when_all_pass_and_1_with_the_failure_and_its_fix(ready, cli, capsys):
    root = ready.sysfs.root
    assert cli(root, "host", "check") == 0
    out = capsys.readouterr().out
    assert out.startswith("SIMULATED host (dgx-h100)")
    assert "OK   vfio-binding: 8 device(s) bound to vfio-pci" in out
    (root / "dev/kvm").unlink()
    assert cli(root, "host", "check") == 1
    out = capsys.readouterr().out
    assert f"FAIL kvm: {root}/dev/kvm does not exist\n     fix: turn VT-x" in out


@pytest.mark.parametrize("machine", ["dgx2"])
def test_check_json_has_stable_keys_and_the_failed_checks(ready, cli, capsys):
    cli.probes["libvirtd"] = HostError(reason="down")
    assert cli(ready.sysfs.root, "host", "check", "--json") == 1
    doc = json.loads(capsys.readouterr().out)
    assert set(doc) == {"ok", "simulated", "findings"} and doc["simulated"] == "dgx2"
    assert not doc["ok"]
    assert all(set(f) == {"check", "status", "detail", "fix"} for f in doc["findings"])
    assert [f["check"] for f in doc["findings"] if f["status"] != OK] == ["libvirtd"]


def test_check_of_a_sysfs_root_that_is_not_a_directory_is_bad_input(cli, tmp_path, capsys):
    rc = cli(tmp_path / "absent", "host", "check")
    assert rc != 0 and "not a directory" in capsys.readouterr().err


# -- what users write on the node ------------------------------------------------------------------
def _storage(tmp_path, cache_dir, mountinfo=None):
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    proc = tmp_path / "proc"
    if mountinfo is not None:
        (proc / "self").mkdir(parents=True, exist_ok=True)
        (proc / "self/mountinfo").write_text(mountinfo)
    roots = HostRoots(sysfs=SysfsRoot(tmp_path), proc=proc, dev=tmp_path / "dev",
                      etc=tmp_path / "etc", state_dir=state, simulated=None)
    cfg = Config()
    cfg = replace(cfg, containers=replace(cfg.containers, cache_dir=cache_dir))
    found = []
    C._user_storage(roots, cfg, lambda *a: found.append(C.Finding(*a)))
    [finding] = found
    return finding


def _mountinfo_line(path, opts, super_opts):
    dev = os.stat(path).st_dev
    return (f"36 25 {os.major(dev)}:{os.minor(dev)} / /srv rw,{opts} shared:1 - ext4 "
            f"/dev/vdb rw,{super_opts}\n")


def test_caches_on_the_state_filesystem_without_quotas_warn_with_the_fix(tmp_path):
    f = _storage(tmp_path, str(tmp_path / "state/containers"),
                 _mountinfo_line(tmp_path, "relatime", "errors=remount-ro"))
    assert f.status == WARN and "no quota" in f.detail and "(/srv, with " in f.detail
    assert "a filesystem of its own" in f.fix and "usrquota" in f.fix


@pytest.mark.parametrize("opts, super_opts", [("relatime", "usrquota"),
                                              ("relatime,usrjquota=aquota.user", "x"),
                                              ("prjquota", "x")])
def test_caches_on_the_state_filesystem_with_quotas_pass(tmp_path, opts, super_opts):
    f = _storage(tmp_path, str(tmp_path / "state/containers"),
                 _mountinfo_line(tmp_path, opts, super_opts))
    assert f.status == OK and "which has quotas" in f.detail


def test_caches_on_a_filesystem_of_their_own_pass(tmp_path):
    assert os.stat("/dev/shm").st_dev != os.stat(tmp_path).st_dev
    f = _storage(tmp_path, OWN_FS_CACHE)
    assert f.status == OK and "a filesystem of their own" in f.detail


def test_no_image_cache_means_nothing_for_users_to_fill(tmp_path):
    f = _storage(tmp_path, "")
    assert f.status == OK and "cache_dir is empty" in f.detail
