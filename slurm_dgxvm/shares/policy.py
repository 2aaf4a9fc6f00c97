"""What may be shared into a job's VM, decided before anything is allocated.

A work dir is shared when it lies at or below one of the admin's ``vm.share_roots`` and the
job's own user can open it: every component, from ``/``, is opened by that user (uid, gid and
supplementary groups; root-squashed NFS and group project directories behave as for the user's
own shell) without following a symbolic link, and the directory itself must be readable and
searchable. The result pins the directory by device and inode (:class:`ShareSpec`); the share's
virtiofsd opens it again the same way when the VM starts and serves it only if it is the same
directory, so nothing swapped in between (a symlink, a rename) is ever served.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
from dataclasses import asdict, dataclass
from pathlib import Path
from collections.abc import Sequence

from ..errors import ShareRefused
from ..fsutil import atomic_write_json

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


def open_as_user(path: str, uid: int, gid: int, groups: Sequence[int]) -> int:
    """Open directory ``path`` (O_RDONLY) with the credentials of ``uid``/``gid``/``groups``,
    following no symlink; returns the descriptor. Raises ShareRefused naming the component
    that stopped it. The walk runs in a forked child that drops to the user; the descriptor
    comes back over a socket (SCM_RIGHTS).
    """
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            parent.close()
            os.setgroups(list(groups))
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            try:
                fd = _walk(path)
            except _Refused as exc:
                child.sendall(json.dumps({"reason": str(exc)}).encode())
            else:
                socket.send_fds(child, [b"{}"], [fd])
        except BaseException:  # noqa: BLE001 - reported as "no answer" below
            code = 1
        finally:
            os._exit(code)
    child.close()
    try:
        msg, fds, _flags, _addr = socket.recv_fds(parent, 65536, 1)
    finally:
        parent.close()
        os.waitpid(pid, 0)
    if fds:
        return fds[0]
    try:
        reason = json.loads(msg.decode() or "{}").get("reason")
    except ValueError:
        reason = None
    raise ShareRefused(value=path, reason=reason or f"it could not be opened as uid {uid}")


class _Refused(Exception):
    pass


def _walk(path: str) -> int:
    fd = os.open("/", _DIR_PATH)
    done = ""
    for part in [p for p in path.split("/") if p]:
        here = f"{done}/{part}"
        try:
            nfd = os.open(part, _DIR_PATH, dir_fd=fd)
        except OSError as exc:
            raise _Refused(_why(fd, part, here, exc)) from None
        os.close(fd)
        fd, done = nfd, here
        if not stat.S_ISDIR(os.fstat(fd).st_mode):   # O_PATH|O_NOFOLLOW may open a link
            raise _Refused(f"{here} is a symbolic link (share the real path)")
    try:
        rd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
    except OSError as exc:
        raise _Refused(f"the job's user cannot read {done or '/'} ({exc.strerror})") from None
    finally:
        os.close(fd)
    return rd


def _why(parent_fd: int, part: str, here: str, exc: OSError) -> str:
    try:
        st = os.lstat(part, dir_fd=parent_fd)
    except OSError:
        st = None
    if st is not None and stat.S_ISLNK(st.st_mode):
        return f"{here} is a symbolic link (share the real path)"
    if exc.errno == errno.ENOENT:
        return f"{here} does not exist"
    if exc.errno == errno.ENOTDIR:
        return f"{here} is not a directory"
    if exc.errno == errno.EACCES:
        return f"the job's user cannot reach {here} (permission denied)"
    return f"{here}: {exc.strerror}"
