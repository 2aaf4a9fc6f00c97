"""The image store: a directory of installed images, :class:`ImageStore`.

Layout::

    <store>/<name>/disk.qcow2     (or disk.raw) the image, read-only once installed
    <store>/<name>/vmlinuz        optional: direct-kernel-boot images only
    <store>/<name>/initrd.img     optional: always together with vmlinuz
    <store>/<name>/image.json     the profile, written last (also the image's container runtime)
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
  errors, :mod:`.accept`), then the copy is checked again with ``qemu-img info``: what we
  store is what we checked, even if the source changed between the two.
* **The store is root's.** Directories 0755, files 0644 (:mod:`.profile` says why).
* **Names are names.** A name must pass :func:`slurm_dgxvm.names.image_name`; ``default`` is
  reserved (it is the store's default-pointer file). Installing over an existing name is
  refused: remove it first (which is refused while VMs use it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import ImageError, ImageInUse
from ..fsutil import atomic_write, fsync_dir, locked
from ..names import image_name
from . import profile
from .accept import check_qcow2, image_info
from .copy import Progress, ReadError, copy_file
from .manifest import (CMDLINE_LIMIT, VERSION_LIMIT, Source, one_line, resolve_source,
                       sibling_version)
from .profile import (AUTO_READINESS, DIR_MODE, FILE_MODE, INITRD_FILE, KERNEL_FILE, NO_RUNTIME,
                      NO_SHARED_CONNECTION, BrokenImage, Image, check_choice, disk_file)
from .sniff import allocated, regular_readable

log = logging.getLogger("dgxvm.images")

DEFAULT_FILE = "default"
LOCK_FILE = ".lock"
RESERVED_NAMES = frozenset({DEFAULT_FILE})
LOCK_TIMEOUT_S = 30.0

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_PARTIAL = re.compile(r"^\.(?P<name>.+)\.(?:partial|removing)-(?P<pid>\d+)$")


@dataclass(frozen=True)
class _Plan:
    """An install with every option resolved and checked: what to copy, under which name."""

    name: str
    source: Source
    version: str | None       # None: the disk's sha256[:12]
    cmdline: str | None
    container_runtime: str    # one of profile.CONTAINER_RUNTIMES
    gpu_devices: str          # one of profile.GPU_DEVICES
    readiness: str            # one of profile.READINESS
    shared_connection: str    # one of profile.SHARED_CONNECTION


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
            raise self._not_installed(name)
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
        except Exception:  # noqa: BLE001 - whatever image_name refuses: no image name
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
                container_runtime: str | None = None, gpu_devices: str | None = None,
                readiness: str | None = None, shared_connection: str | None = None,
                progress: Progress | None = None) -> Image:
        """Install ``src`` as image ``name`` and return its profile.

        ``src`` is either a disk image file (qcow2, or raw: see :mod:`.accept`) or a builder
        **manifest** — a ``*.json`` file, or a directory holding ``manifest.json`` — with keys
        ``name``, ``version``, ``disk``, ``kernel``, ``initrd``, ``cmdline`` (paths relative to
        the manifest; only ``disk`` is required; an optional ``sha256`` of the disk is
        verified), ``container_runtime``, ``gpu_devices``. Options given here win over the
        manifest's values.

        * ``name``: default the manifest's name, else the disk file's stem (``jammy.qcow2`` ->
          ``jammy``). Must be a valid image name, not ``default``, and not installed yet.
        * ``kernel``/``initrd``: both or neither (direct kernel boot); ``cmdline`` only with a
          kernel. They are copied into the image directory.
        * ``version``: explicit, else the manifest's (the one given, or a ``manifest.json``
          next to the disk that describes it), else ``sha256[:12]``.
        * ``container_runtime`` (one of ``runc``, ``podman``, ``docker``, ``enroot``, ``none``)
          and ``gpu_devices`` (``nvidia``, ``cdi``, ``none``): the guest image's container
          runtime and how GPUs reach its containers, recorded in the profile; else the
          manifest's; else ``none`` (``dgxvm run --container-image`` is then refused).
        * ``readiness`` (``auto``, ``agent``, ``cloud-init``): when a VM of it is ready; else
          the manifest's; else ``auto``.
        * ``shared_connection`` (``yes``, ``no``): whether a job's runs share one ssh
          connection to a VM of it (its sshd multiplexes reliably); else the manifest's; else
          ``no``.
        * ``default``: also make it the default image.
        * ``progress(done_bytes, total_bytes)`` is called while the disk is copied.

        Raises ImageError (a BadName for a bad name) and leaves nothing behind on failure,
        including ENOSPC ("no space left") and KeyboardInterrupt.
        """
        plan = self._plan(src, name=name, version=version, kernel=kernel, initrd=initrd,
                          cmdline=cmdline, container_runtime=container_runtime,
                          gpu_devices=gpu_devices, readiness=readiness,
                          shared_connection=shared_connection)
        info = self._check_source(plan)
        plan = _with_sibling_version(plan)
        self._ensure_root()
        self._sweep()
        with self._partial_dir(plan) as partial:
            sha = self._copy_in(plan, info["format"], partial, progress)
            self._check_copy(plan, info, partial)
            version = _write_profile(plan, info, partial, sha)
            self._publish(partial, plan.name)
        log.info("installed image %s (%s, %s, container runtime %s, GPU devices %s, readiness "
                 "%s) from %s", plan.name, info["format"], version, plan.container_runtime,
                 plan.gpu_devices, plan.readiness, _source_text(plan.source))
        if default:
            self._make_default_after_install(plan.name)
        return self._load(plan.name)

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
                raise self._not_installed(name)
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

    # install's steps --------------------------------------------------------------------------
    def _plan(self, src: str | os.PathLike, *, name: str | None, version: str | None,
              kernel: str | os.PathLike | None, initrd: str | os.PathLike | None,
              cmdline: str | None, container_runtime: str | None = None,
              gpu_devices: str | None = None, readiness: str | None = None,
              shared_connection: str | None = None) -> _Plan:
        """Resolve the source and the options into a _Plan; ImageError (BadName for a bad
        name) for options that do not go together or a name that is taken."""
        source = resolve_source(src, kernel=kernel, initrd=initrd)
        if cmdline is not None:
            cmdline = one_line(cmdline, "cmdline", "--cmdline", limit=CMDLINE_LIMIT)
        else:
            cmdline = source.cmdline
        if version is not None:
            version = one_line(version, "version", "--version", limit=VERSION_LIMIT)
        version = version or source.version
        if container_runtime is not None:
            check_choice(container_runtime, "container_runtime", "--container-runtime")
        container_runtime = container_runtime or source.container_runtime or NO_RUNTIME
        if gpu_devices is not None:
            check_choice(gpu_devices, "gpu_devices", "--gpu-devices")
        gpu_devices = gpu_devices or source.gpu_devices or NO_RUNTIME
        if readiness is not None:
            check_choice(readiness, "readiness", "--readiness")
        readiness = readiness or source.readiness or AUTO_READINESS
        if shared_connection is not None:
            check_choice(shared_connection, "shared_connection", "--shared-connection")
        shared_connection = shared_connection or source.shared_connection \
            or NO_SHARED_CONNECTION

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
        if os.path.lexists(self.root / name):
            raise ImageError(name=name, reason=f"already installed; remove it first "
                                               f"(dgxvm image remove {name})")
        return _Plan(name=name, source=source, version=version, cmdline=cmdline,
                     container_runtime=container_runtime, gpu_devices=gpu_devices,
                     readiness=readiness, shared_connection=shared_connection)

    @staticmethod
    def _check_source(plan: _Plan) -> dict:
        """The source disk's ``qemu-img info`` once it is accepted (and, for a qcow2, checked);
        the kernel and initrd must be readable, non-empty files."""
        info = image_info(plan.source.disk)
        if info["format"] == "qcow2":
            check_qcow2(plan.source.disk)
        for path, what in ((plan.source.kernel, "kernel"), (plan.source.initrd, "initrd")):
            if path is not None:
                regular_readable(path, what)
                if path.stat().st_size == 0:
                    raise ImageError(name=str(path), reason=f"{what}: empty file")
        return info

    @contextlib.contextmanager
    def _partial_dir(self, plan: _Plan) -> Iterator[Path]:
        """A fresh ``.<name>.partial-<pid>/`` to build the image in.

        Any failure in the block removes it, Ctrl-C included; a read error becomes an
        ImageError naming the source file, a write error one naming the store (ENOSPC and
        EDQUOT: "no space left", with what the image needs).
        """
        partial = self.root / f".{plan.name}.partial-{os.getpid()}"
        try:
            if os.path.lexists(partial):
                shutil.rmtree(partial)
            os.mkdir(partial, DIR_MODE)
            os.chmod(partial, DIR_MODE)       # mode= is filtered by the umask
            yield partial
        except ReadError as e:
            self._discard(partial)
            raise ImageError(name=str(e.path), reason=f"cannot read: "
                                                      f"{e.exc.strerror or e.exc}") from None
        except OSError as e:
            self._discard(partial)
            if e.errno in _NO_SPACE:
                need = _allocated_or_0(plan.source.disk)
                raise ImageError(name=plan.name, reason=f"no space left in the image store "
                                                        f"{self.root} (the image needs {need} "
                                                        f"bytes)") from None
            raise ImageError(name=plan.name, reason=f"cannot write into the image store "
                                                    f"{self.root}: {e.strerror or e}") from None
        except BaseException:
            self._discard(partial)
            raise

    @staticmethod
    def _copy_in(plan: _Plan, fmt: str, partial: Path, progress: Progress | None) -> str:
        """Copy the disk (verified against the manifest's sha256, if it gave one), and the
        kernel and initrd, into ``partial``; return the disk's sha256."""
        source = plan.source
        sha, _ = copy_file(source.disk, partial / disk_file(fmt), mode=FILE_MODE,
                           progress=progress)
        if source.sha256 and sha != source.sha256:
            raise ImageError(name=str(source.disk), reason=f"sha256 {sha} does not match the "
                                                          f"manifest's {source.sha256}")
        if source.kernel is not None:
            copy_file(source.kernel, partial / KERNEL_FILE, mode=FILE_MODE)
            copy_file(source.initrd, partial / INITRD_FILE, mode=FILE_MODE)
        return sha

    @staticmethod
    def _check_copy(plan: _Plan, info: dict, partial: Path) -> None:
        """What we keep is what we checked: the copy must be the same format and size."""
        copied = image_info(partial / disk_file(info["format"]))
        if copied["format"] != info["format"] or \
                int(copied["virtual-size"]) != int(info["virtual-size"]):
            raise ImageError(name=str(plan.source.disk), reason="changed while it was copied")

    def _publish(self, partial: Path, name: str) -> None:
        """Rename the finished ``partial`` to ``<store>/<name>`` under the store lock, never
        over an image a concurrent install put there first."""
        target = self.root / name
        with self._lock():
            if os.path.lexists(target):
                raise ImageError(name=name, reason="already installed (by a concurrent "
                                                   "install); remove it first")
            os.rename(partial, target)
            fsync_dir(self.root)

    def _make_default_after_install(self, name: str) -> None:
        try:
            self.set_default(name)
        except (ImageError, OSError) as e:
            raise ImageError(name=name, reason=f"installed, but not made the default: "
                                               f"{e}") from None

    # internals ----------------------------------------------------------------------------------
    def _load(self, name: str) -> Image:
        return profile.load(self.root / name)

    def _not_installed(self, name: str) -> ImageError:
        have = ", ".join(self.names()) or "none"
        return ImageError(f"no image named {name}; installed: {have}", name=name,
                          reason="not installed")

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


def _allocated_or_0(path: Path) -> int:
    with contextlib.suppress(OSError):
        return allocated(path)
    return 0


def _with_sibling_version(plan: _Plan) -> _Plan:
    """A disk named directly, with no version given, takes the version of a manifest.json next
    to it that describes it (see :func:`.manifest.sibling_version`)."""
    if plan.version is None and plan.source.manifest is None:
        return dataclasses.replace(plan, version=sibling_version(plan.source.disk))
    return plan


def _write_profile(plan: _Plan, info: dict, partial: Path, sha: str) -> str:
    """Write the profile of the image built in ``partial``; return its version."""
    version = plan.version or sha[:12]
    profile.write(partial, name=plan.name, fmt=info["format"],
                  virtual_size=int(info["virtual-size"]), version=version, sha256=sha,
                  kernel_boot=plan.source.kernel is not None, cmdline=plan.cmdline,
                  source=_source_text(plan.source), container_runtime=plan.container_runtime,
                  gpu_devices=plan.gpu_devices, readiness=plan.readiness,
                  shared_connection=plan.shared_connection)
    return version


def _source_text(source: Source) -> str:
    """What an image was installed from, as its profile records it."""
    return str(source.manifest or source.disk)


__all__ = ["DEFAULT_FILE", "ImageStore", "LOCK_FILE", "RESERVED_NAMES"]
