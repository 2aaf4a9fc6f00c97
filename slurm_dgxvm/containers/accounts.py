"""The container's ``/etc/passwd`` and ``/etc/group`` for a run as the user's own uid.

An image knows nothing of the job's user: ``whoami``, ``id -un``, ``getpwuid()`` (Python's
``getpass``, OpenMPI, ssh, many launchers) fail in a container whose passwd has no entry for the
uid it runs as. enroot (pyxis) adds the user; so does this: the image's own files with the
user's entry, the primary group and each supplementary group appended where the image has none
for the id, written into the run's directory and bound read-only over the image's.

Pure apart from reading the image's files, which are read from the cached rootfs on the host
without following a symlink (an image's ``/etc/passwd`` may point anywhere) and up to
``MAX_BYTES`` (an image's passwd is small; a huge one is not the user's problem to carry).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence
from pathlib import Path

MAX_BYTES = 1 << 20
SHELL = "/bin/sh"


def _read_etc(rootfs: Path, name: str) -> str | None:
    """The image's ``/etc/<name>`` as text, or None when it is missing, not a regular file or
    reached through a symlink (``etc`` or the file itself)."""
    try:
        root = os.open(rootfs, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        etc = os.open("etc", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=root)
    except OSError:
        return None
    finally:
        os.close(root)
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=etc)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ELOOP, errno.EISDIR):
            return None
        raise
    finally:
        os.close(etc)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return os.read(fd, MAX_BYTES).decode("utf-8", errors="surrogateescape")
    finally:
        os.close(fd)


def _ids(text: str, field: int) -> set[str]:
    out = set()
    for line in text.splitlines():
        parts = line.split(":")
        if len(parts) > field:
            out.add(parts[field])
    return out


def _names(text: str) -> set[str]:
    return {line.split(":", 1)[0] for line in text.splitlines() if line}


def _joined(text: str, lines: list[str]) -> str:
    if not lines:
        return text
    if text and not text.endswith("\n"):
        text += "\n"
    return text + "".join(line + "\n" for line in lines)


def passwd(image_text: str | None, *, user: str, uid: int, gid: int, home: str) -> str:
    """The image's passwd with ``user`` (uid, gid, home) when no entry has the uid; one
    already named ``user`` with another uid is left alone, and the user's entry is
    appended anyway (getpwuid finds it; getpwnam finds the image's first)."""
    text = image_text or "root:x:0:0:root:/root:/bin/sh\n"
    if str(uid) in _ids(text, 2):
        return text
    return _joined(text, [f"{user}:x:{uid}:{gid}::{home}:{SHELL}"])


def group(image_text: str | None, *, user: str, gid: int,
          groups: Sequence[tuple[str, int]] = ()) -> str:
    """The image's group with the user's primary group (named after the user, the guest's
    seed's rule) and each supplementary ``(name, gid)`` added where the image has no group of
    that gid; a name the image already uses for another gid becomes ``g<gid>``."""
    text = image_text or "root:x:0:\n"
    have_ids, have_names = _ids(text, 2), _names(text)
    lines: list[str] = []
    for name, g in ((user, gid), *groups):
        if str(g) in have_ids:
            continue
        name = name if name not in have_names else f"g{g}"
        members = "" if g == gid else user
        lines.append(f"{name}:x:{g}:{members}")
        have_ids.add(str(g))
        have_names.add(name)
    return _joined(text, lines)


def files(rootfs: Path, *, user: str, uid: int, gid: int, home: str,
          groups: Sequence[tuple[str, int]] = ()) -> dict[str, bytes]:
    """``{"passwd": ..., "group": ...}`` for the run's directory."""
    return {
        "passwd": passwd(_read_etc(rootfs, "passwd"), user=user, uid=uid, gid=gid,
                         home=home).encode("utf-8", errors="surrogateescape"),
        "group": group(_read_etc(rootfs, "group"), user=user, gid=gid,
                       groups=groups).encode("utf-8", errors="surrogateescape"),
    }


__all__ = ["files", "group", "passwd"]
