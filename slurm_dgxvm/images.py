"""The guest image store: installed OS disk images, and the per-VM disks made from them.

``dgxvm image show|install|remove`` (after ``nvidia-vm image show|install``) manage a directory of
images; the VM designer asks the store for an :class:`Image` (the *profile*: disk, format, sizes,
boot method) and makes each VM's OS disk with :func:`create_overlay`. Layout::

    <store>/<name>/disk.qcow2     (or disk.raw) the image, read-only once installed
    <store>/<name>/vmlinuz        optional: direct-kernel-boot images only
    <store>/<name>/initrd.img     optional: always together with vmlinuz
    <store>/<name>/image.json     the profile, written last
    <store>/default               the default image's name (one line)
    <store>/.lock                 the filelock that serialises renames, removals and the default
    <store>/.<name>.partial-<pid> an install in progress (swept when <pid> is gone)

Decisions that live here:

* **An image appears whole or not at all.** Install copies into ``.<name>.partial-<pid>/``,
  fsyncs every file, writes ``image.json`` last, then renames the directory into place (and
  fsyncs the store). Any failure — a bad source, ENOSPC, a qemu-img error, Ctrl-C — removes the
  partial directory before the error propagates; a crash leaves only a dot-directory that
  :meth:`ImageStore.list` never reports and the next install removes once its pid is gone.
  Removal is the mirror image: rename to ``.<name>.removing-<pid>``, then delete.
* **We validate the copy, not only the source.** The source is checked first (fast, clear
  errors), then the copy is checked again with ``qemu-img info``: what we store is what we
  checked, even if the source changed between the two.
* **Only qcow2 and raw.** Everything else (vmdk, vdi, vhdx...) is refused with a hint to
  ``qemu-img convert``. A qcow2 with a backing file, an external data file or encryption is
  refused (the copy would not be self-contained, or qemu could not open it unattended), and
  ``qemu-img check`` must find no corruption (leaked clusters are harmless and accepted).
* **"raw" needs evidence.** qemu-img calls *any* file it does not recognise raw, so a text file,
  a tarball or a qcow2 with a scribbled header would pass as a "raw disk". A raw image is
  accepted only if it is at least 1 MiB, a whole number of 512-byte sectors, and starts like a
  disk: an MBR boot signature (``55 aa`` at byte 510, also present in GPT's protective MBR) or
  the superblock magic of ext2/3/4, XFS or btrfs (a bare filesystem for direct kernel boot).
  A file named ``*.qcow2`` that qemu-img reads as raw is reported as a damaged qcow2.
* **Files are world-readable, the store is root's.** Directories 0755, files 0644: qemu runs as
  another user and opens the image read-only as a backing file. Per-VM disks (overlays, data
  disks) are 0600: they hold the guest's data; libvirt's DAC driver (``dynamic_ownership``,
  on by default) hands them to the qemu user when the domain starts.
* **Sparse stays sparse.** The copy skips all-zero 4 MiB chunks (seek, then truncate to size),
  so a 100 GiB raw image with 3 GiB of data takes 3 GiB in the store.
* **Names are names.** A name must pass :func:`slurm_dgxvm.names.image_name`; ``default`` is
  reserved (it is the store's default-pointer file). Installing over an existing name is
  refused: remove it first (which is refused while VMs use it).
* **The profile keeps relative file names** (``disk.qcow2``, ``vmlinuz``) and the loader accepts
  only those exact names, so a hand-edited ``image.json`` cannot point a VM at another file;
  :class:`Image` carries absolute paths.

Version of an image: ``--version`` if given; else the ``version`` of the source manifest (see
:meth:`ImageStore.install`); else the first 12 hex digits of the disk's sha256.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import math
import os
import re
import shutil
import stat as stat_mod
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import DiskError, ImageError, ImageInUse
from .fsutil import atomic_write, atomic_write_json, fsync_dir, link_into_place, locked
from .names import image_name
from .tools import output_tail, run_tool, tail

log = logging.getLogger("dgxvm.images")

QEMU_IMG = "qemu-img"                     # module attribute so tests can point it elsewhere
FORMATS = ("qcow2", "raw")
CHUNK = 4 * 1024 * 1024
MIN_RAW_BYTES = 1024 * 1024
SECTOR = 512
GIB = 1024 ** 3
INFO_TIMEOUT_S = 120.0
CHECK_TIMEOUT_S = 1800.0                  # qemu-img check reads all metadata of a large image
CREATE_TIMEOUT_S = 300.0
LOCK_TIMEOUT_S = 30.0

PROFILE_FILE = "image.json"
DEFAULT_FILE = "default"
LOCK_FILE = ".lock"
KERNEL_FILE = "vmlinuz"
INITRD_FILE = "initrd.img"
MANIFEST_FILE = "manifest.json"
RESERVED_NAMES = frozenset({DEFAULT_FILE})
SCHEMA = "dgxvm-image"
SCHEMA_VERSION = 1

DIR_MODE = 0o755
FILE_MODE = 0o644
VM_DISK_MODE = 0o600

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_PARTIAL = re.compile(r"^\.(?P<name>.+)\.(?:partial|removing)-(?P<pid>\d+)$")
_ZERO = bytes(CHUNK)

Progress = Callable[[int, int], None]


# -- the profile -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Image:
    """One installed image: what the VM designer needs to build a domain from it."""

    name: str
    path: str                 # absolute path of the disk file
    format: str               # "qcow2" | "raw"
    virtual_size: int         # bytes the guest sees (qemu-img info)
    actual_size: int          # bytes the file occupies on the host
    version: str
    sha256: str               # of the disk file as installed
    kernel: str | None        # absolute paths when the image boots by direct kernel boot
    initrd: str | None
    cmdline: str | None
    installed: float          # epoch seconds
    source: str               # what it was installed from

    @property
    def boot(self) -> str:
        """``kernel`` (direct kernel boot: kernel + initrd + cmdline) or ``disk`` (firmware)."""
        return "kernel" if self.kernel else "disk"

    def to_json(self) -> dict:
        return {"name": self.name, "path": self.path, "format": self.format,
                "virtual_size": self.virtual_size, "actual_size": self.actual_size,
                "version": self.version, "sha256": self.sha256, "boot": self.boot,
                "kernel": self.kernel, "initrd": self.initrd, "cmdline": self.cmdline,
                "installed": self.installed, "source": self.source}


@dataclass(frozen=True)
class BrokenImage:
    """A directory in the store that is not a usable image (no/invalid profile, disk gone)."""

    name: str
    path: str
    reason: str

    def to_json(self) -> dict:
        return {"name": self.name, "path": self.path, "reason": self.reason}


# -- qemu-img --------------------------------------------------------------------------------------
def _qemu_img(args: list[str], *, timeout: float, error: Callable[[str], Exception],
              check: bool = True) -> subprocess.CompletedProcess:
    """Run ``qemu-img ARGS`` through :func:`run_tool`: missing, time-out and (with ``check``) a
    non-zero exit become ``error(reason)``, the run named ``qemu-img <verb>``."""
    return run_tool([QEMU_IMG, *args], timeout=timeout, error=error, check=check,
                    what=f"qemu-img {args[0]}", hint="; install qemu-utils")


def _regular_readable(path: Path, what: str | None = None) -> None:
    """ImageError naming ``path`` (and ``what`` it is, e.g. ``kernel``) unless it is an
    existing, readable regular file."""
    what = f"{what}: " if what else ""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ImageError(name=str(path), reason=f"{what}no such file") from None
    except OSError as e:
        raise ImageError(name=str(path), reason=f"{what}{e.strerror or e}") from None
    if not stat_mod.S_ISREG(st.st_mode):
        raise ImageError(name=str(path), reason=f"{what}not a regular file")
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        raise ImageError(name=str(path), reason=f"{what}cannot read ({e.strerror or e})") from None


def image_info(path: str | os.PathLike) -> dict:
    """``qemu-img info --output=json`` of an image file, accepted only if dgxvm can use it.

    Returns qemu-img's dict. Raises ImageError naming the file when it is missing, unreadable,
    qemu-img fails (its stderr attached), the format is not qcow2/raw, a qcow2 has a backing
    file, an external data file or encryption, or a "raw" file does not look like a disk (see
    the module docstring).
    """
    p = Path(path).absolute()                 # absolute: a name like "json:{...}" stays a file
    _regular_readable(p)
    r = _qemu_img(["info", "--output=json", str(p)], timeout=INFO_TIMEOUT_S,
                  error=lambda reason: ImageError(name=str(p), reason=reason))
    try:
        info = json.loads(r.stdout)
        fmt = info["format"]
        int(info["virtual-size"])
    except (ValueError, KeyError, TypeError):
        raise ImageError(name=str(p), reason=f"qemu-img info gave unreadable output: "
                                             f"{tail(r.stdout, 200)}") from None
    if fmt not in FORMATS:
        raise ImageError(name=str(p), reason=f"format {fmt} is not supported (qcow2 or raw); "
                                             f"convert it: qemu-img convert -O qcow2 {p} OUT.qcow2")
    if fmt == "raw":
        if p.suffix.lower() == ".qcow2":
            raise ImageError(name=str(p), reason="named .qcow2 but qemu-img does not see a qcow2 "
                                                 "header (damaged or truncated?)")
        problem = _raw_problem(p)
        if problem:
            raise ImageError(name=str(p), reason=f"not a disk image: {problem}")
    else:
        if info.get("backing-filename") or info.get("full-backing-filename"):
            raise ImageError(name=str(p), reason=f"has a backing file "
                                                 f"({info.get('backing-filename')}); flatten it "
                                                 f"first: qemu-img convert -O qcow2 {p} OUT.qcow2")
        data = (info.get("format-specific") or {}).get("data") or {}
        if data.get("data-file"):
            raise ImageError(name=str(p), reason=f"uses an external data file "
                                                 f"({data['data-file']}); convert it first")
        if info.get("encrypted") or data.get("encrypt"):
            raise ImageError(name=str(p), reason="is encrypted; dgxvm cannot open it unattended")
        if data.get("corrupt"):
            raise ImageError(name=str(p), reason="qcow2 header marks the image corrupt")
    return info


def _raw_problem(p: Path) -> str | None:
    """Why a file qemu-img calls raw is not a disk image, or None when it looks like one."""
    size = p.stat().st_size
    if size < MIN_RAW_BYTES:
        return f"{size} bytes; a raw disk image is at least {MIN_RAW_BYTES} bytes"
    if size % SECTOR:
        return f"{size} bytes is not a whole number of {SECTOR}-byte sectors"
    with open(p, "rb") as f:
        head = f.read(0x10048)
    if head[510:512] == b"\x55\xaa":                       # MBR (and GPT's protective MBR)
        return None
    if head[1080:1082] == b"\x53\xef":                     # ext2/3/4 superblock magic
        return None
    if head[0:4] == b"XFSB":
        return None
    if head[0x10040:0x10048] == b"_BHRfS_M":               # btrfs
        return None
    return ("no partition table (MBR/GPT) or ext4/XFS/btrfs superblock; qemu-img reads any "
            "unknown file as raw")


def check_qcow2(path: str | os.PathLike) -> None:
    """``qemu-img check``: ImageError on corruption or when the check cannot complete.

    Exit status 3 (leaked clusters only) is accepted with a warning: leaks waste space but
    never corrupt data.
    """
    p = Path(path).absolute()
    r = _qemu_img(["check", "-f", "qcow2", str(p)], timeout=CHECK_TIMEOUT_S, check=False,
                  error=lambda reason: ImageError(name=str(p), reason=reason))
    if r.returncode == 0:
        return
    if r.returncode == 3:
        log.warning("%s: qemu-img check found leaked clusters (harmless): %s", p, tail(r.stdout))
        return
    detail = output_tail(r)
    if r.returncode == 2:
        raise ImageError(name=str(p), reason=f"corrupt qcow2 (qemu-img check): {detail}")
    raise ImageError(name=str(p), reason=f"qemu-img check could not complete "
                                         f"(exit {r.returncode}): {detail}")


# -- per-VM disks ----------------------------------------------------------------------------------
def create_overlay(image: Image, path: str | os.PathLike, size_gib: int) -> None:
    """Create a VM's OS disk: a qcow2 overlay backed by ``image`` (which stays read-only).

    The size is ``size_gib`` GiB but never smaller than the image's virtual size (a smaller
    overlay would cut the guest's file system off). Created under a temporary name in the same
    directory, then linked into place, so ``path`` is either absent or complete; an existing
    ``path`` is never overwritten. DiskError (naming ``path`` and qemu-img's stderr) on failure.
    """
    size = max(int(size_gib) * GIB, int(image.virtual_size))
    if size != int(size_gib) * GIB:
        log.info("overlay %s: %d GiB is smaller than image %s (%d bytes); using the image's size",
                 path, size_gib, image.name, image.virtual_size)
    _create(Path(path), ["-f", "qcow2", "-F", image.format, "-b", image.path], size)


def create_disk(path: str | os.PathLike, size_gib: int) -> None:
    """Create an empty qcow2 data disk of ``size_gib`` GiB (same guarantees as create_overlay)."""
    if int(size_gib) < 1:
        raise DiskError(path=str(path), reason=f"size must be at least 1 GiB, not {size_gib}")
    _create(Path(path), ["-f", "qcow2"], int(size_gib) * GIB)


def _create(path: Path, opts: list[str], size: int) -> None:
    path = path.absolute()
    if os.path.lexists(path):
        raise DiskError(path=str(path), reason="already exists")
    if not path.parent.is_dir():
        raise DiskError(path=str(path), reason=f"directory {path.parent} does not exist")
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        _qemu_img(["create", "-q", *opts, str(tmp), str(size)], timeout=CREATE_TIMEOUT_S,
                  error=lambda reason: DiskError(path=str(path), reason=reason))
        try:
            os.chmod(tmp, VM_DISK_MODE)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            link_into_place(tmp, path)
            fsync_dir(path.parent)
        except FileExistsError:
            raise DiskError(path=str(path), reason="already exists") from None
        except OSError as e:
            raise DiskError(path=str(path), reason=e.strerror or str(e)) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


# -- copying ---------------------------------------------------------------------------------------
class _ReadError(Exception):
    def __init__(self, path: Path, exc: OSError):
        super().__init__(path, exc)
        self.path, self.exc = path, exc


def _write_all(fd: int, data) -> None:
    """Write all of ``data`` to ``fd`` (os.write may write less than asked)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _copy_file(src: Path, dst: Path, progress: Progress | None = None) -> tuple[str, int]:
    """Copy ``src`` to a new file ``dst`` chunkwise; return (sha256 hex, bytes).

    All-zero chunks become holes. The copy is fsync'ed. A read error raises _ReadError (the
    caller names the source); write errors are OSError (the caller names the store).
    """
    digest = hashlib.sha256()
    try:
        fd_in = os.open(src, os.O_RDONLY)
    except OSError as e:
        raise _ReadError(src, e) from None
    try:
        total = os.fstat(fd_in).st_size
        fd_out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        try:
            buf = bytearray(CHUNK)
            done = 0
            if progress:
                progress(0, total)
            while True:
                try:
                    n = os.readv(fd_in, [buf])
                except OSError as e:
                    raise _ReadError(src, e) from None
                if n == 0:
                    break
                chunk = memoryview(buf)[:n]
                digest.update(chunk)
                # bytearray == bytes is a memcmp; memoryview == bytes is 40x slower
                if (buf == _ZERO) if n == CHUNK else (bytes(chunk) == _ZERO[:n]):
                    os.lseek(fd_out, n, os.SEEK_CUR)
                else:
                    _write_all(fd_out, chunk)
                done += n
                if progress:
                    progress(done, total)
            os.ftruncate(fd_out, done)        # materialise a trailing hole
            os.fchmod(fd_out, FILE_MODE)
            os.fsync(fd_out)
        finally:
            os.close(fd_out)
    finally:
        os.close(fd_in)
    if done != total:
        raise _ReadError(src, OSError(errno.EIO, f"size changed while copying "
                                                 f"({total} -> {done} bytes)"))
    return digest.hexdigest(), done


# -- source manifests ------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Source:
    disk: Path
    kernel: Path | None = None
    initrd: Path | None = None
    cmdline: str | None = None
    version: str | None = None
    name: str | None = None
    sha256: str | None = None
    manifest: Path | None = None


def _text(value: Any, what: str, where: str, *, limit: int) -> str | None:
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and what == "version":
        value = str(value)
    if not isinstance(value, str):
        raise ImageError(name=where, reason=f"{what} must be a string, not {value!r}")
    value = value.strip()
    if not value:
        return None
    if len(value) > limit or any(ord(c) < 32 for c in value):
        raise ImageError(name=where, reason=f"{what} must be one line of at most {limit} "
                                            f"characters")
    return value


def _read_manifest(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text())
    except OSError as e:
        raise ImageError(name=str(path), reason=f"manifest: {e.strerror or e}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ImageError(name=str(path), reason=f"manifest is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise ImageError(name=str(path), reason="manifest must be a JSON object")
    return doc


def _source_from_manifest(path: Path) -> _Source:
    """A builder manifest: ``{"name", "version", "disk", "kernel", "initrd", "cmdline"}``.

    ``disk`` is required; paths are relative to the manifest's directory (absolute ones are
    taken as they are); ``kernel`` and ``initrd`` come together or not at all; an optional
    ``sha256`` of the disk is verified after the copy. Other keys are ignored.
    """
    doc = _read_manifest(path)
    where = str(path)

    def rel(key: str) -> Path | None:
        value = doc.get(key)
        if value in (None, ""):
            return None
        if not isinstance(value, str):
            raise ImageError(name=where, reason=f"manifest {key} must be a path, not {value!r}")
        return (path.parent / value).absolute()

    disk = rel("disk")
    if disk is None:
        raise ImageError(name=where, reason="manifest has no disk")
    sha = _text(doc.get("sha256"), "sha256", where, limit=80)
    if sha is not None:
        sha = sha.lower().removeprefix("sha256:")
        if not re.fullmatch(r"[0-9a-f]{64}", sha):
            raise ImageError(name=where, reason=f"manifest sha256 {sha!r} is not a sha256")
    return _Source(disk=disk, kernel=rel("kernel"), initrd=rel("initrd"),
                   cmdline=_text(doc.get("cmdline"), "cmdline", where, limit=4096),
                   version=_text(doc.get("version"), "version", where, limit=128),
                   name=_text(doc.get("name"), "name", where, limit=63),
                   sha256=sha, manifest=path)


def _sibling_version(disk: Path) -> str | None:
    """The ``version`` of a ``manifest.json`` next to ``disk`` that describes ``disk``.

    Used only when the manifest names no disk or names this one (a directory of several images
    with one manifest must not label them all). A sibling manifest that does not parse is
    ignored with a warning: the disk was named directly, the manifest is only a hint.
    """
    path = disk.parent / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        doc = _read_manifest(path)
        named = doc.get("disk")
        if named and (path.parent / str(named)).absolute() != disk:
            return None
        return _text(doc.get("version"), "version", str(path), limit=128)
    except ImageError as e:
        log.warning("ignoring %s: %s", path, e)
        return None


def _resolve_source(src: str | os.PathLike) -> _Source:
    p = Path(src).expanduser().absolute()
    if p.is_dir():
        if not (p / MANIFEST_FILE).is_file():
            raise ImageError(name=str(p), reason=f"a directory without {MANIFEST_FILE}; give the "
                                                 f"disk file or the manifest")
        return _source_from_manifest(p / MANIFEST_FILE)
    if p.suffix.lower() == ".json":
        _regular_readable(p, "manifest")
        return _source_from_manifest(p)
    return _Source(disk=p)


# -- the store -------------------------------------------------------------------------------------
class ImageStore:
    """The image directory (``cfg.images.store``). Readers need no lock; changes take one."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).absolute()

    # reading ------------------------------------------------------------------------------------
    def list(self) -> list[Image]:
        """Installed images, sorted by name. Broken entries are skipped, each with a logged
        warning (:meth:`scan` returns them)."""
        images, broken = self.scan()
        for b in broken:
            log.warning("image store %s: %s is broken: %s", self.root, b.name, b.reason)
        return images

    def scan(self) -> tuple[list[Image], list[BrokenImage]]:
        """(images, broken entries), each sorted by name. Dot-entries (installs in progress,
        the lock) and the ``default`` file are not entries; a stray file is ignored."""
        images: list[Image] = []
        broken: list[BrokenImage] = []
        try:
            entries = sorted(os.scandir(self.root), key=lambda e: e.name)
        except FileNotFoundError:
            return [], []
        except OSError as e:
            raise ImageError(name=str(self.root), reason=f"cannot read the store: "
                                                         f"{e.strerror or e}") from None
        for entry in entries:
            if entry.name.startswith(".") or entry.name == DEFAULT_FILE:
                continue
            if not entry.is_dir(follow_symlinks=False):
                log.debug("image store %s: ignoring %s (not a directory)", self.root, entry.name)
                continue
            try:
                images.append(self._load(entry.name))
            except ImageError as e:
                broken.append(BrokenImage(name=entry.name, path=entry.path,
                                          reason=str(e.fields.get("reason", e))))
        return images, broken

    def names(self) -> list[str]:
        """Names of the usable images (for messages; no warnings about broken ones)."""
        return [i.name for i in self.scan()[0]]

    def get(self, name: str | None = None) -> Image:
        """The image ``name``, or the default image when ``name`` is None.

        Verifies the profile and that the disk (and kernel/initrd) are still regular files.
        """
        if name is None:
            name = self.default_name()
            if name is None:
                raise ImageError("no default image; install one with "
                                 "`dgxvm image install SRC --default`", name=None,
                                 reason="no default image")
            if not (self.root / name).is_dir():
                raise ImageError(f"the default image {name} is not installed "
                                 f"({self.root / DEFAULT_FILE} is stale); install it or make "
                                 f"another the default",
                                 name=name, reason="default not installed")
        image_name(name)
        if not (self.root / name).is_dir():
            have = ", ".join(self.names()) or "none"
            raise ImageError(f"no image named {name}; installed: {have}", name=name,
                             reason="not installed")
        return self._load(name)

    def default_name(self) -> str | None:
        """The default image's name, None when there is none. Garbage in the file is an error."""
        try:
            text = (self.root / DEFAULT_FILE).read_text().strip()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise ImageError(name="(default)", reason=f"cannot read {self.root / DEFAULT_FILE}: "
                                                      f"{e.strerror or e}") from None
        if not text:
            return None
        try:
            return image_name(text)
        except Exception:
            raise ImageError(name="(default)", reason=f"{self.root / DEFAULT_FILE} holds "
                                                      f"{text[:80]!r}, not an image name") from None

    # changing -----------------------------------------------------------------------------------
    def set_default(self, name: str) -> None:
        """Make ``name`` (an installed, valid image) the default."""
        self.get(name)
        with self._lock():
            self.get(name)                    # still there under the lock
            atomic_write(self.root / DEFAULT_FILE, f"{name}\n", mode=FILE_MODE)

    def install(self, src: str | os.PathLike, *, name: str | None = None, default: bool = False,
                version: str | None = None, kernel: str | os.PathLike | None = None,
                initrd: str | os.PathLike | None = None, cmdline: str | None = None,
                progress: Progress | None = None) -> Image:
        """Install ``src`` as image ``name`` and return its profile.

        ``src`` is either a disk image file (qcow2, or raw: see the module docstring) or a
        builder **manifest** — a ``*.json`` file, or a directory holding ``manifest.json`` —
        with keys ``name``, ``version``, ``disk``, ``kernel``, ``initrd``, ``cmdline`` (paths
        relative to the manifest; only ``disk`` is required; an optional ``sha256`` of the disk
        is verified). Options given here win over the manifest's values.

        * ``name``: default the manifest's name, else the disk file's stem (``jammy.qcow2`` ->
          ``jammy``). Must be a valid image name, not ``default``, and not installed yet.
        * ``kernel``/``initrd``: both or neither (direct kernel boot); ``cmdline`` only with a
          kernel. They are copied into the image directory.
        * ``version``: explicit, else the manifest's (the one given, or a ``manifest.json``
          next to the disk that describes it), else ``sha256[:12]``.
        * ``default``: also make it the default image.
        * ``progress(done_bytes, total_bytes)`` is called while the disk is copied.

        Raises ImageError (a NameError_ for a bad name) and leaves nothing behind on failure,
        including ENOSPC ("no space left") and KeyboardInterrupt.
        """
        source = _resolve_source(src)
        if kernel is not None or initrd is not None:
            source = _Source(disk=source.disk, kernel=_opt_path(kernel), initrd=_opt_path(initrd),
                             cmdline=source.cmdline, version=source.version, name=source.name,
                             sha256=source.sha256, manifest=source.manifest)
        if cmdline is not None:
            cmdline = _text(cmdline, "cmdline", "--cmdline", limit=4096)
        else:
            cmdline = source.cmdline
        if version is not None:
            version = _text(version, "version", "--version", limit=128)
        version = version or source.version

        name = name or source.name or source.disk.stem
        image_name(name)
        if name in RESERVED_NAMES:
            raise ImageError(name=name, reason=f"{name!r} is reserved (the store's default "
                                               f"pointer); choose another name")
        if (source.kernel is None) != (source.initrd is None):
            raise ImageError(name=name, reason="direct kernel boot needs both a kernel and an "
                                               "initrd (--kernel and --initrd)")
        if cmdline and source.kernel is None:
            raise ImageError(name=name, reason="a kernel command line needs a kernel "
                                               "(--cmdline only with --kernel/--initrd)")
        target = self.root / name
        if os.path.lexists(target):
            raise ImageError(name=name, reason=f"already installed; remove it first "
                                               f"(dgxvm image remove {name})")

        info = image_info(source.disk)
        fmt = info["format"]
        if fmt == "qcow2":
            check_qcow2(source.disk)
        for path, what in ((source.kernel, "kernel"), (source.initrd, "initrd")):
            if path is not None:
                _regular_readable(path, what)
                if path.stat().st_size == 0:
                    raise ImageError(name=str(path), reason=f"{what}: empty file")
        if version is None and source.manifest is None:
            version = _sibling_version(source.disk)

        self._ensure_root()
        self._sweep()
        partial = self.root / f".{name}.partial-{os.getpid()}"
        try:
            if os.path.lexists(partial):
                shutil.rmtree(partial)
            os.mkdir(partial, DIR_MODE)
            os.chmod(partial, DIR_MODE)       # mode= is filtered by the umask
            disk = partial / f"disk.{fmt}"
            sha, _ = _copy_file(source.disk, disk, progress)
            if source.sha256 and sha != source.sha256:
                raise ImageError(name=str(source.disk), reason=f"sha256 {sha} does not match the "
                                                              f"manifest's {source.sha256}")
            if source.kernel is not None:
                _copy_file(source.kernel, partial / KERNEL_FILE)
                _copy_file(source.initrd, partial / INITRD_FILE)
            copied = image_info(disk)         # what we keep is what we checked
            if copied["format"] != fmt or int(copied["virtual-size"]) != int(info["virtual-size"]):
                raise ImageError(name=str(source.disk), reason="changed while it was copied")
            profile = {
                "schema": SCHEMA, "schema_version": SCHEMA_VERSION, "name": name,
                "disk": disk.name, "format": fmt, "virtual_size": int(info["virtual-size"]),
                "actual_size": _allocated(disk), "version": version or sha[:12], "sha256": sha,
                "kernel": KERNEL_FILE if source.kernel else None,
                "initrd": INITRD_FILE if source.kernel else None,
                "cmdline": cmdline if source.kernel else None,
                "installed": time.time(), "source": str(source.manifest or source.disk),
            }
            # also makes the copied files' names in ``partial`` durable (one directory fsync)
            atomic_write_json(partial / PROFILE_FILE, profile, mode=FILE_MODE, indent=2)
            with self._lock():
                if os.path.lexists(target):
                    raise ImageError(name=name, reason="already installed (by a concurrent "
                                                       "install); remove it first")
                os.rename(partial, target)
                fsync_dir(self.root)
        except _ReadError as e:
            self._discard(partial)
            raise ImageError(name=str(e.path), reason=f"cannot read: "
                                                      f"{e.exc.strerror or e.exc}") from None
        except OSError as e:
            self._discard(partial)
            if e.errno in _NO_SPACE:
                need = _allocated_src(source.disk)
                raise ImageError(name=name, reason=f"no space left in the image store "
                                                   f"{self.root} (the image needs {need} "
                                                   f"bytes)") from None
            raise ImageError(name=name, reason=f"cannot write into the image store {self.root}: "
                                               f"{e.strerror or e}") from None
        except BaseException:
            self._discard(partial)
            raise
        log.info("installed image %s (%s, %s) from %s", name, fmt, version or sha[:12],
                 profile["source"])
        if default:
            try:
                self.set_default(name)
            except (ImageError, OSError) as e:
                raise ImageError(name=name, reason=f"installed, but not made the default: "
                                                   f"{e}") from None
        return self._load(name)

    def remove(self, name: str, *, in_use_by: Iterable[str] = ()) -> None:
        """Delete image ``name`` (also a broken one). Refused (ImageInUse) while ``in_use_by``
        names any VM; clears the default when it was the default."""
        image_name(name)
        users = sorted(set(in_use_by))
        if users:
            raise ImageInUse(name=name, users=", ".join(users))
        target = self.root / name
        doomed = self.root / f".{name}.removing-{os.getpid()}"
        with self._lock():
            if not target.is_dir() or target.is_symlink():
                have = ", ".join(self.names()) or "none"
                raise ImageError(f"no image named {name}; installed: {have}", name=name,
                                 reason="not installed")
            was_default = False
            with contextlib.suppress(ImageError):     # a garbled default is not this image
                was_default = self.default_name() == name
            try:
                os.rename(target, doomed)
                fsync_dir(self.root)
                if was_default:
                    os.unlink(self.root / DEFAULT_FILE)
            except OSError as e:
                raise ImageError(name=name, reason=f"cannot remove: {e.strerror or e}") from None
        self._discard(doomed)
        log.info("removed image %s", name)

    # internals ----------------------------------------------------------------------------------
    def _load(self, name: str) -> Image:
        d = self.root / name
        prof = d / PROFILE_FILE
        try:
            doc = json.loads(prof.read_text())
        except FileNotFoundError:
            raise ImageError(name=name, reason=f"no {PROFILE_FILE} (an interrupted copy by "
                                               f"hand?); remove it and install again") from None
        except OSError as e:
            raise ImageError(name=name, reason=f"cannot read {prof}: {e.strerror or e}") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise ImageError(name=name, reason=f"{prof} is not valid JSON: {e}") from None
        try:
            if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
                raise ValueError(f"not a {SCHEMA} profile")
            if doc.get("schema_version") != SCHEMA_VERSION:
                raise ValueError(f"unsupported schema_version {doc.get('schema_version')!r}")
            if doc.get("name") != name:
                raise ValueError(f"records name {doc.get('name')!r}")
            fmt = doc["format"]
            if fmt not in FORMATS or doc["disk"] != f"disk.{fmt}":
                raise ValueError(f"disk {doc.get('disk')!r} / format {fmt!r}")
            if (doc.get("kernel"), doc.get("initrd")) not in ((None, None),
                                                              (KERNEL_FILE, INITRD_FILE)):
                raise ValueError("kernel/initrd must be vmlinuz/initrd.img or both null")
            for key in ("virtual_size", "actual_size"):
                if not isinstance(doc[key], int) or isinstance(doc[key], bool) or doc[key] < 0:
                    raise ValueError(f"{key} {doc[key]!r}")
            for key in ("version", "sha256", "source"):
                if not isinstance(doc[key], str):
                    raise ValueError(f"{key} {doc[key]!r}")
            if doc.get("cmdline") is not None and not isinstance(doc["cmdline"], str):
                raise ValueError(f"cmdline {doc['cmdline']!r}")
            installed = float(doc["installed"])
        except (KeyError, TypeError, ValueError) as e:
            raise ImageError(name=name, reason=f"{prof} is invalid: {e}") from None
        files = [d / doc["disk"]] + ([d / KERNEL_FILE, d / INITRD_FILE] if doc["kernel"] else [])
        for f in files:
            if f.is_symlink() or not f.is_file():
                raise ImageError(name=name, reason=f"{f} is missing or not a regular file")
        disk = files[0]
        return Image(name=name, path=str(disk), format=fmt, virtual_size=doc["virtual_size"],
                     actual_size=_allocated(disk), version=doc["version"], sha256=doc["sha256"],
                     kernel=str(files[1]) if doc["kernel"] else None,
                     initrd=str(files[2]) if doc["kernel"] else None,
                     cmdline=doc.get("cmdline") if doc["kernel"] else None,
                     installed=installed, source=doc["source"])

    def _ensure_root(self) -> None:
        if self.root.is_dir():
            return
        try:
            os.makedirs(self.root, mode=DIR_MODE, exist_ok=True)
            os.chmod(self.root, DIR_MODE)
        except OSError as e:
            raise ImageError(name=str(self.root), reason=f"cannot create the image store: "
                                                         f"{e.strerror or e}") from None

    def _lock(self):
        """The store lock (serialises renames, removals and the default), waited for at most
        LOCK_TIMEOUT_S."""
        path = self.root / LOCK_FILE
        return locked(path, timeout=LOCK_TIMEOUT_S, mode=FILE_MODE,
                      timed_out=lambda: ImageError(name=str(self.root),
                                                   reason=f"store lock {path} not acquired in "
                                                          f"{LOCK_TIMEOUT_S:g}s"),
                      failed=lambda e: ImageError(name=str(self.root),
                                                  reason=f"cannot lock the image store "
                                                         f"({path}): {e.strerror or e}"))

    def _sweep(self) -> None:
        """Delete leftovers (``.<name>.partial-<pid>``, ``.removing-<pid>``) of dead processes."""
        try:
            entries = list(os.scandir(self.root))
        except OSError:
            return
        for entry in entries:
            m = _PARTIAL.match(entry.name)
            if m and not _alive(int(m["pid"])):
                log.warning("image store %s: removing %s left by a dead process", self.root,
                            entry.name)
                self._discard(Path(entry.path))

    @staticmethod
    def _discard(path: Path) -> None:
        shutil.rmtree(path, ignore_errors=True)
        if os.path.lexists(path):
            log.warning("could not remove %s completely; remove it by hand", path)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def _allocated_src(path: Path) -> int:
    with contextlib.suppress(OSError):
        return _allocated(path)
    return 0


def _opt_path(p: str | os.PathLike | None) -> Path | None:
    return None if p is None else Path(p).expanduser().absolute()


def human_bytes(n: int) -> str:
    """1536 -> '1.5 KiB'; for tables."""
    if n < 1024:
        return f"{n} B"
    exp = min(int(math.log(n, 1024)), 4)
    return f"{n / 1024 ** exp:.1f} {'KMGT'[exp - 1]}iB"


__all__ = ["BrokenImage", "Image", "ImageStore", "check_qcow2", "create_disk", "create_overlay",
           "human_bytes", "image_info"]
