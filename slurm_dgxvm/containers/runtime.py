"""The container a ``dgxvm run --container-image`` command runs in, as the guest's runtime takes
it. Pure: image facts, the job's request and the flags in, an OCI runtime config (runc's
``config.json``) and the argv that runs it in the guest out.

The ``runc`` profile (the test guest; any guest image with runc and unprivileged user
namespaces): rootless runc as the job's user, the image's rootfs read-only straight from the
user's image cache (shared into the VM at the same path, so the host's path is the guest's),
no network namespace (the container uses the VM's network, as pyxis/enroot use the host's),
the shared work dir bind-mounted at its own path, ``--container-mounts`` as recursive binds
(``nosuid,nodev`` always), ``/dev/shm`` without a size cap (the kernel's default, half the VM's
memory: NCCL's shared-memory transport needs more than Docker's 64 MiB) and the locked-memory
limit of the guest session (the seed raises it for the job's user).

The rules (docs/user/run.md, "Containers"):

- the command is CMD as given: the image's ENTRYPOINT and CMD are not used (pyxis's default);
- environment (pyxis's rule): the job's environment (the host-only variables already out, GPU
  indices already translated), then the image's ENV, which wins for every variable it sets
  (PATH, LD_LIBRARY_PATH, CUDA_VERSION ...), except the names given with ``--container-env``,
  where the job's value wins; PATH is the image's, or a standard PATH when it sets none;
- working directory: ``--container-workdir``, else the caller's cwd when the VM has it (it is
  mounted), else the image's WORKDIR, else ``/``;
- user: the job's uid, gid and supplementary groups, as pyxis/enroot give them (the guest
  helper's ``userns`` makes the namespace: :func:`userns_ids`); with
  ``--container-remap-root``, root in the container, mapped to the job's uid (no more than
  the user can do; the groups are the user's own, shown as nobody's);
- GPUs: on a machine with NVIDIA devices in the guest, the device nodes are bound in; on the
  simulated machine there are none, and the run says what it would pass.
"""

from __future__ import annotations

import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .mounts import Mount

OCI_VERSION = "1.0.2"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
NVIDIA_DEVICES = ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools",
                  "/dev/nvidia-modeset")
BIND_RO = ("rbind", "nosuid", "nodev", "ro")
BIND_RW = ("rbind", "nosuid", "nodev")
# where the guest helper mounts a writable container's root (relative to the bundle, the run's
# directory in the guest): an overlay of the image's rootfs and a layer of its own
ROOTFS_TARGET = "rootfs"


@dataclass(frozen=True)
class ContainerSpec:
    """Everything the container is made from (the caller checked each value)."""
    rootfs: str                        # the image's unpacked rootfs, a path the guest has
    image_config: Mapping              # Env, WorkingDir, User, ... of the image
    argv: tuple[str, ...]
    env: Mapping[str, str]             # the job's environment as the guest sees it
    cwd: str | None                    # the caller's cwd when the VM has it
    uid: int
    gid: int
    shared: tuple[str, ...] = ()       # directories the VM shares with the host (the work dir)
    keep_env: tuple[str, ...] = ()     # --container-env: the job's value wins over the image's
    mounts: tuple[Mount, ...] = ()
    workdir: str | None = None         # --container-workdir
    remap_root: bool = False
    groups: tuple[int, ...] = ()       # the user's supplementary gids (own-uid containers)
    writable: bool = False             # an overlay of rootfs on ROOTFS_TARGET (the guest helper)
    gpu_devices: int = 0               # bind /dev/nvidia0..N-1 and the control nodes (a guest
                                       # with the NVIDIA driver); 0 = none (simulated GPUs)
    hostname: str | None = None
    terminal: bool = False
    etc_files: tuple[str, ...] = ("/etc/resolv.conf", "/etc/hosts")  # bound from the guest
    run_files: tuple[str, ...] = ()    # /etc/passwd, /etc/group: bound from the run's directory
                                       # (the bundle), which holds a file of the same name


def environment(image_env: Sequence[str], job_env: Mapping[str, str],
                keep: Sequence[str] = ()) -> list[str]:
    """``NAME=value`` lines: the job's environment, the image's ENV over it, the ``keep`` names
    back to the job's values; PATH the image's (never the job's)."""
    env = {k: v for k, v in job_env.items() if k != "PATH"}
    env["PATH"] = DEFAULT_PATH
    for item in image_env or ():
        if isinstance(item, str) and "=" in item:
            k, v = item.split("=", 1)
            env[k] = v
    for k in keep:
        if k in job_env and k != "PATH":
            env[k] = job_env[k]
    return [f"{k}={v}" for k, v in env.items()]


def working_dir(spec: ContainerSpec) -> str:
    if spec.workdir:
        return spec.workdir
    if spec.cwd:
        return spec.cwd
    wd = spec.image_config.get("WorkingDir")
    return wd if isinstance(wd, str) and wd.startswith("/") else "/"


def _bind(source: str, target: str, options: Sequence[str]) -> dict:
    return {"destination": target, "type": "bind", "source": source, "options": list(options)}


def oci_config(spec: ContainerSpec) -> dict:
    """runc's ``config.json`` for ``spec`` (rootless: runc runs as the job's user)."""
    caps = (["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE", "CAP_CHOWN",
             "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID", "CAP_SETGID", "CAP_SETUID",
             "CAP_SETPCAP"] if spec.remap_root else [])
    mounts = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": ["nosuid", "nodev", "mode=1777"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
         "options": ["nosuid", "noexec", "nodev"]},
        _bind("/sys", "/sys", ("rbind", "nosuid", "noexec", "nodev", "ro")),
        {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "nodev", "mode=1777"]},
        {"destination": "/run", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "nodev", "mode=755"]},
        {"destination": "/var/tmp", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "nodev", "mode=1777"]},
        *(_bind(f, f, BIND_RO) for f in spec.etc_files),
        # a relative source is the bundle's (OCI runtime spec, "mounts")
        *(_bind(posixpath.basename(f), f, BIND_RO) for f in spec.run_files),
    ]
    for d in spec.shared:
        mounts.append(_bind(d, d, BIND_RW))
    for m in spec.mounts:
        mounts.append(_bind(m.source, m.target, BIND_RO if m.read_only else BIND_RW))
    if spec.gpu_devices:
        for dev in (*(f"/dev/nvidia{i}" for i in range(spec.gpu_devices)), *NVIDIA_DEVICES):
            mounts.append(_bind(dev, dev, ("bind", "nosuid")))
    return {
        "ociVersion": OCI_VERSION,
        "process": {
            "terminal": spec.terminal,
            "user": _user(spec),
            "args": list(spec.argv),
            "env": environment(spec.image_config.get("Env") or [], spec.env, spec.keep_env),
            "cwd": posixpath.normpath(working_dir(spec)),
            "capabilities": {k: caps for k in ("bounding", "effective", "permitted",
                                                "ambient")},
            "noNewPrivileges": True,
        },
        "root": ({"path": ROOTFS_TARGET, "readonly": False} if spec.writable
                 else {"path": spec.rootfs, "readonly": True}),
        **({"hostname": spec.hostname} if spec.hostname else {}),
        "mounts": mounts,
        "linux": {
            **_mappings(spec),
            "namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount", "user")],
            "maskedPaths": ["/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys",
                            "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats",
                            "/proc/sched_debug", "/sys/firmware", "/proc/scsi"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys",
                              "/proc/sysrq-trigger"],
        },
    }


def own_uid(spec: ContainerSpec) -> bool:
    """Whether the container runs as the user's own uid (in the namespace the guest helper's
    ``userns`` makes) rather than as root mapped to it (``--container-remap-root``, or a job
    of root's or of a user whose primary group is root's)."""
    return not spec.remap_root and spec.uid != 0 and spec.gid != 0


def in_userns(spec: ContainerSpec) -> bool:
    """Whether runc runs in the namespace the guest helper's ``userns`` makes: for the user's
    own uid, and for a writable root (its overlay is mounted in that namespace's mounts)."""
    return own_uid(spec) or spec.writable


def supplementary(spec: ContainerSpec) -> tuple[int, ...]:
    """The user's supplementary gids the container keeps, in order, without 0, the primary
    gid and repeats: the ``GIDS`` the guest helper's ``userns`` maps as 2, 3, ..."""
    out: list[int] = []
    for g in spec.groups:
        if g not in (0, spec.gid) and g not in out:
            out.append(g)
    return tuple(out)


def _user(spec: ContainerSpec) -> dict:
    if not own_uid(spec):
        return {"uid": 0, "gid": 0}     # the user, mapped (see _mappings)
    return {"uid": spec.uid, "gid": spec.gid, "additionalGids": list(supplementary(spec))}


def _one(container: int, host: int) -> dict:
    return {"containerID": container, "hostID": host, "size": 1}


def _mappings(spec: ContainerSpec) -> dict:
    """The container's user namespace maps.

    As root mapped to the user (``--container-remap-root``): the user's uid and gid are the
    container's 0, the only ids there; rootless runc runs straight in the guest (or, for a
    writable root, in the helper's namespace, whose 0 is the user).

    As the user's own uid (the default): runc runs as root of the namespace the guest helper's
    ``userns`` made, where the user is 0, one subordinate uid/gid is 1 and the supplementary
    gids are 2, 3, ...; the container maps its uid/gid onto 0, its root onto 1, each
    supplementary gid onto its own number there. Rootless runc cannot do this by itself: it
    needs a root in the container, and with the user's uid besides (two ids) it fails chowning
    its exec fifo to a subordinate uid it may not use."""
    if not in_userns(spec):
        return {"uidMappings": [_one(0, spec.uid)], "gidMappings": [_one(0, spec.gid)]}
    if not own_uid(spec):       # root mapped to the user, in the helper's namespace
        return {"uidMappings": [_one(0, 0)], "gidMappings": [_one(0, 0)]}
    return {"uidMappings": [_one(spec.uid, 0), _one(0, 1)],
            "gidMappings": [_one(spec.gid, 0), _one(0, 1),
                            *(_one(g, 2 + i) for i, g in enumerate(supplementary(spec)))]}
