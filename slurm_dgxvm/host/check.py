"""``dgxvm host check``: can this host run GPU VMs? One line per check, each failure with its fix.

Checks, in order (a check that cannot apply, e.g. Fabric Manager on a DGX-2, is left out):

=================  =======================================================================
iommu              the IOMMU is on: ``sys/kernel/iommu_groups`` has groups (and the kernel
                   command line asks for it; ``iommu=pt`` missing is a WARN)
devices            the host has GPUs to give to VMs (none: the device checks are left out)
iommu-groups       every GPU (and, where they go into VMs, NVSwitch) has an IOMMU group whose
                   other members are devices dgxvm passes too, or PCI bridges: vfio takes a
                   group whole
vfio-modules       vfio, vfio_pci, vfio_iommu_type1 are loaded (``sys/module``)
vfio-binding       those devices are bound to vfio-pci (unbound: WARN, setup binds them)
vfio-at-boot       ... and will be after a reboot (dgxvm's modprobe.d file lists their ids)
hugepages          each NUMA node with GPUs has its huge page pool (:func:`hugepage_need`)
kvm                /dev/kvm exists and can be opened read-write
libvirtd           libvirtd answers at ``[libvirt] uri``
libvirt-hook       the qemu hook that keeps the ledger true is installed
apparmor           where AppArmor confines libvirtd (Debian's default), its profile lets it
                   run each VM's virtiofsd script (:mod:`slurm_dgxvm.host.apparmor`)
fabric-manager     shared-NVSwitch machines: ``fmpm`` runs and Fabric Manager answers
slurm-hooks        slurm.conf has dgxvm's Prolog and Epilog and ``PrologFlags=Alloc``
gres-conf          gres.conf's GPU lines are those of ``dgxvm gres-conf``
images             the image store holds the default image and every partition's
user-storage       what users write on the node (their container image caches) cannot fill the
                   filesystem of the VMs' disks: ``[containers] cache_dir`` is on a filesystem
                   other than the state dir's, or that filesystem has user quotas (WARN
                   otherwise)
=================  =======================================================================

Status: OK, WARN (works, but not as it should be: said, never a failure) or FAIL. The probes
that need a daemon (libvirtd, Fabric Manager, the image store) are callables in :class:`Probes`,
so the checks' logic is tested without one; :meth:`Probes.real` is the real one.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..config import Config
from ..errors import DgxvmError, ModuleMissing
from ..placement.sizing import gpus_on
from ..topology import sysfs as S
from ..topology.model import SHARED_NVSWITCH, Host
from . import apparmor as AA
from . import roots as R
from .roots import HostRoots

OK, WARN, FAIL = "OK", "WARN", "FAIL"
VFIO_DRIVER = "vfio-pci"
VFIO_MODULES = ("vfio", "vfio_pci", "vfio_iommu_type1")
_BRIDGE_CLASS_PREFIX = "0x0604"
_SETUP = "run `dgxvm host setup`"


@dataclass(frozen=True)
class Finding:
    check: str
    status: str                   # OK | WARN | FAIL
    detail: str
    fix: str | None = None

    def to_json(self) -> dict:
        return {"check": self.check, "status": self.status, "detail": self.detail,
                "fix": self.fix}


@dataclass(frozen=True)
class HostReport:
    findings: tuple[Finding, ...]
    simulated: str | None = None

    @property
    def ok(self) -> bool:
        return all(f.status != FAIL for f in self.findings)

    def get(self, check: str) -> Finding | None:
        return next((f for f in self.findings if f.check == check), None)

    def to_json(self) -> dict:
        return {"ok": self.ok, "simulated": self.simulated,
                "findings": [f.to_json() for f in self.findings]}


@dataclass(frozen=True)
class Probes:
    """The checks that ask a daemon or a tool: each returns a detail line, or raises
    DgxvmError (the check's FAIL, with the error as its detail)."""

    libvirtd: Callable[[], str]
    fabric: Callable[[], str]
    images: Callable[[], str]
    which: Callable[[str], str | None] = field(default=shutil.which)

    @classmethod
    def real(cls, cfg: Config) -> Probes:
        try:
            import libvirt  # noqa: F401  (the lifecycle imports it only when it connects)

            from ..lifecycle import Env
            from .health import libvirt_answers, partition_images
        except ImportError as exc:
            # a host without python3-libvirt: these three checks fail with that, the rest run
            return cls.without(exc.name or str(exc))
        env = Env(cfg)

        def fabric() -> str:
            active = sum(env.fabric.list().values())
            return f"Fabric Manager answers: {active} partition(s) active"
        return cls(libvirtd=lambda: libvirt_answers(env), fabric=fabric,
                   images=lambda: partition_images(env))

    @classmethod
    def without(cls, module: str) -> Probes:
        """Probes for a host missing the Python module ``module`` (libvirt's bindings): each
        one fails naming it and the Debian package that has it."""
        def missing() -> str:
            raise ModuleMissing(module)
        return cls(libvirtd=missing, fabric=missing, images=missing)


# -- what the host must provide -------------------------------------------------------------------
def hugepage_need(host: Host, cfg: Config) -> dict[int, tuple[int, int, str]]:
    """``{node: (page size kB, pages, how derived)}`` for every NUMA node with GPUs; ``{}`` when
    ``[placement] hugepage_size = "none"``.

    VMs are sized from each node's pool (:func:`slurm_dgxvm.placement.sizing.memory_budget_mib`):
    a node's VMs together take at most its pool. The pool that gives them what they would get
    on ordinary pages is the node's memory less ``reserved_memory_mib_per_node``; where a
    partition sets ``memory_mib_per_gpu``, the largest such figure times the node's GPUs.
    Example: a DGX H100 node (1 TiB, 4 GPUs), 1 GiB pages, 8 GiB reserved -> 1016 pages.
    """
    size = cfg.hugepage_kib
    if size is None:
        return {}
    per_gpu = max((p.memory_mib_per_gpu for p in cfg.partitions.values()), default=0)
    reserve = cfg.placement.reserved_memory_mib_per_node
    out = {}
    for node in host.numa_nodes:
        if not host.gpus_by_node.get(node.id):
            continue
        if per_gpu:
            how = (
                f"{gpus_on(host, node.id)} GPU(s) x memory_mib_per_gpu {per_gpu} MiB")
            pages = gpus_on(host, node.id) * -(-per_gpu * 1024 // size)   # whole pages a VM
        else:
            mib, how = node.memory_mib - reserve, (
                f"node memory {node.memory_mib} MiB less reserved_memory_mib_per_node {reserve}")
            pages = mib * 1024 // size
        out[node.id] = (size, max(pages, 0), how)
    return out


def modprobe_ids(host: Host, devices: list[str]) -> list[str]:
    """``vendor:device`` ids of ``devices``, sorted: what vfio-pci's ``ids=`` must list."""
    ids = {f"{g.vendor_id}:{g.device_id}" for g in host.gpus if g.pci in devices}
    ids |= {f"10de:{s.device_id}" for s in host.nvswitches if s.pci in devices}
    return sorted(ids)


# -- the checks -----------------------------------------------------------------------------------
def check_host(roots: HostRoots, cfg: Config, probes: Probes, *,
               host: Host | None = None) -> HostReport:
    out: list[Finding] = []

    def add(check, status, detail, fix=None):
        out.append(Finding(check, status, detail, None if status == OK else fix))

    def run(check, fix, fn):
        try:
            add(check, OK, fn() or "ok")
        except DgxvmError as exc:
            add(check, FAIL, str(exc), fix)

    sysfs = roots.sysfs
    if host is None:
        try:
            from ..topology import discover
            host = discover(sysfs, machine=cfg.host.machine or None,
                            module_ids=cfg.host.module_ids or None)
        except DgxvmError as exc:
            add("topology", FAIL, str(exc), "check the host's PCI devices and host.sysfs_root")
    def guard(check, fn, *args):
        """A check that cannot read what it reads FAILs with the unreadable file, alone."""
        try:
            fn(*args, add)
        except DgxvmError as exc:
            add(check, FAIL, str(exc), "see the file named; on a simulated host, render it again")

    guard("iommu", _iommu, roots)
    if host is not None and not host.passthrough_pcis:
        add("devices", FAIL, "no NVIDIA GPU on the PCI bus (sys/bus/pci/devices): nothing to "
                             "give to VMs",
            "check that the GPUs are seen at all (lspci -d 10de:; dmesg); a GPU bound to no "
            "driver is still listed")
    elif host is not None:
        devices = list(host.passthrough_pcis)
        guard("iommu-groups", _groups, sysfs, devices)
        guard("vfio-modules", _modules, sysfs)
        guard("vfio-binding", _binding, sysfs, devices)
        guard("vfio-at-boot", _at_boot, roots, host, devices)
        guard("hugepages", _hugepages, sysfs, host, cfg)
    guard("kvm", _kvm, roots)
    run("libvirtd", "start libvirtd (systemctl start libvirtd) and check [libvirt] uri",
        probes.libvirtd)
    guard("libvirt-hook", _hook, roots)
    guard("apparmor", _apparmor, roots)
    if host is not None and host.nvswitch_model == SHARED_NVSWITCH:
        guard("fabric-manager", _fabric, cfg, probes)
    guard("slurm-hooks", _slurm_hooks, roots)
    if host is not None:
        guard("gres-conf", _gres, roots, host)
    run("images", "install the image with `dgxvm image install`, or fix the partition's image "
                  "in the config", probes.images)
    guard("user-storage", _user_storage, roots, cfg)
    return HostReport(tuple(out), roots.simulated)


def _cpu_vendor(roots: HostRoots) -> str:
    try:
        text = (roots.proc / "cpuinfo").read_text(errors="replace")
    except OSError:
        return "unknown"
    m = re.search(r"^vendor_id\s*:\s*(\S+)", text, re.M)
    return {"GenuineIntel": "intel", "AuthenticAMD": "amd"}.get(m.group(1) if m else "", "unknown")


def kernel_iommu_args(roots: HostRoots) -> list[str]:
    """The kernel arguments a VM host needs for its CPU vendor."""
    vendor = _cpu_vendor(roots)
    on = {"intel": ["intel_iommu=on"], "amd": ["amd_iommu=on"]}.get(
        vendor, ["intel_iommu=on (Intel) or amd_iommu=on (AMD)"])
    return [*on, "iommu=pt"]


def _cmdline(roots: HostRoots) -> list[str] | None:
    try:
        return (roots.proc / "cmdline").read_text(errors="replace").split()
    except OSError:
        return None


def _iommu(roots: HostRoots, add) -> None:
    args = kernel_iommu_args(roots)
    fix = (f"add {' '.join(args)} to GRUB_CMDLINE_LINUX in /etc/default/grub, run update-grub "
           "and reboot (and turn VT-d / AMD-Vi on in the firmware)")
    groups = roots.sysfs.path(S.IOMMU_GROUPS)
    n = len(os.listdir(groups)) if groups.is_dir() else 0
    cmdline = _cmdline(roots)
    if n == 0:
        add("iommu", FAIL, f"no IOMMU groups in {groups}: the IOMMU is off", fix)
        return
    said = f"{n} IOMMU groups"
    if cmdline is None:
        add("iommu", OK, f"{said} (kernel command line not readable)")
    elif "iommu=pt" not in cmdline:
        add("iommu", WARN, f"{said}, but the kernel command line lacks iommu=pt (the host's own "
                           "DMA goes through the IOMMU: slower)", fix)
    else:
        add("iommu", OK, f"{said}; kernel command line has iommu=pt")


def _groups(sysfs, devices: list[str], add) -> None:
    ours, bad = set(devices), []
    for bdf in devices:
        group = sysfs.pci_link_name(bdf, "iommu_group")
        if group is None:
            bad.append(f"{bdf} has no IOMMU group")
            continue
        members = sysfs.listdir(f"{S.IOMMU_GROUPS}/{group}/devices")
        others = [m for m in members if m not in ours
                  and not (sysfs.pci_attr_optional(m, "class") or "").startswith(
                      _BRIDGE_CLASS_PREFIX)]
        if others:
            bad.append(f"{bdf}'s group {group} also holds {', '.join(others)}")
    if bad:
        add("iommu-groups", FAIL, "; ".join(bad),
            "vfio passes an IOMMU group whole: enable ACS on the PCIe switches in the firmware, "
            "or move the other device; do not use pcie_acs_override (it breaks isolation)")
    else:
        add("iommu-groups", OK, f"{len(devices)} device(s), each in a group dgxvm can pass whole")


def _modules(sysfs, add) -> None:
    missing = [m for m in VFIO_MODULES if not sysfs.exists(S.MODULE, name=m)]
    if missing:
        add("vfio-modules", FAIL, f"not loaded: {', '.join(missing)}",
            f"modprobe vfio-pci (loads them all); {_SETUP} to load it at every boot")
    else:
        add("vfio-modules", OK, ", ".join(VFIO_MODULES) + " loaded")


def _binding(sysfs, devices: list[str], add) -> None:
    wrong, unbound = [], []
    for bdf in devices:
        drv = sysfs.pci_link_name(bdf, "driver")
        if drv is None:
            unbound.append(bdf)
        elif drv != VFIO_DRIVER:
            wrong.append(f"{bdf} ({drv})")
    fix = f"{_SETUP} (binds them to vfio-pci now and at boot)"
    if wrong:
        add("vfio-binding", FAIL, f"{len(wrong)} of {len(devices)} device(s) on another "
                                  f"driver: {', '.join(wrong)}", fix)
    elif unbound:
        add("vfio-binding", WARN, f"{len(unbound)} device(s) bound to no driver (bindable): "
                                  f"{', '.join(unbound)}", fix)
    else:
        add("vfio-binding", OK, f"{len(devices)} device(s) bound to vfio-pci")


def _at_boot(roots: HostRoots, host: Host, devices: list[str], add) -> None:
    path = roots.etc_path(R.MODPROBE_CONF)
    ids = modprobe_ids(host, devices)
    try:
        text = path.read_text()
    except OSError:
        text = ""
    m = re.search(r"^options\s+vfio[-_]pci\s+.*\bids=(\S+)", text, re.M)
    listed = set(m.group(1).split(",")) if m else set()
    if set(ids) <= listed:
        add("vfio-at-boot", OK, f"{path} binds {','.join(ids)} to vfio-pci at boot")
    else:
        add("vfio-at-boot", WARN, f"{path} does not list {','.join(sorted(set(ids) - listed))}:"
                                  " after a reboot the GPUs are on the host's driver", _SETUP)


def _hugepages(sysfs, host: Host, cfg: Config, add) -> None:
    need = hugepage_need(host, cfg)
    if not need:
        add("hugepages", OK, "[placement] hugepage_size = \"none\": VMs use ordinary pages")
        return
    empty = [f"node {node}: {how}" for node, (_, pages, how) in sorted(need.items())
             if pages == 0]
    if empty:
        # no pool can help: the node has no memory to give VMs at all
        add("hugepages", FAIL, "no memory is left for VMs on " + "; ".join(empty),
            "lower [placement] reserved_memory_mib_per_node (or a partition's "
            "memory_mib_per_gpu), or give the node more memory")
        return
    short, low, have = [], [], []
    for node, (size, pages, how) in sorted(need.items()):
        nr = sysfs.node_hugepages(node).get(size, (0, 0))[0]
        have.append(f"node {node}: {nr}/{pages}")
        if nr == 0:
            short.append(f"node {node} has no {size} kB pages (needs {pages}: {how})")
        elif nr < pages:
            low.append(f"node {node} has {nr} of {pages} {size} kB pages ({how})")
    fix = f"{_SETUP} (reserves them now and at every boot)"
    size_word = f"{next(iter(need.values()))[0]} kB"
    if short:
        add("hugepages", FAIL, "; ".join(short) + ": VMs there would use ordinary pages", fix)
    elif low:
        add("hugepages", WARN, "; ".join(low) + ": VMs there get less memory", fix)
    else:
        add("hugepages", OK, f"{size_word} pages per node: " + ", ".join(have))


def _kvm(roots: HostRoots, add) -> None:
    kvm = roots.dev / "kvm"
    fix = ("turn VT-x / AMD-V on in the firmware and load kvm_intel or kvm_amd; libvirt's "
           "qemu user must be in group kvm")
    if not kvm.exists():
        add("kvm", FAIL, f"{kvm} does not exist", fix)
    elif not os.access(kvm, os.R_OK | os.W_OK):
        add("kvm", FAIL, f"{kvm} cannot be opened read-write by this user", fix)
    else:
        add("kvm", OK, f"{kvm} usable")


def hook_installed(roots: HostRoots) -> str | None:
    """The file that runs ``dgxvm hook qemu`` (hooks/qemu or a file of hooks/qemu.d), or None."""
    candidates = [roots.etc_path(R.QEMU_HOOK)]
    d = roots.etc_path(R.QEMU_HOOK_DIR)
    if d.is_dir():
        candidates += sorted(d.iterdir())
    for p in candidates:
        try:
            if p.is_file() and "dgxvm hook qemu" in p.read_text(errors="replace") \
                    and os.access(p, os.X_OK):
                return str(p)
        except OSError:
            continue
    return None


def _hook(roots: HostRoots, add) -> None:
    found = hook_installed(roots)
    if found:
        add("libvirt-hook", OK, f"{found} runs `dgxvm hook qemu`")
    else:
        add("libvirt-hook", FAIL, f"no executable {roots.etc_path(R.QEMU_HOOK)} or "
                                  f"{roots.etc_path(R.QEMU_HOOK_DIR)}/* runs `dgxvm hook qemu`",
            f"{_SETUP} (installs {roots.etc_path(R.QEMU_HOOK_DGXVM)}), then systemctl restart "
            "libvirtd")


def _apparmor(roots: HostRoots, add) -> None:
    mode = AA.libvirtd_mode(roots)
    if mode is None:
        add("apparmor", OK, "AppArmor does not confine libvirtd")
        return
    local = roots.etc_path(AA.LOCAL)
    if AA.has_rule(AA.local_text(roots), roots.state_dir):
        add("apparmor", OK, f"libvirtd ({mode}) may run the VMs' virtiofsd scripts ({local})")
        return
    fix = (f"{_SETUP} (adds `{AA.rule(roots.state_dir)}` to {local}), then apparmor_parser -r "
           f"{roots.etc_path(AA.PROFILE)}")
    detail = (f"libvirtd's AppArmor profile ({mode}) does not let it run the VMs' virtiofsd "
              f"scripts under {roots.state_dir}/vms/")
    if mode == "enforce":
        add("apparmor", FAIL, detail + ": a VM with a work dir share does not start", fix)
    else:
        add("apparmor", WARN, detail + ": AppArmor only logs it now", fix)


def _fabric(cfg: Config, probes: Probes, add) -> None:
    fix = ("install and start Fabric Manager (systemctl start nvidia-fabricmanager) with "
           "fmpm, and check [fabric] fmpm")
    tool = cfg.fabric.fmpm.split()[0] if cfg.fabric.fmpm.split() else ""
    if not tool or not (os.path.isfile(tool) or probes.which(tool)):
        add("fabric-manager", FAIL, f"fmpm {tool!r} not found", fix)
        return
    try:
        add("fabric-manager", OK, probes.fabric())
    except DgxvmError as exc:
        add("fabric-manager", FAIL, str(exc), fix)


def read_slurm_conf(text: str) -> dict[str, str]:
    """``{key lowercased: value}`` of slurm.conf's ``Key=Value`` lines (the last one wins, as in
    Slurm); comments and node/partition lines are skipped."""
    out = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        m = re.match(r"^([A-Za-z]+)\s*=\s*(.*)$", line)
        if m and m.group(1).lower() not in ("nodename", "partitionname", "include"):
            out[m.group(1).lower()] = m.group(2).strip()
    return out


def _slurm_hooks(roots: HostRoots, add) -> None:
    path = roots.etc_path(R.SLURM_CONF)
    fix = (f"merge the hook lines of etc/slurm.conf.fragment (Prolog, Epilog, PrologFlags=Alloc) "
           f"into {path}, then scontrol reconfigure")
    try:
        conf = read_slurm_conf(path.read_text(errors="replace"))
    except OSError as exc:
        add("slurm-hooks", FAIL, f"cannot read {path}: {exc.strerror or exc}", fix)
        return
    bad = []
    for key, want in (("prolog", "dgxvm-prolog"), ("epilog", "dgxvm-epilog")):
        if want not in os.path.basename(conf.get(key, "")):
            bad.append(f"{key.capitalize()}={conf.get(key, '(unset)')} (want .../{want})")
    flags = [f.strip().lower() for f in conf.get("prologflags", "").split(",")]
    if "alloc" not in flags and "contain" not in flags:   # Contain implies Alloc
        bad.append(f"PrologFlags={conf.get('prologflags', '(unset)')} (want Alloc)")
    if bad:
        add("slurm-hooks", FAIL, f"{path}: " + "; ".join(bad), fix)
    else:
        add("slurm-hooks", OK, f"{path}: Prolog, Epilog and PrologFlags=Alloc are dgxvm's")


def gres_lines(text: str) -> list[str]:
    """gres.conf's GPU lines without comments, NodeName= and extra blanks: what must match."""
    out = []
    for line in text.splitlines():
        line = line.split("#", 1)[0]
        words = [w for w in line.split() if not w.lower().startswith("nodename=")]
        if any(w.lower() == "name=gpu" for w in words):
            out.append(" ".join(words))
    return out


def _gres(roots: HostRoots, host: Host, add) -> None:
    from ..topology.gres import gres_conf
    path = roots.etc_path(R.GRES_CONF)
    fix = f"{_SETUP} (writes it), or `dgxvm gres-conf > {path}`; then scontrol reconfigure"
    try:
        want = gres_lines(gres_conf(host))
    except DgxvmError as exc:
        add("gres-conf", FAIL, str(exc), "enable the IOMMU (see the iommu check)")
        return
    try:
        have = gres_lines(path.read_text(errors="replace"))
    except OSError as exc:
        add("gres-conf", FAIL, f"cannot read {path}: {exc.strerror or exc}", fix)
        return
    if have == want:
        add("gres-conf", OK, f"{path}: {len(want)} GPU line(s), as `dgxvm gres-conf`")
    else:
        diff = next((f"line {i + 1}: {a!r}, want {b!r}" for i, (a, b) in enumerate(zip(have, want))
                     if a != b), f"{len(have)} GPU line(s), want {len(want)}")
        add("gres-conf", FAIL, f"{path} differs from `dgxvm gres-conf`: {diff}", fix)


QUOTA_OPTIONS = ("usrquota", "usrjquota", "quota", "prjquota", "uquota", "pquota", "uqnoenforce",
                 "pqnoenforce", "prjjquota")


def _nearest(path: Path) -> Path:
    """``path`` or its nearest parent that exists (what a directory not made yet will be on)."""
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def mount_of(roots: HostRoots, dev: int) -> tuple[str, set[str]] | None:
    """(mount point, its mount and superblock options) of the filesystem ``dev`` from
    ``<proc>/self/mountinfo``, or None when it cannot be told."""
    try:
        text = (roots.proc / "self/mountinfo").read_text()
    except OSError:
        return None
    want = f"{os.major(dev)}:{os.minor(dev)}"
    for line in text.splitlines():
        head, sep, tail = line.partition(" - ")
        fields = head.split()
        if not sep or len(fields) < 6 or fields[2] != want:
            continue
        opts = set(fields[5].split(","))
        rest = tail.split()
        if len(rest) >= 3:
            opts |= set(rest[2].split(","))
        return fields[4], {o.split("=", 1)[0] for o in opts}
    return None


def _user_storage(roots: HostRoots, cfg: Config, add) -> None:
    cache = cfg.containers.cache_dir
    if not cache:
        add("user-storage", OK, "no container image cache ([containers] cache_dir is empty): "
                                "users write nothing on the node's state filesystem")
        return
    state = _nearest(roots.state_dir)
    where = _nearest(Path(cache))
    try:
        s_dev, c_dev = state.stat().st_dev, where.stat().st_dev
    except OSError as exc:
        add("user-storage", FAIL, f"cannot stat {exc.filename}: {exc.strerror}",
            "check host.state_dir and containers.cache_dir")
        return
    mount = mount_of(roots, c_dev)
    mount_point = mount[0] if mount else where
    if s_dev != c_dev:
        add("user-storage", OK, f"the users' image caches ({cache}) are on a filesystem of their "
                                f"own ({mount_point}), not the VMs' disks' ({roots.state_dir})")
        return
    quota = sorted(mount[1] & set(QUOTA_OPTIONS)) if mount else []
    if quota:
        add("user-storage", OK, f"the users' image caches ({cache}) share the VMs' disks' "
                                f"filesystem ({mount_point}), which has quotas "
                                f"({', '.join(quota)})")
        return
    add("user-storage", WARN,
        f"the users' image caches ({cache}) are on the filesystem of the VMs' disks "
        f"({mount_point}, with {roots.state_dir}) with no quota: a user's pulls can fill it, "
        f"and then every VM's overlay writes fail (QEMU pauses the VM)",
        f"mount a filesystem of its own at {cache}, or enable user quotas there (ext4 "
        f"usrquota / usrjquota=, xfs uquota) and give each user a limit (setquota); "
        f"[containers] cache_max_gib bounds what dgxvm run keeps, not what a user writes")
