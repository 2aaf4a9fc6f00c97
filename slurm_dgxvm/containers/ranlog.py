"""The container images a job ran, by digest: written by the job's ``dgxvm run`` (as the user)
into a file of the VM's directory that belongs to the user, read by the Epilog (as root) into
the job's final VM record in Slurm's accounting, so ``sacct`` answers "which exact container
did job N run".

What the file says is the job's own report (its user can write anything there), so the reader
trusts nothing: a line is ``<digest> <reference>`` with a digest of the registry's form and a
reference ``containers.ref`` parses; anything else is skipped; the file is opened without
following a symlink and read up to ``MAX_BYTES``; at most ``MAX_IMAGES`` distinct digests are
kept, in the order first run. Writing is best effort: a run never fails for its log.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from ..errors import ContainerRefError
from .ref import parse

FILE = "containers.log"
MAX_BYTES = 64 * 1024
MAX_IMAGES = 8
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}\Z")


def append(vmdir: Path | str, digest: str, ref: str) -> bool:
    """Add one line; False when the VM has no log (an older VM) or it cannot be written."""
    try:
        fd = os.open(Path(vmdir) / FILE, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        if os.fstat(fd).st_size >= MAX_BYTES:
            return False
        os.write(fd, f"{digest} {ref}\n".encode())
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def read(vmdir: Path | str) -> list[tuple[str, str]]:
    """``[(reference, digest)]``: the valid lines, distinct digests, first run first."""
    try:
        fd = os.open(Path(vmdir) / FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return []
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return []
        data = os.read(fd, MAX_BYTES)
    except OSError:
        return []
    finally:
        os.close(fd)
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    for line in data.decode("utf-8", errors="replace").splitlines():
        words = line.split(" ")
        if len(words) != 2 or not _DIGEST.match(words[0]) or words[0] in seen:
            continue
        try:
            ref = parse(words[1])
        except ContainerRefError:
            continue
        seen.add(words[0])
        out.append((str(ref), words[0]))
        if len(out) == MAX_IMAGES:
            break
    return out


def field(images: list[tuple[str, str]]) -> str | None:
    """The AdminComment value: ``ref@digest`` joined with ``,`` (None when there are none)."""
    return ",".join(f"{ref.split('@')[0]}@{digest}" for ref, digest in images) or None
