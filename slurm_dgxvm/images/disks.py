"""Per-VM disks made with qemu-img: a VM's OS disk (a qcow2 overlay on an installed image) and
an empty data disk.

Per-VM disks are 0600: they hold the guest's data; libvirt's DAC driver (``dynamic_ownership``,
on by default) hands them to the qemu user when the domain starts. The image under an overlay
stays read-only (and world-readable, see :mod:`.profile`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from ..errors import DiskError
from ..fsutil import fsync_dir, link_into_place
from . import qemu_img
from .profile import Image

log = logging.getLogger("dgxvm.images")

GIB = 1024 ** 3
VM_DISK_MODE = 0o600


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
    """``qemu-img create`` into ``.<name>.tmp-<pid>``, 0600, fsync, then link to ``path``
    (never replacing one that is there); the temp file is gone afterwards, whatever happened."""
    path = path.absolute()
    if os.path.lexists(path):
        raise DiskError(path=str(path), reason="already exists")
    if not path.parent.is_dir():
        raise DiskError(path=str(path), reason=f"directory {path.parent} does not exist")
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        qemu_img.create(tmp, opts, size,
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


__all__ = ["GIB", "VM_DISK_MODE", "create_disk", "create_overlay"]
