"""libvirtd under AppArmor: the one rule dgxvm needs in libvirtd's profile.

Debian 12 turns AppArmor on by default, and libvirt-daemon-system confines libvirtd with
``/etc/apparmor.d/usr.sbin.libvirtd`` (enforce mode). That profile lets libvirtd run programs
from ``/usr/bin``, ``/usr/sbin``, ``/usr/lib/libvirt``, ``/etc/libvirt/hooks`` and the packaged
virtiofsd, and nothing else: not the per-VM script dgxvm names as a share's virtiofsd
(``<binary path=...>``, ``<state_dir>/vms/NAME/virtiofsd`` and ``virtiofsd-images``; see
:mod:`slurm_dgxvm.shares`), so a VM with a work dir share would not start. The profile ends
with ``#include <local/usr.sbin.libvirtd>``, the file for a site's additions (libvirt's
postinst creates it empty); ``dgxvm host setup`` adds the one rule there, recorded, and
``dgxvm host revert`` takes it out again. ``PUx``, as the profile's own rules for the programs
it runs: the script runs under its own profile if one exists, else unconfined (it becomes the
job's user in a user namespace of its own before it execs virtiofsd).
"""

from __future__ import annotations

from pathlib import Path

from ..records import IMAGE_CACHE_WRAPPER, SHARE_WRAPPER
from .roots import HostRoots

ENABLED = "sys/module/apparmor/parameters/enabled"           # "Y" when AppArmor is on
PROFILES = "sys/kernel/security/apparmor/profiles"           # "NAME (MODE)" per loaded profile
LOCAL = "apparmor.d/local/usr.sbin.libvirtd"                  # below the /etc root
PROFILE = "apparmor.d/usr.sbin.libvirtd"
MARK = "# slurm-dgxvm: libvirtd runs each VM's virtiofsd script (dgxvm host setup)"
LIBVIRTD_PROFILES = ("libvirtd", "/usr/sbin/libvirtd")


def rule(state_dir: str | Path) -> str:
    """The rule: every VM's share scripts under ``state_dir``."""
    return f"{Path(state_dir)}/vms/*/{{{SHARE_WRAPPER},{IMAGE_CACHE_WRAPPER}}} PUx,"


def libvirtd_mode(roots: HostRoots) -> str | None:
    """The mode AppArmor confines libvirtd in (``enforce``, ``complain``), or None: AppArmor
    off, or no libvirtd profile loaded."""
    try:
        if roots.sysfs.path(ENABLED).read_text().strip() != "Y":
            return None
        lines = roots.sysfs.path(PROFILES).read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        name, _, mode = line.rpartition(" (")
        if name in LIBVIRTD_PROFILES:
            return mode.rstrip(")")
    return None


def has_rule(text: str, state_dir: str | Path) -> bool:
    return rule(state_dir) in (line.strip() for line in text.splitlines())


def with_rule(text: str, state_dir: str | Path) -> str:
    """``text`` (the site's local file) with dgxvm's rule added at its end."""
    if text and not text.endswith("\n"):
        text += "\n"
    return f"{text}{MARK}\n{rule(state_dir)}\n"


def local_text(roots: HostRoots) -> str:
    try:
        return roots.etc_path(LOCAL).read_text()
    except OSError:
        return ""
