"""A local cluster of several simulated DGX nodes under one Slurm, each node with its own
libvirt and its own dgxvm, on an underlay of network namespaces (harness/README.md shows how)::

    with LocalCluster(nodes=("dgxa", "dgxb"), machine="dgx-h100", user="dgxvmmn") as c:
        job = c.jobs.sbatch(script, nodes=2, gpus=1)
        c.node("dgxa").dgxvm_cmd("list", "--json")
        c.run_on("dgxb", ["virsh", "-c", "qemu:///system", "list", "--all"])

What it builds:

* the underlay: network namespace ``dgxvm-ul`` with a bridge, standing in for the cluster's
  Ethernet (192.168.213.0/24); nothing in it routes anywhere else;
* the controller: namespace ``dgxvm-ctl`` on the underlay (192.168.213.1) running munged,
  MariaDB + slurmdbd and slurmctld (harness/slurm.py); Slurm's clients run there;
* per node ``NAME``: namespace ``dgxvm-NAME`` on the underlay (192.168.213.11, .12, ...), and a
  mount and UTS namespace held by a ``sleep`` (:class:`NodeNamespaces`) in which the node's own
  directories are bound over the fixed paths a node's daemons and dgxvm use (/run/libvirt,
  /var/lib/libvirt, /var/cache/libvirt, /var/log/libvirt, /etc/libvirt/qemu,
  /etc/libvirt/hooks, /run/dgxvm, /etc/dgxvm, /var/lib/dgxvm, /etc/hosts) and the hostname is
  the node's name; in them run the node's virtlogd + libvirtd (harness/libvirt.py) and its
  ``slurmd -N NAME``, so the Prolog, the Epilog and every job step on the node see the node's
  libvirtd at qemu:///system and its config at /etc/dgxvm/dgxvm.toml;
* dgxvm on each node as harness/node.py's LocalNode has it on one: a simulated sysfs tree
  (``dgxvm simulate MACHINE --serial INDEX+1``: each node's HCAs have GUIDs of their own), the
  config, dgxvm's qemu and network hooks in the node's libvirt, the test guest installed as the
  default image, the node's lines of gres.conf;
* the site's services on the controller's address: with ``ib="ufm"``, the UFM stand-in
  (tools/ufm-standin; every node's ``[ib]`` points at it and partition ``batch`` gives VMs
  InfiniBand VFs); a container registry a test starts there (:data:`REGISTRY`, which every
  node's ``[containers] insecure_registries`` names).

``stop()``: Slurm first (its Epilogs need libvirt), then per node any VM left (``dgxvm
delete``), its libvirt stack, the holder (the mount namespace and its bind mounts go with it),
the namespaces (their veths with them), the directory and the user; every process by PID.
"""

from __future__ import annotations

import atexit
import json
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from .daemons import Daemons
from .libvirt import LibvirtStack
from .node import (Jobs, build_guest, default_dgxvm, dgxvm_for_users, hook_wrappers,
                   installed_dgxvm)
from .proc import create_netns, delete_netns_if_empty, drop_lock, exe, take_lock
from .proc import ip as _ip
from .slurm import DGX2_SHAPE, NodeShape, SlurmCluster, SlurmNode, ensure_user

UNDERLAY_NETNS = "dgxvm-ul"
CTL_NETNS = "dgxvm-ctl"
NODE_NETNS = "dgxvm-{name}"
BRIDGE = "ul0"
SUBNET = "192.168.213"
CTL_ADDR = f"{SUBNET}.1"
FIRST_NODE_HOST = 11            # node i (from 0) is SUBNET.(11 + i)
# One cluster per host: the namespace names and the underlay's addresses are fixed.
LOCK_PATH = Path("/run/dgxvm-cluster-harness.lock")
CONFIG_PATH = Path("/etc/dgxvm/dgxvm.toml")   # on every node, in its mount namespace
JOBNET_SECRET = "/etc/dgxvm/jobnet-ssh.key"   # [jobnet] ssh_secret, with jobnet=True
HOLDER_TIMEOUT_S = 10.0
FMPM_STANDIN = Path(__file__).resolve().parents[1] / "tools" / "fmpm-standin" / "fmpm"
UFM_STANDIN = Path(__file__).resolve().parents[1] / "tools" / "ufm-standin" / "ufm-standin"
UFM_CREDENTIALS = "/etc/dgxvm/ufm-credentials"   # [ib] credentials_file, with ib="ufm"
UFM_USER = "dgxvm"
#: where a test's registry listens (harness.registry.LocalRegistry in the controller's netns,
#: host=CTL_ADDR, port 5000): plain HTTP, named in every node's insecure_registries
REGISTRY = f"{CTL_ADDR}:5000"

#: What slurm.conf declares for each machine ``dgxvm simulate`` knows (sockets x cores x
#: threads as the simulated tree has them; memory as sold).
SHAPES = {
    "dgx2": DGX2_SHAPE,
    "dgx-a100": NodeShape(cpus=256, sockets=2, cores_per_socket=64, threads_per_core=2,
                          real_memory_mib=1024000, gpus=8, features="dgxa100,a100"),
    "dgx-h100": NodeShape(cpus=224, sockets=2, cores_per_socket=56, threads_per_core=2,
                          real_memory_mib=2048000, gpus=8, features="dgxh100,h100"),
}

#: fixed path on a node -> its directory under the node's dir (each bound over the path in the
#: node's mount namespace). /etc/libvirt/qemu is the node's libvirt stack's own config dir.
NODE_MOUNTS = {
    "/run/libvirt": "run-libvirt",
    "/var/lib/libvirt": "var-lib-libvirt",
    "/var/cache/libvirt": "var-cache-libvirt",
    "/var/log/libvirt": "var-log-libvirt",
    "/etc/libvirt/qemu": "libvirt/etc-libvirt-qemu",
    "/etc/libvirt/hooks": "etc-libvirt-hooks",
    "/run/dgxvm": "run-dgxvm",
    "/etc/dgxvm": "etc-dgxvm",
    "/var/lib/dgxvm": "var-lib-dgxvm",
}
# Copied (directories with their owners and modes; files too for the capability cache, which
# spares each node's libvirtd its ~4 s QEMU probe) from the host's, so libvirtd finds the
# layout Debian's package made.
_SEEDED = {"/var/lib/libvirt": False, "/var/cache/libvirt": True, "/var/log/libvirt": False}
# The holder: binds each SRC over DST, names the host, then sleeps holding the namespaces.
_HOLDER = ('h=$1; shift; while [ $# -gt 0 ]; do mount --bind "$1" "$2" || exit 1; shift 2; '
           'done; hostname "$h" && exec sleep infinity')


def _node_addr(index: int) -> str:
    return f"{SUBNET}.{FIRST_NODE_HOST + index}"


def _seed(src: Path, dst: Path, files: bool) -> None:
    """Mirror ``src``'s directories (owner, mode) into ``dst``, and its files when ``files``."""
    dst.mkdir(parents=True, exist_ok=True)
    if not src.is_dir():
        return
    for root, dirs, names in os.walk(src):
        rel = Path(root).relative_to(src)
        for d in dirs:
            s, t = Path(root) / d, dst / rel / d
            st = os.stat(s)
            t.mkdir(exist_ok=True)
            os.chown(t, st.st_uid, st.st_gid)
            os.chmod(t, st.st_mode & 0o7777)
        if files:
            for n in names:
                if (Path(root) / n).is_file():
                    shutil.copy2(Path(root) / n, dst / rel / n)
    st = os.stat(src)
    os.chown(dst, st.st_uid, st.st_gid)
    os.chmod(dst, st.st_mode & 0o7777)


def _veth(netns: str, ul_name: str, addr: str | None) -> None:
    """A veth pair from the underlay's bridge (``ul_name``) to ``eth0`` in ``netns``, with
    ``addr``/24 there. Both ends go with their namespaces."""
    _ip("-n", UNDERLAY_NETNS, "link", "add", ul_name, "type", "veth", "peer", "name", "eth0",
        "netns", netns)
    _ip("-n", UNDERLAY_NETNS, "link", "set", ul_name, "master", BRIDGE, "up")
    if addr is not None:
        _ip("-n", netns, "addr", "add", f"{addr}/24", "dev", "eth0")
    _ip("-n", netns, "link", "set", "eth0", "up")


class NodeNamespaces:
    """One node's namespaces: network namespace ``dgxvm-NAME`` on the underlay, and a mount and
    UTS namespace held by a ``sleep`` of ours (``unshare --mount --uts --propagation slave``:
    the host's later mounts still show inside, the node's binds never leave it), in which each
    of ``mounts`` (fixed path -> directory) is bound over its path and the hostname is NAME.
    :attr:`enter` runs a program in all three. stop() ends the holder: the mount namespace and
    its binds go with the last process in it; then the network namespace is deleted."""

    def __init__(self, name: str, addr: str, base: Path, mounts: dict[Path, Path]):
        self.name, self.addr, self.base, self.mounts = name, addr, base, mounts
        self.netns = NODE_NETNS.format(name=name)
        self._holder = Daemons(enter=[], env=lambda: {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
                               log_dir=base, log_suffix=".log")
        self._netns_created = False
        self.mnt_inode: int | None = None

    @property
    def held(self) -> bool:
        """The network namespace is still there (stop() could not delete it)."""
        return self._netns_created

    @property
    def holder_pid(self) -> int | None:
        return self._holder.pids().get("holder")

    @property
    def mount_ns(self) -> Path:
        return Path(f"/proc/{self.holder_pid}/ns/mnt")

    @property
    def enter(self) -> list[str]:
        """The prefix that runs a program in the node's namespaces (nsenter execs it). The
        holder is our unreaped child while the node runs: its pid cannot name anyone else."""
        pid = self.holder_pid
        if pid is None:
            raise RuntimeError(f"node {self.name}: its namespaces are not held")
        return ["nsenter", f"--mount=/proc/{pid}/ns/mnt", f"--uts=/proc/{pid}/ns/uts",
                f"--net=/run/netns/{self.netns}", "--"]

    def start(self) -> None:
        create_netns(self.netns)
        self._netns_created = True
        _veth(self.netns, f"ul-{self.name}", self.addr)
        pairs = [str(a) for fixed, here in self.mounts.items() for a in (here, fixed)]
        holder = self._holder.spawn("holder", [
            "nsenter", f"--net=/run/netns/{self.netns}", "--",
            "unshare", "--mount", "--uts", "--propagation", "slave", "--",
            "sh", "-c", _HOLDER, "sh", self.name, *pairs])
        self._holder.wait_for("holder", lambda: os.path.basename(exe(holder.pid)) == "sleep",
                              "the bind mounts", HOLDER_TIMEOUT_S)
        self.mnt_inode = os.stat(self.mount_ns).st_ino

    def mount_members(self) -> list[int]:
        """Pids of the live processes in the node's mount namespace."""
        out = []
        if self.mnt_inode is None:
            return out
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    if os.stat(f"/proc/{entry}/ns/mnt").st_ino == self.mnt_inode:
                        out.append(int(entry))
                except OSError:
                    pass
        return out

    def stop(self, problems: list[str]) -> None:
        holder = self.holder_pid
        left = [p for p in self.mount_members() if p != holder]
        if left:
            problems.append(f"node {self.name}: processes {left} still in its mount namespace "
                            f"({[exe(p) for p in left]}): it outlives the holder")
        self._holder.stop("holder", 5.0, problems)
        self._holder.close_logs()
        self.mnt_inode = None
        if self._netns_created and delete_netns_if_empty(self.netns, problems):
            self._netns_created = False


class ClusterNode:
    """One node of a :class:`LocalCluster`: its namespaces (:attr:`ns`), its libvirt stack
    (:attr:`stack`, whose ``uri`` reaches it from here), its dir (:attr:`base`; :meth:`path`
    maps a fixed path of the node to where this process sees it)."""

    def __init__(self, cluster: LocalCluster, name: str, index: int):
        self.cluster, self.name, self.index = cluster, name, index
        self.addr = _node_addr(index)
        self.base = cluster.base / "nodes" / name
        self.sysfs = self.base / "sysfs"
        mounts = {Path(fixed): self.base / rel for fixed, rel in NODE_MOUNTS.items()}
        mounts[Path("/etc/hosts")] = self.base / "hosts"
        self.ns = NodeNamespaces(name, self.addr, self.base, mounts)
        self.stack: LibvirtStack | None = None

    def path(self, fixed: str | Path) -> Path:
        """Where this process sees ``fixed`` (e.g. /var/lib/dgxvm/ledger.json) of the node."""
        fixed = Path(fixed)
        for mounted, here in self.ns.mounts.items():
            if fixed == mounted or mounted in fixed.parents:
                return here / fixed.relative_to(mounted)
        return fixed

    def run(self, argv, *, user: str | None = None, timeout: float = 120, check: bool = False,
            input: str | None = None) -> subprocess.CompletedProcess:
        """``argv`` inside the node's namespaces (as ``user`` through setpriv when given), with
        no DGXVM_* or SLURM_* variable of ours: the node's own config rules."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DGXVM_", "SLURM_"))}
        env["LC_ALL"] = "C"
        cmd = list(self.ns.enter)
        if user is not None:
            pw = pwd.getpwnam(user)
            cmd += ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups",
                    "--"]
            env.update(HOME=pw.pw_dir, USER=pw.pw_name, LOGNAME=pw.pw_name)
        r = subprocess.run([*cmd, *map(str, argv)], capture_output=True, text=True, env=env,
                           timeout=timeout, input=input,
                           stdin=None if input is not None else subprocess.DEVNULL)
        if check and r.returncode != 0:
            raise RuntimeError(f"on {self.name}: {' '.join(map(str, argv))}: exit "
                               f"{r.returncode}: {r.stderr.strip()[-2000:]}")
        return r

    def dgxvm_cmd(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """``dgxvm ARGS`` as root on the node (its /etc/dgxvm/dgxvm.toml)."""
        return self.run([self.cluster.dgxvm, *args], check=check, timeout=600)

    def vms(self) -> list[dict]:
        return json.loads(self.dgxvm_cmd("list", "--json").stdout)


class LocalCluster:
    """Several simulated DGX nodes under one Slurm; see the module docstring.

    ``nodes``: the node names (each its own namespaces, libvirt and dgxvm); ``machine``: what
    ``dgxvm simulate`` makes of each (one name for all, or one per node); ``user``: the
    ordinary user jobs run as (created if missing, and then removed by stop()).
    ``guest=False`` skips the test guest (a cluster for Slurm alone: no image installed).
    ``jobnet=True`` turns the job fabric on in every node's config (``[jobnet]``: the nodes'
    underlay addresses, and one SSH secret written root-only on every node). ``ib="ufm"``
    runs the UFM stand-in on the controller's address and gives partition ``batch`` InfiniBand
    VFs against it (:meth:`ufm_calls`, :meth:`ufm_members`)."""

    def __init__(self, *, nodes=("dgxa", "dgxb"), machine: str | tuple[str, ...] = "dgx-h100",
                 user: str = "dgxvmmn", network: str = "dgxvmmn", cidr: str = "10.215.0.0/24",
                 prolog: Path | None = None, epilog: Path | None = None,
                 config_extra: str = "", slurm_extra: str = "", guest: bool = True,
                 jobnet: bool = False, ib: str = "none"):
        self.names = tuple(nodes)
        machines = (machine,) * len(self.names) if isinstance(machine, str) else tuple(machine)
        if len(machines) != len(self.names) or not set(machines) <= set(SHAPES):
            raise ValueError(f"machine: one of {sorted(SHAPES)}, or one per node")
        self.machines = dict(zip(self.names, machines))
        self.user, self.network, self.cidr = user, network, cidr
        self._prolog, self._epilog = prolog, epilog
        self.config_extra, self.slurm_extra = config_extra, slurm_extra
        self.jobnet = jobnet
        if ib not in ("none", "ufm"):
            raise ValueError(f"ib: none or ufm, not {ib!r}")
        self.ib = ib
        self._ufm_password = os.urandom(12).hex()
        self._ufm_url: str | None = None
        self._services: Daemons | None = None      # the site's, in the controller's netns
        self._jobnet_secret = os.urandom(64)     # [jobnet] ssh_secret: one for every node
        self.guest = guest
        self.dgxvm = default_dgxvm()
        self.base: Path | None = None
        self.nodes: dict[str, ClusterNode] = {}
        self.cluster: SlurmCluster | None = None
        self.jobs: Jobs | None = None
        self.created_user = False
        self._created_dirs: list[Path] = []
        self._netns: list[str] = []
        self._lock_fd: int | None = None
        self._atexit = False
        self.timings: dict[str, float] = {}
        self.stop_problems: list[str] = []

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def node(self, name: str) -> ClusterNode:
        return self.nodes[name]

    def run_on(self, name: str, argv, **kw) -> subprocess.CompletedProcess:
        """``argv`` inside node ``name``'s namespaces (:meth:`ClusterNode.run`)."""
        return self.nodes[name].run(argv, **kw)

    @property
    def workdir(self) -> Path:
        """The jobs' working directory, shared by every node (as a cluster file system is)."""
        return self.base / "work"

    # -- start ---------------------------------------------------------------------------------
    def start(self) -> LocalCluster:
        t0 = time.monotonic()
        self._lock_fd = take_lock(LOCK_PATH, "another LocalCluster holds {path} (pid {holder})")
        atexit.register(self._stop_at_exit)
        self._atexit = True
        try:
            self.base = Path(tempfile.mkdtemp(prefix="dgxvm-cluster-", dir="/var/tmp"))
            os.chmod(self.base, 0o755)
            try:
                pwd.getpwnam(self.user)
            except KeyError:
                self.created_user = True
            uid, gid, _home = ensure_user(self.user)
            self.workdir.mkdir(mode=0o755)
            os.chown(self.workdir, uid, gid)
            manifest = build_guest() if self.guest else None
            self.timings["guest_s"] = round(time.monotonic() - t0, 2)
            self._underlay()
            if self.ib == "ufm":
                self._start_ufm()
            for i, name in enumerate(self.names):
                self.nodes[name] = ClusterNode(self, name, i)
                self._prepare_node(self.nodes[name])
            self._mount_points()
            for node in self.nodes.values():
                node.ns.start()
            self.timings["namespaces_s"] = round(time.monotonic() - t0, 2)
            for node in self.nodes.values():
                self._start_libvirt(node, manifest)
            self.timings["libvirt_s"] = round(time.monotonic() - t0, 2)
            self._start_slurm()
            self.timings["slurm_s"] = round(time.monotonic() - t0, 2)
        except BaseException:
            try:
                self.stop()
            except RuntimeError as exc:
                print(f"harness.cluster: {exc}", flush=True)
            raise
        self.timings["start_s"] = round(time.monotonic() - t0, 2)
        return self

    def _underlay(self) -> None:
        """The underlay's bridge, and the controller on it."""
        for netns in (UNDERLAY_NETNS, CTL_NETNS):
            create_netns(netns)
            self._netns.append(netns)
        _ip("-n", UNDERLAY_NETNS, "link", "add", BRIDGE, "type", "bridge")
        _ip("-n", UNDERLAY_NETNS, "link", "set", BRIDGE, "up")
        _veth(CTL_NETNS, "ul-ctl", CTL_ADDR)

    def _start_ufm(self) -> None:
        """The UFM stand-in on the controller's underlay address (a port it picks)."""
        self._services = Daemons(enter=["ip", "netns", "exec", CTL_NETNS],
                                 env=lambda: {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
                                 log_dir=self.base, log_suffix=".log", cwd=self.base)
        port_file = self.base / "ufm.port"
        self._services.spawn("ufm-standin", [
            "python3", str(UFM_STANDIN), "--host", CTL_ADDR, "--port-file", str(port_file),
            "--log", str(self.base / "ufm-calls.jsonl"), "--user", UFM_USER,
            "--password", self._ufm_password])
        self._services.wait_for("ufm-standin", port_file.exists, "its port file", 15)
        self._ufm_url = f"http://{CTL_ADDR}:{int(port_file.read_text())}"

    def ufm_calls(self) -> list[dict]:
        """Every call the UFM stand-in answered or refused so far, in order (its log: method,
        path, body, user, status)."""
        log = self.base / "ufm-calls.jsonl"
        if not log.exists():
            return []
        return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]

    def ufm_members(self, pkey: str) -> list[str]:
        """The GUIDs partition key ``pkey`` (``0x102a``) holds at the UFM stand-in now, as its
        REST API answers (asked from the controller's namespace); [] for a key it has not."""
        probe = ("import base64, json, sys, urllib.request, urllib.error\n"
                 "r = urllib.request.Request(sys.argv[1], headers={'Authorization': 'Basic ' + "
                 "base64.b64encode(sys.argv[2].encode()).decode()})\n"
                 "try:\n    print(urllib.request.urlopen(r, timeout=10).read().decode())\n"
                 "except urllib.error.HTTPError as e:\n"
                 "    print('{}' if e.code == 404 else sys.exit(e.code))\n")
        r = subprocess.run(["ip", "netns", "exec", CTL_NETNS, "python3", "-c", probe,
                            f"{self._ufm_url}/ufmRest/resources/pkeys/{pkey}?guids_data=true",
                            f"{UFM_USER}:{self._ufm_password}"],
                           capture_output=True, text=True, timeout=30, check=True)
        data = json.loads(r.stdout)
        return sorted(g["guid"] if isinstance(g, dict) else g for g in data.get("guids", []))

    def _prepare_node(self, node: ClusterNode) -> None:
        base = node.base
        for fixed, here in node.ns.mounts.items():
            if fixed == Path("/etc/hosts"):     # a file, written below
                continue
            if str(fixed) in _SEEDED:
                _seed(fixed, here, _SEEDED[str(fixed)])
            else:
                here.mkdir(parents=True, exist_ok=True)
                os.chmod(here, 0o755)
        (node.path("/etc/libvirt/qemu") / "networks" / "autostart").mkdir(parents=True,
                                                                        exist_ok=True)
        (node.path("/etc/libvirt/qemu") / "autostart").mkdir(exist_ok=True)
        hosts = ["127.0.0.1\tlocalhost", f"{CTL_ADDR}\tdgxvm-ctl"]
        hosts += [f"{_node_addr(i)}\t{n}" for i, n in enumerate(self.names)]
        (base / "hosts").write_text("\n".join(hosts) + "\n")
        os.chmod(base / "hosts", 0o644)
        for d in ("images", "containers"):
            (node.path("/var/lib/dgxvm") / d).mkdir(mode=0o755)
        self.run_dgxvm("simulate", self.machines[node.name], "--out", str(node.sysfs),
                       "--serial", str(node.index + 1))
        node.path(CONFIG_PATH).write_text(self.config_text(node))
        if self.jobnet:           # the same root-only secret on every node, as a site has it
            secret = node.path(JOBNET_SECRET)
            fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(self._jobnet_secret)
        if self.ib == "ufm":      # the site's UFM credentials, root's alone on every node
            fd = os.open(node.path(UFM_CREDENTIALS), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(f"{UFM_USER}:{self._ufm_password}\n")

    def config_text(self, node: ClusterNode) -> str:
        """The node's /etc/dgxvm/dgxvm.toml: its own paths are the fixed ones (its mount
        namespace makes them its own); the shared work dir may be shared into VMs; Fabric
        Manager (shared-NVSwitch machines: DGX A100, H100) is the repo's fmpm stand-in over
        a state file of the node's."""
        return (f'[host]\nsysfs_root = "{node.sysfs}"\nstate_dir = "/var/lib/dgxvm"\n\n'
                f'[libvirt]\nuri = "qemu:///system"\ndomain_type = "qemu"\n'
                f'network = "{self.network}"\nnetwork_cidr = "{self.cidr}"\n'
                f'ready_timeout_s = 300.0\nshutdown_timeout_s = 30.0\n\n'
                f'[images]\nstore = "/var/lib/dgxvm/images"\n\n'
                f'[vm]\nshare = "virtiofs"\nshare_roots = ["{self.workdir}"]\nfit_vcpus = 1\n'
                f'fit_memory_mib = 384\n\n'
                f'[containers]\ncache_dir = "/var/lib/dgxvm/containers"\n'
                f'insecure_registries = ["{REGISTRY}"]\n\n'
                f'[fabric]\nfmpm = "env FMPM_STANDIN_STATE=/var/lib/dgxvm/fm-state.json '
                f'{FMPM_STANDIN}"\n' + self.ib_text() + self.jobnet_text() + self.config_extra)

    def ib_text(self) -> str:
        """``[ib]`` against the UFM stand-in and partition ``batch`` with VFs, when ib="ufm"."""
        if self.ib != "ufm":
            return ""
        return (f'\n[ib]\nbackend = "ufm"\nurl = "{self._ufm_url}"\n'
                f'credentials_file = "{UFM_CREDENTIALS}"\n\n[partitions.batch]\nib = "vf"\n')

    def jobnet_text(self) -> str:
        """``[jobnet]`` when the cluster has the job fabric: every node's underlay address,
        the SSH secret's path (the same file on every node)."""
        if not self.jobnet:
            return ""
        nodes = "".join(f'{n} = "{_node_addr(i)}"\n' for i, n in enumerate(self.names))
        return (f'\n[jobnet]\nenabled = true\nssh_secret = "{JOBNET_SECRET}"\n\n'
                f'[jobnet.nodes]\n{nodes}')

    def _mount_points(self) -> None:
        """Each node binds over these paths: the ones the host lacks (no slurm-dgxvm installed:
        no /etc/dgxvm) are made, empty, and removed by stop()."""
        for fixed in [*NODE_MOUNTS, "/etc/hosts"]:
            path = Path(fixed)
            missing = [p for p in (path, *path.parents) if not p.exists()]
            for p in reversed(missing):
                p.mkdir(mode=0o755)
                self._created_dirs.insert(0, p)

    def _start_libvirt(self, node: ClusterNode, manifest: Path | None) -> None:
        from slurm_dgxvm.lifecycle import libvirt_hook_script
        from slurm_dgxvm.netfilter import network_hook_script
        dgxvm, config = str(self.dgxvm), str(CONFIG_PATH)
        node.stack = LibvirtStack(
            node.base / "libvirt", netns=node.ns.netns, mount_ns=node.ns.mount_ns,
            mounts=node.ns.mounts, hook=libvirt_hook_script(dgxvm, config),
            network_hook=network_hook_script(dgxvm, config))
        node.stack.start()
        if manifest is not None:
            node.dgxvm_cmd("image", "install", str(manifest), "--name", "testguest", "--default")

    def gres_conf(self) -> str:
        """Every node's lines (``NodeName=``) from ``dgxvm gres-conf``, each node's device
        files under the Slurm run dir (symlinks to /dev/null, made by SlurmCluster)."""
        out = []
        for node in self.nodes.values():
            out.append(self.run_dgxvm("--sysfs-root", str(node.sysfs), "gres-conf", "--dev-dir",
                                      str(self.base / "slurm" / "dev" / node.name / "vfio"),
                                      "--node-name", node.name).stdout)
        return "".join(out)

    def _start_slurm(self) -> None:
        wrappers = hook_wrappers(self.base / "hooks", self.dgxvm, CONFIG_PATH)
        slurm_nodes = [SlurmNode(n.name, n.addr, SHAPES[self.machines[n.name]],
                                 tuple(n.ns.enter), n.ns.netns) for n in self.nodes.values()]
        self.cluster = SlurmCluster(
            self.base / "slurm", netns=CTL_NETNS, nodes=slurm_nodes, ctld_addr=CTL_ADDR,
            own_address=False, gres_conf=self.gres_conf(),
            prolog=str(self._prolog or wrappers[0]), epilog=str(self._epilog or wrappers[1]),
            prolog_epilog_timeout_s=600, batch_start_timeout_s=600, extra_conf=self.slurm_extra)
        self.cluster.start()
        self.cluster.add_user(self.user)
        self.jobs = Jobs(self.cluster, user=self.user, workdir=self.workdir, config=None,
                         dgxvm=dgxvm_for_users(self.base / "dgxvm-for-users"))

    def run_dgxvm(self, *args: str) -> subprocess.CompletedProcess:
        """``dgxvm ARGS`` here (not on a node): simulate, gres-conf."""
        r = subprocess.run([str(self.dgxvm), *args], capture_output=True, text=True,
                           timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"dgxvm {' '.join(args)}: {r.stderr.strip()}")
        return r

    def wait_idle(self, timeout: float = 120, *, drained_fails: bool = True) -> None:
        """Every node back to idle (a drained node fails at once)."""
        deadline = time.monotonic() + timeout
        for name in self.names:
            self.cluster.wait_idle(max(1.0, deadline - time.monotonic()),
                                   drained_fails=drained_fails, node=name)

    # -- stop ----------------------------------------------------------------------------------
    def _stop_at_exit(self) -> None:
        try:
            self.stop()
        except RuntimeError as exc:
            print(f"harness.cluster: {exc}", flush=True)

    def stop(self) -> None:
        """Slurm, then per node: VMs left, libvirt, namespaces; then the underlay, the dirs,
        the user. Idempotent; raises RuntimeError after doing all it can if something had to
        be forced or was left over (``stop_problems``)."""
        t0 = time.monotonic()
        problems: list[str] = []
        if self.cluster is not None:
            try:
                self.cluster.stop()
            except RuntimeError as exc:
                problems.append(str(exc))
            self.cluster = None
        for node in self.nodes.values():
            if node.stack is not None:
                if node.stack.pids().get("libvirtd"):
                    vms = node.path("/var/lib/dgxvm") / "vms"
                    for name in sorted(p.name for p in vms.glob("*")):
                        r = node.dgxvm_cmd("delete", "--domain", name, check=False)
                        if r.returncode != 0:
                            problems.append(f"{node.name}: dgxvm delete {name}: "
                                            f"{r.stderr.strip()}")
                    for verb in ("net-destroy", "net-undefine"):
                        node.run(["virsh", "-c", "qemu:///system", verb, self.network])
                try:
                    node.stack.stop()
                except RuntimeError as exc:
                    problems.append(f"{node.name}: {exc}")
                node.stack = None
            node.ns.stop(problems)
        if self._services is not None:
            self._services.stop("ufm-standin", 5.0, problems)
            self._services.close_logs()
            self._services = None
        for netns in [n for n in (CTL_NETNS, UNDERLAY_NETNS) if n in self._netns]:
            if delete_netns_if_empty(netns, problems):
                self._netns.remove(netns)
        for path in list(self._created_dirs):
            try:
                path.rmdir()
                self._created_dirs.remove(path)
            except OSError as exc:
                problems.append(f"mount point {path} made by start(): {exc}")
        left = self._netns + [n.ns.netns for n in self.nodes.values() if n.ns.held]
        if self.base is not None and not left:
            shutil.rmtree(self.base, ignore_errors=True)
            self.base = None
        if self.created_user:
            subprocess.run(["userdel", "--remove", self.user], capture_output=True, timeout=60)
            self.created_user = False
        if self._lock_fd is not None and not left:   # kept while a namespace of ours is left
            drop_lock(self._lock_fd)
            self._lock_fd = None
        if self._atexit:
            atexit.unregister(self._stop_at_exit)
            self._atexit = False
        self.timings["stop_s"] = round(time.monotonic() - t0, 2)
        self.stop_problems = problems
        if problems:
            raise RuntimeError("LocalCluster.stop: " + "; ".join(problems))


def main(argv: list[str] | None = None) -> int:
    """``python -m harness.cluster``: start a local cluster, hold it until Ctrl-C."""
    import argparse
    ap = argparse.ArgumentParser(prog="python -m harness.cluster", description=main.__doc__)
    ap.add_argument("--nodes", default="dgxa,dgxb", help="comma-separated node names")
    ap.add_argument("--machine", default="dgx-h100", choices=sorted(SHAPES))
    ap.add_argument("--user", default="dgxvmmn")
    ap.add_argument("--no-guest", action="store_true", help="no test guest (Slurm only)")
    args = ap.parse_args(argv)
    c = LocalCluster(nodes=tuple(args.nodes.split(",")), machine=args.machine, user=args.user,
                     guest=not args.no_guest)
    with c:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        first = c.nodes[c.names[0]]
        print(f"cluster up in {c.timings['start_s']:.2f} s ({c.timings}): {c.base}\n"
              f"  clients:  ip netns exec {CTL_NETNS} env SLURM_CONF={c.cluster.slurm_conf} "
              f"sinfo\n  on a node: {' '.join(first.ns.enter)} virsh -c qemu:///system list\n"
              f"  dgxvm under test: {c.dgxvm} ({'installed' if installed_dgxvm() else 'checkout'})",
              flush=True)
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    print(f"stopped in {c.timings['stop_s']:.2f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
