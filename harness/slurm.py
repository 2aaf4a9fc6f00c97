"""A local, throw-away Slurm 22.05 cluster inside a network namespace: one node beside the
controller, or several nodes, each in namespaces of its own (``nodes``, harness/cluster.py).

For integration tests, the demo and benchmarks::

    with SlurmCluster(run_dir, netns="dgxvm-test", node=shape, gres_conf=text,
                      prolog=wrapper, epilog=wrapper) as cluster:
        cluster.add_user("alice")
        cluster.run(["sbatch", "--gres=gpu:4", "--wrap", "hostname"], user="alice")
        cluster.wait_idle()

What it does (see harness/README.md for the why and the measurements):

* runs ``munged``, (``mariadbd`` + ``slurmdbd`` when ``accounting``), ``slurmctld`` and
  ``slurmd`` in the foreground as children of this process, each through ``nsenter --net``
  (not ``ip netns exec``, whose fresh /sys hides the cgroup mounts slurmd needs; nsenter
  execs, so every Popen pid is the daemon's own, checked via ``/proc/PID/exe``), talking
  on 127.0.0.1 inside the namespace; every file (config, munge key, state, logs, database) lives
  under ``run_dir``; nothing under /etc is read or changed;
* fakes the GPUs named by ``gres_conf`` (each ``File=`` path becomes a symlink to /dev/null);
* ``stop()`` cancels every job (bounded), stops the daemons by PID, then kills by PID any process
  of this cluster still alive in the namespace (slurmstepd, a job, a prolog): processes found by
  walking /proc for members of the namespace whose parent or session leads back to our daemons,
  or that carry the cluster's marker in their environment (slurmstepd, jobs submitted through
  ``run``).
  It never touches a process it did not start (the libvirtd, QEMU or dnsmasq sharing the
  namespace are left alone), and deletes the namespace only if it created it and it is empty.
"""

from __future__ import annotations

import atexit
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .daemons import Daemons, stop_pids
from .proc import DEAD_STATES, create_netns, delete_netns_if_empty, drop_lock, take_lock
from .proc import alive as _alive
from .proc import exe as _exe
from .proc import ip as _ip
from .proc import socket_answers as _socket_answers
from .proc import stat as _stat
from .proc import tail as _tail

CTLD_PORT, SLURMD_PORT, DBD_PORT, DB_PORT = 6817, 6818, 6819, 3307
START_TIMEOUT_S = 60.0
STOP_JOBS_TIMEOUT_S = 60.0   # scancel, then wait for the jobs (and their Epilogs) to finish
SLURMD_KILL_AFTER_S = 3.0    # slurmd can ignore SIGTERM for ~128 s: SIGKILL it after this
STOP_TIMEOUT_S = 10.0        # the other daemons: SIGTERM, then SIGKILL (reported) after this
LEFTOVER_KILL_AFTER_S = 3.0
POLL_S = 0.05
# The daemons, in start order; stop() goes the other way.
DAEMONS = ("munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd")
# Environment variables that would steer Slurm clients or daemons away from our config (the test
# process may itself run inside a Slurm job).
_SLURM_ENV_PREFIXES = ("SLURM_", "SBATCH_", "SALLOC_", "SRUN_", "SQUEUE_", "SINFO_", "SACCT_",
                       "SACCTMGR_", "SCONTROL_", "SCANCEL_", "SPANK_",
                       # and dgxvm's own: hooks and jobs get theirs from the node's wrappers
                       "DGXVM_")
_MARKER = "DGXVM_SLURM_HARNESS"  # in every daemon's environment; slurmstepd inherits slurmd's
LOCK_DIR = Path("/run")
# glibc's AI_ADDRCONFIG, which Slurm passes with AF_INET, finds nothing (not even 127.0.0.1)
# while the namespace has no IPv4 address outside lo: the daemons then cannot bind and the
# clients cannot resolve localhost. The cluster keeps an address of its own on a veth pair
# (both ends in the namespace, no route anywhere) for its whole life, so it does not depend on
# a libvirt network being up. The kernel here has no `dummy` module; veth works.
ADDR_IFACE, ADDR_PEER, ADDR_CIDR = "dgxslurm0", "dgxslurm1", "169.254.213.1/32"


@dataclass(frozen=True)
class NodeShape:
    """What slurm.conf declares for the node (``SlurmdParameters=config_overrides`` makes slurmd
    accept it whatever the real machine has)."""
    cpus: int
    sockets: int
    cores_per_socket: int
    threads_per_core: int
    real_memory_mib: int
    gpus: int
    features: str = ""


@dataclass(frozen=True)
class SlurmNode:
    """One node of a cluster of several (harness/cluster.py): its slurmd runs through ``enter``
    (a prefix that enters the node's namespaces and execs), in network namespace ``netns``,
    reachable at ``addr`` from the controller's namespace and the other nodes'."""
    name: str
    addr: str
    shape: NodeShape
    enter: tuple[str, ...]
    netns: str


# A DGX-2 as dgxvm simulates it (2 x 24 cores x 2 threads, 1.5 TB, 16 V100).
DGX2_SHAPE = NodeShape(cpus=96, sockets=2, cores_per_socket=24, threads_per_core=2,
                       real_memory_mib=1536000, gpus=16, features="dgx2,v100")


class SlurmCommandError(subprocess.CalledProcessError):
    """A Slurm client exited non-zero (``SlurmCluster.run(check=True)``); the message carries
    its stderr."""

    def __str__(self) -> str:
        err = (self.stderr or "").strip() or (self.output or "").strip()
        return f"{super().__str__()}: {err[-2000:]}"


def ensure_user(name: str) -> tuple[int, int, str]:
    """``useradd -m`` the user if missing; returns ``(uid, gid, home)``."""
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", name], check=True,
                       capture_output=True, timeout=30)
        pw = pwd.getpwnam(name)
    return pw.pw_uid, pw.pw_gid, pw.pw_dir


# -- /proc helpers ---------------------------------------------------------------------------


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace").strip()
    except OSError:
        return ""


def _environ_has(pid: int, needle: bytes) -> bool:
    try:
        return needle in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False


# -- gres.conf File= paths -------------------------------------------------------------------


def expand_brackets(text: str) -> list[str]:
    """Slurm's host-list style expansion of one name: ``/dev/nvidia[0-2,5]`` ->
    ``[/dev/nvidia0, /dev/nvidia1, /dev/nvidia2, /dev/nvidia5]``; several bracket groups
    multiply; zero padding (``[00-03]``) is kept."""
    m = re.search(r"\[([^\]]*)\]", text)
    if not m:
        return [text]
    head, tail = text[:m.start()], text[m.end():]
    out = []
    for item in m.group(1).split(","):
        item = item.strip()
        lo, sep, hi = item.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"bad range {item!r} in {text!r}")
        width = len(lo) if lo.startswith("0") and len(lo) > 1 else 0
        for i in range(int(lo), int(hi if sep else lo) + 1):
            for rest in expand_brackets(tail):
                out.append(f"{head}{i:0{width}d}{rest}")
    return out


def _split_outside_brackets(text: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [p for p in parts if p]


def gres_files(gres_conf: str) -> list[Path]:
    """Every device path the ``File=`` (or ``Files=``) keys of a gres.conf name, in order."""
    out = []
    for line in gres_conf.splitlines():
        line = line.split("#", 1)[0]
        for m in re.finditer(r"(?i)(?:^|\s)files?=(\S+)", line):
            for item in _split_outside_brackets(m.group(1)):
                out.extend(Path(p) for p in expand_brackets(item))
    return out


def _one_state(sinfo_out: str) -> str:
    """sinfo -N prints a node once per partition it is in: the same state on every line."""
    lines = list(dict.fromkeys(line.strip() for line in sinfo_out.splitlines() if line.strip()))
    return lines[0] if len(lines) == 1 else ",".join(lines)


class SlurmCluster:
    """munged, [mariadbd, slurmdbd,] slurmctld and slurmd of our own, one node, inside network
    namespace ``netns``; all state under ``run_dir``. See the module docstring.

    Several nodes (harness/cluster.py): ``nodes`` (instead of ``node_name`` and ``node``), one
    ``slurmd -N NAME`` per node started through the node's ``enter``, named ``slurmd-NAME``;
    slurmctld, slurmdbd and the clients stay in ``netns`` and listen on ``ctld_addr``, an
    address the namespace already has (``own_address=False``: no veth of the cluster's own);
    ``gres_conf`` holds every node's lines (``NodeName=``)."""

    def __init__(self, run_dir: Path, *, netns: str, create_netns: bool = False,
                 node_name: str = "dgx01", node: NodeShape | None = None, gres_conf: str,
                 nodes: Sequence[SlurmNode] = (), ctld_addr: str | None = None,
                 own_address: bool = True,
                 prolog: str | None = None, epilog: str | None = None,
                 prolog_epilog_timeout_s: int = 300, batch_start_timeout_s: int = 300,
                 accounting: bool = True, extra_conf: str = "", cluster_name: str = "dgxtest",
                 start_timeout: float = START_TIMEOUT_S):
        self.run_dir = Path(run_dir).absolute()
        self.netns = netns
        self.create_netns = create_netns
        if bool(nodes) == (node is not None):
            raise ValueError("SlurmCluster: give node (one node) or nodes (several), not both")
        self.multi = bool(nodes)
        self.nodes: list[SlurmNode] = list(nodes) or [
            SlurmNode(node_name, "127.0.0.1", node, tuple(self._in_netns(netns)), netns)]
        self.node_name = self.nodes[0].name
        self.node = self.nodes[0].shape
        self.ctld_addr = ctld_addr
        self.own_address = own_address
        self.gres_conf = gres_conf
        self.prolog = prolog
        self.epilog = epilog
        self.prolog_epilog_timeout_s = prolog_epilog_timeout_s
        self.batch_start_timeout_s = batch_start_timeout_s
        self.accounting = accounting
        self.extra_conf = extra_conf
        self.cluster_name = cluster_name
        self.start_timeout = start_timeout

        self.conf_dir = self.run_dir / "etc"
        self.log_dir = self.run_dir / "log"
        self.state_dir = self.run_dir / "state"
        self.munge_dir = self.run_dir / "munge"
        self.db_dir = self.run_dir / "db"
        self.slurm_conf = self.conf_dir / "slurm.conf"
        self.gres_conf_path = self.conf_dir / "gres.conf"
        self.slurmdbd_conf = self.conf_dir / "slurmdbd.conf"
        self.slurmd_log = self.log_dir / "slurmd.log"
        # one log per node when there are several (SlurmdLogFile with %n)
        self.slurmd_logs = ({n.name: self.log_dir / f"slurmd-{n.name}.log" for n in self.nodes}
                            if self.multi else {self.node_name: self.slurmd_log})
        self.slurmctld_log = self.log_dir / "slurmctld.log"
        self.slurmdbd_log = self.log_dir / "slurmdbd.log"
        self.munge_socket = self.munge_dir / "munge.socket.2"
        self.db_socket = self.db_dir / "mysqld.sock"
        self.env = {"SLURM_CONF": str(self.slurm_conf)}

        self._token = secrets.token_hex(8)
        self._daemons = Daemons(enter=self._in_netns(netns), env=self._daemon_env,
                                log_dir=self.log_dir, log_suffix=".out", cwd=self.run_dir)
        self._ours: dict[int, int] = {}          # pid -> start time of every process of ours seen
        self._daemon_pids: set[int] = set()
        self._netns_created = False
        self._iface_created = False
        self._install: subprocess.Popen | None = None  # mariadb-install-db while it runs
        self._lock_fd: int | None = None
        self._atexit_registered = False
        self._started = False
        self.timings: dict[str, float] = {}
        self.stop_problems: list[str] = []
        self.stop_notes: list[str] = []          # expected forcing (slurmd SIGKILLed), not errors

    # -- context manager -------------------------------------------------------------------

    def __enter__(self) -> SlurmCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- public ----------------------------------------------------------------------------

    def start(self) -> SlurmCluster:
        if self._started or len(self._daemons):
            raise RuntimeError("SlurmCluster already started")
        t0 = time.monotonic()
        self._lock()
        if not self._atexit_registered:
            atexit.register(self._stop_at_exit)
            self._atexit_registered = True
        try:
            self._started = True
            self._setup_netns()
            self._prepare_files()
            install = None
            if self.accounting:  # the slowest step (1-2 s): overlap it with munged's start
                launched = self._daemons.launch(
                    "mariadb-install-db",
                    ["mariadb-install-db", "--no-defaults", f"--datadir={self.db_dir / 'data'}",
                     "--user=root", "--auth-root-authentication-method=normal",
                     "--skip-test-db", "--skip-name-resolve"])
                self._note_launched(launched.pid, launched.start)
                install = self._install = launched.proc
            self._spawn("munged", ["munged", "--foreground", "--force",
                                   f"--key-file={self.munge_dir / 'munge.key'}",
                                   f"--socket={self.munge_socket}",
                                   f"--pid-file={self.munge_dir / 'munged.pid'}",
                                   f"--seed-file={self.munge_dir / 'munged.seed'}",
                                   f"--log-file={self.log_dir / 'munged.log'}"],
                        self.log_dir / "munged.log")
            self._wait_for("munged", lambda: _socket_answers(self.munge_socket), "munge socket")
            self.timings["start_munged_s"] = time.monotonic() - t0
            if self.accounting:
                self._start_accounting(install)
                self.timings["start_accounting_s"] = time.monotonic() - t0
            self._spawn("slurmctld", ["slurmctld", "-D", "-c", "-f", str(self.slurm_conf)],
                        self.slurmctld_log)
            self._wait_for("slurmctld", self._ctld_up, "scontrol ping")
            self.timings["start_slurmctld_s"] = time.monotonic() - t0
            for n in self.nodes:
                self._spawn_slurmd(n)
            if self.accounting:
                self._wait_for("slurmctld", self._cluster_registered,
                               f"sacctmgr (cluster {self.cluster_name} registered)")
                self._sacctmgr("add", "account", "default", f"Cluster={self.cluster_name}",
                               "Description=default", f"Organization={self.cluster_name}")
            for n in self.nodes:
                self._wait_for(self._slurmd_name(n), lambda n=n: self._node_idle(n.name),
                               f"sinfo (node {n.name} idle)")
            self.timings["start_slurmd_s"] = time.monotonic() - t0
            for name, daemon in self._daemons.items():
                # Debian's slurmctld and slurmd are symlinks to slurmctld-wlm and slurmd-wlm
                prog = name.split("-")[0]       # slurmd-NAME: one node's of several
                want = os.path.realpath(shutil.which(prog) or prog)
                if _exe(daemon.pid) != want:
                    raise RuntimeError(f"pid {daemon.pid} is {_exe(daemon.pid)!r}, "
                                       f"expected {want}")
            (self.run_dir / "cluster.json").write_text(json.dumps(
                {"netns": self.netns, "pids": self.pids(), "env": self.env,
                 "logs": str(self.log_dir)}, indent=2) + "\n")
        except BaseException as exc:
            try:
                self.stop()
            except RuntimeError as stop_exc:  # keep start()'s error as the one raised
                exc.add_note(f"and then: {stop_exc}")
            raise
        self.timings["start_s"] = time.monotonic() - t0
        return self

    def stop(self) -> None:
        """Idempotent; safe after a failed or partial start. Raises RuntimeError, after doing
        every cleanup step it can, when something had to be forced or was left over."""
        t0 = time.monotonic()
        problems: list[str] = []
        notes: list[str] = []
        self._note_ours()
        if self._daemons.running("slurmctld"):
            self._cancel_all_jobs(problems)
        self.timings["stop_jobs_s"] = time.monotonic() - t0
        slurmds = [self._slurmd_name(n) for n in self.nodes]
        for name in [*slurmds, *reversed(DAEMONS[:-1])]:
            if self._daemons.get(name) is None:
                continue
            self._note_ours()
            t1 = time.monotonic()
            if name in slurmds:
                self._daemons.stop(name, SLURMD_KILL_AFTER_S, notes)
            else:
                self._daemons.stop(name, STOP_TIMEOUT_S, problems)
            self.timings[f"stop_{name}_s"] = time.monotonic() - t1
        if self._install is not None:  # start() failed before mariadb-install-db was done
            if self._install.poll() is None:
                self._install.kill()
            self._install.wait()
            self._install = None
        self._daemons.close_logs()
        self.timings["stop_daemons_s"] = time.monotonic() - t0 - self.timings["stop_jobs_s"]
        self._kill_leftovers(problems)
        self._delete_netns(problems)
        self._unlock()
        if self._atexit_registered:
            atexit.unregister(self._stop_at_exit)
            self._atexit_registered = False
        self._started = False
        self.timings["stop_s"] = time.monotonic() - t0
        self.stop_problems, self.stop_notes = problems, notes
        if problems:
            raise RuntimeError("SlurmCluster.stop: " + "; ".join(problems))

    def pids(self) -> dict[str, int]:
        """``{name: pid}`` of the daemons this cluster started that are still alive (munged,
        mariadbd, slurmdbd, slurmctld, slurmd)."""
        return self._daemons.pids()

    def our_processes(self) -> dict[int, str]:
        """``{pid: cmdline}`` of every live process this cluster started (daemons, slurmstepd,
        jobs, prologs ...), as stop() would find them."""
        self._note_ours()
        return {pid: _cmdline(pid) for pid, start in self._ours.items() if _alive(pid, start)}

    def run(self, argv, *, user: str | None = None, timeout: float = 30, check: bool = True,
            input: str | None = None, cwd: Path | str | None = None
            ) -> subprocess.CompletedProcess:
        """Run a Slurm client (or anything) inside the namespace with ``SLURM_CONF`` set, as
        ``user`` when given (``setpriv``, which execs: a timeout kills the client itself; HOME,
        USER, LOGNAME are the user's and the working directory defaults to the user's home, so
        ``sbatch`` writes ``slurm-%j.out`` there). ``check``: raise SlurmCommandError on a
        non-zero exit. A timeout raises subprocess.TimeoutExpired."""
        argv = [str(a) for a in argv]
        env = self._client_env()
        cmd = self._in_netns(self.netns)
        if user is not None:
            pw = pwd.getpwnam(user)
            cmd += ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups",
                    "--"]
            env.update(HOME=pw.pw_dir, USER=pw.pw_name, LOGNAME=pw.pw_name)
            if cwd is None:
                cwd = pw.pw_dir
        proc = subprocess.run(cmd + argv, capture_output=True, text=True, timeout=timeout,
                              input=input, env=env, cwd=cwd,
                              stdin=None if input is not None else subprocess.DEVNULL)
        if check and proc.returncode != 0:
            raise SlurmCommandError(proc.returncode, argv, proc.stdout, proc.stderr)
        return proc

    def node_state(self, node: str | None = None) -> str:
        """``sinfo -h -N -n NODE -o %T``: "idle", "mixed", "allocated", "drained", "draining",
        "completing", ... (a trailing ``*`` means not responding). ``node``: default the
        first (the only one of a one-node cluster)."""
        out = self.run(["sinfo", "-h", "-N", "-n", node or self.node_name, "-o", "%T"],
                       timeout=10)
        return _one_state(out.stdout)

    def wait_idle(self, timeout: float = 60, *, drained_fails: bool = False,
                  node: str | None = None) -> None:
        """Wait until the node (``node``, default the first) is idle again; raises
        TimeoutError with the last state seen. ``drained_fails``: a drained or draining node
        raises RuntimeError at once (a check that the node stayed in service: "completing"
        while an Epilog runs is waited out)."""
        node = node or self.node_name
        deadline = time.monotonic() + timeout
        state = "?"
        while True:
            try:
                state = self.node_state(node)
            except (subprocess.SubprocessError, OSError) as exc:
                state = f"(sinfo failed: {exc})"
            if state == "idle":
                return
            if drained_fails and "drain" in state:
                raise RuntimeError(f"node {node} is {state}, not in service")
            if time.monotonic() > deadline:
                raise TimeoutError(f"node {node} not idle after {timeout:.0f} s: {state}")
            time.sleep(0.1)

    def restart_slurmd(self, timeout: float = 60) -> None:
        """Stop slurmd by its pid (SIGTERM, SIGKILL after SLURMD_KILL_AFTER_S: it can ignore
        SIGTERM for minutes) and start it again, while jobs run: their slurmstepd processes are
        not slurmd's and carry on. Returns once the new slurmd has logged its start."""
        if self.multi:
            raise RuntimeError("restart_slurmd: one-node clusters only")
        started = self.slurmd_log.read_text(errors="replace").count(" started on ")
        problems: list[str] = []
        self._daemons.stop("slurmd", SLURMD_KILL_AFTER_S, problems)
        self._spawn_slurmd(self.nodes[0])
        deadline = time.monotonic() + timeout
        while self.slurmd_log.read_text(errors="replace").count(" started on ") <= started:
            if time.monotonic() > deadline:
                raise TimeoutError(f"slurmd not started again after {timeout:.0f} s")
            time.sleep(0.2)
        self.stop_notes += problems        # a SIGKILLed slurmd is expected here, not an error

    def stop_slurmd(self, node: str) -> None:
        """Stop node ``node``'s slurmd by its pid (SIGTERM, SIGKILL after SLURMD_KILL_AFTER_S),
        as a node that is lost: its jobs' slurmstepd processes are not slurmd's and carry on."""
        [n] = [x for x in self.nodes if x.name == node]
        problems: list[str] = []
        self._daemons.stop(self._slurmd_name(n), SLURMD_KILL_AFTER_S, problems)
        self.stop_notes += problems        # a SIGKILLed slurmd is expected here, not an error

    def start_slurmd(self, node: str, timeout: float = 60) -> None:
        """Start node ``node``'s slurmd again (after :meth:`stop_slurmd`); returns once it has
        logged its start."""
        [n] = [x for x in self.nodes if x.name == node]
        log = self.slurmd_logs[node]
        started = log.read_text(errors="replace").count(" started on ") if log.exists() else 0
        self._spawn_slurmd(n)
        deadline = time.monotonic() + timeout
        while log.read_text(errors="replace").count(" started on ") <= started:
            if time.monotonic() > deadline:
                raise TimeoutError(f"slurmd of {node} not started again after {timeout:.0f} s")
            time.sleep(0.2)

    def resume_node(self) -> None:
        self.run(["scontrol", "update", f"nodename={self.node_name}", "state=resume"])

    def add_user(self, name: str, account: str = "default") -> None:
        """Give ``name`` an association under ``account`` (created if missing), so its jobs
        have an account; waits until slurmctld knows the association."""
        if not self.accounting:
            raise RuntimeError("add_user needs accounting=True")
        if not self._sacctmgr("-n", "-P", "show", "account", "where", f"name={account}",
                              "format=account").strip():
            self._sacctmgr("add", "account", account, f"Cluster={self.cluster_name}",
                           f"Description={account}", f"Organization={self.cluster_name}")
        if not self._sacctmgr("-n", "-P", "show", "assoc", "where", f"user={name}",
                              f"account={account}", f"cluster={self.cluster_name}",
                              "format=user").strip():
            self._sacctmgr("add", "user", name, f"Account={account}",
                           f"Cluster={self.cluster_name}")
        deadline = time.monotonic() + 15
        while True:
            out = self.run(["scontrol", "show", "assoc_mgr", f"users={name}",
                            f"accounts={account}", "flags=assoc"], timeout=10, check=False)
            if f"UserName={name}(" in out.stdout:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"slurmctld does not know user {name} in account {account} "
                                   f"after 15 s:\n{out.stdout}{out.stderr}")
            time.sleep(0.1)

    # -- start helpers ---------------------------------------------------------------------

    def _stop_at_exit(self) -> None:
        try:
            self.stop()
        except RuntimeError as exc:
            print(f"harness.slurm: {exc}", flush=True)

    def _lock(self) -> None:
        """One cluster per namespace (the ports are fixed): flock held while running."""
        if self._lock_fd is not None:
            return
        path = LOCK_DIR / f"dgxvm-slurm-harness.{self.netns}.lock"
        self._lock_fd = take_lock(path, "another SlurmCluster holds {path} (pid {holder}): one "
                                        "cluster per namespace")

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            drop_lock(self._lock_fd)
            self._lock_fd = None

    def _slurmd_name(self, node: SlurmNode) -> str:
        return f"slurmd-{node.name}" if self.multi else "slurmd"

    def _spawn_slurmd(self, node: SlurmNode) -> None:
        self._spawn(self._slurmd_name(node),
                    ["slurmd", "-D", "-N", node.name, "-f", str(self.slurm_conf)],
                    self.slurmd_logs[node.name], enter=list(node.enter))

    def _setup_netns(self) -> None:
        path = Path("/run/netns") / self.netns
        if self.create_netns:
            self._daemons.netns_inode = create_netns(self.netns)
            self._netns_created = True
        elif not path.exists():
            raise RuntimeError(f"network namespace {self.netns} does not exist (start the "
                               f"LibvirtStack first, or pass create_netns=True)")
        else:
            self._daemons.netns_inode = os.stat(path).st_ino
        if self.multi:   # the nodes' namespaces: their slurmstepd, Prologs and jobs are ours
            self._daemons.more_netns_inodes = {
                os.stat(Path("/run/netns") / n.netns).st_ino for n in self.nodes}
        if not self.own_address:
            return
        if _ip("-n", self.netns, "link", "show", ADDR_IFACE, check=False).returncode == 0:
            _ip("-n", self.netns, "link", "delete", ADDR_IFACE)  # left by a crashed run
        _ip("-n", self.netns, "link", "add", ADDR_IFACE, "type", "veth", "peer", "name",
            ADDR_PEER)
        self._iface_created = True
        _ip("-n", self.netns, "addr", "add", ADDR_CIDR, "dev", ADDR_IFACE)
        self._check_lo()

    def _check_lo(self) -> None:
        lo = _ip("-n", self.netns, "-o", "link", "show", "lo").stdout
        if "UP" not in lo.split("<", 1)[-1].split(">", 1)[0].split(","):
            raise RuntimeError(f"lo is down in namespace {self.netns}")

    def _prepare_files(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.run_dir, 0o755)
        # Throw-away: a run dir used before starts from scratch (only the dirs we own).
        for d in (self.conf_dir, self.log_dir, self.state_dir, self.munge_dir, self.db_dir):
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(mode=0o755)
            os.chmod(d, 0o755)  # whatever the umask: jobs of ordinary users read slurm.conf
        for d in ("ctld", "d"):
            (self.state_dir / d).mkdir(mode=0o755)
        blocked = [str(p) for p in self.run_dir.parents if not os.stat(p).st_mode & 0o001]
        if blocked:
            warnings.warn(f"harness.slurm: {blocked} not searchable by other users: jobs of "
                          f"ordinary users cannot read {self.slurm_conf}", stacklevel=3)
        key = self.munge_dir / "munge.key"
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(1024))
        self._make_gpu_files()
        self._write(self.gres_conf_path, self.gres_conf if self.gres_conf.endswith("\n")
                    else self.gres_conf + "\n", 0o644)
        self._write(self.slurm_conf, self.slurm_conf_text(), 0o644)
        if self.accounting:
            self._db_password = secrets.token_hex(16)
            self._write(self.slurmdbd_conf, self._slurmdbd_conf_text(), 0o600)

    @staticmethod
    def _write(path: Path, text: str, mode: int) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(path, mode)

    def _make_gpu_files(self) -> None:
        """Each File= path becomes a symlink to /dev/null: slurmd wants a character or block
        device (a regular file makes it publish no GPU indices at all)."""
        for path in gres_files(self.gres_conf):
            if path.is_symlink() and os.readlink(path) == "/dev/null":
                continue
            if path.exists() or path.is_symlink():
                raise RuntimeError(f"gres.conf names {path}, which exists and is not a symlink "
                                   f"to /dev/null: not replacing it")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.symlink_to("/dev/null")

    def slurm_conf_text(self) -> str:
        s = self
        # Several nodes: slurmctld calls itself localhost (it accepts that name as its own
        # host) and the nodes and clients reach it at ctld_addr; each slurmd's files carry
        # its node's name (%n).
        ctld = f"localhost({s.ctld_addr})" if s.ctld_addr else "localhost"
        node_files = "-%n" if s.multi else ""
        lines = [
            "# generated by harness/slurm.py",
            f"ClusterName={s.cluster_name}",
            f"SlurmctldHost={ctld}",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"SlurmctldPort={CTLD_PORT}",
            f"SlurmdPort={SLURMD_PORT}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={s.munge_socket},cred_expire=10",
            f"StateSaveLocation={s.state_dir / 'ctld'}",
            f"SlurmdSpoolDir={s.state_dir / 'd'}{node_files}",
            f"SlurmctldPidFile={s.state_dir / 'slurmctld.pid'}",
            f"SlurmdPidFile={s.state_dir / f'slurmd{node_files}.pid'}",
            f"SlurmctldLogFile={s.slurmctld_log}",
            f"SlurmdLogFile={s.log_dir / f'slurmd{node_files}.log'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "MailProg=/bin/true",
            "MpiDefault=none",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "GresTypes=gpu",
            "SlurmdParameters=config_overrides",
            "ReturnToService=2",
            "SchedulerParameters=batch_sched_delay=0",
            "KillWait=5",
            "MinJobAge=300",
            "JobRequeue=1",
            "SlurmdTimeout=300",
            "MessageTimeout=30",
            f"PrologEpilogTimeout={s.prolog_epilog_timeout_s}",
            f"BatchStartTimeout={s.batch_start_timeout_s}",
        ]
        if s.prolog is not None:
            lines += [f"Prolog={s.prolog}", "PrologFlags=Alloc"]
        if s.epilog is not None:
            lines.append(f"Epilog={s.epilog}")
        if s.accounting:
            # several nodes: their Epilogs' sacct and sacctmgr reach slurmdbd over the underlay
            lines += ["AccountingStorageType=accounting_storage/slurmdbd",
                      f"AccountingStorageHost={s.ctld_addr if s.multi and s.ctld_addr else 'localhost'}",
                      f"AccountingStoragePort={DBD_PORT}",
                      "AccountingStorageTRES=gres/gpu",
                      f"AccountingStoragePass={s.munge_socket}"]
        else:
            lines.append("AccountingStorageType=accounting_storage/none")
        for node in s.nodes:
            n = node.shape
            features = f" Features={n.features}" if n.features else ""
            host = "" if s.multi else " NodeHostname=localhost"
            lines.append(
                f"NodeName={node.name}{host} NodeAddr={node.addr} CPUs={n.cpus} "
                f"Boards=1 SocketsPerBoard={n.sockets} CoresPerSocket={n.cores_per_socket} "
                f"ThreadsPerCore={n.threads_per_core} RealMemory={n.real_memory_mib} "
                f"Gres=gpu:{n.gpus}{features} State=UNKNOWN")
        lines += [
            "PartitionName=batch Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO",
        ]
        text = "\n".join(lines) + "\n"
        if s.extra_conf:
            text += s.extra_conf if s.extra_conf.endswith("\n") else s.extra_conf + "\n"
        return text

    def _slurmdbd_conf_text(self) -> str:
        return "\n".join([
            "# generated by harness/slurm.py",
            "AuthType=auth/munge",
            f"AuthInfo=socket={self.munge_socket}",
            "DbdHost=localhost",
            f"DbdPort={DBD_PORT}",
            "SlurmUser=root",
            f"PidFile={self.state_dir / 'slurmdbd.pid'}",
            f"LogFile={self.slurmdbd_log}",
            "DebugLevel=info",
            "StorageType=accounting_storage/mysql",
            "StorageHost=127.0.0.1",
            f"StoragePort={DB_PORT}",
            "StorageUser=slurm",
            f"StoragePass={self._db_password}",
            "StorageLoc=slurm_acct_db",
        ]) + "\n"

    @staticmethod
    def _in_netns(netns: str) -> list[str]:
        """The prefix that runs a program in the namespace: ``nsenter --net`` (execs, so the
        pid stays the program's). Not ``ip netns exec``: that also mounts a fresh sysfs over
        /sys in a private mount namespace, which hides /sys/fs/cgroup, and slurmd 22.05 then
        dies at start ("No filesystem mounted on /sys/fs/cgroup", even with
        proctrack/linuxproc and task/none)."""
        return ["nsenter", f"--net=/run/netns/{netns}", "--"]

    def _daemon_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(_SLURM_ENV_PREFIXES)}
        env.update(LC_ALL="C", SLURM_CONF=str(self.slurm_conf))
        env[_MARKER] = self._token
        return env

    def _client_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(_SLURM_ENV_PREFIXES)}
        env.update(LC_ALL="C", **self.env)
        # sbatch exports its environment to the job: a job's process that leaves slurmstepd's
        # tree (double fork, setsid) still carries the marker and stop() finds it.
        env[_MARKER] = self._token
        return env

    def _note_launched(self, pid: int, start: int | None) -> None:
        if start is not None:
            self._ours[pid] = start

    def _spawn(self, name: str, argv: list[str], log: Path,
               enter: list[str] | None = None) -> None:
        """Start daemon ``name``; ``log`` is the log file it writes itself."""
        daemon = self._daemons.spawn(name, argv, own_log=log, enter=enter)
        self._note_launched(daemon.pid, daemon.start)
        self._daemon_pids.add(daemon.pid)

    def _wait_for(self, name: str, ready, what: str) -> None:
        self._daemons.wait_for(name, ready, what, self.start_timeout)

    def _quiet(self, argv: list[str], timeout: float = 5) -> subprocess.CompletedProcess | None:
        try:
            return self.run(argv, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return None

    def _poll(self, argv: list[str], timeout: float = 5) -> subprocess.CompletedProcess | None:
        """``_quiet`` for start()'s polls: a client's ``fatal:`` (e.g. "Unable to process
        configuration file" for a bad ``extra_conf``) will not go away, so raise at once."""
        r = self._quiet(argv, timeout)
        if r is not None and r.returncode != 0 and "fatal:" in r.stderr:
            raise RuntimeError(f"{' '.join(argv)} failed ({r.returncode}): {r.stderr.strip()}")
        return r

    def _start_accounting(self, install: subprocess.Popen) -> None:
        try:
            rc = install.wait(self.start_timeout)
        except subprocess.TimeoutExpired:
            install.kill()
            install.wait()
            rc = "timeout"
        self._install = None
        if rc != 0:
            raise RuntimeError(f"mariadb-install-db failed ({rc}):\n"
                               f"{_tail(self.log_dir / 'mariadb-install-db.out')}")
        self._spawn("mariadbd", [
            "mariadbd", "--no-defaults", f"--datadir={self.db_dir / 'data'}",
            f"--socket={self.db_socket}", f"--port={DB_PORT}", "--bind-address=127.0.0.1",
            "--user=root", f"--pid-file={self.db_dir / 'mariadbd.pid'}",
            f"--log-error={self.log_dir / 'mariadbd.log'}", "--skip-name-resolve",
            "--innodb-buffer-pool-size=64M", "--innodb-flush-log-at-trx-commit=0",
            "--innodb-lock-wait-timeout=900", "--skip-log-bin"], self.log_dir / "mariadbd.log")
        sql = (f"CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '{self._db_password}'; "
               f"GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;")

        def db_ready() -> bool:
            if not _socket_answers(self.db_socket):
                return False
            r = self._quiet(["mariadb", "--no-defaults", f"--socket={self.db_socket}", "-uroot",
                             "-e", sql], timeout=10)
            return r is not None and r.returncode == 0
        self._wait_for("mariadbd", db_ready, "mariadb SQL (the slurm user's grant)")
        self._spawn("slurmdbd", ["slurmdbd", "-D"], self.slurmdbd_log)

        def dbd_ready() -> bool:
            r = self._poll(["sacctmgr", "-n", "show", "cluster"])
            return r is not None and r.returncode == 0
        self._wait_for("slurmdbd", dbd_ready, "sacctmgr show cluster")

    def _ctld_up(self) -> bool:
        r = self._poll(["scontrol", "ping"])
        return r is not None and "UP" in r.stdout

    def _cluster_registered(self) -> bool:
        r = self._poll(["sacctmgr", "-n", "-P", "show", "cluster", "format=cluster"])
        return r is not None and self.cluster_name in r.stdout.split()

    def _node_idle(self, node: str) -> bool:
        r = self._poll(["sinfo", "-h", "-N", "-n", node, "-o", "%T"])
        state = _one_state(r.stdout) if r is not None else ""
        if state.startswith(("inval", "drain", "down")):
            reason = self._quiet(["scontrol", "show", "node", node])
            log = self.slurmd_logs[node]
            raise RuntimeError(f"node {node} is {state}:\n"
                               f"{reason.stdout if reason else ''}\n{log}:\n{_tail(log)}")
        return state == "idle"

    def _sacctmgr(self, *args: str) -> str:
        return self.run(["sacctmgr", "-i", *args], timeout=30).stdout

    # -- stop helpers ----------------------------------------------------------------------

    def _cancel_all_jobs(self, problems: list[str]) -> None:
        deadline = time.monotonic() + STOP_JOBS_TIMEOUT_S
        r = self._quiet(["squeue", "-h", "--all", "-o", "%i"], timeout=10)
        if r is None or r.returncode != 0:
            problems.append(f"squeue failed, jobs not cancelled: "
                            f"{r.stderr.strip() if r else 'timeout'}")
            return
        ids = r.stdout.split()
        if not ids:
            return
        self._quiet(["scancel", *ids], timeout=10)
        while time.monotonic() < deadline:
            r = self._quiet(["squeue", "-h", "--all", "-o", "%i %T"], timeout=10)
            if r is not None and r.returncode == 0 and not r.stdout.strip():
                return
            time.sleep(0.1)
        problems.append(f"jobs still listed {STOP_JOBS_TIMEOUT_S:.0f} s after scancel: "
                        f"{r.stdout.strip() if r else '?'}")

    def _note_ours(self) -> None:
        """Add to ``self._ours`` every live member of the namespace whose parent is ours, whose
        session leader is ours (our daemons lead their own sessions: prologs, epilogs and
        their children stay in slurmd's), or that carries our marker in its environment
        (slurmstepd inherits slurmd's). Repeated until nothing changes, so grandchildren
        count; pids are paired with start times, so a reused pid is never taken for ours."""
        members = self._daemons.members()
        if not members:
            return

        def is_ours(pid: int) -> bool:
            start = self._ours.get(pid)
            if start is None:
                return False
            st = members.get(pid) or _stat(pid)
            return st is None or st.state in DEAD_STATES or st.start == start

        def parent_ours(pid: int) -> bool:
            start = self._ours.get(pid)
            return start is not None and _alive(pid, start)

        needle = f"{_MARKER}={self._token}".encode()
        changed = True
        while changed:
            changed = False
            for pid, st in members.items():
                if self._ours.get(pid) == st.start:
                    continue
                if (st.ppid > 1 and parent_ours(st.ppid)) or \
                        (st.sid != pid and st.sid > 1 and is_ours(st.sid)) or \
                        _environ_has(pid, needle):
                    self._ours[pid] = st.start
                    changed = True

    def _kill_leftovers(self, problems: list[str]) -> None:
        self._note_ours()
        left = {pid: start for pid, start in self._ours.items()
                if pid not in self._daemon_pids and _alive(pid, start)}
        if left:
            problems.append("left after the daemons stopped, killed by pid: "
                            + ", ".join(f"{pid} ({_cmdline(pid)[:80]})" for pid in sorted(left)))
            stop_pids(left, LEFTOVER_KILL_AFTER_S, problems)
        self._ours = {p: s for p, s in self._ours.items() if _alive(p, s)}
        self._daemon_pids.clear()

    def _delete_netns(self, problems: list[str]) -> None:
        if self._iface_created and not self._netns_created:
            proc = _ip("-n", self.netns, "link", "delete", ADDR_IFACE, check=False)
            if proc.returncode != 0 and "Cannot find" not in proc.stderr:
                problems.append(f"ip -n {self.netns} link delete {ADDR_IFACE}: "
                                f"{proc.stderr.strip()}")
        self._iface_created = False
        if not self._netns_created:
            self._daemons.netns_inode = None
            return
        if not delete_netns_if_empty(self.netns, problems, POLL_S):
            return
        self._netns_created = False
        self._daemons.netns_inode = None


def main(argv: list[str] | None = None) -> int:
    """``python -m harness.slurm RUN_DIR``: start a one-node cluster, wait for Ctrl-C."""
    import argparse
    ap = argparse.ArgumentParser(prog="python -m harness.slurm", description=main.__doc__)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--netns", default="dgxvm-test")
    ap.add_argument("--create-netns", action="store_true",
                    help="create (and at the end delete) the namespace; otherwise it must exist")
    ap.add_argument("--node-name", default="dgx01")
    ap.add_argument("--gres-conf", type=Path,
                    help="gres.conf to use (default: 16 fake GPUs RUN_DIR/dev/nvidia[0-15])")
    ap.add_argument("--prolog", help="Prolog script path")
    ap.add_argument("--epilog", help="Epilog script path")
    ap.add_argument("--no-accounting", action="store_true")
    args = ap.parse_args(argv)
    run_dir = args.run_dir.absolute()
    if args.gres_conf:
        gres = args.gres_conf.read_text()
    else:
        gres = f"Name=gpu File={run_dir}/dev/nvidia[0-{DGX2_SHAPE.gpus - 1}]\n"
    cluster = SlurmCluster(run_dir, netns=args.netns, create_netns=args.create_netns,
                           node_name=args.node_name, node=DGX2_SHAPE, gres_conf=gres,
                           prolog=args.prolog, epilog=args.epilog,
                           accounting=not args.no_accounting)
    with cluster:
        # Block only now: children inherit the signal mask.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        print(f"slurm cluster up in {cluster.timings['start_s']:.2f} s: netns={cluster.netns} "
              f"pids={cluster.pids()} logs={cluster.log_dir}\n"
              f"  clients: ip netns exec {cluster.netns} env SLURM_CONF={cluster.slurm_conf} "
              f"sinfo", flush=True)
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    print(f"stopped in {cluster.timings['stop_s']:.2f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
