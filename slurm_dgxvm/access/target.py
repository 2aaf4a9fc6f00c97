"""A job's VM as its user reaches it: which VM (from ``SLURM_JOB_ID`` or ``--job``), what the
caller may see of it, and the one ssh command line that reaches it.

The caller may see a VM's job view (records.job_view) when it is the VM's user (through the
job.json that belongs to them) or root (every record). Another user's job reads as "no VM of
yours": nothing tells a user whether someone else's job has a VM here.

Root reaching a user's job (``dgxvm run --job N``) becomes that user for good once the target is
known (:func:`become_job_user`): everything after it (the user's image cache, their registry
credentials, the mount points made in an image, ssh with the job's key) is done as the user,
never by root in a tree the user controls.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass

from ..errors import BadInput, HostError
from ..lifecycle.env import Env
from ..lifecycle.identity import vm_of_job
from ..records import JOB_VIEW, job_view

#: Where the seed puts the guest side of ``dgxvm run`` (slurm_dgxvm/access/dgxvm-guest.sh).
GUEST_HELPER = "/usr/lib/dgxvm/dgxvm-guest"
CONNECT_TIMEOUT_S = 15


def job_from_env(job_id: int | None, environ: Mapping[str, str]) -> int:
    """``job_id`` when given, else ``SLURM_JOB_ID``; BadInput naming it when there is none."""
    if job_id is not None:
        return job_id
    raw = environ.get("SLURM_JOB_ID")
    if not raw or not raw.isdigit() or int(raw) < 1:
        raise BadInput("no job: give --job ID or run inside a Slurm job ($SLURM_JOB_ID)",
                       value=raw)
    return int(raw)


def view_for(env: Env, job_id: int) -> dict:
    """What the caller may see of job ``job_id``'s VM: root sees every record (as job.json
    shows it, plus the record under "record"); any other user only a VM of their own, through
    the job.json that belongs to them. A VM that is not running or stopped, another user's
    job and a job without a VM are all BadInput (exit 2)."""
    name = vm_of_job(env, job_id)
    missing = BadInput(f"job {job_id} has no VM of yours on this node", value=job_id)
    if os.geteuid() == 0:
        rec = env.vms.load(name)
        if rec is None or rec.state not in ("running", "stopped"):
            raise BadInput(f"job {job_id} has no VM on this node"
                           + (f" (it is {rec.state})" if rec else ""), value=job_id)
        return {**job_view(rec, env.vms.dir(name)), "record": rec.to_json()}
    path = env.vms.dir(name) / JOB_VIEW
    try:
        st = path.stat()
        if st.st_uid != os.geteuid():
            raise missing
        view = env.vms.load_view(name)
    except (FileNotFoundError, PermissionError, NotADirectoryError):
        raise missing from None
    if view is None or view.get("state") not in ("running", "stopped"):
        raise missing
    return view


@dataclass(frozen=True)
class Target:
    """How to reach one VM as its user."""
    job_id: int
    domain: str
    address: str
    user: str
    key: str
    known_hosts: str
    state: str
    workdir: str | None          # the shared work dir (the same path in the guest), if any
    gpus: tuple[int, ...]        # the VM's GPUs, host numbering
    slurm_gpus: tuple[int, ...]  # the job's GPUs as Slurm numbered them (= gpus if not remapped)
    uid: int = 0
    gid: int = 0
    groups: tuple[int, ...] = ()  # the user's supplementary gids in the VM
    image: str | None = None     # the guest image (its profile says the container runtime)
    image_cache: str | None = None  # the user's image cache, shared at the same path

    @classmethod
    def from_view(cls, job_id: int, view: dict) -> Target:
        gpus = tuple(view.get("gpus") or ())
        slurm = view.get("slurm_gpus")
        return cls(job_id=job_id, domain=view["name"], address=view["address"],
                   user=view["user"], key=view["key"], known_hosts=view["known_hosts"],
                   state=view["state"], workdir=view.get("workdir"), gpus=gpus,
                   slurm_gpus=tuple(slurm) if slurm is not None else gpus,
                   uid=int(view.get("uid") or 0), gid=int(view["gid"] if "gid" in view else os.getgid()),
                   groups=tuple(int(g) for g in view.get("groups") or ()),
                   image=view.get("image"),
                   image_cache=view.get("image_cache"))

    @property
    def shared(self) -> tuple[str, ...]:
        """The directories the VM shares with the host at the same path (the work dir)."""
        return (self.workdir,) if self.workdir else ()

    @property
    def destination(self) -> str:
        return f"{self.user}@{self.address}"

    def ssh_argv(self, *options: str, tty: bool = False) -> list[str]:
        """``ssh`` with the job's key only, the VM's host key pinned (never trust on first
        use), no prompt, no configuration file of the caller's (a ControlMaster or ProxyCommand
        in ~/.ssh/config must not change how dgxvm reaches the VM), keepalives so a dead VM is
        noticed; ``options`` go before the destination, the remote command after it."""
        return ["ssh", "-F", "none", "-i", self.key, "-o", "IdentitiesOnly=yes",
                "-o", f"UserKnownHostsFile={self.known_hosts}",
                "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes",
                "-o", "LogLevel=ERROR", "-o", f"ConnectTimeout={CONNECT_TIMEOUT_S}",
                "-o", "ServerAliveInterval=10", "-o", "ServerAliveCountMax=3",
                "-t" if tty else "-T", *options, self.destination]

    def shell_line(self) -> str:
        """The ssh command a batch script may run itself (``dgxvm job``)."""
        return (f"ssh -i {self.key} -o UserKnownHostsFile={self.known_hosts} "
                f"-o StrictHostKeyChecking=yes -o BatchMode=yes {self.destination}")


def target_for(env: Env, job_id: int) -> Target:
    """The running VM of ``job_id`` the caller may reach (BadInput otherwise)."""
    view = view_for(env, job_id)
    if view.get("state") != "running":
        raise BadInput(f"job {job_id}'s VM {view.get('name')} is {view.get('state')}, "
                       "not running", value=job_id)
    if not view.get("address"):
        raise BadInput(f"job {job_id}'s VM {view.get('name')} has no address", value=job_id)
    return Target.from_view(job_id, view)


def remote(verb: str, run_id: str, helper: str = GUEST_HELPER) -> Sequence[str]:
    """The remote command line for one session (words ssh joins with spaces: only safe ones)."""
    return (helper, verb, run_id)


#: What root's environment must not hand on once the process is the job's user's: root's
#: credentials and root's own per-user places (registry logins, the container tools'
#: configuration and auth.json under XDG_RUNTIME_DIR, Kerberos, the ssh agent, temporary
#: directories). HOME, USER, LOGNAME and SHELL become the user's.
ROOT_ONLY_ENV = frozenset({"DOCKER_CONFIG", "REGISTRY_AUTH_FILE", "REGISTRIES_CONFIG_PATH",
                           "KRB5CCNAME", "SSH_AUTH_SOCK", "SSH_AGENT_PID", "GNUPGHOME",
                           "TMPDIR", "TMP", "TEMP", "MAIL"})
ROOT_ONLY_PREFIXES = ("XDG_", "CONTAINERS_")


def must_become_user(target: Target) -> bool:
    """Whether this process (root) must become ``target``'s user before it goes on: root
    reaching the job of a user who is not root."""
    return os.geteuid() == 0 and target.uid != 0


def become_job_user(target: Target, environ: MutableMapping[str, str] | None = None) -> None:
    """Make this root process ``target``'s job user for good: every descriptor beyond stdio
    closed (what root opened: records, a libvirt connection, whatever root's caller passed),
    the user's groups (the node's account database, as a login gets them) with the job's gid,
    the real, effective and saved uid and gid the user's, then checked: the ids are the
    user's, no capability is left and root cannot be had back. ``environ`` (os.environ) gets
    the user's HOME, USER, LOGNAME and SHELL, and loses root's credentials and places
    (ROOT_ONLY_ENV). BadInput naming the user when they cannot be become (no such account on
    this node, the uid is another name's now); HostError when the kernel did not drop (then
    nothing more may run)."""
    import pwd
    import tempfile
    environ = os.environ if environ is None else environ
    uid, gid = target.uid, target.gid

    def refuse(why: str) -> BadInput:
        return BadInput(f"job {target.job_id}'s user {target.user} (uid {uid}) {why}: root's "
                        f"dgxvm run/shell runs as the job's user", value=target.user)
    if uid <= 0 or gid < 0:
        raise refuse("is not an ordinary user")
    try:
        pw = pwd.getpwuid(uid)
    except KeyError:
        raise refuse("does not exist on this node") from None
    if pw.pw_name != target.user:
        raise refuse(f"is not the job's user: uid {uid} is {pw.pw_name} on this node now")
    try:
        groups = sorted(set(os.getgrouplist(pw.pw_name, gid)))
    except OSError as e:
        raise refuse(f"has no group list here ({e.strerror or e})") from None
    close_descriptors()
    try:
        os.setgroups(groups)
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    except OSError as e:
        raise HostError(f"cannot become job {target.job_id}'s user {target.user}: "
                        f"{e.strerror or e}") from None
    _check_dropped(target, groups)
    for name in [k for k in environ if k in ROOT_ONLY_ENV or k.startswith(ROOT_ONLY_PREFIXES)]:
        del environ[name]
    environ.update({"HOME": pw.pw_dir or "/", "USER": pw.pw_name, "LOGNAME": pw.pw_name,
                    "SHELL": pw.pw_shell or "/bin/sh"})
    tempfile.tempdir = None            # chosen again, from the user's environment


def close_descriptors() -> None:
    """Close every descriptor of this process beyond 0, 1 and 2."""
    try:
        fds = [int(n) for n in os.listdir("/proc/self/fd")]
    except OSError:                    # no /proc: every possible one
        os.closerange(3, os.sysconf("SC_OPEN_MAX"))
        return
    for fd in fds:
        if fd > 2:
            with contextlib.suppress(OSError):    # the listing's own, closed already
                os.close(fd)


def _check_dropped(target: Target, groups: list[int]) -> None:
    """HostError unless this process is now ``target``'s user and nothing more."""
    uid, gid = target.uid, target.gid
    why = None
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid):
        why = f"uids {os.getresuid()}, gids {os.getresgid()}"
    elif sorted(set(os.getgroups())) != groups:
        why = f"groups {os.getgroups()}"
    else:
        try:
            caps = _capabilities()
        except OSError as e:
            caps = {"unknown": f"/proc/self/status: {e.strerror or e}"}
        if any(caps.get(k, 1) for k in ("CapPrm", "CapEff", "CapAmb")):
            why = f"capabilities left: {caps}"
    if why is None:
        for again in (lambda: os.setresuid(0, 0, 0), lambda: os.setresgid(0, 0, 0),
                      lambda: os.setgroups([0])):
            try:
                again()
            except PermissionError:
                continue
            why = "root could be had back"
            break
    if why is not None:
        raise HostError(f"dropping to job {target.job_id}'s user {target.user} failed ({why}); "
                        "nothing was done as them")


def _capabilities() -> dict[str, int]:
    """The capability sets of /proc/self/status (each as a number)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key.startswith("Cap"):
                out[key] = int(value.strip(), 16)
    return out
