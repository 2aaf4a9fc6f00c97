"""``dgxvm run --container-image``: from pyxis's flags to the request the guest runs.

The image comes from the job's user's own cache on the host (containers.cache: pulled once per
digest with the user's credentials, unpacked once), which the VM has at the same path (the image
cache share). The guest image's profile says which runtime runs it: ``runc`` (rootless runc with
an OCI config, containers.runtime: the test guest) or ``podman`` (containers.podman: the Debian
cloud guest and images built like it), the same container either way.
"""

from __future__ import annotations

import json
import os
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..containers import accounts
from ..containers import mounts as mounts_mod
from ..containers import mountpoints, podman, ranlog
from ..containers import ref as ref_mod
from ..containers import runtime
from ..containers.ref import ImageRef
from ..errors import BadInput, ContainerMountError, ContainerRefError
from ..lifecycle.identity import group_names
from .request import Request, guest_cwd, is_name, quote
from .target import GUEST_HELPER

RUNTIMES = ("runc", "podman")     # the image profiles' runtimes dgxvm run can drive


OVERLAY_UNSAFE = (",", ":", "\\", "\n")    # what an overlayfs lowerdir= option cannot carry


@dataclass(frozen=True)
class ContainerFlags:
    """pyxis's flags, as given (``None``: not given; ``mounts`` and ``env`` are every
    occurrence joined with ``,``, as pyxis adds them up). :meth:`check` is every check the
    flags alone allow; what needs the VM (a mount source the VM does not have, a named
    container the job has) is checked by ``dgxvm run`` before it pulls anything."""
    image: str | None
    mounts: str | None = None
    workdir: str | None = None
    env: str | None = None           # --container-env NAME,NAME
    name: str | None = None          # --container-name NAME[:auto]
    remap_root: bool = False
    writable: bool | None = None     # --container-writable / --container-readonly / neither

    @property
    def container_name(self) -> str | None:
        """The name of ``--container-name`` (checked), without pyxis's ``:auto``."""
        if self.name is None:
            return None
        name, _, flag = self.name.partition(":")
        if flag not in ("", "auto"):
            raise BadInput(f"--container-name {self.name}: flag {flag!r} is not supported "
                           "(dgxvm run keeps pyxis's default, auto: use the container if it "
                           "exists, else make it)", value=self.name)
        if not ranlog.NAME.match(name):
            raise BadInput(f"--container-name {self.name}: a name is 1-64 letters, digits, "
                           "'_', '.' or '-', starting with a letter or digit", value=self.name)
        return name

    def image_ref(self) -> ImageRef | None:
        """``--container-image`` parsed (None when not given); ContainerRefError naming the
        flag and the value."""
        if self.image is None:
            return None
        try:
            return ref_mod.parse(self.image)
        except ContainerRefError as e:
            raise ContainerRefError(f"--container-image {self.image!r}: {e.reason}",
                                    value=self.image, reason=e.reason) from None

    def check(self) -> None:
        """Every check the flags alone allow (BadInput naming the flag and the bad value):
        the image reference, the mounts' syntax, the working directory, the variable names,
        the container's name, and a named container made read-only. Reads nothing, runs
        nothing."""
        self.image_ref()
        if self.mounts is not None:
            parse_mounts(self.mounts)
        check_workdir(self.workdir)
        env_names(self.env)
        self.container_name     # noqa: B018 - the name's own check
        self.rootfs_writable    # noqa: B018 - a named container cannot be read-only

    @property
    def rootfs_writable(self) -> bool:
        """A writable root: --container-writable, or a named container (it keeps what its
        runs change, as pyxis's named containers do), unless --container-readonly."""
        if self.name is not None and self.writable is False:
            raise BadInput(f"--container-name {self.name} keeps the changes a container makes "
                           "and cannot be --container-readonly", value=self.name)
        return bool(self.writable) or self.name is not None


def parse_mounts(text: str | None) -> tuple[mounts_mod.Mount, ...]:
    """``--container-mounts``'s syntax (containers.mounts): () when not given; an empty value
    is refused, as pyxis does."""
    if text is None:
        return ()
    return mounts_mod.parse(text)


def check_mounts(text: str | None, shared: tuple[str, ...]) -> tuple[mounts_mod.Mount, ...]:
    """``--container-mounts``, each source a path the VM has: under a share, or a path that
    is not the host's (then it is the guest's own, checked there by the runtime). A host
    path the VM does not have is refused naming it: it would silently be another directory.
    Call it as the job's user: whether a host path exists is theirs to know, not root's."""
    out = parse_mounts(text)
    for m in out:
        if guest_cwd(m.source, shared) is None and os.path.lexists(m.source):
            raise ContainerMountError(
                value=str(m), reason=f"{m.source} is a host path the VM does not have "
                f"(shared with it: {', '.join(shared) or 'nothing'})")
    return out


def check_workdir(text: str | None) -> str | None:
    """``--container-workdir``: None when not given; else an absolute path without ``.`` or
    ``..`` components or control characters (the runtime's cwd, and a mount point dgxvm makes
    in the image), returned as given."""
    if text is None:
        return None

    def bad(reason: str) -> BadInput:
        return BadInput(f"--container-workdir {text!r}: {reason}", value=text)
    if not text:
        raise bad("an argument is required (an absolute path in the container)")
    if not text.startswith("/"):
        raise bad("not an absolute path")
    if any(not c.isprintable() for c in text):
        raise bad("has control characters")
    if any(p in (".", "..") for p in text.split("/")):
        raise bad("has a '.' or '..' component")
    return text


def env_names(text: str | None) -> tuple[str, ...]:
    """``--container-env NAME[,NAME...]``: () when not given; an empty value, an empty entry
    (``FOO,``) or a name sh cannot export is refused naming it, as pyxis does."""
    if text is None:
        return ()
    if not text:
        raise BadInput("--container-env '': an argument is required (NAME[,NAME...])",
                       value=text)
    names = text.split(",")
    if "" in names:
        raise BadInput(f"--container-env {text!r}: an empty name (NAME[,NAME...], no empty "
                       "entries)", value=text)
    for n in names:
        if not is_name(n):
            raise BadInput(f"--container-env {text!r}: {n!r} is not a variable name", value=n)
    return tuple(dict.fromkeys(names))


def container_request(flags: ContainerFlags, *, argv: tuple[str, ...], env: Mapping[str, str],
                      cwd: str | None, shared: tuple[str, ...], uid: int, gid: int,
                      rootfs: str, image_config: Mapping, run_name: str,
                      groups: tuple[int, ...] = (), user: str = "", home: str = "/",
                      gpu_devices: int = 0, terminal: bool = False,
                      prepare: bool = True, runtime_kind: str = "runc") -> Request:
    """The request that runs ``argv`` in the image's container under ``runtime_kind`` (one of
    RUNTIMES: the guest image's profile) in the guest. ``prepare``: make the mount points in
    the (read-only in the guest) rootfs first, as its owner on the host."""
    if runtime_kind not in RUNTIMES:
        raise ValueError(f"no container runtime {runtime_kind!r}")
    mounts = check_mounts(flags.mounts, shared)
    etc_files = tuple(mountpoints.STANDARD_FILES)
    account_files = ("/etc/passwd", "/etc/group")
    files: dict[str, bytes] = {}
    run_files: tuple[str, ...] = ()
    if prepare:
        dirs = [*mountpoints.STANDARD_DIRS, *shared, *(m.target for m in mounts)]
        if flags.workdir:
            dirs.append(flags.workdir)
        # podman binds its own /etc/hostname: a mount point it needs besides runc's
        runtime_files = podman.ROOTFS_FILES if runtime_kind == "podman" else ()
        made = mountpoints.ensure(Path(rootfs), dirs, (*mountpoints.STANDARD_FILES,
                                                        *runtime_files, *account_files))
        etc_files = tuple(f for f in made if f not in (*account_files, *runtime_files))
        if runtime_kind == "podman":
            mountpoints.ensure_links(Path(rootfs), podman.ROOTFS_LINKS)
        if user and uid and gid and not flags.remap_root:
            # the user's own entries, so that whoami/getpwuid work (accounts)
            files = accounts.files(Path(rootfs), user=user, uid=uid, gid=gid, home=home,
                                   groups=group_names(tuple(groups)))
            run_files = tuple(f for f in made if f in account_files)
    writable = flags.rootfs_writable
    name = flags.container_name
    if writable and any(c in rootfs for c in OVERLAY_UNSAFE):
        raise BadInput(f"--container-writable: the image's path {rootfs} has a character an "
                       "overlay mount cannot take (',', ':', '\\'); the admin's [containers] "
                       "cache_dir must avoid them", value=rootfs)
    spec = runtime.ContainerSpec(
        rootfs=rootfs, image_config=image_config, argv=argv, env=env, cwd=cwd, uid=uid, gid=gid,
        shared=shared, mounts=mounts, workdir=flags.workdir,
        keep_env=env_names(flags.env), remap_root=flags.remap_root, groups=groups,
        writable=writable,
        gpu_devices=gpu_devices, terminal=terminal, etc_files=etc_files,
        run_files=run_files)
    if runtime_kind == "podman":
        return _podman_request(spec, argv, files, run_files, name)
    config = runtime.oci_config(spec)
    cname = f"dgxvm-{run_name}"
    # runc's state lives in the run's directory (removed with it); the cleanup script runs
    # from there too and finds it as its own $0's directory
    # runc's own messages go to runtime.log (the guest helper shows them, and makes "not
    # found" 127): its stderr is the command's alone
    command = (f'runc --root "$DGXVM_RUN_DIR/runc" --log "$DGXVM_RUN_DIR/runtime.log" run '
               f'--bundle "$DGXVM_RUN_DIR" {cname}').encode()
    if runtime.in_userns(spec):
        # runc in the namespace the guest helper makes (runtime._mappings), with the writable
        # layer mounted there first when there is one
        command = _userns(spec, name) + b" " + command
    cleanup = f'd=$(dirname "$0"); runc --root "$d/runc" delete --force {cname}'.encode()
    return Request(argv=argv, env={}, cwd=None,
                   files={"config.json": json.dumps(config, indent=1).encode(),
                          **{posixpath.basename(f): files[posixpath.basename(f)]
                             for f in run_files}},
                   command=command, cleanup=cleanup)



def _userns(spec: runtime.ContainerSpec, name: str | None) -> bytes:
    """The guest helper's ``userns`` words: the namespace where the user is 0 (and the
    container's runtime its root), with the writable layer mounted on the bundle's rootfs first
    when there is one."""
    gids = ",".join(map(str, runtime.supplementary(spec))) or "-"
    layer = (quote(spec.rootfs) + f' "$DGXVM_RUN_DIR/{runtime.ROOTFS_TARGET}" '.encode()
             + (name or "-").encode()) if spec.writable else b"- - -"
    return f"{GUEST_HELPER} userns {gids} ".encode() + layer


def _podman_request(spec: runtime.ContainerSpec, argv: tuple[str, ...],
                    files: dict[str, bytes], run_files: tuple[str, ...],
                    name: str | None) -> Request:
    """The podman profile (containers.podman): podman in the helper's namespace, its state in
    the run's directory. A job of root's runs podman as the guest's root, with no namespace
    of the helper's (root has no subordinate ids there)."""
    env_text, passed = podman.env_file(spec)
    # a name of the run's own: the run's directory name is its ID (16+ hex digits)
    words = podman.command(spec, name=podman.Raw(b'"dgxvm-${DGXVM_RUN_DIR##*/}"'))
    if spec.uid != 0 and spec.gid != 0:
        command = (_userns(spec, name) + b" " + podman.sh(podman.private_storage()) + b" "
                   + podman.sh(podman.rootless_env(spec)) + b" " + podman.sh(words))
    elif spec.writable:
        command = _userns(spec, name) + b" " + podman.sh(words)
    else:
        command = podman.sh(words)
    return Request(argv=argv, env=passed, cwd=None,
                   files={podman.ENV_FILE: env_text,
                          **{posixpath.basename(f): files[posixpath.basename(f)]
                             for f in run_files}},
                   command=command, cleanup=podman.cleanup(GUEST_HELPER))
