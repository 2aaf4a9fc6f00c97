"""The ``podman`` profile: the container of ``dgxvm run --container-image`` made by podman, in a
guest image whose container runtime is podman (the Debian cloud guest, and the images sites
build the same way). Pure: a :class:`~.runtime.ContainerSpec` in, the sh words that run it in the
guest and the files they read out.

It is the same container as the runc profile's (runtime.py has the rules: the environment, the
working directory, the user and groups, the mounts, /dev/shm, the GPUs), made with podman's own
flags, so the two profiles cannot drift apart in what a job sees:

- **Where podman runs.** In the user namespace the guest helper's ``userns`` makes (the user is
  0 there, one subordinate id is 1, each supplementary gid 2, 3, ...), told that it is already in
  its rootless namespace (``_CONTAINERS_USERNS_CONFIGURED``, ``_CONTAINERS_ROOTLESS_UID/GID``:
  what podman sets for itself when it re-executes in the namespace it made, podman's
  pkg/rootless). Podman then maps the container from that namespace (``--uidmap``/``--gidmap``,
  the runc profile's maps): the user's uid, gid and supplementary groups are the container's,
  its root a subordinate id. Rootless podman left to itself maps only the subordinate ranges
  with ``--userns=keep-id`` (a supplementary group shows as ``nobody``), and leaves a pause
  process in the guest after every run; here none is left.
- **Its state.** ``--root``, ``--runroot`` and ``--tmpdir`` in the run's directory, removed with
  it (``--root`` on a tmpfs of the helper's mount namespace: :func:`private_storage`): a run
  never touches the user's own podman storage, and two runs never share a container name.
  ``--storage-driver vfs``: with ``--rootfs`` podman stores no image layers, and vfs needs no
  probe of the kernel's overlay support.
- **The root.** ``--rootfs``: the image's unpacked rootfs in the user's cache share,
  ``--read-only`` (podman then mounts tmpfs on /tmp, /var/tmp and /run, as the runc profile
  does); or, writable (``--container-writable``, a named container), the overlay the helper
  mounts on ``$DGXVM_RUN_DIR/rootfs`` as for runc. Podman makes /etc/mtab a symlink when the
  image has none, and binds its /etc/hostname over the image's, which a read-only root cannot
  take: ``dgxvm run`` makes them on the host (:data:`ROOTFS_LINKS`, :data:`ROOTFS_FILES`).
- **PID 1** is the command, as in the runc profile (no ``--init``: with podman's init, a
  command the image does not have ends with catatonit's status 1 instead of 127). ``podman
  run`` passes the signals it gets to it (``--sig-proxy``, its default); a PID 1 that ignores
  SIGTERM is stopped by the helper's KILL and :func:`cleanup` when ``dgxvm run`` ends or dies.
- **The environment** goes in an ``--env-file`` (``NAME=value`` lines), except values podman's
  file reader cannot carry (a newline, a trailing carriage return, a line longer than its 64 KiB
  buffer): those are given to podman's own environment and named in the file without a value,
  which podman reads as "take it from mine". Podman adds ``container=podman``, ``HOSTNAME`` and,
  when the job has none, ``TERM``; a variable set to the empty string arrives unset
  (podman drops the ``=``).
- **No cgroups** (``--cgroups disabled``, ``--cgroup-manager cgroupfs``): the guest's user
  session has no delegated cgroup; the VM is the job's limit.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterable

from ..errors import BadInput
from .runtime import NVIDIA_DEVICES, ContainerSpec, environment, own_uid, supplementary, working_dir

#: symlinks podman needs in a root it cannot write, made on the host (path -> target)
ROOTFS_LINKS = {"/etc/mtab": "../proc/self/mounts"}
#: files podman binds its own over (besides /etc/hosts and /etc/resolv.conf, which every
#: profile binds): a read-only root must have them, empty, to mount on
ROOTFS_FILES = ("/etc/hostname",)
#: podman's env-file reader (bufio.Scanner) takes lines up to 64 KiB
ENV_FILE_LINE_MAX = 60 * 1024
#: the guest's ``podman`` (Debian's, on PATH)
PODMAN = "podman"
#: what a path needs not to have to go into ``-v SRC:DST:OPTIONS``
_VOLUME_UNSAFE = (":", ",", "\n")

ENV_FILE = "podman.env"
#: the run's podman state, in the run's directory (removed with it). Short: podman refuses a
#: runroot longer than 50 characters (its sockets' paths), and ``/tmp/.dgxvm-UID/RUNID/pm/run``
#: is at most 46 for a 10-digit uid
STATE = "pm"


class Raw(bytes):
    """A word that is sh already (``"$DGXVM_RUN_DIR/..."``): not quoted again."""


def _quote(word: str | bytes) -> bytes:
    if isinstance(word, Raw):
        return bytes(word)
    raw = os.fsencode(word) if isinstance(word, str) else word
    return b"'" + raw.replace(b"'", b"'\\''") + b"'"


def sh(words: Iterable[str | bytes]) -> bytes:
    return b" ".join(_quote(w) for w in words)


def _in_run(path: str) -> Raw:
    return Raw(b'"$DGXVM_RUN_DIR/' + path.encode() + b'"')


def env_file(spec: ContainerSpec) -> tuple[bytes, dict[str, str]]:
    """The ``--env-file`` and the variables podman's own environment must carry (see the
    module's rule)."""
    lines: list[bytes] = []
    passed: dict[str, str] = {}
    for item in environment(spec.image_config.get("Env") or [], spec.env, spec.keep_env):
        name, _, value = item.partition("=")
        line = item.encode("utf-8", "surrogateescape")
        if "\n" in value or value.endswith("\r") or len(line) > ENV_FILE_LINE_MAX:
            passed[name] = value
            lines.append(name.encode())
        else:
            lines.append(line)
    return b"".join(line + b"\n" for line in lines), passed


def _volume(source: str, target: str, options: str) -> list[str | bytes]:
    for p in (source, target):
        if any(c in p for c in _VOLUME_UNSAFE):
            raise BadInput(f"the podman profile cannot mount {p!r}: podman's -v cannot take a "
                           "path with ':' or ','", value=p)
    return ["-v", f"{source}:{target}:{options}"]


def _ids(spec: ContainerSpec) -> list[str | bytes]:
    """``--user``, the groups and the maps (see runtime._mappings: the same numbers)."""
    if spec.uid == 0 or spec.gid == 0 or not own_uid(spec):
        # root in the container, the user (the helper namespace's 0) outside
        return ["--user", "0:0", "--uidmap", "0:0:1", "--gidmap", "0:0:1"]
    supp = supplementary(spec)
    out: list[str | bytes] = ["--user", f"{spec.uid}:{spec.gid}",
                              "--uidmap", f"{spec.uid}:0:1", "--uidmap", "0:1:1",
                              "--gidmap", f"{spec.gid}:0:1", "--gidmap", "0:1:1"]
    for i, g in enumerate(supp):
        out += ["--gidmap", f"{g}:{2 + i}:1"]
    for g in supp:
        out += ["--group-add", str(g)]
    return out


def command(spec: ContainerSpec, *, name: str) -> list[str | bytes]:
    """``podman [global flags] run ... --rootfs -- ROOT ARGV`` (sh words; ``$DGXVM_RUN_DIR`` expands in the
    guest). ``name``: the container's, unique to the run."""
    state = STATE
    words: list[str | bytes] = [
        PODMAN,
        "--root", _in_run(f"{state}/storage"), "--runroot", _in_run(f"{state}/run"),
        "--tmpdir", _in_run(f"{state}/tmp"),
        "--storage-driver", "vfs", "--cgroup-manager", "cgroupfs", "--events-backend", "none",
        "--log-level", "error",
        "run", "--rm", "--name", name, "--interactive",
        "--cgroups", "disabled", "--network", "host", "--passwd=false",
        "--security-opt", "no-new-privileges",
        # /dev/shm as the runc profile has it: a tmpfs of the kernel's default size (half the
        # VM's memory), not podman's 64 MiB, which NCCL's shared-memory transport outgrows
        "--shm-size", Raw(b"\"$(awk '/^MemTotal:/ { print int($2 / 2) \"k\" }' /proc/meminfo)\""),
        *(["--tty"] if spec.terminal else []),
        *_ids(spec),
        "--env-file", _in_run(ENV_FILE),
        "--workdir", posixpath.normpath(working_dir(spec)),
    ]
    for f in spec.run_files:       # /etc/passwd, /etc/group with the user's entries
        words += ["-v", Raw(b'"$DGXVM_RUN_DIR/' + posixpath.basename(f).encode()
                            + b":" + f.encode() + b':ro"')]
    for d in spec.shared:
        words += _volume(d, d, "rw,rbind,nosuid,nodev")
    for m in spec.mounts:
        words += _volume(m.source, m.target, ",".join(
            ["ro" if m.read_only else "rw", "rbind", "nosuid", "nodev",
             *(f for f in m.flags if f not in ("ro", "rw"))]))
    if spec.gpu_devices:
        for dev in (*(f"/dev/nvidia{i}" for i in range(spec.gpu_devices)), *NVIDIA_DEVICES):
            words += ["--device", dev]
    if not spec.writable:
        words.append("--read-only")
    # --rootfs is a switch: the first word after the options is the root's path (not an
    # image), the command follows; "--" ends the options before either
    root = _in_run("rootfs") if spec.writable else spec.rootfs
    return [*words, "--rootfs", "--", root, *spec.argv]


def private_storage() -> list[str | bytes]:
    """Words that put podman's storage (``--root``) on a tmpfs of the helper's mount namespace
    before podman runs. Podman makes its storage driver's directory owned by the container's
    root (a subordinate uid), which the user cannot remove from the run's directory afterwards;
    a tmpfs there goes with the namespace when its last process ends, even after a SIGKILL."""
    return ["sh", "-c", 'mkdir -p "$0" && mount -t tmpfs -o mode=0700 dgxvm-podman "$0" '
                        '&& exec "$@"', _in_run(f"{STATE}/storage")]


def rootless_env(spec: ContainerSpec) -> list[str]:
    """What tells podman it already runs in its rootless namespace (pkg/rootless: the
    variables it sets for itself after re-executing there), for the user's uid and gid."""
    return ["env", "_CONTAINERS_USERNS_CONFIGURED=done",
            f"_CONTAINERS_ROOTLESS_UID={spec.uid}", f"_CONTAINERS_ROOTLESS_GID={spec.gid}"]


_CLEANUP = b"""d=$(dirname "$0")
for u in "$d"/@STATE@/run/*-containers/*/userdata; do
  [ -d "$u" ] || continue
  c=$(cat "$u/conmon.pid" 2>/dev/null); p=$(cat "$u/pidfile" 2>/dev/null)
  ns=; [ -n "$c" ] && ns=$(readlink "/proc/$c/ns/user" 2>/dev/null)
  [ -n "$c" ] && kill -KILL "$c" 2>/dev/null
  [ -n "$p" ] && kill -KILL "$p" 2>/dev/null
  [ -n "$ns" ] && for q in /proc/[0-9]*; do
    [ "$(readlink "$q/ns/user" 2>/dev/null)" = "$ns" ] && kill -KILL "${q#/proc/}"
  done 2>/dev/null
done
[ ! -d "$d/@STATE@" ] || @HELPER@ userns - - - - rm -rf "$d/@STATE@"
:"""


def cleanup(helper: str) -> bytes:
    """What the guest helper runs when the command has ended (and when ``dgxvm run`` died): it
    stops what a killed ``podman run`` left, then removes podman's state. Idempotent: after a
    run that ended by itself there is nothing left to stop.

    By the pids podman wrote: conmon first (so that it starts no exit command, a ``podman
    container cleanup`` that would hang on the state removed under it), the container's PID 1
    (which ends its pid namespace), then every process left in conmon's user namespace (the
    helper's: an exit command already started). The state goes in a namespace of the
    ``helper``'s own: what a killed podman left there belongs to the container's root, a
    subordinate uid the user cannot remove. Runs as ``sh RUN_DIR/cleanup`` (its ``$0``)."""
    state = STATE.encode()
    script = _CLEANUP.replace(b"@STATE@", state).replace(b"@HELPER@", _quote(helper))
    return script
