"""Which image files dgxvm accepts: :func:`image_info` and :func:`check_qcow2`.

* **Only qcow2 and raw.** Everything else (vmdk, vdi, vhdx...) is refused with a hint to
  ``qemu-img convert``. A qcow2 with a backing file, an external data file or encryption is
  refused (the copy would not be self-contained, or qemu could not open it unattended), and
  ``qemu-img check`` must find no corruption (leaked clusters are harmless and accepted).
* **"raw" needs evidence** (:mod:`.sniff`): a file qemu-img merely calls raw must start like a
  disk. A file named ``*.qcow2`` that qemu-img reads as raw is reported as a damaged qcow2.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..errors import ImageError
from ..tools import output_tail, tail
from . import qemu_img
from .profile import FORMATS
from .sniff import raw_problem, regular_readable

log = logging.getLogger("dgxvm.images")


def image_info(path: str | os.PathLike) -> dict:
    """``qemu-img info --output=json`` of an image file, accepted only if dgxvm can use it.

    Returns qemu-img's dict. Raises ImageError naming the file when it is missing, unreadable,
    qemu-img fails (its stderr attached), the format is not qcow2/raw, a qcow2 has a backing
    file, an external data file or encryption, or a "raw" file does not look like a disk (see
    the module docstring).
    """
    p = Path(path).absolute()                 # absolute: a name like "json:{...}" stays a file
    regular_readable(p)
    info = qemu_img.info(p, error=lambda reason: ImageError(name=str(p), reason=reason))
    fmt = info["format"]
    if fmt not in FORMATS:
        raise ImageError(name=str(p), reason=f"format {fmt} is not supported (qcow2 or raw); "
                                             f"convert it: qemu-img convert -O qcow2 {p} OUT.qcow2")
    if fmt == "raw":
        if p.suffix.lower() == ".qcow2":
            raise ImageError(name=str(p), reason="named .qcow2 but qemu-img does not see a qcow2 "
                                                 "header (damaged or truncated?)")
        problem = raw_problem(p)
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


def check_qcow2(path: str | os.PathLike) -> None:
    """``qemu-img check``: ImageError on corruption or when the check cannot complete.

    Exit status 3 (leaked clusters only) is accepted with a warning: leaks waste space but
    never corrupt data.
    """
    p = Path(path).absolute()
    r = qemu_img.check(p, "qcow2", error=lambda reason: ImageError(name=str(p), reason=reason))
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


__all__ = ["check_qcow2", "image_info"]
