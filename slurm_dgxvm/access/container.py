"""``dgxvm run --container-image``: from pyxis's flags to the request the guest runs.

The image comes from the job's user's own cache on the host (containers.cache: pulled once per
digest with the user's credentials, unpacked once), which the VM has at the same path (the image
cache share). The guest image's profile says which runtime runs it; today's is rootless runc
(containers.runtime).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..containers import mounts as mounts_mod
from ..containers import mountpoints
from ..containers import runtime
from ..errors import BadInput, ContainerMountError
from .request import Request, guest_cwd, is_name
from .target import GUEST_HELPER

RUNTIMES = ("runc",)     # the runtimes dgxvm run can drive today


@dataclass(frozen=True)
class ContainerFlags:
    """pyxis's flags, as given."""
    image: str
    mounts: str | None = None
    workdir: str | None = None
    env: str | None = None           # --container-env NAME,NAME
    name: str | None = None
    remap_root: bool = False
    writable: bool = False


def check_mounts(text: str | None, shared: tuple[str, ...]) -> tuple[mounts_mod.Mount, ...]:
    """``--container-mounts``, each source a path the VM has: under a share, or a path that
    is not the host's (then it is the guest's own, checked there by the runtime). A host
    path the VM does not have is refused naming it: it would silently be another directory."""
    if not text:
        return ()
    out = mounts_mod.parse(text)
    for m in out:
        if guest_cwd(m.source, shared) is None and os.path.lexists(m.source):
            raise ContainerMountError(
                value=str(m), reason=f"{m.source} is a host path the VM does not have "
                f"(shared with it: {', '.join(shared) or 'nothing'})")
    return out


def env_names(text: str | None) -> tuple[str, ...]:
    if not text:
        return ()
    names = tuple(n for n in text.split(",") if n)
    for n in names:
        if not is_name(n):
            raise BadInput(f"--container-env: {n!r} is not a variable name", value=n)
    return names


def container_request(flags: ContainerFlags, *, argv: tuple[str, ...], env: Mapping[str, str],
                      cwd: str | None, shared: tuple[str, ...], uid: int, gid: int,
                      rootfs: str, image_config: Mapping, run_name: str,
                      groups: tuple[int, ...] = (), gpu_devices: int = 0,
                      terminal: bool = False, prepare: bool = True) -> Request:
    """The request that runs ``argv`` in the image's container under runc in the guest.
    ``prepare``: make the mount points in the (read-only in the guest) rootfs first, as its
    owner on the host."""
    mounts = check_mounts(flags.mounts, shared)
    etc_files = tuple(mountpoints.STANDARD_FILES)
    if prepare:
        dirs = [*mountpoints.STANDARD_DIRS, *shared, *(m.target for m in mounts)]
        if flags.workdir:
            dirs.append(flags.workdir)
        etc_files = tuple(mountpoints.ensure(Path(rootfs), dirs, mountpoints.STANDARD_FILES))
    spec = runtime.ContainerSpec(
        rootfs=rootfs, image_config=image_config, argv=argv, env=env, cwd=cwd, uid=uid, gid=gid,
        shared=shared, mounts=mounts, workdir=flags.workdir,
        keep_env=env_names(flags.env), remap_root=flags.remap_root, groups=groups,
        writable=flags.writable,
        gpu_devices=gpu_devices, terminal=terminal, etc_files=etc_files)
    config = runtime.oci_config(spec)
    name = f"dgxvm-{run_name}"
    # runc's state lives in the run's directory (removed with it); the cleanup script runs
    # from there too and finds it as its own $0's directory
    command = f'runc --root "$DGXVM_RUN_DIR/runc" run --bundle "$DGXVM_RUN_DIR" {name}'
    if runtime.own_uid(spec):
        # as the user's own uid: runc in the namespace the guest helper makes (runtime._mappings)
        gids = ",".join(map(str, runtime.supplementary(spec))) or "-"
        command = f"{GUEST_HELPER} userns {gids} {command}"
    cleanup = f'd=$(dirname "$0"); runc --root "$d/runc" delete --force {name}'.encode()
    return Request(argv=argv, env={}, cwd=None,
                   files={"config.json": json.dumps(config, indent=1).encode()},
                   command=command.encode(), cleanup=cleanup)

