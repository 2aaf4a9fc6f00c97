"""Where ``dgxvm host`` looks and writes: every root injectable, the real paths by default.

On a simulated host (the sysfs root holds ``dgxvm simulate``'s marker) /proc, /dev and /etc
default to ``proc/``, ``dev/`` and ``etc/`` inside the simulated tree, so that check, setup and
revert never read or touch the real machine's files for a simulated one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..topology.sysfs import SysfsRoot

# Below the /etc root. Files dgxvm writes are named for it; hooks go where the Debian package
# puts them (libvirt >= 6.5 runs every file of hooks/qemu.d/ after hooks/qemu).
MODPROBE_CONF = "modprobe.d/dgxvm-vfio.conf"
MODULES_LOAD_CONF = "modules-load.d/dgxvm-vfio.conf"
HUGEPAGES_UNIT = "systemd/system/dgxvm-hugepages.service"
HUGEPAGES_WANTS = "systemd/system/multi-user.target.wants/dgxvm-hugepages.service"
QEMU_HOOK = "libvirt/hooks/qemu"
QEMU_HOOK_DIR = "libvirt/hooks/qemu.d"
QEMU_HOOK_DGXVM = "libvirt/hooks/qemu.d/slurm-dgxvm"
SLURM_CONF = "slurm/slurm.conf"
GRES_CONF = "slurm/gres.conf"
# Below the state dir: what setup changed, for revert.
SETUP_RECORD = "host-setup.json"


@dataclass(frozen=True)
class HostRoots:
    sysfs: SysfsRoot
    proc: Path
    dev: Path
    etc: Path
    state_dir: Path
    simulated: str | None           # the machine a simulated tree imitates; None: a real host

    @classmethod
    def make(cls, sysfs_root: str | os.PathLike, state_dir: str | os.PathLike, *,
             proc: str | os.PathLike | None = None, dev: str | os.PathLike | None = None,
             etc: str | os.PathLike | None = None) -> HostRoots:
        sysfs = SysfsRoot(sysfs_root)
        marker = sysfs.simulated()
        base = sysfs.root if marker is not None else Path("/")
        return cls(sysfs=sysfs, proc=Path(proc) if proc else base / "proc",
                   dev=Path(dev) if dev else base / "dev",
                   etc=Path(etc) if etc else base / "etc", state_dir=Path(state_dir),
                   simulated=(marker or {}).get("machine") if marker is not None else None)

    def etc_path(self, rel: str) -> Path:
        return self.etc / rel

    @property
    def record_path(self) -> Path:
        return self.state_dir / SETUP_RECORD
