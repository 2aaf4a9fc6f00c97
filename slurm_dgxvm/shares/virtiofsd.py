"""The share's virtiofsd, as libvirt starts it: ``<binary path="VMDIR/virtiofsd"/>`` in the
domain names a per-VM script that runs ``python -m slurm_dgxvm.shares.virtiofsd SPEC ARGS...``,
where ARGS are libvirt's (``--fd=N -o source=PATH,...``).

Steps, as root, then as the job's user:
1. read the VM's ShareSpec (written by the Prolog's check, root-only) and open its directory
   again as the job's user, component by component, no symlink followed; it must be the same
   directory (device, inode) the Prolog checked;
2. raise RLIMIT_NOFILE for virtiofsd while still root (it cannot raise a hard limit later);
3. enter a user namespace holding only the user's uid and groups, as that user, with
   ``KEEP_CAPS`` there (virtiofsd's chroot sandbox and its per-request credential switch);
   for a read-only share (``--read-only`` before SPEC: the container image cache), first
   attach a read-only bind of the directory in a private mount namespace and enter a mount
   namespace of the user namespace's with it, which locks it read-only (:mod:`.readonly`);
4. install the seccomp filter against setuid/setgid bits;
5. exec virtiofsd with ``source=/proc/self/fd/N`` and ``sandbox=chroot`` (libvirt's
   ``--fd`` and other options kept).

A failure writes one line to the spec's name with ``.error`` (``share.json`` -> ``share.error``,
``image-cache.json`` -> ``image-cache.error``: each share of a VM its own) beside the spec (the
lifecycle reads it to tell the job's fault -- a directory swapped since the check -- from the
node's) and exits 1, which libvirt reports as a failed start.
"""

from __future__ import annotations

import os
import resource
import shlex
import sys
from pathlib import Path

from ..errors import DgxvmError, ShareRefused
from . import readonly, seccomp, userns
from .policy import ShareSpec, open_as_user

VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
ERROR_FILE = "share.error"           # the work dir share's (share.json's) error file
REFUSED_PREFIX = "refused: "
# What virtiofsd keeps in the namespace (there they apply to the user's own ids only): chroot
# for its sandbox, setuid/setgid for its per-request credential switch to the guest's uid (which
# must be the job's uid, the only one mapped), fowner/chown/dac_override/fsetid for its file
# operations, and setpcap, without which libcap-ng cannot drop virtiofsd's bounding set and
# falls back to a readlink that virtiofsd's own seccomp filter kills (SIGSYS, seen here).
KEEP_CAPS = ("setpcap", "sys_chroot", "setuid", "setgid", "fowner", "chown", "dac_override",
             "fsetid")
# virtiofsd asks for its whole list by default; these two it must not have (and cannot get).
MODCAPS = "modcaps=-mknod:-setfcap"
NOFILE = 65536


def split_options(value: str) -> list[str]:
    """QEMU-style comma list (``,,`` is a literal comma) -> items."""
    items, cur, i = [], [], 0
    while i < len(value):
        c = value[i]
        if c == ",":
            if value[i + 1:i + 2] == ",":
                cur.append(",")
                i += 2
                continue
            items.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    items.append("".join(cur))
    return [x for x in items if x]


def rewrite_args(args: list[str], source: str) -> list[str]:
    """libvirt's virtiofsd arguments with our source and sandbox (other options kept)."""
    out: list[str] = []
    it = iter(args)
    for arg in it:
        if arg == "-o":
            opts = [o for o in split_options(next(it, ""))
                    if not o.startswith(("source=", "sandbox=", "modcaps="))]
            out += ["-o", ",".join([f"source={source}", "sandbox=chroot", MODCAPS,
                                    *[o.replace(",", ",,") for o in opts]])]
        elif arg.startswith("--rlimit-nofile"):
            continue
        else:
            out.append(arg)
    if "-o" not in out:
        out += ["-o", f"source={source},sandbox=chroot,{MODCAPS}"]
    return out + ["--rlimit-nofile=0"]


def _raise_nofile() -> None:
    """As many descriptors as the host allows, up to NOFILE (virtiofsd holds one per inode the
    guest has looked up); raising the hard limit needs root in the initial namespace."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = NOFILE if hard == resource.RLIM_INFINITY else max(soft, min(NOFILE, hard))
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(want, hard)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def prepare(spec: ShareSpec) -> int:
    """Open the checked directory as the job's user; the descriptor, inheritable."""
    fd = open_as_user(spec.path, spec.uid, spec.gid, spec.groups)
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) != (spec.dev, spec.ino):
        os.close(fd)
        raise ShareRefused(value=spec.path, reason="it is no longer the directory that was "
                                                   "checked when the job started")
    os.set_inheritable(fd, True)
    return fd


READ_ONLY = "--read-only"            # the wrapper's first argument for a read-only share
MOUNT_POINT_SUFFIX = ".ro"           # image-cache.json -> image-cache.ro: where it is mounted


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    read_only = bool(args) and args[0] == READ_ONLY
    args = args[1:] if read_only else args
    if not args:
        print(f"usage: python -m slurm_dgxvm.shares.virtiofsd [{READ_ONLY}] SPEC "
              "[virtiofsd args]", file=sys.stderr)
        return 2
    spec_path = Path(args[0])
    error_file = error_file_of(spec_path)
    try:
        spec = ShareSpec.load(spec_path)
        fd = prepare(spec)
        _raise_nofile()
        if read_only:
            fd = readonly.enter_read_only(fd, spec_path.with_suffix(MOUNT_POINT_SUFFIX),
                                          uid=spec.uid, gid=spec.gid, groups=spec.groups,
                                          keep_caps=KEEP_CAPS, dev=spec.dev, ino=spec.ino)
        else:
            userns.enter(spec.uid, spec.gid, spec.groups, KEEP_CAPS)
        argv2 = rewrite_args(args[1:], f"/proc/self/fd/{fd}/")  # "/": virtiofsd lstat()s it
        seccomp.install_no_setid()
        binary = os.environ.get("DGXVM_VIRTIOFSD", VIRTIOFSD)
        os.execv(binary, [binary, *argv2])
    except ShareRefused as exc:
        line = REFUSED_PREFIX + str(exc)
    except (DgxvmError, OSError, ValueError, KeyError) as exc:
        line = f"virtiofsd as the job's user: {type(exc).__name__}: {exc}"
    try:
        error_file.write_text(line + "\n")
    except OSError:
        pass
    print(f"dgxvm share: {line}", file=sys.stderr)
    return 1


def error_file_of(spec_path: Path) -> Path:
    """Where the virtiofsd of the share ``spec_path`` says why it did not start."""
    return Path(spec_path).with_suffix(".error")


def wrapper_script(spec_path: Path, *, virtiofsd: str = VIRTIOFSD,
                   python: str | None = None, what: str = "The work dir share",
                   read_only: bool = False) -> str:
    """The per-VM script libvirt runs as the share's virtiofsd: this interpreter, this copy of
    the package (libvirtd starts it with an environment of its own), the VM's spec; with
    ``read_only``, served from a locked read-only mount (:mod:`.readonly`)."""
    py = shlex.quote(python or sys.executable)
    package_parent = shlex.quote(str(Path(__file__).resolve().parents[2]))
    return ("#!/bin/sh\n"
            f"# {what} of this VM, served as the job's user (slurm_dgxvm.shares).\n"
            f"PYTHONPATH={package_parent} DGXVM_VIRTIOFSD={shlex.quote(virtiofsd)} "
            f"exec {py} -m slurm_dgxvm.shares.virtiofsd {READ_ONLY + ' ' if read_only else ''}"
            f"{shlex.quote(str(spec_path))} \"$@\"\n")


if __name__ == "__main__":
    sys.exit(main())
