"""Can this node serve work dir shares as the job's user? Each check does the real thing once
(the kernel answers, not a version number) and says how to fix what fails."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Sequence

from . import readonly, seccomp, userns

PROBE_UID = PROBE_GID = 65534          # nobody: any uid works, the kernel only sees numbers


@dataclass(frozen=True)
class Finding:
    check: str
    ok: bool
    detail: str


def _in_child(fn) -> str | None:
    """Run ``fn`` in a forked child; None when it worked, else its error text."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            fn()
            msg = b""
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            msg = f"{type(exc).__name__}: {exc}".encode()[:1000] or b"failed"
        os.write(w, msg)
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read()
    os.waitpid(pid, 0)
    return out.decode() or None


def _read_only_mount(base: Path) -> None:
    """What the image cache share's virtiofsd does (:mod:`.readonly`), with directory ``base``
    as the share; raises when a step fails or the result is not read-only. In a child: the
    mount goes with its namespace."""
    fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY)
    st = os.fstat(fd)
    os.close(readonly.enter_read_only(fd, base / "ro", uid=PROBE_UID, gid=PROBE_GID,
                                      groups=[PROBE_GID], keep_caps=("sys_chroot", "setpcap"),
                                      dev=st.st_dev, ino=st.st_ino))


def findings(virtiofsd: str, share_roots: Sequence[str]) -> list[Finding]:
    """The checks, in order; meant to run as root on the node."""
    out = []
    exe = Path(virtiofsd)
    ok = exe.is_file() and os.access(exe, os.X_OK)
    out.append(Finding("virtiofsd", ok, f"{exe}" if ok else
                       f"{exe} is missing or not executable: install qemu-system-common "
                       f"(Debian 12) or set [vm] virtiofsd"))
    err = None if os.geteuid() == 0 else "run this check as root"
    err = err or _in_child(lambda: userns.enter(PROBE_UID, PROBE_GID, [PROBE_GID],
                                                ("sys_chroot", "setpcap")))
    out.append(Finding("user namespaces", err is None, "root can create a user namespace "
                       "holding one user's ids" if err is None else
                       f"{err}; allow them (sysctl user.max_user_namespaces > 0)"))
    err = _in_child(seccomp.install_no_setid)
    out.append(Finding("seccomp", err is None, "the setuid/setgid filter installs"
                       if err is None else f"{err}; the kernel needs CONFIG_SECCOMP_FILTER"))
    err = None if os.geteuid() == 0 else "run this check as root"
    if err is None:
        base = Path(tempfile.mkdtemp(prefix="dgxvm-share-check-"))
        os.chown(base, PROBE_UID, PROBE_GID)    # as a user's cache: theirs, 0700
        try:
            err = _in_child(lambda: _read_only_mount(base))
        finally:
            shutil.rmtree(base, ignore_errors=True)
    out.append(Finding("read-only mounts", err is None, "a locked read-only bind serves the "
                       "image cache share" if err is None else
                       f"{err}; the image cache share needs Linux 5.12 or later (open_tree, "
                       f"move_mount, mount_setattr)"))
    for root in share_roots:
        ok = Path(root).is_dir() and not any(
            Path(*Path(root).parts[:i + 1]).is_symlink() for i in range(len(Path(root).parts)))
        out.append(Finding(f"share root {root}", ok, "a real directory" if ok else
                           "missing, or reached through a symlink: nothing under it can be "
                           "shared (list the real path in [vm] share_roots)"))
    if not share_roots:
        out.append(Finding("share roots", True, "[vm] share_roots is empty: nothing is shared"))
    return out


def node_findings(vm) -> list[Finding]:
    """The checks for this node's ``[vm]`` config (``dgxvm share check``): none when it shares
    nothing (``share = "none"``)."""
    return findings(vm.virtiofsd, vm.share_roots) if vm.share != "none" else []
