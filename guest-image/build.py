#!/usr/bin/env python3
"""Build the small dgxvm test guest from Debian packages only (see README.md next to this file).

Output (in ``OUT/<key>/``, ``<key>`` = 12 hex digits of a sha256 over this script, the guest's
files under ``rootfs/`` and ``initramfs/`` and the exact package versions)::

    vmlinuz        the kernel of linux-image-amd64 (its versioned linux-image-6.x package)
    initrd.img     gzip'd newc cpio: busybox-static, the virtio/ext4/isofs/9p/virtiofs modules in
                   dependency order, /init that mounts /dev/vda and switch_roots into it
    disk.qcow2     ext4 root filesystem (mke2fs -d, no loop device) with busybox, dropbear,
                   qemu-guest-agent, runc, umoci and the library packages they need
    manifest.json  name, version (= key), file names, kernel command line, package versions
    .complete      written last; a directory without it is never reused

Only ``apt-get download`` and ``dpkg-deb`` are used to get files: nothing is copied from the
host's /lib. ``apt-get update`` runs only when the package lists do not know a package (or a
download fails because the lists are stale). The last line of stdout is the output directory.
Must run as root (``dpkg-deb -x`` then keeps the packages' root ownership, which mke2fs -d copies
into the image).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# The seed readers the guest's init sources at boot, installed as /usr/lib/dgxvm/seed.sh: one
# copy, in the package, since a warm VM's claim (slurm_dgxvm/lifecycle/warm.py) sends the same
# functions to a guest that may not have them (a cloud-init image).
SEED_SH = HERE.parent / "slurm_dgxvm" / "seedfiles" / "seed.sh"
SEED_SH_IN_GUEST = "usr/lib/dgxvm/seed.sh"
import buildcache  # noqa: E402

DEFAULT_OUT = Path("/var/cache/dgxvm/test-guest")
NAME = "dgxvm-test-guest"

KERNEL_META = "linux-image-amd64"
# What the guest runs; their library dependencies are added by walking apt's Depends.
ROOT_PACKAGES = ("busybox-static", "dropbear-bin", "qemu-guest-agent", "runc", "umoci",
                 "uidmap")   # newuidmap/newgidmap: a container as the user's own uid
# Dependencies worth following: shared-library packages only (not init-system-helpers & co).
LIBRARY_PACKAGE = re.compile(r"^(lib[a-z0-9].*|zlib1g)$")

# Kernel modules for the initramfs, loaded in this order (each after its own dependencies).
# Required ones must exist as a module or be built in; optional ones are skipped when absent.
MODULES_REQUIRED = (
    "virtio_pci", "virtio_blk", "virtio_net", "virtio_console",
    "ext4", "isofs", "9pnet_virtio", "9p", "fuse", "virtiofs",
)
MODULES_OPTIONAL_EARLY = ("crc32c_generic", "crc32c_intel", "af_packet")
MODULES_OPTIONAL_LATE = (
    "virtio_rng", "virtio_scsi", "ahci", "sr_mod", "sd_mod",  # a seed on a SATA/SCSI CD-ROM
    "button", "evdev",                                       # ACPI power button for acpid
    "overlay",                                               # container root filesystems
)

# no_timer_check: under TCG with 16 guests booting on 2 CPUs, one guest halted for good after
# the kernel's IO-APIC timer check ("MP-BIOS bug: 8254 timer not connected to IO-APIC"), which
# counts timer ticks against a busy-wait that a starved vCPU cannot keep. The kernel's
# parameter list: "no_timer_check: Disables the code which tests for broken timer IRQ sources,
# i.e., the IO-APIC timer" (Documentation/admin-guide/kernel-parameters.txt).
CMDLINE = ("console=ttyS0 root=/dev/vda rootfstype=ext4 rw loglevel=4 no_timer_check "
           "init=/sbin/dgxvm-init")
DISK_MIN_MIB = 256

PRUNE = ("usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale",
         "usr/share/lintian", "usr/share/bug", "usr/share/bash-completion", "etc/init.d",
         "lib/systemd", "usr/lib/systemd", "etc/default", "etc/logrotate.d",
         "usr/lib/x86_64-linux-gnu/gconv")  # iconv modules: nothing in the guest converts charsets
LIB_DIRS = ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu", "lib64", "lib", "usr/lib")


class BuildError(Exception):
    pass


def log(msg: str) -> None:
    print(f"guest-image: {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], *, cwd: Path | None = None, check: bool = True,
        env: dict | None = None) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=env, text=True, capture_output=True,
                              stdin=subprocess.DEVNULL)
    except FileNotFoundError as exc:
        raise BuildError(f"{cmd[0]} not found: {exc}") from None
    if check and proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip()[-2000:]
        raise BuildError(f"{' '.join(cmd[:4])}{' ...' if len(cmd) > 4 else ''} failed "
                         f"(exit {proc.returncode}): {tail}")
    return proc


# -- apt ---------------------------------------------------------------------------------------
APT_ENV = dict(os.environ, LC_ALL="C", DEBIAN_FRONTEND="noninteractive")


def apt_show(packages: list[str]) -> dict[str, dict[str, str]]:
    """Candidate fields (Version, Architecture, Depends, Pre-Depends) of each package."""
    proc = run(["apt-cache", "show", "--no-all-versions", *packages], check=False, env=APT_ENV)
    out: dict[str, dict[str, str]] = {}
    for para in proc.stdout.split("\n\n"):
        fields: dict[str, str] = {}
        key = None
        for line in para.splitlines():
            if line[:1] in (" ", "\t") and key:
                fields[key] += " " + line.strip()
            elif ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        if "Package" in fields and fields["Package"] not in out:
            out[fields["Package"]] = fields
    return out


def first_alternatives(depends: str) -> list[str]:
    """``a (>= 1) | b, c:any`` -> ``[a, c]``."""
    names = []
    for group in filter(None, (g.strip() for g in depends.split(","))):
        first = group.split("|")[0].strip()
        names.append(first.split()[0].split(":")[0])
    return names


def ensure_lists(probe: list[str]) -> None:
    known = apt_show(probe)
    if all(p in known for p in probe):
        return
    log("apt package lists do not know " + ", ".join(p for p in probe if p not in known)
        + "; running apt-get update")
    run(["apt-get", "update", "-qq"], env=APT_ENV)
    known = apt_show(probe)
    missing = [p for p in probe if p not in known]
    if missing:
        raise BuildError(f"no installable candidate for {', '.join(missing)}")


def resolve_packages() -> tuple[dict[str, dict[str, str]], str]:
    """``({package: fields}, kernel_package)``: everything the image is made of."""
    ensure_lists([KERNEL_META, *ROOT_PACKAGES])
    meta = apt_show([KERNEL_META])[KERNEL_META]
    kernel_pkgs = [d for d in first_alternatives(meta.get("Depends", ""))
                   if d.startswith("linux-image-")]
    if len(kernel_pkgs) != 1:
        raise BuildError(f"{KERNEL_META} {meta.get('Version')} depends on {kernel_pkgs}, "
                         "expected exactly one linux-image-6.x package")
    kernel_pkg = kernel_pkgs[0]
    chosen: dict[str, dict[str, str]] = {}
    todo = [KERNEL_META, kernel_pkg, *ROOT_PACKAGES]
    while todo:
        info = apt_show(sorted(set(todo)))
        missing = sorted(set(todo) - set(info))
        if missing:
            raise BuildError(f"apt knows no candidate for {', '.join(missing)}")
        todo = []
        for name, fields in info.items():
            chosen[name] = fields
            if name in (KERNEL_META, kernel_pkg):
                continue
            deps = first_alternatives(fields.get("Pre-Depends", "")) + \
                first_alternatives(fields.get("Depends", ""))
            todo += [d for d in deps if LIBRARY_PACKAGE.match(d) and d not in chosen]
    return dict(sorted(chosen.items())), kernel_pkg


def deb_filename(name: str, fields: dict[str, str]) -> str:
    version = fields["Version"].replace(":", "%3a")
    return f"{name}_{version}_{fields['Architecture']}.deb"


def download(packages: dict[str, dict[str, str]], debs: Path) -> dict[str, Path]:
    debs.mkdir(parents=True, exist_ok=True)
    paths = {name: debs / deb_filename(name, f) for name, f in packages.items()}
    missing = [name for name, p in paths.items() if not p.is_file()]
    if missing:
        log(f"downloading {len(missing)} package(s): {' '.join(missing)}")
        args = ["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root",
                *(f"{n}={packages[n]['Version']}" for n in missing)]
        proc = run(args, cwd=debs, check=False, env=APT_ENV)
        if proc.returncode != 0:  # stale lists (a superseded version): refresh once and retry
            log("apt-get download failed; running apt-get update and retrying")
            run(["apt-get", "update", "-qq"], env=APT_ENV)
            run(args, cwd=debs, env=APT_ENV)
    for p in paths.values():
        if not p.is_file():
            raise BuildError(f"apt-get download did not produce {p.name}")
    # keep the download cache bounded: drop superseded versions (and partial downloads)
    keep = {p.name for p in paths.values()}
    for p in debs.iterdir():
        if p.name not in keep and p.is_file():
            p.unlink()
    return paths


# -- cache key ---------------------------------------------------------------------------------
def guest_files() -> list[Path]:
    files = []
    for top in ("rootfs", "initramfs"):
        files += [p for p in sorted((HERE / top).rglob("*")) if p.is_file() or p.is_symlink()]
    return files + [SEED_SH]


def cache_key(packages: dict[str, dict[str, str]]) -> str:
    h = hashlib.sha256()
    for path in [HERE / "build.py", HERE / "build", HERE / "buildcache.py", *guest_files()]:
        rel = SEED_SH_IN_GUEST if path == SEED_SH else path.relative_to(HERE).as_posix()
        mode = "x" if os.access(path, os.X_OK) else "-"
        data = os.readlink(path).encode() if path.is_symlink() else path.read_bytes()
        h.update(f"{rel}\0{mode}\0{len(data)}\0".encode() + data)
    for name, fields in sorted(packages.items()):
        h.update(f"{name}={fields['Version']}\n".encode())
    return h.hexdigest()[:12]


# -- ELF and kernel modules --------------------------------------------------------------------
def elf_needed(path: Path) -> list[str] | None:
    """DT_NEEDED entries of a 64-bit little-endian ELF file; None when it is not one."""
    with open(path, "rb") as f:
        head = f.read(64)
        if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
            return None
        shoff, = struct.unpack_from("<Q", head, 0x28)
        shentsize, shnum = struct.unpack_from("<HH", head, 0x3A)
        f.seek(shoff)
        shdrs = f.read(shentsize * shnum)
        sections = [struct.unpack_from("<IIQQQQIIQQ", shdrs, i * shentsize)
                    for i in range(shnum)]
        needed = []
        for _n, stype, _fl, _addr, off, size, link, _info, _al, _es in sections:
            if stype != 6:  # SHT_DYNAMIC
                continue
            strtab = sections[link]
            f.seek(strtab[4])
            strings = f.read(strtab[5])
            f.seek(off)
            dyn = f.read(size)
            for i in range(0, len(dyn) - 15, 16):
                tag, val = struct.unpack_from("<qQ", dyn, i)
                if tag == 0:
                    break
                if tag == 1:  # DT_NEEDED
                    needed.append(strings[val:strings.index(b"\0", val)].decode())
        return needed


def check_libraries(root: Path) -> None:
    """Every DT_NEEDED of every ELF file in the image resolves inside the image."""
    def present(soname: str, user: Path) -> bool:  # the user's own directory: $ORIGIN rpaths
        return any((root / d / soname).exists() for d in LIB_DIRS) or \
            (user.parent / soname).exists()

    missing: dict[str, list[str]] = {}
    for path in root.rglob("*"):
        if path.is_symlink() or not path.is_file():
            continue
        if not (os.access(path, os.X_OK) or ".so" in path.name):
            continue
        for soname in elf_needed(path) or ():
            if not present(soname, path):
                missing.setdefault(soname, []).append(str(path.relative_to(root)))
    if missing:
        raise BuildError("shared libraries not found in the image: " + "; ".join(
            f"{s} (needed by {', '.join(sorted(users)[:3])})" for s, users in missing.items()))


def modinfo(data: bytes, key: str) -> list[str]:
    values = []
    for m in re.finditer(rb"\0" + key.encode() + rb"=([^\0]*)", data):
        values.append(m.group(1).decode())
    return values


def read_module(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        data = lzma.decompress(data)
    elif path.name.endswith(".zst"):
        raise BuildError(f"{path}: zstd-compressed modules are not supported")
    return data


def module_plan(moddir: Path) -> list[tuple[str, bytes, bool]]:
    """``[(name, .ko bytes, optional)]`` in load order: dependencies first, built-ins left out.

    An optional module may fail to load (crc32c_intel needs SSE4.2, which TCG's default CPU
    lacks); the initramfs says nothing about those.
    """
    index: dict[str, Path] = {}
    for p in moddir.joinpath("kernel").rglob("*.ko*"):
        index[re.sub(r"\.ko(\.xz|\.zst)?$", "", p.name).replace("-", "_")] = p
    builtin = set()
    for line in (moddir / "modules.builtin").read_text().splitlines():
        builtin.add(Path(line.strip()).name.removesuffix(".ko").replace("-", "_"))

    order: list[tuple[str, bytes, bool]] = []
    seen: set[str] = set()

    def visit(name: str, required: bool, chain: tuple[str, ...]) -> None:
        name = name.replace("-", "_")
        if name in seen or name in builtin:
            return
        if name in chain:
            raise BuildError(f"module dependency cycle: {' -> '.join(chain + (name,))}")
        if name not in index:
            if required:
                raise BuildError(f"kernel module {name} is neither built in nor in the package"
                                 + (f" (needed by {chain[-1]})" if chain else ""))
            return
        data = read_module(index[name])
        for dep in filter(None, ",".join(modinfo(data, "depends")).split(",")):
            visit(dep, True, chain + (name,))
        seen.add(name)
        order.append((name, data, not required))

    for name in MODULES_OPTIONAL_EARLY:
        visit(name, False, ())
    for name in MODULES_REQUIRED:
        visit(name, True, ())
    for name in MODULES_OPTIONAL_LATE:
        visit(name, False, ())
    return order


# -- cpio (newc) -------------------------------------------------------------------------------
class Cpio:
    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0),
               nlink: int = 1) -> None:
        namez = name.encode() + b"\0"
        fields = (self.ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1],
                  len(namez), 0)
        self.ino += 1
        self.buf.write(b"070701" + b"".join(b"%08X" % v for v in fields) + namez)
        self.buf.write(b"\0" * (-(110 + len(namez)) % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-len(data) % 4))

    def dir(self, name: str, perm: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | perm, nlink=2)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | perm, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int, perm: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | perm, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0, nlink=1)
        data = self.buf.getvalue()
        return data + b"\0" * (-len(data) % 512)


def build_initrd(busybox: Path, modules: list[tuple[str, bytes, bool]], out: Path) -> None:
    c = Cpio()
    for d in ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys", "newroot",
              "lib", "lib/modules", "run"):
        c.dir(d)
    c.chardev("dev/console", 5, 1)
    c.chardev("dev/null", 1, 3, 0o666)
    c.file("bin/busybox", busybox.read_bytes(), 0o755)
    c.symlink("bin/sh", "busybox")
    c.file("init", (HERE / "initramfs" / "init").read_bytes(), 0o755)
    for name, data, _optional in modules:
        c.file(f"lib/modules/{name}.ko", data)
    c.file("lib/modules/load-order", "".join(
        f"{n}{' optional' if opt else ''}\n" for n, _, opt in modules).encode())
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6,
                                                mtime=0) as gz:
        gz.write(c.finish())
    os.replace(tmp, out)


# -- the root filesystem -----------------------------------------------------------------------
def install_overlay(src: Path, root: Path) -> None:
    """Copy the guest's own files (guest-image/rootfs) over the extracted packages."""
    for path in sorted(src.rglob("*")):
        dest = root / path.relative_to(src)
        if path.is_dir() and not path.is_symlink():
            dest.mkdir(parents=True, exist_ok=True)
            continue
        if dest.is_symlink() or dest.exists():
            dest.unlink()
        dest.parent.mkdir(parents=True, exist_ok=True)
        if path.is_symlink():
            dest.symlink_to(os.readlink(path))
        else:
            shutil.copyfile(path, dest)
            os.chmod(dest, 0o755 if os.access(path, os.X_OK) else 0o644)


def build_rootfs(debs: dict[str, Path], root: Path) -> None:
    for deb in debs.values():
        run(["dpkg-deb", "-x", str(deb), str(root)])
    for rel in PRUNE:
        shutil.rmtree(root / rel, ignore_errors=True)
    for rel, mode in (("proc", 0o555), ("sys", 0o555), ("dev", 0o755), ("run", 0o755),
                      ("tmp", 0o1777), ("root", 0o700), ("home", 0o755), ("mnt", 0o755),
                      ("var/log", 0o755), ("var/tmp", 0o1777), ("etc/dropbear", 0o755),
                      ("usr/local/bin", 0o755)):
        (root / rel).mkdir(parents=True, exist_ok=True)
        os.chmod(root / rel, mode)
    if not (root / "var/run").exists():
        (root / "var/run").symlink_to("/run")
    # busybox applet links, never over a real program from a package
    busybox = root / "bin/busybox"
    applets = run([str(busybox), "--list-full"]).stdout.split()
    for rel in applets:
        dest = root / rel
        if dest.exists() or dest.is_symlink():
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.symlink_to("/bin/busybox")
    install_overlay(HERE / "rootfs", root)
    (root / SEED_SH_IN_GUEST).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(SEED_SH, root / SEED_SH_IN_GUEST)
    os.chmod(root / SEED_SH_IN_GUEST, 0o644)
    for rel in ("etc/shadow",):
        if (root / rel).exists():
            os.chmod(root / rel, 0o600)
    check_libraries(root)


def tree_size(root: Path) -> int:
    total = 0
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink():
            total += p.stat().st_size
    return total


def build_disk(root: Path, work: Path, out: Path) -> int:
    size_mib = max(DISK_MIN_MIB, (tree_size(root) * 2) // (1 << 20) + 64)
    raw = work / "disk.raw"
    with open(raw, "wb") as f:
        f.truncate(size_mib << 20)
    run(["mke2fs", "-q", "-F", "-t", "ext4", "-L", "dgxvm-root", "-E", "root_owner=0:0",
         "-d", str(root), str(raw)])
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(out)])
    raw.unlink()
    return size_mib


# -- main --------------------------------------------------------------------------------------
def build(out_root: Path, force: bool) -> Path:
    buildcache.require(("apt-get", "apt-cache", "dpkg-deb", "mke2fs", "qemu-img"), BuildError,
                       "the image's files must be owned by root")
    t0 = time.monotonic()
    packages, kernel_pkg = resolve_packages()
    key = cache_key(packages)

    def make(work: Path, result: Path) -> None:
        wanted = {n: f for n, f in packages.items() if n != KERNEL_META}
        debs = download(wanted, out_root / "debs")
        # kernel and modules
        kroot = work / "kernel"
        run(["dpkg-deb", "-x", str(debs[kernel_pkg]), str(kroot)])
        vmlinuz = sorted((kroot / "boot").glob("vmlinuz-*"))
        moddirs = sorted((kroot / "lib/modules").iterdir())
        if len(vmlinuz) != 1 or len(moddirs) != 1:
            raise BuildError(f"{kernel_pkg}: expected one vmlinuz and one module tree, "
                             f"found {vmlinuz} {moddirs}")
        shutil.copyfile(vmlinuz[0], result / "vmlinuz")
        modules = module_plan(moddirs[0])
        log(f"kernel {moddirs[0].name}: {len(modules)} module(s) for the initramfs")
        # root filesystem
        root = work / "root"
        root.mkdir()
        build_rootfs({n: p for n, p in debs.items() if n != kernel_pkg}, root)
        build_initrd(root / "bin/busybox", modules, result / "initrd.img")
        shutil.rmtree(kroot)
        size = build_disk(root, work, result / "disk.qcow2")
        manifest = {
            "name": NAME,
            "version": key,
            "kernel": "vmlinuz",
            "initrd": "initrd.img",
            "disk": "disk.qcow2",
            "format": "qcow2",
            "cmdline": CMDLINE,
            # the profile dgxvm image install records: rootless runc (+ umoci) is in the
            # image; the test machine's GPUs are simulated, no device reaches a container
            "container_runtime": "runc",
            "gpu_devices": "none",
            # its own init applies the seed before it starts the guest agent
            "readiness": "agent",
            "kernel_release": moddirs[0].name,
            "disk_size_mib": size,
            "modules": [n for n, _, _ in modules],
            "packages": {n: f["Version"] for n, f in packages.items()},
        }
        (result / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")

    return buildcache.cached_build(out_root, key, make, log, force=force, started=t0)


def main(argv: list[str] | None = None) -> int:
    return buildcache.main(argv, description=__doc__.split("\n")[0], default_out=DEFAULT_OUT,
                           tag="guest-image", build=build, error=BuildError,
                           print_key=lambda: cache_key(resolve_packages()[0]))


if __name__ == "__main__":
    sys.exit(main())
