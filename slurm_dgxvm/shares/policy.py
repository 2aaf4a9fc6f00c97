"""What may be shared into a job's VM, decided before anything is allocated.

A work dir is shared when it lies at or below one of the admin's ``vm.share_roots`` and the
job's own user can open it: every component, from ``/``, is opened by that user (uid, gid and
supplementary groups; root-squashed NFS and group project directories behave as for the user's
own shell) without following a symbolic link, and the directory itself must be readable and
searchable. The result pins the directory by device and inode (:class:`ShareSpec`); the share's
virtiofsd opens it again the same way when the VM starts and serves it only if it is the same
directory, so nothing swapped in between (a symlink, a rename) is ever served.

The walk runs in a child that has become the user (:mod:`.asuser`: no root descriptor in it,
killed at a deadline), so a FIFO, a stopped FUSE mount or a ``kill -STOP`` of that child by the
user makes a refusal in a few seconds (ShareTimeout), never a Prolog that waits for ever.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from dataclasses import asdict, dataclass
from pathlib import Path
from collections.abc import Sequence

from ..errors import ShareRefused, ShareTimeout, UserTreeRefused, UserTreeTimeout
from ..fsutil import atomic_write_json
from ..names import shown
from . import asuser

_DIR_PATH = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True)
class ShareSpec:
    """A directory checked for one VM: what its virtiofsd serves, and as whom."""

    path: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    dev: int
    ino: int

    def to_json(self) -> dict:
        return {**asdict(self), "groups": list(self.groups)}

    @classmethod
    def from_json(cls, doc: dict) -> ShareSpec:
        return cls(path=doc["path"], uid=int(doc["uid"]), gid=int(doc["gid"]),
                   groups=tuple(int(g) for g in doc["groups"]), dev=int(doc["dev"]),
                   ino=int(doc["ino"]))

    def save(self, path: Path) -> None:
        """Root's alone (0600), written atomically like the VM record."""
        atomic_write_json(path, self.to_json(), mode=0o600)

    @classmethod
    def load(cls, path: Path) -> ShareSpec:
        return cls.from_json(json.loads(Path(path).read_text()))


def under_roots(path: str, roots: Sequence[str]) -> str | None:
    """The first root that ``path`` lies at or below (by whole components), or None."""
    parts = [p for p in path.split("/") if p]
    for root in roots:
        rparts = [p for p in root.split("/") if p]
        if parts[:len(rparts)] == rparts:
            return root
    return None


def check(path: str, roots: Sequence[str], uid: int, gid: int,
          groups: Sequence[int]) -> ShareSpec:
    """The ShareSpec of ``path`` for this user, or ShareRefused naming why not.

    ``path`` must be absolute and normalised (the Slurm side validates its format first).
    Example: ``check("/home/alice/run", ["/home"], 1000, 1000, [1000])`` opens ``/``, ``home``,
    ``alice``, ``run`` as uid 1000 and returns the directory's device and inode.
    """
    if not roots:
        raise ShareRefused(value=path, reason="no directory may be shared on this node "
                                              "(vm.share_roots is empty)")
    if under_roots(path, roots) is None:
        raise ShareRefused(value=path, reason=f"it is not under vm.share_roots "
                                              f"({', '.join(roots)})")
    return pin(path, uid, gid, groups)


def pin(path: str, uid: int, gid: int, groups: Sequence[int]) -> ShareSpec:
    """The ShareSpec of directory ``path`` as this user opens it (no symlink followed, readable
    and searchable by the user), whatever ``vm.share_roots`` says: for directories dgxvm itself
    chose (the user's container image cache), not for a work dir a job names. ShareRefused
    naming the component that stopped it."""
    fd = open_as_user(path, uid, gid, groups)
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    return ShareSpec(path=path, uid=uid, gid=gid, groups=tuple(sorted(set(groups))),
                     dev=st.st_dev, ino=st.st_ino)


def open_as_user(path: str, uid: int, gid: int, groups: Sequence[int], *,
                 timeout_s: float | None = None) -> int:
    """Open directory ``path`` (O_RDONLY) with the credentials of ``uid``/``gid``/``groups``,
    following no symlink; returns the descriptor. Raises ShareRefused naming the component
    that stopped it (its path is the error's ``at``), ShareTimeout when the user's files did
    not let it finish within ``timeout_s`` seconds (:data:`.asuser.DEADLINE_S` when None: a
    stopped FUSE daemon, the walk's process stopped by the user): both the job's fault. The
    walk runs as the user through :func:`.asuser.run` (a forked child holding none of root's
    descriptors, killed at the deadline); the descriptor comes back over a socket
    (SCM_RIGHTS).
    """
    try:
        answer = asuser.run(lambda: asuser.Answer(fds=(_walk(path),)), uid=uid, gid=gid,
                            groups=groups, subject=path, timeout_s=timeout_s,
                            doing=f"opening {path} as uid {uid}")
    except UserTreeTimeout as exc:
        raise ShareTimeout(value=path, reason=exc.reason, timeout=exc.fields.get("timeout")) \
            from None
    except UserTreeRefused as exc:
        raise ShareRefused(value=path, reason=exc.reason, at=exc.fields.get("at")) from None
    [fd] = answer.fds
    return fd


def _walk(path: str) -> int:
    fd = os.open("/", _DIR_PATH)
    done = ""
    for part in [p for p in path.split("/") if p]:
        here = f"{done}/{part}"
        try:
            nfd = os.open(part, _DIR_PATH, dir_fd=fd)
        except OSError as exc:
            raise asuser.Refused(_why(fd, part, here, exc), at=here) from None
        os.close(fd)
        fd, done = nfd, here
        if not stat.S_ISDIR(os.fstat(fd).st_mode):   # O_PATH|O_NOFOLLOW may open a link
            raise asuser.Refused(f"{shown(here)} is a symbolic link (share the real path)",
                                 at=here)
    try:
        rd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
    except OSError as exc:
        raise asuser.Refused(f"the job's user cannot read {shown(done or '/')} "
                             f"({exc.strerror})", at=done or "/") from None
    finally:
        os.close(fd)
    return rd


def _why(parent_fd: int, part: str, here: str, exc: OSError) -> str:
    here = shown(here)
    try:
        st = os.lstat(part, dir_fd=parent_fd)
    except OSError:
        st = None
    if st is not None and stat.S_ISLNK(st.st_mode):
        return f"{here} is a symbolic link (share the real path)"
    if exc.errno == errno.ENOENT:
        return f"{here} does not exist"
    if exc.errno == errno.ENOTDIR:
        what = f" ({asuser.kind(st.st_mode)})" if st is not None else ""
        return f"{here} is not a directory{what}"
    if exc.errno == errno.EACCES:
        return f"the job's user cannot reach {here} (permission denied)"
    return f"{here}: {exc.strerror}"
