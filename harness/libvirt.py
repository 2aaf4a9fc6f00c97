"""A local, throw-away libvirt stack (virtlogd + libvirtd) inside a network namespace.

For integration tests, the demo and benchmarks::

    with LibvirtStack(run_dir) as stack:
        conn = libvirt.open(stack.uri)          # qemu:///system, served by our libvirtd
        ...

What it does (see harness/README.md for the why):

* refuses to start when a libvirtd or virtlogd is already running or answering: only one
  system libvirtd can exist (fixed socket and pid-file paths), and the harness never stops a
  daemon it did not start;
* creates the network namespace ``netns`` and runs ``virtlogd`` and ``libvirtd`` in the
  foreground inside it (``ip netns exec NS ...``), as children of this process, so the bridges,
  dnsmasq, nftables rules and guest NICs of every libvirt network live in that namespace only;
* gives libvirtd an empty ``/etc/libvirt/qemu`` of its own (``RUN_DIR/etc-libvirt-qemu``,
  bound in its mount namespace): persistent definitions live and die with the stack, and what
  an interrupted earlier run left in the host's directory is never loaded;
* hides the host's ``/etc/libvirt/hooks/qemu.d`` and ``network.d`` (an installed
  slurm-dgxvm's hooks) from its libvirtd behind an empty directory;
* optionally installs a qemu hook script (``/etc/libvirt/hooks/qemu``) and a network hook
  script (``/etc/libvirt/hooks/network``) before libvirtd starts;
* or, for one node of a local cluster (harness/cluster.py: ``mount_ns`` and ``mounts``), runs
  them inside that node's namespaces, where the node's own directories are bound over
  /run/libvirt, /var/lib/libvirt, /etc/libvirt/hooks ...: one stack per node, several per host;
* ``stop()`` destroys every running domain and active network, stops both daemons by PID, kills
  by PID any QEMU or dnsmasq of this stack that survived, deletes the namespace, restores the
  hooks. Persistent domains and networks are NOT undefined (tests undefine what they define);
  their definitions stay in ``RUN_DIR/etc-libvirt-qemu``, never in the host's /etc.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import stat
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import libvirt

from .daemons import Daemons, stop_pids
from .proc import alive as _alive
from .proc import create_netns, delete_netns_if_empty, drop_lock, take_lock
from .proc import exe as _exe
from .proc import netns_inode_of_pid as _netns_inode_of_pid
from .proc import socket_answers as _socket_answers
from .proc import stat as _stat

LIBVIRT_SOCK = Path("/run/libvirt/libvirt-sock")
VIRTLOGD_SOCK = Path("/run/libvirt/virtlogd-sock")
PID_FILES = {"libvirtd": Path("/run/libvirtd.pid"), "virtlogd": Path("/run/virtlogd.pid")}
QEMU_PID_DIR = Path("/run/libvirt/qemu")
# libvirt 9.0 writes dnsmasq's pid file under /run/libvirt/network; older releases used
# /var/lib/libvirt/dnsmasq. Both are read.
DNSMASQ_PID_DIRS = (Path("/run/libvirt/network"), Path("/var/lib/libvirt/dnsmasq"))
HOOK_PATH = Path("/etc/libvirt/hooks/qemu")
NETWORK_HOOK_PATH = Path("/etc/libvirt/hooks/network")
# The qemu driver's persistent domain and network definitions (libvirt 9.0, qemu:///system).
QEMU_CONFIG_DIR = Path("/etc/libvirt/qemu")
# Held (flock) for a stack's lifetime: two harness users cannot race on the namespace.
LOCK_PATH = Path("/run/dgxvm-libvirt-harness.lock")
KVM_DEVICE = Path("/dev/kvm")
KVM_MAJOR, KVM_MINOR = 10, 232
KVM_GROUP = "kvm"
# A node's stack (mount_ns given): its daemons' pid files, in the node's own /run/libvirt, and
# a lock per namespace (one stack per node).
NODE_PID_FILES = {"libvirtd": Path("/run/libvirt/libvirtd.pid"),
                  "virtlogd": Path("/run/libvirt/virtlogd.pid")}
NODE_LOCK = "/run/dgxvm-libvirt-harness.{netns}.lock"

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
LEFTOVER_KILL_AFTER_S = 5.0  # a QEMU or dnsmasq left by libvirt: SIGTERM, then SIGKILL


def _child_kind(exe: str) -> str | None:
    """"qemu" or "dnsmasq" for the processes libvirt runs for the stack, else None."""
    base = os.path.basename(exe)
    if base == "dnsmasq":
        return "dnsmasq"
    return "qemu" if base.startswith("qemu-system") else None


def _read_pid_file(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _daemon_env() -> dict[str, str]:
    """Our environment without libvirt's variables (they would steer the daemons)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LIBVIRT_", "VIR"))}
    env["LC_ALL"] = "C"
    return env


def _open_with_timeout(uri: str, timeout: float) -> libvirt.virConnect | None:
    """``libvirt.open`` in a daemon thread, so a wedged libvirtd cannot hang ``stop()``."""
    box: dict = {}

    def target():
        try:
            box["conn"] = libvirt.open(uri)
        except libvirt.libvirtError as exc:
            box["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    return box.get("conn")


class LibvirtStack:
    """virtlogd + libvirtd of our own, inside network namespace ``netns``.

    ``kvm``: what the stack's libvirtd sees at ``/dev/kvm`` (bind-mounted in libvirtd's private
    mount namespace, the host's node is untouched). ``False`` (default) shows a node that no
    driver answers, so KVM is consistently unavailable and guests must be ``type='qemu'`` (TCG);
    ``True`` shows the real KVM device with Debian's usual ``root:kvm 0660``. Either way
    libvirt's QEMU capability cache stays valid: with the host's ``root:root 0600`` node,
    libvirt 9.0 re-probes QEMU on every lookup and a tiny domain takes ~40 s to start.

    ``mount_ns`` (``/proc/PID/ns/mnt`` of a process holding it and the UTS namespace beside
    it) and ``mounts`` make it one node's stack (harness/cluster.py): the network namespace
    ``netns`` must exist, the daemons run through ``nsenter --mount=MOUNT_NS
    --uts=/proc/PID/ns/uts -- ip netns exec NS`` (so libvirtd's private mount
    namespace is a child of the node's), ``mounts`` says where this process sees each fixed
    path the node binds its own directory over (``{Path("/run/libvirt"): node_dir, ...}``):
    sockets, pid files (``--pid-file`` in the node's /run/libvirt), QEMU and dnsmasq pid files
    and the hooks are read and written there, the lock is per namespace, and :attr:`uri`
    names the node's socket. Without them it is the host's one system stack.
    """

    def __init__(self, run_dir: Path, *, netns: str = "dgxvm-test", hook: str | None = None,
                 network_hook: str | None = None, kvm: bool = False,
                 start_timeout: float = START_TIMEOUT_S, mount_ns: Path | None = None,
                 mounts: Mapping[Path, Path] | None = None):
        self.run_dir = Path(run_dir)
        self.netns = netns
        self.hook = hook
        self.network_hook = network_hook
        self.kvm = kvm
        self.start_timeout = start_timeout
        self.mount_ns = mount_ns
        self.mounts = {Path(k): Path(v) for k, v in (mounts or {}).items()}
        enter = ["ip", "netns", "exec", netns]
        if mount_ns is not None:   # and the node's hostname (its UTS namespace) beside it
            uts = Path(mount_ns).with_name("uts")
            enter = ["nsenter", f"--mount={mount_ns}", f"--uts={uts}", "--", *enter]
        self._pid_files = PID_FILES if mount_ns is None else NODE_PID_FILES
        self._daemons = Daemons(enter=enter, env=_daemon_env,
                                log_dir=self.run_dir, log_suffix=".log")
        self._netns_created = False
        # hook path -> its backup in run_dir (None: there was none, remove ours on stop)
        self._hooks_installed: dict[Path, Path | None] = {}
        self._hook_dir_created = False
        self._kvm_node: Path | None = None
        self._atexit_registered = False
        self._lock_fd: int | None = None
        # QEMU/dnsmasq processes observed, for stop(): pid -> (kind, start time)
        self._seen_children: dict[int, tuple[str, int]] = {}
        self.timings: dict[str, float] = {}
        self.stop_problems: list[str] = []

    @property
    def uri(self) -> str:
        """How this process reaches the stack's libvirtd: ``qemu:///system``, or for a node's
        stack the same with ``?socket=`` naming the node's socket (inside the node it is
        plain ``qemu:///system``)."""
        if self.mount_ns is None:
            return "qemu:///system"
        return f"qemu:///system?socket={self._host(LIBVIRT_SOCK)}"

    def _host(self, path: Path) -> Path:
        """Where this process sees ``path`` of the stack's mount namespace."""
        for fixed, here in self.mounts.items():
            if path == fixed or fixed in path.parents:
                return here / path.relative_to(fixed)
        return path

    # -- context manager -------------------------------------------------------------------

    def __enter__(self) -> LibvirtStack:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- public ----------------------------------------------------------------------------

    def start(self) -> LibvirtStack:
        if len(self._daemons):
            raise RuntimeError("LibvirtStack already started")
        t0 = time.monotonic()
        self._lock()
        try:
            self._refuse_if_running()
        except BaseException:
            self._unlock()
            raise
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if not self._atexit_registered:
            atexit.register(self.stop)
            self._atexit_registered = True
        try:
            self._create_netns()
            self._make_kvm_node()
            for path, text in ((HOOK_PATH, self.hook), (NETWORK_HOOK_PATH, self.network_hook)):
                if text is not None:
                    self._install_hook(self._host(path), text)
            self._daemons.spawn("virtlogd", ["virtlogd", *self._pid_file_args("virtlogd")])
            self._daemons.wait_for("virtlogd",
                                   lambda: _socket_answers(self._host(VIRTLOGD_SOCK)),
                                   "virtlogd socket", self.start_timeout)
            # `ip netns exec` already gave the daemon a private (slave) mount namespace;
            # the bind mounts over /dev/kvm and /etc/libvirt/qemu stay in it. `exec` keeps
            # the Popen pid.
            self._spawn_libvirtd()
            for name, daemon in self._daemons.items():
                exe = _exe(daemon.pid)
                if os.path.basename(exe) != name:
                    raise RuntimeError(f"pid {daemon.pid} is {exe!r}, expected {name}")
            (self.run_dir / "stack.json").write_text(json.dumps(
                {"netns": self.netns, "pids": self.pids()}, indent=2) + "\n")
        except BaseException as exc:
            try:
                self.stop()
            except RuntimeError as stop_exc:  # keep start()'s error as the one raised
                exc.add_note(f"and then: {stop_exc}")
            raise
        self.timings["start_s"] = time.monotonic() - t0
        return self

    def stop(self) -> None:
        """Idempotent; safe after a partial start. Raises RuntimeError, after doing every
        cleanup step it can, when something of this stack could not be cleaned up."""
        t0 = time.monotonic()
        problems: list[str] = []
        if self._daemons.running("libvirtd"):
            self._destroy_everything(problems)
        self.timings["stop_destroy_s"] = time.monotonic() - t0
        self._note_children()
        for name in ("libvirtd", "virtlogd"):
            self._daemons.stop(name, STOP_TIMEOUT_S, problems)
        self.timings["stop_daemons_s"] = time.monotonic() - t0 - self.timings["stop_destroy_s"]
        self._daemons.close_logs()
        self._kill_leftovers(problems)
        self._delete_netns(problems)
        self._restore_hook(problems)
        if self._kvm_node is not None:
            self._kvm_node.unlink(missing_ok=True)
            self._kvm_node = None
        if not self._netns_created:  # keep the lock while a namespace of ours is left
            self._unlock()
        if self._atexit_registered:
            atexit.unregister(self.stop)
            self._atexit_registered = False
        self.timings["stop_s"] = time.monotonic() - t0
        self.stop_problems = problems
        if problems:
            raise RuntimeError("LibvirtStack.stop: " + "; ".join(problems))

    def _spawn_libvirtd(self) -> None:
        config = self._make_config_dir()
        # The host's hook directories (an installed slurm-dgxvm's qemu.d/ and network.d/ hooks,
        # which act with the host's /etc/dgxvm config) are hidden behind an empty directory:
        # this stack's domains and networks run only the hooks the stack installs.
        empty = self.run_dir / "no-host-hooks"
        empty.mkdir(mode=0o755, exist_ok=True)
        script = ('mount --bind "$1" /dev/kvm && mount --bind "$2" "$3" && '
                  'for d in "$5"/qemu.d "$5"/network.d; do '
                  '[ ! -d "$d" ] || mount --bind "$4" "$d" || exit 1; done && shift 5 && '
                'exec libvirtd "$@"')
        self._daemons.spawn("libvirtd", ["sh", "-c", script, "sh", str(self._kvm_node),
                                         str(config), str(QEMU_CONFIG_DIR), str(empty),
                                         str(HOOK_PATH.parent),
                                         *self._pid_file_args("libvirtd")])
        self._daemons.wait_for("libvirtd", self._libvirt_answers, "qemu:///system",
                               self.start_timeout)

    def _pid_file_args(self, name: str) -> list[str]:
        """A node's daemons write their pid files in the node's /run/libvirt: the defaults
        (/run/libvirtd.pid, /run/virtlogd.pid) are the host's, locked by whichever daemon
        wrote them first."""
        return [] if self.mount_ns is None else [f"--pid-file={self._pid_files[name]}"]

    def restart_libvirtd(self) -> None:
        """Stop libvirtd by its pid (SIGTERM, as `systemctl restart libvirtd` does) and start
        it again as :meth:`start` does, while domains run: QEMU runs on without it (libvirtd
        daemonizes it) and the new libvirtd reconnects to it from /run/libvirt/qemu. The
        fault-injection tests restart it under running VMs."""
        problems: list[str] = []
        self._daemons.stop("libvirtd", STOP_TIMEOUT_S, problems)
        if problems:
            raise RuntimeError("LibvirtStack.restart_libvirtd: " + "; ".join(problems))
        self._spawn_libvirtd()

    def pids(self) -> dict[str, int]:
        """``{"virtlogd": pid, "libvirtd": pid}`` of the daemons this stack started and that
        are still alive."""
        return self._daemons.pids()

    def qemu_pids(self) -> list[int]:
        """Pids of live QEMU processes libvirt runs (from /run/libvirt/qemu/*.pid)."""
        out = []
        for pid_file in sorted(self._host(QEMU_PID_DIR).glob("*.pid")):
            pid = _read_pid_file(pid_file)
            if pid is None or pid_file.name == "driver.pid":
                continue
            if _alive(pid) and os.path.basename(_exe(pid)).startswith("qemu-system"):
                out.append(pid)
        return out

    def dnsmasq_pids(self) -> list[int]:
        """Pids of live dnsmasq processes in this stack's namespace (both of each network's
        processes: libvirt's pid file names only the parent)."""
        return [pid for pid in self._daemons.members() if _child_kind(_exe(pid)) == "dnsmasq"]

    # -- start helpers ---------------------------------------------------------------------

    def _lock(self) -> None:
        if self._lock_fd is not None:
            return
        path = LOCK_PATH if self.mount_ns is None else Path(NODE_LOCK.format(netns=self.netns))
        self._lock_fd = take_lock(path, "another LibvirtStack holds {path} (pid {holder}); "
                                             "only one system libvirtd can run at a time")

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            drop_lock(self._lock_fd)
            self._lock_fd = None

    def _refuse_if_running(self) -> None:
        found = []
        for path in (self._host(LIBVIRT_SOCK), self._host(VIRTLOGD_SOCK)):
            if _socket_answers(path):
                found.append(f"{path} answers")
        for path in map(self._host, self._pid_files.values()):
            pid = _read_pid_file(path)
            if pid is not None and _alive(pid):
                found.append(f"{path} names live pid {pid} ({_exe(pid) or '?'})")
        if found:
            raise RuntimeError(
                "a libvirtd/virtlogd is already running (only one system libvirtd can run; the "
                "harness never stops a daemon it did not start): " + "; ".join(found))

    def _create_netns(self) -> None:
        if self.mount_ns is not None:   # a node's: the cluster made it, with its mounts
            path = Path("/run/netns") / self.netns
            if not path.exists():
                raise RuntimeError(f"network namespace {self.netns} does not exist")
            self._daemons.netns_inode = os.stat(path).st_ino
            return
        self._daemons.netns_inode = create_netns(self.netns)
        self._netns_created = True
        # No `sysctl net.ipv4.ip_forward=1` here: libvirt sets it itself when it starts a NAT
        # network, and since libvirtd runs inside the namespace it writes the namespace's copy
        # (measured: 1 inside, host stays 0).

    def _make_kvm_node(self) -> None:
        node = self.run_dir / "kvm-node"
        node.unlink(missing_ok=True)
        if self.kvm:
            os.mknod(node, stat.S_IFCHR | 0o660, os.makedev(KVM_MAJOR, KVM_MINOR))
            import grp
            os.chown(node, 0, grp.getgrnam(KVM_GROUP).gr_gid)
            os.chmod(node, 0o660)
        else:
            # char 0:0: no driver behind it, open() gives ENXIO. libvirt sees /dev/kvm exists
            # but is not accessible to libvirt-qemu (0600 root), and QEMU's probe (kvm:tcg)
            # falls back to TCG: consistent, so the capability cache holds.
            os.mknod(node, stat.S_IFCHR | 0o600, os.makedev(0, 0))
        self._kvm_node = node

    def _make_config_dir(self) -> Path:
        """An empty directory of this stack's own, bound over /etc/libvirt/qemu in libvirtd's
        mount namespace: the domains and networks defined in this stack are written there and
        go with run_dir, and what an interrupted earlier run (or anyone else) left in the
        host's /etc/libvirt/qemu is never loaded. The stop of a run that was cut off (a machine
        powered down mid-test) left a persistent domain there, which the next run's tests
        then met as a stranger."""
        self._host(QEMU_CONFIG_DIR).mkdir(parents=True, exist_ok=True)
        config = self.run_dir / "etc-libvirt-qemu"
        (config / "networks" / "autostart").mkdir(parents=True, exist_ok=True)
        (config / "autostart").mkdir(exist_ok=True)
        return config

    def _install_hook(self, path: Path, text: str) -> None:
        backup = None
        if path.exists() or path.is_symlink():
            backup = self.run_dir / f"{path.name}-hook.orig"
            shutil.copy2(path, backup, follow_symlinks=False)
        if not path.parent.exists():
            path.parent.mkdir(parents=True)
            self._hook_dir_created = True
        tmp = path.with_name(f".{path.name}.dgxvm-harness")
        tmp.write_text(text)
        tmp.chmod(0o755)
        os.replace(tmp, path)
        self._hooks_installed[path] = backup

    def _libvirt_answers(self) -> bool:
        if not _socket_answers(self._host(LIBVIRT_SOCK)):
            return False
        conn = _open_with_timeout(self.uri, 5.0)
        if conn is None:
            return False
        conn.close()
        return True

    # -- stop helpers ----------------------------------------------------------------------

    def _destroy_everything(self, problems: list[str]) -> None:
        conn = _open_with_timeout(self.uri, 10.0)
        if conn is None:
            problems.append("could not connect to libvirtd to destroy domains and networks")
            return
        try:
            self._note_children()
            # in parallel: libvirt waits ~2 s here for each QEMU to exit after SIGTERM
            def destroy(dom):
                try:
                    dom.destroy()
                except libvirt.libvirtError as exc:
                    problems.append(f"destroy domain {dom.name()}: {exc}")
            doms = conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
            if doms:
                with ThreadPoolExecutor(max_workers=min(16, len(doms))) as pool:
                    list(pool.map(destroy, doms))
            for net in conn.listAllNetworks(libvirt.VIR_CONNECT_LIST_NETWORKS_ACTIVE):
                try:
                    net.destroy()
                except libvirt.libvirtError as exc:
                    problems.append(f"destroy network {net.name()}: {exc}")
        finally:
            conn.close()

    def _note_children(self) -> None:
        """Remember QEMU and dnsmasq processes of this stack (pid files, verified by exe and
        by being in our namespace), so stop() can check them after the daemons are gone."""
        candidates = {pid: "qemu" for pid in self.qemu_pids()}
        for d in DNSMASQ_PID_DIRS:
            for pid_file in self._host(d).glob("*.pid"):
                pid = _read_pid_file(pid_file)
                if pid and _alive(pid) and _child_kind(_exe(pid)) == "dnsmasq":
                    candidates[pid] = "dnsmasq"
        for pid in self._daemons.members():
            kind = _child_kind(_exe(pid))
            if kind is not None:
                candidates[pid] = kind
        for pid, kind in candidates.items():
            st = _stat(pid)
            if st is not None and _netns_inode_of_pid(pid) == self._daemons.netns_inode:
                self._seen_children[pid] = (kind, st.start)

    def _kill_leftovers(self, problems: list[str]) -> None:
        """Stop by pid and start time the QEMU and dnsmasq processes of this stack that
        libvirt left: those noted while libvirtd ran, and any still in the namespace."""
        left = {pid: (kind, start) for pid, (kind, start) in self._seen_children.items()
                if _alive(pid, start) and _child_kind(_exe(pid)) == kind}
        for pid, st in self._daemons.members().items():
            kind = _child_kind(_exe(pid))
            if kind is not None:
                left[pid] = (kind, st.start)
        if left:
            problems.append("survived libvirt's cleanup, killed by pid: "
                            + ", ".join(f"{k} {p}" for p, (k, _) in sorted(left.items())))
            stop_pids({pid: start for pid, (_, start) in left.items()}, LEFTOVER_KILL_AFTER_S,
                      problems)
        self._seen_children.clear()

    def _delete_netns(self, problems: list[str]) -> None:
        if not self._netns_created:
            return
        if not delete_netns_if_empty(self.netns, problems):
            return
        self._netns_created = False
        self._daemons.netns_inode = None

    def _restore_hook(self, problems: list[str]) -> None:
        for path, backup in list(self._hooks_installed.items()):
            try:
                if backup is not None:
                    tmp = path.with_name(f".{path.name}.dgxvm-harness")
                    shutil.copy2(backup, tmp, follow_symlinks=False)
                    os.replace(tmp, path)
                else:
                    path.unlink(missing_ok=True)
            except OSError as exc:
                problems.append(f"restoring {path}: {exc}")
                continue
            del self._hooks_installed[path]
        if not self._hooks_installed and self._hook_dir_created:
            try:
                self._host(HOOK_PATH.parent).rmdir()
            except OSError:
                pass
            self._hook_dir_created = False


def main(argv: list[str] | None = None) -> int:
    """``python -m harness.libvirt RUN_DIR [--netns NS]``: start the stack, wait for Ctrl-C."""
    import argparse
    ap = argparse.ArgumentParser(prog="python -m harness.libvirt", description=main.__doc__)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--netns", default="dgxvm-test")
    ap.add_argument("--hook", type=Path, help="file with a qemu hook script to install")
    ap.add_argument("--network-hook", type=Path,
                    help="file with a network hook script to install")
    args = ap.parse_args(argv)
    hook = args.hook.read_text() if args.hook else None
    network_hook = args.network_hook.read_text() if args.network_hook else None
    with LibvirtStack(args.run_dir, netns=args.netns, hook=hook,
                      network_hook=network_hook) as stack:
        # Block only now: children inherit the signal mask, and virtlogd would then ignore the
        # SIGTERM that stop() sends it.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        print(f"libvirt stack up in {stack.timings['start_s']:.2f} s: uri={stack.uri} "
              f"netns={stack.netns} pids={stack.pids()} logs={stack.run_dir}", flush=True)
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    print(f"stopped in {stack.timings['stop_s']:.2f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
