"""``dgxvm host setup`` and ``dgxvm host revert``.

Setup makes the changes that can be made safely, now and for every boot, each recorded first
(:mod:`.setup_record`):

- the GPUs (and, on a DGX-2, the NVSwitches) are bound to vfio-pci now (:mod:`.kernel`), and at
  boot by ``<etc>/modprobe.d/dgxvm-vfio.conf`` (``options vfio-pci ids=...`` plus ``softdep``
  lines that load vfio-pci before nvidia and nouveau, so it claims the devices first) and
  ``<etc>/modules-load.d/dgxvm-vfio.conf`` (loads vfio-pci at boot even when nothing else does).
  Why modprobe.d and not driverctl: it needs no extra package, and on a DGX every GPU goes to
  VMs, so matching by vendor:device id takes exactly them; a shared-NVSwitch machine's
  NVSwitches have another device id and stay with the host's driver for Fabric Manager.
- each GPU node's huge page pool is raised to :func:`.check.hugepage_need` now, and at boot by
  ``<etc>/systemd/system/dgxvm-hugepages.service`` (enabled with the link systemctl enable
  makes), which writes each node's ``nr_hugepages`` before libvirtd starts. Per node, because
  the kernel's plain ``hugepages=N`` splits the pages evenly over all nodes, GPU or not.
- the libvirt qemu hook, where the Debian package puts it (``hooks/qemu.d/slurm-dgxvm``), when
  no hook runs ``dgxvm hook qemu`` yet;
- ``<etc>/slurm/gres.conf`` from ``dgxvm gres-conf`` when its GPU lines differ.

Setup never lowers a pool, never edits the kernel command line, slurm.conf or the initramfs:
those it prints as manual steps (the command line needs a reboot; 1 GiB pages are allocated
most reliably there, as ``hugepagesz=1G hugepages=0:N,1:M``, per node since Linux 5.16).
Setup is idempotent: a second run plans nothing. Revert undoes the record's entries, last
first, and removes the record; with no record there is nothing to revert (exit 0: a purge
that runs it on a host setup never touched must not fail). A file changed since setup, or a
device someone rebound, is left as it is and named (exit 1).
"""

from __future__ import annotations

import hashlib
import os
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..config import Config
from ..errors import DgxvmError, HostError
from ..fsutil import atomic_write
from ..topology import sysfs as S
from ..topology.model import Host
from . import apparmor as AA
from . import roots as R
from .check import (VFIO_DRIVER, gres_lines, hook_installed, hugepage_need, kernel_iommu_args,
                    modprobe_ids)
from .setup_record import SetupRecord, decode, encode
from .roots import HostRoots

MARK = "Written by `dgxvm host setup`; `dgxvm host revert` puts back what was here before."
_REPO_HOOK = Path(__file__).resolve().parents[2] / "etc/libvirt/hooks/qemu"
_HOOK_DGXVM_PATH = "/usr/local/bin/dgxvm"          # the path in etc/libvirt/hooks/qemu


@dataclass(frozen=True)
class Change:
    """One change setup would make. ``entry`` is its record entry (with ``before``)."""

    text: str
    entry: dict


@dataclass
class Plan:
    changes: list[Change] = field(default_factory=list)
    manual: list[str] = field(default_factory=list)     # what an admin must do by hand


# -- planning -------------------------------------------------------------------------------------
def plan_setup(roots: HostRoots, cfg: Config, host: Host, binder, pages, *,
               dgxvm_path: str | None = None, hook_source: Path | None = None) -> Plan:
    """What setup would change on this host now (nothing when it is set up already)."""
    plan = Plan()
    devices = list(host.passthrough_pcis)
    groups = roots.sysfs.path(S.IOMMU_GROUPS)
    iommu_on = groups.is_dir() and any(groups.iterdir())
    if not iommu_on:
        plan.manual.append("the IOMMU is off: vfio-pci cannot take a device without an IOMMU "
                           "group, so nothing is bound now; run setup again after the reboot")
    for bdf in devices if iommu_on else ():
        drv = binder.driver(bdf)
        if drv != VFIO_DRIVER:
            plan.changes.append(Change(f"bind {bdf} to vfio-pci (now on {drv or 'no driver'})",
                                       {"kind": "bind", "bdf": bdf, "before": drv,
                                        "after": VFIO_DRIVER}))
    need = hugepage_need(host, cfg)
    targets = {}
    for node, (size, want, how) in sorted(need.items()):
        if want == 0:
            continue   # no memory for VMs there: host check says so, a pool of 0 is no fix
        have = pages.get(node, size)
        targets[node] = (size, max(have, want))
        if have < want:
            plan.changes.append(Change(
                f"reserve {want} {size} kB huge pages on node {node} (now {have}; {how})",
                {"kind": "hugepages", "node": node, "size_kib": size, "before": have,
                 "after": want}))
    ids = modprobe_ids(host, devices)
    if ids:
        _file(plan, roots, R.MODPROBE_CONF, _modprobe_text(ids), 0o644,
              f"bind {','.join(ids)} to vfio-pci at boot")
    else:
        plan.manual.append("no NVIDIA GPU on the PCI bus: nothing to bind to vfio-pci "
                           "(check lspci -d 10de:)")
    _file(plan, roots, R.MODULES_LOAD_CONF, f"# {MARK}\nvfio-pci\n", 0o644,
          "load vfio-pci at boot")
    if targets:
        _file(plan, roots, R.HUGEPAGES_UNIT, _unit_text(targets), 0o644,
              "reserve the huge pages per node at boot")
        _link(plan, roots, R.HUGEPAGES_WANTS, "../dgxvm-hugepages.service",
              "enable dgxvm-hugepages.service")
    if hook_installed(roots) is None:
        src = hook_source or _REPO_HOOK
        try:
            text = src.read_text()
        except OSError:
            plan.manual.append(f"install the libvirt qemu hook (etc/libvirt/hooks/qemu of "
                               f"slurm-dgxvm; not found at {src}) as "
                               f"{roots.etc_path(R.QEMU_HOOK_DGXVM)}, mode 0755")
        else:
            _file(plan, roots, R.QEMU_HOOK_DGXVM, _hook_text(text, dgxvm_path), 0o755,
                  "install the libvirt qemu hook")
    if AA.libvirtd_mode(roots) is not None:
        local = AA.local_text(roots)
        if not AA.has_rule(local, roots.state_dir):
            path = roots.etc_path(AA.LOCAL)
            mode = stat.S_IMODE(path.stat().st_mode) if path.is_file() else 0o644
            _file(plan, roots, AA.LOCAL, AA.with_rule(local, roots.state_dir), mode,
                  "let libvirtd run each VM's virtiofsd script under AppArmor")
    from ..topology.gres import gres_conf
    gres_path = roots.etc_path(R.GRES_CONF)
    try:
        want_gres = gres_conf(host)
        have = gres_lines(gres_path.read_text(errors="replace")) if gres_path.is_file() else None
        if have != gres_lines(want_gres):
            _file(plan, roots, R.GRES_CONF, f"# {MARK}\n{want_gres}", 0o644,
                  "write gres.conf as `dgxvm gres-conf`")
    except DgxvmError as exc:
        plan.manual.append(f"gres.conf: {exc}")
    _manual(plan, roots, need, [c for c in plan.changes])
    return plan


def _modprobe_text(ids: list[str]) -> str:
    return (f"# {MARK}\n# GPUs (and NVSwitches on a DGX-2) go to VMs: vfio-pci claims them by id,\n"
            "# and is loaded before the drivers that would take them first.\n"
            f"options vfio-pci ids={','.join(ids)}\n"
            "softdep nvidia pre: vfio-pci\nsoftdep nouveau pre: vfio-pci\n")


def _unit_text(targets: dict[int, tuple[int, int]]) -> str:
    lines = [f"# {MARK}", "[Unit]",
             "Description=dgxvm: reserve huge pages on each GPU NUMA node for GPU VMs",
             "DefaultDependencies=no", "After=local-fs.target",
             "Before=libvirtd.service slurmd.service", "", "[Service]", "Type=oneshot",
             "RemainAfterExit=yes"]
    for node, (size, count) in sorted(targets.items()):
        f = "/" + S.NODE_HUGEPAGES.format(node=node) + f"/hugepages-{size}kB/nr_hugepages"
        lines.append(f"ExecStart=/bin/sh -c 'echo {count} > {f}'")
    lines += ["", "[Install]", "WantedBy=multi-user.target"]
    return "\n".join(lines) + "\n"


def _hook_text(text: str, dgxvm_path: str | None) -> str:
    path = dgxvm_path or _dgxvm_path()
    first, _, rest = text.partition("\n")
    return f"{first}\n# {MARK}\n{rest.replace(_HOOK_DGXVM_PATH, path)}"


def _dgxvm_path() -> str:
    import shutil
    return shutil.which("dgxvm") or os.path.abspath(sys.argv[0])


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _before(p: Path) -> dict | None:
    if p.is_symlink():
        return {"symlink": os.readlink(p)}
    if p.is_file():
        return {"content": encode(p.read_bytes()), "mode": stat.S_IMODE(p.stat().st_mode)}
    if p.exists():
        raise HostError(reason=f"{p} exists and is neither a file nor a symlink")
    return None


def _missing_dirs(p: Path) -> list[str]:
    out, d = [], p.parent
    while not d.exists():
        out.append(str(d))
        d = d.parent
    return out


def _file(plan: Plan, roots: HostRoots, rel: str, text: str, mode: int, why: str) -> None:
    p = roots.etc_path(rel)
    data = text.encode()
    if p.is_file() and not p.is_symlink() and p.read_bytes() == data \
            and stat.S_IMODE(p.stat().st_mode) == mode:
        return
    before = _before(p)
    verb = "replace" if before is not None else "write"
    plan.changes.append(Change(f"{verb} {p} ({why})",
                               {"kind": "file", "path": rel, "before": before, "mode": mode,
                                "content": encode(data), "after_sha256": _sha(data),
                                "made_dirs": _missing_dirs(p)}))


def _link(plan: Plan, roots: HostRoots, rel: str, target: str, why: str) -> None:
    p = roots.etc_path(rel)
    if p.is_symlink() and os.readlink(p) == target:
        return
    plan.changes.append(Change(f"link {p} -> {target} ({why})",
                               {"kind": "symlink", "path": rel, "before": _before(p),
                                "target": target, "made_dirs": _missing_dirs(p)}))


def _manual(plan: Plan, roots: HostRoots, need, changes: list[Change]) -> None:
    groups = roots.sysfs.path(S.IOMMU_GROUPS)
    try:
        cmdline = (roots.proc / "cmdline").read_text().split()
    except OSError:
        cmdline = []
    args = kernel_iommu_args(roots)
    if not (groups.is_dir() and any(groups.iterdir())) or "iommu=pt" not in cmdline:
        plan.manual.append(f"kernel command line (needs a reboot): add {' '.join(args)} to "
                           "GRUB_CMDLINE_LINUX in /etc/default/grub, then update-grub")
    paths = {c.entry.get("path") for c in changes}
    if need and (R.HUGEPAGES_UNIT in paths or any(c.entry["kind"] == "hugepages" for c in changes)):
        size = next(iter(need.values()))[0]
        per_node = ",".join(f"{n}:{p}" for n, (_, p, _) in sorted(need.items()))
        plan.manual.append(f"optional, most reliable for {size} kB pages: reserve them at boot on "
                           f"the kernel command line, hugepagesz={size // 1024 // 1024 or 2}"
                           f"{'G' if size >= 1048576 else 'M'} hugepages={per_node} (Linux >= "
                           "5.16), instead of dgxvm-hugepages.service")
    if AA.LOCAL in paths:
        plan.manual.append(f"apparmor_parser -r {roots.etc_path(AA.PROFILE)} (libvirtd's "
                           "profile takes the new rule; running guests are not touched)")
    if R.MODPROBE_CONF in paths:
        plan.manual.append("update-initramfs -u (where the initramfs loads nvidia, so that "
                           "vfio-pci claims the GPUs there too)")
    if R.HUGEPAGES_UNIT in paths:
        plan.manual.append("systemctl daemon-reload")
    if R.QEMU_HOOK_DGXVM in paths:
        plan.manual.append("systemctl restart libvirtd (libvirtd reads its hooks when it starts)")
    if R.GRES_CONF in paths:
        plan.manual.append("scontrol reconfigure (Slurm reads gres.conf again)")


# -- doing ----------------------------------------------------------------------------------------
def apply(plan: Plan, roots: HostRoots, binder, pages,
          say: Callable[[str], None] = lambda _: None) -> SetupRecord:
    """Make ``plan``'s changes, each recorded before it is made. Raises HostError on the first
    that fails (what was done is recorded: revert undoes it)."""
    record = SetupRecord.load(roots.record_path) or SetupRecord(roots.record_path)
    for change in plan.changes:
        e = change.entry
        record.add(dict(e))
        try:
            if e["kind"] == "bind":
                binder.bind(e["bdf"], e["after"])
            elif e["kind"] == "hugepages":
                got = pages.set(e["node"], e["size_kib"], e["after"])
                if got < e["after"]:
                    say(f"node {e['node']}: the kernel gave {got} of {e['after']} pages "
                        "(memory fragmented: reserve them on the kernel command line)")
            elif e["kind"] == "file":
                p = roots.etc_path(e["path"])
                p.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
                if p.is_symlink():
                    p.unlink()
                atomic_write(p, decode(e["content"]), mode=e["mode"])
            elif e["kind"] == "symlink":
                p = roots.etc_path(e["path"])
                p.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
                p.unlink(missing_ok=True)
                os.symlink(e["target"], p)
        except (OSError, DgxvmError) as exc:
            raise HostError(reason=f"{change.text}: {exc} (what was done is recorded in "
                                   f"{record.path}: `dgxvm host revert` undoes it)") from None
        say(change.text)
    return record


@dataclass
class RevertResult:
    done: list[str] = field(default_factory=list)
    left: list[str] = field(default_factory=list)      # changed since setup: not touched
    had_record: bool = True


def revert(roots: HostRoots, binder, pages, *, dry_run: bool = False,
           say: Callable[[str], None] = lambda _: None) -> RevertResult:
    record = SetupRecord.load(roots.record_path)
    if record is None:
        return RevertResult(had_record=False)
    result = RevertResult()
    for e in reversed(record.changes):
        try:
            text = _revert_one(roots, binder, pages, e, dry_run)
        except (OSError, DgxvmError) as exc:
            raise HostError(reason=f"reverting {e.get('path') or e.get('bdf') or e}: {exc}") \
                from None
        if text is None:
            continue
        (result.left if text.startswith("left ") else result.done).append(text)
        say(text)
    if not dry_run and not result.left:
        record.remove()
    return result


def _revert_one(roots: HostRoots, binder, pages, e: dict, dry_run: bool) -> str | None:
    kind = e["kind"]
    if kind == "bind":
        now = binder.driver(e["bdf"])
        if now == e["before"]:
            return None
        if now != e["after"]:
            return (f"left {e['bdf']}: bound to {now or 'no driver'} since setup (setup bound it "
                    f"to {e['after']})")
        if not dry_run:
            binder.bind(e["bdf"], e["before"])
        return f"bind {e['bdf']} to {e['before'] or 'no driver'} again"
    if kind == "hugepages":
        now = pages.get(e["node"], e["size_kib"])
        if now == e["before"]:
            return None
        if not dry_run:
            pages.set(e["node"], e["size_kib"], e["before"])
        return f"node {e['node']}: {e['before']} {e['size_kib']} kB huge pages again (now {now})"
    p = roots.etc_path(e["path"])
    now = _before(p)
    if now == e["before"]:
        text = None
    elif kind == "file" and not (now and "content" in now
                                 and _sha(decode(now["content"])) == e["after_sha256"]):
        return f"left {p}: changed since setup wrote it"
    elif kind == "symlink" and now != {"symlink": e["target"]}:
        return f"left {p}: changed since setup linked it"
    else:
        text = f"{'restore' if e['before'] else 'remove'} {p}"
        if not dry_run:
            _restore(p, e["before"])
    if not dry_run:
        for d in e.get("made_dirs", ()):
            try:
                os.rmdir(d)
            except OSError:
                break
    return text


def _restore(p: Path, before: dict | None) -> None:
    if p.is_symlink() or p.exists():
        p.unlink()
    if before is None:
        return
    if "symlink" in before:
        os.symlink(before["symlink"], p)
    else:
        atomic_write(p, decode(before["content"]), mode=before["mode"])
