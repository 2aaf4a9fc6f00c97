"""What a file is, read without qemu-img: a readable regular file, a raw disk, its allocation.

**"raw" needs evidence.** qemu-img calls *any* file it does not recognise raw, so a text file,
a tarball or a qcow2 with a scribbled header would pass as a "raw disk". A raw image is
accepted only if it is at least 1 MiB, a whole number of 512-byte sectors, and starts like a
disk: an MBR boot signature (``55 aa`` at byte 510, also present in GPT's protective MBR) or
the superblock magic of ext2/3/4, XFS or btrfs (a bare filesystem for direct kernel boot).
"""

from __future__ import annotations

import os
import stat as stat_mod
from pathlib import Path

from ..errors import ImageError

MIN_RAW_BYTES = 1024 * 1024
SECTOR = 512


def regular_readable(path: Path, what: str | None = None) -> None:
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


def raw_problem(p: Path) -> str | None:
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


def allocated(path: Path) -> int:
    """Bytes ``path`` occupies on the host (less than its size when it is sparse)."""
    return os.stat(path).st_blocks * 512


__all__ = ["MIN_RAW_BYTES", "SECTOR", "allocated", "raw_problem", "regular_readable"]
