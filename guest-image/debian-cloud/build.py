#!/usr/bin/env python3
"""Build a Debian 12 guest the way sites run them: systemd, cloud-init (NoCloud), OpenSSH,
qemu-guest-agent, podman, a Debian cloud kernel, booted by a boot loader from its own disk
(extlinux), from Debian packages only (mmdebstrap). See README.md next to this file.

Output (in ``OUT/<key>/``, ``<key>`` = 12 hex digits of a sha256 over this directory's files and
the exact versions of every package the image installs, as apt resolves them)::

    disk.qcow2     one ext4 file system on the whole disk (no partition table), label
                   dgxvm-root, extlinux in its boot sector; the firmware boots it (no direct
                   kernel boot)
    manifest.json  name, version (= key), disk, format, container_runtime (podman),
                   gpu_devices, readiness (cloud-init), shared_connection (yes),
                   packages (name -> version)
    .complete      written last; a directory without it is never reused

Must run as root (mmdebstrap's root mode; the loop mount extlinux needs to install itself). The
last line of stdout is the output directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import buildcache  # noqa: E402

DEFAULT_OUT = Path("/var/cache/dgxvm/debian-cloud")
NAME = "dgxvm-debian-cloud"
SUITE = "bookworm"
LABEL = "dgxvm-root"
# What the guest runs. No Recommends (mmdebstrap's default): each one is named here.
PACKAGES = (
    "systemd-sysv", "udev", "dbus", "netbase", "ca-certificates", "iproute2", "ifupdown",
    "isc-dhcp-client", "e2fsprogs",    # fsck and resize2fs of the root file system
    "cloud-init",                      # NoCloud: the seed's user-data and meta-data
    "openssh-server",                  # the job's user logs in with the job's key
    "qemu-guest-agent",                # readiness (and the host's view of the guest)
    "podman", "crun", "uidmap", "fuse-overlayfs", "slirp4netns", "catatonit",
    "linux-image-cloud-amd64",
    "extlinux",
)
# Debian's apt sources of the host (a local mirror, or the registry this machine may reach):
# deb822 as Debian 12 installs it, else the one-line format (mmdebstrap reads either)
SOURCES = (Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list"))


def apt_sources() -> Path:
    for path in SOURCES:
        if path.is_file() and path.stat().st_size:
            return path
    raise BuildError(f"no Debian apt sources to build from ({', '.join(map(str, SOURCES))})")
KERNEL_CMDLINE = f"root=LABEL={LABEL} rw console=ttyS0 quiet"
FILES = HERE / "files"            # laid over the root file system (cloud.cfg.d, drop-ins)
DISK_HEADROOM_MIB = 512           # free space in the image for containers' layers and logs

APT_ENV = dict(os.environ, LC_ALL="C", DEBIAN_FRONTEND="noninteractive")


class BuildError(Exception):
    pass


def log(msg: str) -> None:
    print(f"debian-cloud: {msg}", file=sys.stderr, flush=True)


def run(argv: list[str], **kw) -> subprocess.CompletedProcess:
    kw.setdefault("check", True)
    kw.setdefault("text", True)
    kw.setdefault("env", APT_ENV)
    try:
        return subprocess.run(argv, capture_output=True, **kw)
    except subprocess.CalledProcessError as e:
        raise BuildError(f"{' '.join(argv[:3])} ...: exit {e.returncode}: "
                         f"{(e.stderr or e.stdout or '').strip()[-2000:]}") from None


# -- what goes in: the package closure and the cache key ---------------------------------------
_INST = re.compile(r"^Inst (\S+) \((\S+) ")


def closure(packages: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    """Every package installing ``packages`` on an empty system takes, with its version (apt's
    own resolver, simulated against an empty dpkg status: no download, nothing installed)."""
    argv = ["apt-get", "-s", "-o", "Dir::State::status=/dev/null",
            "-o", "APT::Install-Recommends=false", "install", *packages]
    proc = run(argv, check=False)
    if proc.returncode != 0:
        run(["apt-get", "update", "-qq"])
        proc = run(argv)
    out = dict(m.groups() for m in map(_INST.match, proc.stdout.splitlines()) if m)
    missing = [p for p in packages if p not in out]
    if missing:
        raise BuildError(f"apt does not install {', '.join(missing)}")
    return out


def guest_files() -> list[Path]:
    return [HERE / "build.py", HERE / "build", HERE.parent / "buildcache.py",
            *sorted(p for p in FILES.rglob("*") if p.is_file() or p.is_symlink())]


def cache_key(versions: dict[str, str]) -> str:
    h = hashlib.sha256()
    for path in guest_files():
        rel = Path(os.path.relpath(path, HERE)).as_posix()   # ../buildcache.py too
        data = os.readlink(path).encode() if path.is_symlink() else path.read_bytes()
        h.update(f"{rel}\0{len(data)}\0".encode() + data)
    for name, version in sorted(versions.items()):
        h.update(f"{name}={version}\n".encode())
    return h.hexdigest()[:12]


# -- the root file system ---------------------------------------------------------------------
def customize(root: Path) -> None:
    """What a cloud image's build does after the packages: our files, no host keys, no
    machine-id, fstab, the boot loader's configuration."""
    for path in sorted(FILES.rglob("*")):
        dest = root / path.relative_to(FILES)
        if path.is_dir():
            dest.mkdir(parents=True, exist_ok=True)
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest)
        os.chmod(dest, 0o755 if os.access(path, os.X_OK) else 0o644)
    # each VM gets its own: the seed's pinned host key (cloud-init's ssh module), a machine-id
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    # podman's units for containers that restart with the machine or update themselves: a
    # job's VM has none, and each costs half a minute of a TCG boot. Masked, not disabled:
    # the first boot (an empty machine-id) applies the presets, which enable them again.
    for unit in ("podman-auto-update.timer", "podman-auto-update.service",
                 "podman-restart.service", "podman-clean-transient.service", "e2scrub_reap.service",
                 "e2scrub_all.timer"):
        for link in (root / "etc/systemd/system").rglob(unit):
            link.unlink()
        (root / "etc/systemd/system" / unit).symlink_to("/dev/null")
    (root / "etc/machine-id").write_text("")
    dbus_id = root / "var/lib/dbus/machine-id"
    if dbus_id.is_symlink() or dbus_id.exists():
        dbus_id.unlink()
    (root / "etc/fstab").write_text(f"LABEL={LABEL} / ext4 rw,errors=remount-ro 0 1\n")
    (root / "etc/hostname").write_text("debian\n")
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise BuildError(f"expected one kernel in /boot, found {[k.name for k in kernels]}")
    release = kernels[0].name.removeprefix("vmlinuz-")
    ext = root / "boot/extlinux"
    ext.mkdir(parents=True, exist_ok=True)
    (ext / "extlinux.conf").write_text(
        "DEFAULT debian\nTIMEOUT 0\nPROMPT 0\n"
        "LABEL debian\n"
        f"  LINUX /boot/vmlinuz-{release}\n"
        f"  INITRD /boot/initrd.img-{release}\n"
        f"  APPEND {KERNEL_CMDLINE}\n")
    for rel in ("var/cache/apt", "var/lib/apt/lists"):
        for p in (root / rel).glob("*"):
            if p.is_file():
                p.unlink()
    for p in (root / "var/log").rglob("*"):
        if p.is_file():
            p.write_bytes(b"")


def tree_mib(root: Path) -> int:
    total = 0
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink():
            total += p.lstat().st_blocks * 512
    return total >> 20


def build_disk(root: Path, work: Path, out: Path) -> int:
    """ext4 over the whole disk with extlinux in its boot sector (a disk the firmware boots,
    with no partition table: nothing to grow, one file system)."""
    size_mib = tree_mib(root) * 5 // 4 + DISK_HEADROOM_MIB
    raw = work / "disk.raw"
    with open(raw, "wb") as f:
        f.truncate(size_mib << 20)
    # no 64bit feature (only file systems over 16 TiB need it): SYSLINUX 6.04 cannot read an
    # ext4 that has it, and hangs after its banner
    run(["mke2fs", "-q", "-F", "-t", "ext4", "-O", "^64bit", "-L", LABEL,
         "-E", "root_owner=0:0", "-d", str(root), str(raw)])
    mnt = work / "mnt"
    mnt.mkdir()
    dev = run(["losetup", "--find", "--show", str(raw)]).stdout.strip()
    try:
        run(["mount", dev, str(mnt)])
        try:
            run(["extlinux", "--install", str(mnt / "boot/extlinux")])
        finally:
            run(["umount", str(mnt)])
    finally:
        run(["losetup", "--detach", dev])
    with open(raw, "rb") as f:
        boot = f.read(512)
    if boot[510:512] != b"\x55\xaa" or b"SYSLINUX" not in boot:
        raise BuildError(f"extlinux left no boot sector in {raw} (through {dev})")
    run(["e2fsck", "-f", "-n", str(raw)])
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(out)])
    raw.unlink()
    return size_mib


# -- main --------------------------------------------------------------------------------------
def build(out_root: Path, force: bool) -> Path:
    buildcache.require(("apt-get", "mmdebstrap", "mke2fs", "e2fsck", "extlinux", "losetup",
                        "mount", "qemu-img"), BuildError,
                       "mmdebstrap's root mode, a loop mount for extlinux")
    sources = apt_sources()
    t0 = time.monotonic()
    versions = closure()
    key = cache_key(versions)

    def make(work: Path, result: Path) -> None:
        root = work / "root"
        log(f"mmdebstrap {SUITE}: {len(versions)} packages")
        run(["mmdebstrap", "--variant=apt", "--mode=root", "--format=directory",
             "--aptopt=Acquire::Retries \"3\"", f"--include={','.join(PACKAGES)}",
             SUITE, str(root), str(sources)])
        installed = dict(line.split("\t", 1) for line in run(
            ["dpkg-query", f"--admindir={root}/var/lib/dpkg", "-W",
             "-f", "${Package}\t${Version}\n"]).stdout.splitlines() if "\t" in line)
        customize(root)
        size = build_disk(root, work, result / "disk.qcow2")
        manifest = {
            "name": NAME,
            "version": key,
            "disk": "disk.qcow2",
            "format": "qcow2",
            "kernel": None,            # the firmware boots the disk (extlinux)
            # the profile dgxvm image install records
            "container_runtime": "podman",
            "gpu_devices": "none",     # no NVIDIA driver in this image (simulated GPUs)
            "readiness": "cloud-init",
            # OpenSSH multiplexes sessions on one connection (the seed raises MaxSessions)
            "shared_connection": "yes",
            "disk_size_mib": size,
            "kernel_cmdline": KERNEL_CMDLINE,
            "packages": dict(sorted(installed.items())),
        }
        (result / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")

    return buildcache.cached_build(out_root, key, make, log, force=force, started=t0)


def main(argv: list[str] | None = None) -> int:
    return buildcache.main(argv, description=__doc__.split("\n")[0], default_out=DEFAULT_OUT,
                           tag="debian-cloud", build=build, error=BuildError,
                           print_key=lambda: cache_key(closure()))


if __name__ == "__main__":
    sys.exit(main())
