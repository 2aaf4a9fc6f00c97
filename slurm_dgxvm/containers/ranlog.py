"""The container images a job ran, by digest: written by the job's ``dgxvm run`` (as the user)
into a file of the VM's directory that belongs to the user, read by the Epilog (as root) into
the job's final VM record in Slurm's accounting, so ``sacct`` answers "which exact container
did job N run".

The same lines tell a later ``dgxvm run --container-name NAME`` of the job which image its
named container was made from (:func:`named`).

What the file says is the job's own report (its user can write anything there), so the reader
trusts nothing: a line is ``<digest> <reference> [<container name>]`` with a digest of the
registry's form and a reference ``containers.ref`` parses; anything else is skipped; the file
is opened without following a symlink and read up to ``MAX_BYTES``; at most ``MAX_IMAGES``
distinct digests are kept, in the order first run. Before the Epilog puts them in the job's
record, :func:`in_cache` keeps only the digests the user's image cache holds as complete
entries (read as the user, with a deadline): a line naming an image the user never pulled on
this node, or a made-up digest, never reaches ``sacct``. Writing is best effort: a run never
fails for its log.
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

from ..errors import ContainerRefError
from ..records import RANLOG
from .ref import parse

FILE = RANLOG          # the VM directory's file: records names them all, so create makes it
MAX_BYTES = 64 * 1024
MAX_IMAGES = 8
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}\Z")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")   # a --container-name


def append(vmdir: Path | str, digest: str, ref: str, name: str | None = None) -> bool:
    """Add one line; False when the VM has no log (an older VM) or it cannot be written."""
    try:
        fd = os.open(Path(vmdir) / FILE, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        if os.fstat(fd).st_size >= MAX_BYTES:
            return False
        os.write(fd, f"{digest} {ref}{' ' + name if name else ''}\n".encode())
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _lines(vmdir: Path | str) -> list[tuple[str, str, str | None]]:
    """``[(reference, digest, name or None)]``: every valid line, in order."""
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
    out: list[tuple[str, str, str | None]] = []
    for line in data.decode("utf-8", errors="replace").splitlines():
        words = line.split(" ")
        if len(words) not in (2, 3) or not _DIGEST.match(words[0]) \
                or (len(words) == 3 and not NAME.match(words[2])):
            continue
        try:
            ref = parse(words[1])
        except ContainerRefError:
            continue
        out.append((str(ref), words[0], words[2] if len(words) == 3 else None))
    return out


def read(vmdir: Path | str) -> list[tuple[str, str]]:
    """``[(reference, digest)]``: the valid lines, distinct digests, first run first (all of
    them: lines naming images that are not in the cache must not push real ones out before
    :func:`in_cache` drops them; :func:`field` keeps ``MAX_IMAGES``)."""
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    for ref, digest, _ in _lines(vmdir):
        if digest in seen:
            continue
        seen.add(digest)
        out.append((ref, digest))
    return out


def named(vmdir: Path | str, name: str) -> tuple[str, str] | None:
    """``(reference, digest)`` the job's container ``name`` was made from (its first run's
    line), or None when no run of the job named a container so."""
    for ref, digest, n in _lines(vmdir):
        if n == name:
            return ref, digest
    return None


def in_cache(images: list[tuple[str, str]], cache: str | None, uid: int, gid: int,
             groups: tuple[int, ...] = ()) -> list[tuple[str, str]]:
    """The ``images`` whose digest is a complete entry of the user's image cache ``cache``
    (``sha256/<hex>/image.json`` a regular file naming that digest), read as the user with
    :mod:`slurm_dgxvm.shares.asuser`'s deadline; none when the VM had no cache or the cache
    did not answer (the record then names no image rather than an unchecked one)."""
    if not images or not cache or uid <= 0:
        return []
    from ..errors import DgxvmError
    from ..shares import asuser

    def held() -> list[str]:
        root = asuser.open_dir(cache)
        found = []
        for _, digest in images:
            algo, hex_ = digest.split(":", 1)
            try:
                entry = asuser.open_dir(hex_, dir_fd=asuser.open_dir(algo, dir_fd=root))
                meta = json.loads(asuser.read_file("image.json", dir_fd=entry))
            except (asuser.Refused, OSError, ValueError):
                continue
            if isinstance(meta, dict) and meta.get("digest") == digest:
                found.append(digest)
        return found
    try:
        answer = asuser.run(held, uid=uid, gid=gid, groups=groups, subject=cache,
                            doing="checking the images a job ran")
    except DgxvmError:
        return []
    kept = set(answer.value or ())
    return [(ref, digest) for ref, digest in images if digest in kept]


def field(images: list[tuple[str, str]]) -> str | None:
    """The AdminComment value: the first ``MAX_IMAGES`` as ``ref@digest`` joined with ``,``
    (None when there are none)."""
    return ",".join(f"{ref.split('@')[0]}@{digest}"
                    for ref, digest in images[:MAX_IMAGES]) or None
