"""Load and soak on one simulated DGX-2 node: what ``benchmarks/load_bench.py``,
``benchmarks/soak_bench.py`` and ``tests/integration/test_soak_smoke.py`` share.

* :class:`Node`: what the checks need of a node, from a :class:`~harness.node.LocalNode`, the
  integration tests' ``slurm_node`` fixture, or a libvirt-only bench node.
* The node's truth: :func:`leftovers` (domains, QEMU processes, VM directories, ledger entries,
  DHCP reservations, fault points not fired), :func:`domains` (each libvirt domain's GPUs and
  vCPU pins, read back from libvirt) and :func:`ledger_vs_libvirt`.
* Load: :func:`load` starts N ``dgxvm prolog`` processes at the same moment with each job's
  Slurm environment (accounting off: no Slurm needed), checks what they made, then N
  ``dgxvm epilog`` at once, and checks that nothing is left.
* Soak: :class:`Soak` runs a mix of 1/2/4/8-GPU jobs through the node's Slurm with a fault
  every K jobs (:data:`FAULTS`), recovers from each as an admin would, and checks leaks, double
  assignments (a :class:`Sampler` thread), sacct, the quarantine, and host memory and file
  descriptors of the node's daemons.

Every figure is a :class:`Check` (name, figure, target, ok); :func:`print_checks` prints them.
Processes are found and signalled by pid (a pidfd), never by name.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pwd
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import libvirt

from slurm_dgxvm.design.spec import XMLNS
from slurm_dgxvm.ledger import Ledger, job_key
from slurm_dgxvm.ranges import parse_index_list
from slurm_dgxvm.slurm.accounting import decode, parse_stages
from slurm_dgxvm.observe.stages import ordered
from slurm_dgxvm.virt import addresses, hypervisor

from .node import default_dgxvm
from .slurm import ensure_user

#: the PATH slurmd gives a Prolog (harness/README.md, measured)
SLURMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: appended to a node's config for Prologs run without Slurm: no AdminComment to write, and
#: the hooks' one line on stderr (there is no slurmd log to append it to)
HOOKS_WITHOUT_SLURM = '\n[slurm]\naccounting = false\nlog_file = ""\n'
LOCK_TARGET_S = 0.010             # DESIGN.md: the ledger's critical section < 10 ms
Say = Callable[[str], None]


# -- results ---------------------------------------------------------------------------------------
@dataclass
class Check:
    """A correctness check (PASS/FAIL), or with ``perf`` a performance target (met/MISSED),
    which depends on the machine and fails nothing."""

    name: str
    ok: bool
    figure: str
    target: str = ""
    perf: bool = False


def print_checks(title: str, checks: Iterable[Check], say: Say = print) -> bool:
    """One line per check (PASS/FAIL or met/MISSED, figure, target); True when every
    correctness check passed."""
    checks = list(checks)
    say(f"\n{title}")
    for c in checks:
        target = f"  [target: {c.target}]" if c.target else ""
        verdict = ("met " if c.ok else "MISSED") if c.perf else ("PASS" if c.ok else "FAIL")
        say(f"  {verdict:6} {c.name}: {c.figure}{target}")
    return not failed(checks)


def failed(checks: Iterable[Check]) -> list[str]:
    """The correctness checks that failed, one line each."""
    return [f"{c.name}: {c.figure}" for c in checks if not c.ok and not c.perf]


def quantiles(values: Iterable[float]) -> str:
    """min, p50, p95 (nearest rank, as `dgxvm report`), max."""
    v = sorted(values)
    if not v:
        return "no values"
    p95 = v[max(0, math.ceil(0.95 * len(v)) - 1)]
    return (f"min {v[0]:.3f}s  p50 {statistics.median(v):.3f}s  p95 {p95:.3f}s  "
            f"max {v[-1]:.3f}s  (n={len(v)})")


def stage_checks(boots: list[float], stages: Iterable[dict[str, float]]) -> list[Check]:
    """The Prolog's time (boot_s) and each create stage's, as min/p50/p95/max lines."""
    by_stage: dict[str, list[float]] = {}
    for one in stages:
        for stage, s in one.items():
            by_stage.setdefault(stage, []).append(s)
    return [Check("Prolog time (boot_s)", bool(boots), quantiles(boots)),
            *(Check(f"  create stage {stage}", True, quantiles(v))
              for stage, v in ordered(by_stage, "create"))]


# -- the node ----------------------------------------------------------------------------------------
@dataclass
class Node:
    """A simulated DGX-2 node: where its state is, its libvirt stack, and (for the soak) its
    Slurm cluster and the :class:`~harness.node.Jobs` of its ordinary user."""

    uri: str
    network: str
    state_dir: Path
    sysfs: Path
    config: Path
    stack: object                      # harness.libvirt.LibvirtStack
    user: str
    workdir: Path
    cluster: object | None = None      # harness.slurm.SlurmCluster
    jobs: object | None = None         # harness.node.Jobs
    dgxvm: Path = field(default_factory=default_dgxvm)

    @classmethod
    def of_local(cls, node) -> Node:
        """From a started :class:`~harness.node.LocalNode`."""
        return cls(uri="qemu:///system", network=node.network, state_dir=node.state_dir,
                   sysfs=node.base / "dgx2", config=node.config, stack=node.stack,
                   user=node.user, workdir=node.workdir, cluster=node.cluster, jobs=node.jobs,
                   dgxvm=node.dgxvm)

    @classmethod
    def of_fixture(cls, slurm_node) -> Node:
        """From the integration tests' session fixture ``slurm_node``."""
        env = slurm_node.env
        return cls(uri=env.uri, network=env.network, state_dir=env.state_dir, sysfs=env.sysfs,
                   config=env.config, stack=env.stack, user=env.user,
                   workdir=slurm_node.jobs.workdir, cluster=slurm_node.cluster,
                   jobs=slurm_node.jobs, dgxvm=env.dgxvm_path)

    def dgxvm_cmd(self, *args: str, check: bool = True, timeout: float = 300,
                  config: Path | None = None) -> subprocess.CompletedProcess:
        """``dgxvm ARGS`` as root with this node's config."""
        env = {k: v for k, v in os.environ.items()
               if k not in ("DGXVM_STATE_DIR", "DGXVM_SYSFS_ROOT")}
        env["DGXVM_CONFIG"] = str(config or self.config)
        r = subprocess.run([str(self.dgxvm), *args], capture_output=True, text=True, env=env,
                           timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"dgxvm {' '.join(args)}: exit {r.returncode}: {r.stderr.strip()}")
        return r

    def records(self) -> dict[str, dict]:
        """Every VM record (``<state_dir>/vms/*/record.json``) that reads now."""
        out = {}
        for path in (self.state_dir / "vms").glob("*/record.json"):
            try:
                out[path.parent.name] = json.loads(path.read_text())
            except (OSError, ValueError):
                continue                   # being written or removed right now
        return out

    def hooks_config(self, path: Path) -> Path:
        """A copy of the node's config for Prologs run without Slurm (same state dir)."""
        path.write_text(self.config.read_text() + HOOKS_WITHOUT_SLURM)
        return path


def exit_on_sigterm() -> None:
    """SIGTERM ends the bench as Ctrl-C would (SystemExit in the main thread), so its node's
    ``with`` block stops every daemon it started; Python's default would leave them running."""
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))


@contextlib.contextmanager
def ordinary_user(name: str) -> Iterator[pwd.struct_passwd]:
    """The user ``name`` (created when missing, and then removed at the end)."""
    try:
        pwd.getpwnam(name)
        made = False
    except KeyError:
        made = True
    ensure_user(name)
    try:
        yield pwd.getpwnam(name)
    finally:
        if made:
            subprocess.run(["userdel", "--remove", name], capture_output=True, timeout=60)


# -- the node's truth --------------------------------------------------------------------------------
def failpoint_lines(node: Node) -> list[str]:
    try:
        return [ln for ln in (node.state_dir / "failpoints").read_text().splitlines() if ln]
    except FileNotFoundError:
        return []


def add_failpoint(node: Node, line: str) -> None:
    """Append ``line`` to ``<state_dir>/failpoints`` (root's, 0644, replaced atomically)."""
    path = node.state_dir / "failpoints"
    text = "".join(f"{x}\n" for x in [*failpoint_lines(node), line])
    fd, tmp = tempfile.mkstemp(dir=node.state_dir, prefix=".failpoints.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def leftovers(node: Node, *, jobs: Iterable[int] | None = None) -> list[str]:
    """What is left on the node (as test_slurm_jobs.nothing_left checks, as a list of problems):
    libvirt domains, DHCP reservations of a VM's own and address slots held on the node's
    network, QEMU processes, VM directories, ledger entries, fault points that never fired.
    ``jobs``: only what is of those jobs."""
    names = None if jobs is None else {f"job-{j}" for j in jobs}
    keys = None if jobs is None else {job_key(j) for j in jobs}
    conn = libvirt.open(node.uri)
    try:
        doms = sorted(d.name() for d in conn.listAllDomains())
        # a VM's own reservation (made before address slots); the slots' stay with the network
        hosts = sorted(name for mac, (_ip, name) in
                       (hypervisor.reservations(conn, node.network) or {}).items()
                       if not addresses.is_slot_mac(mac))
    finally:
        conn.close()
    held = sorted(addresses.held(str(node.state_dir)).values())
    vms = node.state_dir / "vms"
    dirs = sorted(p.name for p in vms.iterdir()) if vms.exists() else []
    entries = sorted(Ledger(node.state_dir).read().allocations)
    if names is not None:
        doms, hosts, held, dirs = ([x for x in xs if x in names]
                                   for xs in (doms, hosts, held, dirs))
        entries = [k for k in entries if k in keys]
    out = [f"{what} left: {items}" for what, items in
           (("domains", doms), ("DHCP reservations", hosts), ("addresses held", held),
            ("VM directories", dirs), ("ledger entries", entries)) if items]
    if names is None:
        if node.stack.qemu_pids():
            out.append(f"QEMU processes left: {node.stack.qemu_pids()}")
        if failpoint_lines(node):
            out.append(f"fault points never fired: {failpoint_lines(node)}")
    return out


@dataclass(frozen=True)
class Domain:
    """A libvirt domain as libvirt has it: dgxvm's metadata GPUs, the PCI devices passed
    through (or, fitted to this small host, the ones the fit dropped, as the domain's own
    ``<dgxvm:fitted>`` lines name them), its vCPU pins as designed (the fit's line, else the
    live ``<vcpupin>``s) and as they run."""

    name: str
    gpus: tuple[int, ...]
    gpu_pcis: tuple[str, ...]
    cpus: tuple[int, ...]
    live_pins: tuple[int, ...]


_DROPPED = re.compile(r"dropped PCI passthrough of \d+ GPU\(s\) (.*?)(?: and \d+ NVSwitch| \(not)")
_PINS = re.compile(r"vCPU pins on host CPUs (\S+) ->")


def domains(uri: str) -> dict[str, Domain]:
    conn = libvirt.open(uri)
    try:
        xmls = {d.name(): d.XMLDesc(0) for d in conn.listAllDomains()}
    finally:
        conn.close()
    out = {}
    for name, xml in xmls.items():
        root = ET.fromstring(xml)
        vm = root.find(f"metadata/{{{XMLNS}}}vm")
        gpus_text = (vm.findtext(f"{{{XMLNS}}}gpus") or "").strip() if vm is not None else ""
        fitted = [(e.text or "") for e in vm.findall(f"{{{XMLNS}}}fitted")] if vm is not None \
            else []
        pcis = []
        for a in root.findall("devices/hostdev/source/address"):
            pcis.append("{:04x}:{:02x}:{:02x}.{:x}".format(
                *(int(a.get(k), 0) for k in ("domain", "bus", "slot", "function"))))
        live = sorted({c for p in root.findall("cputune/vcpupin")
                       for c in parse_index_list(p.get("cpuset"))})
        designed = live
        for line in fitted:
            if m := _DROPPED.search(line):
                pcis += [p.strip() for p in m.group(1).split(",")]
            if m := _PINS.search(line):
                designed = sorted(parse_index_list(m.group(1)))
        out[name] = Domain(name=name, gpus=tuple(parse_index_list(gpus_text)) if gpus_text
                           else (), gpu_pcis=tuple(pcis), cpus=tuple(designed),
                           live_pins=tuple(live))
    return out


def disjoint(sets: dict[str, Iterable[int]], what: str) -> list[str]:
    """Problems where two owners share an item."""
    seen: dict[int, str] = {}
    out = []
    for owner, items in sorted(sets.items()):
        for x in items:
            other = seen.setdefault(x, owner)
            if other != owner:
                out.append(f"{what} {x} in {other} and {owner}")
    return out


def ledger_vs_libvirt(node: Node) -> list[str]:
    """Every ledger entry has its domain and every domain its entry, with the same GPUs (index
    and PCI address) and the same vCPU CPUs."""
    doms = domains(node.uri)
    allocs = {a.domain: a for a in Ledger(node.state_dir).read().allocations.values()}
    out = [f"domain {n} has no ledger entry" for n in sorted(set(doms) - set(allocs))]
    out += [f"ledger entry {allocs[n].key} has no domain {n}" for n in sorted(set(allocs) - set(doms))]
    for name in sorted(set(doms) & set(allocs)):
        d, a = doms[name], allocs[name]
        if sorted(d.gpus) != sorted(a.gpus):
            out.append(f"{name}: GPUs {list(d.gpus)} in libvirt, {list(a.gpus)} in the ledger")
        if sorted(d.gpu_pcis) != sorted(a.gpu_pcis):
            out.append(f"{name}: PCI {list(d.gpu_pcis)} in libvirt, {list(a.gpu_pcis)} in the "
                       f"ledger")
        if set(d.cpus) != set(a.cpus) and not (set(d.cpus) < set(a.cpus) and len(d.cpus) == 1):
            # a 1-vCPU fit whose first designed pin is already a real CPU has no pin line: its
            # one live pin is the only designed pin libvirt still shows
            out.append(f"{name}: vCPUs on {list(d.cpus)} in libvirt, {list(a.cpus)} in the ledger")
    return out


# -- processes ---------------------------------------------------------------------------------------
def kill_pid(pid: int, sig: int = signal.SIGKILL) -> bool:
    """Signal ``pid`` through a pidfd (the number cannot name another process meanwhile)."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return False
    try:
        signal.pidfd_send_signal(fd, sig)
        return True
    except ProcessLookupError:
        return False
    finally:
        os.close(fd)


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def qemu_of(node: Node, name: str) -> int | None:
    """The QEMU process of domain ``name`` (``guest=NAME,`` on its command line)."""
    for pid in node.stack.qemu_pids():
        if any(a.startswith(f"guest={name},") or a == f"guest={name}" for a in cmdline(pid)):
            return pid
    return None


def usage(pid: int) -> tuple[int, int, int] | None:
    """(VmRSS KiB, VmHWM KiB, open fds) of ``pid``; None when it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
    kib = {k: int(v.split()[0]) for k, v in (ln.split(":", 1) for ln in status.splitlines())
           if k in ("VmRSS", "VmHWM")}
    return kib.get("VmRSS", 0), kib.get("VmHWM", 0), fds


def hook_verb(pid: int, dgxvm: Path) -> str | None:
    """``prolog``/``epilog``/``hook`` for a hook process of this node's ``dgxvm`` (``python3
    .../dgxvm prolog``): another checkout's, on this shared machine, is not counted."""
    argv = cmdline(pid)
    for i, a in enumerate(argv[:3]):
        if a == str(dgxvm) and i + 1 < len(argv) and argv[i + 1] in ("prolog", "epilog", "hook"):
            return argv[i + 1]
    return None


class Sampler(threading.Thread):
    """Every ``period`` s: the VM records of the node (no two live VMs may share a GPU or a CPU,
    as test_slurm_jobs.Sampler checks), each VM's GPUs and when they were placed (for the
    quarantine check), and the peak RSS (VmHWM) of every dgxvm prolog/epilog/hook process seen."""

    def __init__(self, node: Node, period: float = 0.5):
        super().__init__(daemon=True)
        self.node, self.period, self.stop_evt = node, period, threading.Event()
        self.snapshots, self.max_vms = 0, 0
        self.problems: list[str] = []
        # "NAME@placed" -> (when placed, its GPUs' PCI addresses): every VM seen
        self.placed: dict[str, tuple[float, tuple[str, ...]]] = {}
        self.hook_hwm: dict[str, int] = {}                          # verb -> KiB
        self.hook_pids: set[int] = set()

    def run(self) -> None:
        while not self.stop_evt.is_set():
            self.sample()
            self.stop_evt.wait(self.period)

    def stop(self) -> None:
        self.stop_evt.set()
        self.join()

    def sample(self) -> None:
        recs = self.node.records()
        live = {n: r for n, r in recs.items() if r.get("state") in ("creating", "running")}
        self.max_vms = max(self.max_vms, len(live))
        for kind in ("gpus", "cpus"):
            for p in disjoint({n: r["allocation"][kind] for n, r in live.items()}, kind[:-1]):
                if p not in self.problems:
                    self.problems.append(p)
        for n, r in recs.items():
            a = r["allocation"]
            self.placed.setdefault(f"{n}@{a['created']}", (a["created"], tuple(a["gpu_pcis"])))
        for d in Path("/proc").iterdir():
            if d.name.isdigit() and (verb := hook_verb(int(d.name), self.node.dgxvm)):
                u = usage(int(d.name))
                if u:
                    self.hook_hwm[verb] = max(self.hook_hwm.get(verb, 0), u[1])
                    self.hook_pids.add(int(d.name))
        self.snapshots += 1


# -- load: N Prologs at once -------------------------------------------------------------------------
@dataclass
class HookRun:
    job: int
    rc: int | None                    # None: still running at the deadline (killed)
    seconds: float
    out: str


def job_environ(node: Node, job: int, slurm_gpus: str, config: Path) -> dict[str, str]:
    """What slurmd gives a Prolog/Epilog for ``job`` (slurm_dgxvm/slurm/job.py reads these)."""
    pw = pwd.getpwnam(node.user)
    return {"PATH": SLURMD_PATH, "DGXVM_CONFIG": str(config), "SLURM_JOB_ID": str(job),
            "SLURM_JOB_UID": str(pw.pw_uid), "SLURM_JOB_GID": str(pw.pw_gid),
            "SLURM_JOB_USER": node.user, "SLURM_JOB_GPUS": slurm_gpus,
            "SLURM_JOB_WORK_DIR": str(node.workdir), "SLURM_JOB_PARTITION": "batch",
            "SLURMD_NODENAME": "dgx01"}


def hooks_at_once(node: Node, verb: str, environs: dict[int, dict[str, str]],
                  deadline_s: float) -> tuple[list[HookRun], float]:
    """``dgxvm VERB`` for every job in ``environs``, as separate processes released at the same
    moment: each waits on a line of its own stdin pipe, written to all of them in one loop once
    all are spawned. Returns each run and the wall time from the release to the last exit; a
    run still going at ``deadline_s`` is SIGKILLed (by pid) and has rc None."""
    procs = {job: subprocess.Popen(
        ["sh", "-c", 'read _gate; exec "$0" "$@" </dev/null', str(node.dgxvm), verb],
        env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True) for job, env in environs.items()}
    ends: dict[int, float] = {}
    outs: dict[int, str] = {}

    def collect(job: int, p: subprocess.Popen) -> None:
        outs[job] = p.stdout.read()
        p.wait()
        ends[job] = time.monotonic()

    t0 = time.monotonic()
    for p in procs.values():
        p.stdin.write("go\n")
        p.stdin.close()
    threads = [threading.Thread(target=collect, args=(j, p), daemon=True) for j, p in procs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, t0 + deadline_s - time.monotonic()))
    runs = []
    for job, p in procs.items():
        if job not in ends:
            kill_pid(p.pid)
            p.wait()
        runs.append(HookRun(job=job, rc=p.returncode if job in ends else None,
                            seconds=ends.get(job, time.monotonic()) - t0, out=outs.get(job, "")))
    return runs, max(r.seconds for r in runs)


def load(node: Node, count: int, *, config: Path, first_job: int, deadline_s: float,
         warm: bool = False, say: Say = print) -> tuple[list[Check], dict]:
    """``count`` Prologs of 1-GPU jobs at once (job ids ``first_job``..., each with its own
    Slurm GPU index), the checks on what they made, then ``count`` Epilogs at once and the check
    that nothing is left. ``config``: the node's config with accounting off
    (:meth:`Node.hooks_config`). ``warm``: one Prolog and Epilog (job ``first_job - 1``) first,
    so that the burst meets a node that has run a job (its network defined and started) rather
    than a fresh one. Returns the checks and the figures."""
    if warm:
        for verb in ("prolog", "epilog"):
            [run], _ = hooks_at_once(node, verb, {first_job - 1: job_environ(
                node, first_job - 1, "0", config)}, deadline_s)
            if run.rc != 0:
                raise RuntimeError(f"warm-up {verb}: exit {run.rc}: {run.out.strip()[-600:]}")
        say(f"warm: job {first_job - 1}'s Prolog and Epilog ran first")
    jobs = range(first_job, first_job + count)
    say(f"{count} Prologs at once (jobs {first_job}-{first_job + count - 1}, 1 GPU each)")
    prologs, p_wall = hooks_at_once(node, "prolog", {j: job_environ(node, j, str(i % 16), config)
                                                    for i, j in enumerate(jobs)}, deadline_s)
    ready = [r for r in prologs if r.rc == 0 and f"VM job-{r.job} ready in" in r.out]
    allocs = {a.domain: a for a in Ledger(node.state_dir).read().allocations.values()}
    doms = domains(node.uri)
    recs = node.records()
    locks = [float(r["lock_s"]) for r in recs.values() if r.get("lock_s") is not None]
    boot = [float(r["boot_s"]) for r in recs.values() if r.get("boot_s")]
    guest = [float(r["create_stages"].get("ready", 0)) for r in recs.values()
             if r.get("create_stages")]
    gpus = [g for a in allocs.values() for g in a.gpus]
    mismatch = ledger_vs_libvirt(node)
    shared = disjoint({n: a.cpus for n, a in allocs.items()}, "CPU")
    shared_xml = disjoint({n: d.cpus for n, d in doms.items()}, "CPU")
    say(f"  Prologs done in {p_wall:.1f}s; VMs: {len(doms)}; ledger entries: {len(allocs)}")
    for r in prologs:
        if r not in ready:
            say(f"  job {r.job}: rc {r.rc}: {r.out.strip()[-600:]}")
    epilogs, e_wall = hooks_at_once(node, "epilog", {j: job_environ(node, j, str(i % 16), config)
                                                    for i, j in enumerate(jobs)}, deadline_s)
    left = leftovers(node)
    say(f"  Epilogs done in {e_wall:.1f}s")
    for r in epilogs:
        if r.rc != 0:
            say(f"  job {r.job} Epilog: rc {r.rc}: {r.out.strip()[-600:]}")
    max_lock = max(locks) if locks else float("nan")
    checks = [
        Check("Prologs: VM ready", len(ready) == count, f"{len(ready)}/{count}"),
        Check("no deadlock: every Prolog ended", all(r.rc is not None for r in prologs),
              f"last one after {p_wall:.1f}s", f"< {deadline_s:.0f}s"),
        Check("distinct GPUs (ledger)", len(gpus) == len(set(gpus)) == count,
              f"{len(set(gpus))} distinct of {len(gpus)} held by {len(allocs)} VMs: "
              f"{sorted(gpus)}", f"{count}"),
        # whether every VM was made is the first check's; these judge the VMs there are
        Check("disjoint core sets (ledger)", not shared,
              "; ".join(shared) or f"{sum(len(a.cpus) for a in allocs.values())} CPUs of "
                                   f"{len(allocs)} VMs, none shared"),
        Check("disjoint core sets (domain XML, designed vcpupin)", not shared_xml,
              "; ".join(shared_xml) or f"{sum(len(d.cpus) for d in doms.values())} CPUs of "
                                       f"{len(doms)} domains, none shared (live pins, fitted "
                                       f"to this host: "
                                       f"{sorted({c for d in doms.values() for c in d.live_pins})})"),
        Check("ledger = libvirt (GPUs, PCI, vCPUs; no extra entries)", not mismatch,
              "; ".join(mismatch) or f"{len(doms)} domains = {len(allocs)} entries"),
        Check("longest ledger lock hold (record lock_s)", max_lock < LOCK_TARGET_S,
              f"{max_lock * 1000:.2f} ms (median {statistics.median(locks) * 1000:.2f} ms "
              f"over {len(locks)})" if locks else "no lock_s recorded",
              f"< {LOCK_TARGET_S * 1000:.0f} ms", perf=True),
        Check("Prolog wall time, release to last VM ready", bool(ready), f"{p_wall:.1f}s"),
        Check("Epilogs: exit 0, all ended", all(r.rc == 0 for r in epilogs),
              f"{sum(r.rc == 0 for r in epilogs)}/{count} in {e_wall:.1f}s", f"< {deadline_s:.0f}s"),
        Check("nothing left after the Epilogs", not left, "; ".join(left) or "nothing"),
        *stage_checks(boot, (r["create_stages"] for r in recs.values() if r.get("create_stages"))),
    ]
    figures = {"prolog_wall_s": p_wall, "epilog_wall_s": e_wall, "lock_s": locks,
               "boot_s": boot, "guest_ready_s": guest,
               "prolog_s": sorted(r.seconds for r in prologs)}
    return checks, figures


# -- soak: jobs through Slurm, with faults -----------------------------------------------------------
#: the faults, in the order they rotate (kinds interleaved, so a short soak meets each kind):
#: ``prolog:STEP`` the Prolog SIGKILLs itself after create step STEP (failpoints), ``epilog:
#: undefine`` the Epilog after undefining the domain, ``gpu:reset-fail`` one GPU of a running
#: job refuses its reset (it must be quarantined at the job's end), ``guest:crash`` a running
#: job's QEMU is SIGKILLed
FAULTS = ("prolog:place", "epilog:undefine", "gpu:reset-fail", "guest:crash", "prolog:disks",
          "prolog:define", "prolog:start")

JOB_SCRIPT = """#!/bin/sh
# a soak job: show that its VM is there, hold it a while
dgxvm job --json > soak-$SLURM_JOB_ID.json
sleep {hold}
"""


def job_mix(n: int, seed: int = 13) -> list[int]:
    """``n`` job sizes: 1, 2, 4 and 8 GPUs in turn, each round of four shuffled."""
    rng = random.Random(seed)
    out: list[int] = []
    while len(out) < n:
        block = [1, 2, 4, 8]
        rng.shuffle(block)
        out += block
    return out[:n]


@dataclass
class SoakJob:
    id: int
    gpus: int
    fault: str | None = None
    notes: list[str] = field(default_factory=list)
    pci: str | None = None             # gpu:reset-fail: the GPU made to fail


class FaultStuck(Exception):
    pass


class Soak:
    """``Soak(node, jobs=200, fault_every=20).run()`` -> checks. See the module docstring."""

    def __init__(self, node: Node, *, jobs: int = 200, fault_every: int = 20,
                 faults: tuple[str, ...] = FAULTS, hold: float = 2.0, fault_hold: float = 15.0,
                 queue: int = 6, sample_every: int = 50, fault_timeout_s: float = 600.0,
                 job_timeout_s: float = 1800.0, clear_after: int | None = None,
                 say: Say = print, partition: str | None = None,
                 before_checks: Callable[[], None] | None = None, seed: int = 13,
                 gap: float = 0.0):
        """``partition``: the jobs' (None: the default); ``before_checks``: called when the
        stream has ended, before the checks (what the node keeps on purpose, warm VMs, is
        measured and removed there, so that it is not a leak); ``gap``: seconds at least
        between two submissions (0: as fast as the queue allows)."""
        self.node, self.say = node, say
        self.partition, self.before_checks, self.gap = partition, before_checks, gap
        sizes = job_mix(jobs, seed)
        self.plan = [(n, faults[(k // fault_every - 1) % len(faults)]
                      if fault_every and k % fault_every == 0 else None)
                     for k, n in enumerate(sizes, start=1)]
        self.hold, self.fault_hold, self.queue = hold, fault_hold, queue
        self.sample_every, self.fault_timeout_s = sample_every, fault_timeout_s
        self.job_timeout_s = job_timeout_s
        self.clear_after = clear_after if clear_after is not None else max(1, fault_every // 2)
        self.jobs: dict[int, SoakJob] = {}
        self.sampler = Sampler(node)
        self.usage: list[tuple[str, dict[str, tuple[int, int, int] | None]]] = []
        self.quarantines: list[dict] = []   # {"pci", "job", "since", "cleared"}
        self.problems: list[str] = []      # a fault not recovered as documented
        self.stuck_jobs: list[str] = []    # a job past the job timeout, or not ended
        self.unplanned: list[str] = []     # a drain no fault of ours caused
        self._first_seen: dict[int, float] = {}

    # -- helpers -------------------------------------------------------------------------------
    def daemons(self) -> dict[str, int]:
        pids = {**self.node.stack.pids(), **self.node.cluster.pids()}
        for i, pid in enumerate(sorted(self.node.stack.dnsmasq_pids())):
            pids[f"dnsmasq{i}"] = pid
        return pids

    def sample_usage(self, label: str) -> None:
        self.usage.append((label, {name: usage(pid) for name, pid in self.daemons().items()}))

    def queue_states(self) -> dict[int, dict]:
        return {q["job"]: q for q in self.node.jobs.squeue() if q["job"] in self.jobs}

    def node_state(self) -> tuple[str, str]:
        r = self.node.cluster.run(["sinfo", "-h", "-N", "-n", self.node.cluster.node_name, "-o",
                                   "%T|%E"], timeout=15)
        # one line per partition the node is in: the same node each time
        state, _, reason = (r.stdout.strip().splitlines() or [""])[0].partition("|")
        return state, reason

    def submit(self, gpus: int, hold: float, *, held: bool = False) -> int:
        return self.node.jobs.sbatch(JOB_SCRIPT.format(hold=hold), gpus=gpus,
                                     extra=("--hold",) if held else (), partition=self.partition)

    def wait(self, what: str, ready: Callable[[], object], job: SoakJob) -> object:
        """Poll ``ready`` (0.5 s) while the soak's sampler runs; FaultStuck past the fault
        timeout."""
        deadline = time.monotonic() + self.fault_timeout_s
        while True:
            value = ready()
            if value:
                return value
            if time.monotonic() > deadline:
                raise FaultStuck(f"job {job.id} ({job.fault}): {what} not seen within "
                                 f"{self.fault_timeout_s:.0f}s")
            time.sleep(0.5)

    def note(self, job: SoakJob, text: str) -> None:
        job.notes.append(text)
        self.say(f"  [{time.strftime('%H:%M:%S')}] job {job.id} ({job.fault}): {text}")

    def drained(self) -> tuple[str, str] | None:
        state, reason = self.node_state()
        return (state, reason) if "drain" in state else None

    def resume(self, job: SoakJob) -> None:
        self.node.cluster.resume_node()
        self.note(job, f"node resumed ({self.node_state()[0]})")

    # -- the faults ----------------------------------------------------------------------------
    def fault(self, gpus: int, kind: str) -> SoakJob:
        """Inject ``kind`` into a new job of ``gpus`` GPUs and recover from it, as an admin
        would; returns the job (it may still run)."""
        what, _, arg = kind.partition(":")
        if what == "prolog":
            job = SoakJob(self.submit(gpus, self.hold, held=True), gpus, kind)
            self.jobs[job.id] = job
            add_failpoint(self.node, f"after:{arg} job-{job.id} kill")
            self.node.cluster.run(["scontrol", "release", str(job.id)])
            self.note(job, f"submitted held, fault point after:{arg} set, released")
            self.prolog_killed(job)
        elif what == "epilog":
            job = SoakJob(self.submit(gpus, self.hold), gpus, kind)
            self.jobs[job.id] = job
            add_failpoint(self.node, f"after:{arg} job-{job.id} kill")
            self.note(job, f"submitted, fault point after:{arg} set")
            self.epilog_killed(job)
        elif what == "gpu":
            job = SoakJob(self.submit(gpus, self.fault_hold), gpus, kind)
            self.jobs[job.id] = job
            rec = self.wait("its VM running", lambda: self.running_record(job.id), job)
            job.pci = rec["allocation"]["gpu_pcis"][0]
            self.node.dgxvm_cmd("simulate", "--fault", f"{job.pci}:{arg}", "--into",
                                str(self.node.sysfs))
            self.note(job, f"GPU {rec['allocation']['gpus'][0]} ({job.pci}) made to "
                           f"{arg} while the VM runs")
            since = self.wait("the GPU quarantined", lambda: self.quarantined_since(job.pci), job)
            self.quarantines.append({"pci": job.pci, "job": job.id, "since": since,
                                     "cleared": None})
            self.note(job, f"{job.pci} quarantined at the job's end")
        elif what == "guest":
            job = SoakJob(self.submit(gpus, self.fault_hold), gpus, kind)
            self.jobs[job.id] = job
            self.wait("its VM running, batch script started",
                      lambda: self.running_record(job.id) and
                      self.queue_states().get(job.id, {}).get("state") == "RUNNING", job)
            pid = qemu_of(self.node, f"job-{job.id}")
            if pid is None or not kill_pid(pid):
                raise FaultStuck(f"job {job.id}: no QEMU process guest=job-{job.id} to kill")
            self.note(job, f"QEMU pid {pid} SIGKILLed")
            self.wait("the libvirt hook's release (record stopped)",
                      lambda: self.node.records().get(f"job-{job.id}", {}).get("state")
                      in ("stopped", None), job)
            self.note(job, "VM record says stopped; the job runs on")
        else:
            raise ValueError(f"unknown fault {kind!r}")
        return job

    def running_record(self, job: int) -> dict | None:
        rec = self.node.records().get(f"job-{job}")
        return rec if rec and rec.get("state") == "running" else None

    def quarantined_since(self, pci: str) -> float | None:
        try:
            doc = json.loads((self.node.state_dir / "gpu-health.json").read_text())
        except (OSError, ValueError):
            return None
        dev = doc.get("devices", {}).get(pci, {})
        return dev.get("since") if dev.get("state") == "quarantined" else None

    def prolog_killed(self, job: SoakJob) -> None:
        """Slurm drains the node and holds the job; its Epilog removes what the Prolog made.
        Then: resume the node, release the job (it runs again)."""
        line = f"job-{job.id} kill"
        self.wait("the fault point fired", lambda: not any(line in x for x in
                                                           failpoint_lines(self.node)), job)
        state, reason = self.wait("the node drained", self.drained, job)
        q = self.wait("the job requeued", lambda: self.queue_states().get(job.id) if
                      self.queue_states().get(job.id, {}).get("state") == "PENDING" else None, job)
        self.note(job, f"Prolog killed: node {state} ({reason}); job {q['state']} ({q['reason']})")
        self.wait("the Epilog's cleanup", lambda: not leftovers(self.node, jobs=[job.id]), job)
        self.note(job, "Slurm's Epilog removed what the killed Prolog left")
        self.resume(job)
        self.node.cluster.run(["scontrol", "release", str(job.id)])
        self.note(job, "released: it runs again")

    def epilog_killed(self, job: SoakJob) -> None:
        """Slurm drains the node ("Epilog error"); the admin runs the Epilog again for the job
        (as root, SLURM_JOB_ID set) and resumes the node."""
        line = f"job-{job.id} kill"
        self.wait("the fault point fired", lambda: not any(line in x for x in
                                                           failpoint_lines(self.node)), job)
        state, reason = self.wait("the node drained", self.drained, job)
        self.wait("the job out of the queue", lambda: job.id not in self.queue_states(), job)
        self.note(job, f"Epilog killed after undefine: node {state} ({reason}); left: "
                       f"{leftovers(self.node, jobs=[job.id])}")
        r = self.node.cluster.run(["env", f"DGXVM_CONFIG={self.node.config}",
                                   f"SLURM_JOB_ID={job.id}", str(self.node.dgxvm), "epilog"],
                                  check=False, timeout=300)
        self.note(job, f"dgxvm epilog rerun: exit {r.returncode}")
        if r.returncode != 0:
            self.problems.append(f"job {job.id}: the Epilog's rerun exited {r.returncode}: "
                                 f"{r.stderr.strip()[-300:]}")
        left = leftovers(self.node, jobs=[job.id])
        if left:
            self.problems.append(f"job {job.id}: after the Epilog's rerun: {left}")
        self.resume(job)

    def placed_during(self, q: dict) -> list[tuple[str, tuple[str, ...]]]:
        """(VM, its PCIs) of every VM placed while ``q`` was quarantined."""
        until = q["cleared"] or time.time()
        return [(key.split("@")[0], pcis) for key, (placed, pcis) in self.sampler.placed.items()
                if q["since"] < placed < until]

    def clear_quarantines(self, *, all_due: bool = False) -> None:
        """Clear a quarantined GPU once ``clear_after`` VMs were placed during its quarantine
        (each one a chance to be given it), or at the end."""
        for q in self.quarantines:
            if q["cleared"] is None and (all_due or len(self.placed_during(q)) >= self.clear_after):
                self.node.dgxvm_cmd("simulate", "--fault", f"{q['pci']}:clear", "--into",
                                    str(self.node.sysfs))
                self.node.dgxvm_cmd("gpu", "clear", q["pci"], "--note", "soak: fault cleared")
                q["cleared"] = time.time()
                self.say(f"  [{time.strftime('%H:%M:%S')}] {q['pci']} cleared "
                         f"({len(self.jobs)} jobs submitted)")

    # -- the run -------------------------------------------------------------------------------
    def run(self) -> list[Check]:
        t0 = time.monotonic()
        self.sample_usage("start")
        self.sampler.start()
        next_sample = self.sample_every
        try:
            k = 0
            last_submit = -math.inf
            while True:
                queued = self.queue_states()
                done = len(self.jobs) - len(queued)
                if done >= next_sample:
                    self.sample_usage(f"after {done} jobs")
                    next_sample += self.sample_every
                self.clear_quarantines()
                self.stuck(queued)
                self.unplanned_drain(queued)
                if k < len(self.plan) and len(queued) < self.queue \
                        and time.monotonic() - last_submit >= self.gap:
                    gpus, kind = self.plan[k]
                    k += 1
                    last_submit = time.monotonic()
                    if kind:
                        self.fault(gpus, kind)
                    else:
                        jid = self.submit(gpus, self.hold)
                        self.jobs[jid] = SoakJob(jid, gpus)
                    if len(self.jobs) % 10 == 0:
                        self.say(f"  [{time.strftime('%H:%M:%S')}] {len(self.jobs)} submitted, "
                                 f"{done} done, {time.monotonic() - t0:.0f}s")
                    continue
                if k >= len(self.plan) and not queued:
                    break
                time.sleep(0.5)
            self.clear_quarantines(all_due=True)
        except FaultStuck as exc:
            self.stuck_jobs.append(str(exc))
            self.say(f"  STUCK: {exc}")
        finally:
            self.sampler.stop()
            self.tidy()
        self.wall_s = time.monotonic() - t0
        if self.before_checks is not None:
            self.before_checks()
        self.sample_usage("end")
        return self.checks()

    def unplanned_drain(self, queued: dict[int, dict]) -> None:
        """A drain that no injected fault caused (a guest that never became ready, ...): it is
        recorded, with what slurmd logged of the held jobs, then undone as an admin would
        (resume the node, release the held jobs), so the soak goes on."""
        drained = self.drained()
        # no fault is being handled here, so no job of ours is held on purpose; a held job may
        # also be seen only after the drain was undone (Slurm requeues it a moment later)
        held = [jid for jid, q in queued.items() if "held" in q["reason"].lower()]
        if not drained and not held:
            return
        why = [ln.strip()[:300] for ln in self.node.cluster.slurmd_log.read_text(
            errors="replace").splitlines() if "dgxvm" in ln and any(
            f"job {j} " in ln for j in held)]
        self.unplanned.append(f"node {drained or 'not drained'}, held jobs {held}: "
                              + " | ".join(why[-3:]))
        self.say(f"  [{time.strftime('%H:%M:%S')}] UNPLANNED: {self.unplanned[-1]}")
        if drained:
            self.node.cluster.resume_node()
        for jid in held:
            self.node.cluster.run(["scontrol", "release", str(jid)], check=False)

    def stuck(self, queued: dict[int, dict]) -> None:
        """A job queued or running past the job timeout: the soak stops (FaultStuck)."""
        now = time.monotonic()
        for jid in queued:
            if now - self._first_seen.setdefault(jid, now) > self.job_timeout_s:
                raise FaultStuck(f"job {jid} still {queued[jid]['state']} "
                                 f"({queued[jid]['reason']}) after {self.job_timeout_s:.0f}s")

    def tidy(self) -> None:
        """After a soak cut short: jobs cancelled, node resumed, quarantines and fault points
        cleared, so the node is usable again (what was left is still reported)."""
        left = list(self.queue_states())
        if left:
            self.node.cluster.run(["scancel", *map(str, left)], check=False)
            try:
                self.node.jobs.wait_done(left, timeout=600)
            except TimeoutError as exc:
                self.stuck_jobs.append(str(exc))
        if "drain" in self.node_state()[0]:
            self.problems.append(f"node left {self.node_state()}; resumed")
            self.node.cluster.resume_node()
        self.clear_quarantines(all_due=True)
        if failpoint_lines(self.node):
            self.problems.append(f"fault points never fired: {failpoint_lines(self.node)}")
            (self.node.state_dir / "failpoints").unlink()

    # -- the checks ----------------------------------------------------------------------------
    def checks(self) -> list[Check]:
        node = self.node
        rows = node.jobs.sacct(self.jobs)
        try:
            node.cluster.wait_idle(timeout=120)
        except TimeoutError:
            pass
        state = node.cluster.node_state()
        left = leftovers(node)
        wrong = []
        boots, stages = [], []
        for jid, job in sorted(self.jobs.items()):
            why = self.sacct_problem(job, rows.get(jid))
            if why:
                wrong.append(f"job {jid} ({job.fault or f'{job.gpus} GPU'}): {why}")
            rec = decode(rows.get(jid, {}).get("AdminComment"))
            if rec and rec.get("boot_s"):
                boots.append(float(rec["boot_s"]))
                stages.append(parse_stages(rec.get("create_stages")))
        quarantine = self.quarantine_problems()
        flat = self.flatness()
        n_faults = sum(1 for j in self.jobs.values() if j.fault)
        want_faults = sum(1 for _n, f in self.plan if f)
        checks = [
            Check("every job ran to its end (no deadlock)",
                  len(self.jobs) == len(self.plan) and not self.stuck_jobs,
                  f"{len(self.jobs)} of {len(self.plan)} in {self.wall_s:.0f}s "
                  f"({3600 * len(self.jobs) / self.wall_s:.0f} jobs/hour)"
                  + ("; " + "; ".join(self.stuck_jobs) if self.stuck_jobs else "")),
            Check("faults injected and recovered", n_faults == want_faults and not self.problems,
                  f"{n_faults} of {want_faults}: " + ", ".join(
                      f"{j.id}={j.fault}" for j in self.jobs.values() if j.fault)
                  + ("; " + "; ".join(self.problems) if self.problems else "")),
            Check("no drain but the injected faults' (an unplanned one is undone, to go on)",
                  not self.unplanned,
                  "; ".join(self.unplanned) or "none"),
            Check("leaks (domains, QEMU, VM dirs, ledger, DHCP, fault points)", not left,
                  "; ".join(left) or "0"),
            Check("double assignments (records every 0.5 s)", not self.sampler.problems,
                  (f"{len(self.sampler.problems)}: {self.sampler.problems[:5]}"
                   if self.sampler.problems else "0")
                  + f" in {self.sampler.snapshots} samples, up to {self.sampler.max_vms} VMs "
                    f"at once"),
            Check("no VM placed on a quarantined GPU", not quarantine and
                  all(q["cleared"] for q in self.quarantines),
                  "; ".join(quarantine) or
                  ", ".join(f"{q['pci']} quarantined by job {q['job']} for "
                            f"{q['cleared'] - q['since']:.0f}s, {len(self.placed_during(q))} "
                            f"VMs placed meanwhile, none on it" for q in self.quarantines)
                  or "no GPU fault in this run"),
            Check("sacct: every job's state and AdminComment", not wrong,
                  "; ".join(wrong[:8]) or f"{len(rows)} jobs right"),
            Check("node idle at the end", state == "idle", state),
            Check("slurmctld: node not responding (log lines, for the record)", True,
                  self.not_responding()),
            *flat,
        ]
        self.figures = {"boot_s": boots, "rows": rows}
        return checks + stage_checks(boots, stages)   # from each job's AdminComment

    def not_responding(self) -> str:
        try:
            lines = [ln for ln in self.node.cluster.slurmctld_log.read_text(errors="replace")
                     .splitlines() if "not responding" in ln.lower()]
        except OSError as exc:
            return f"log unreadable: {exc}"
        return f"{len(lines)}" + (f"; last: {lines[-1].strip()[:160]}" if lines else "")

    def sacct_problem(self, job: SoakJob, row: dict | None) -> str | None:
        """What is wrong with a job's sacct row, or None. Every job, faulted or not, ends
        COMPLETED (see each fault for why) with a record of its VM whose GPU count is its
        --gres, and its batch script saw that VM; a faulted one says what happened to it."""
        if row is None:
            return "no sacct row"
        if row["State"] != "COMPLETED":
            return f"State {row['State']}"
        rec = decode(row["AdminComment"])
        if rec is None:
            return f"AdminComment does not decode: {row['AdminComment']!r}"
        if rec.get("state") != "ended":
            return f"record state {rec.get('state')}"
        if len(parse_index_list(rec.get("gpus", ""))) != job.gpus:
            return f"record gpus {rec.get('gpus')!r}, --gres gpu:{job.gpus}"
        try:            # what the batch script saw: `dgxvm job --json`, run once its VM was up
            seen = json.loads((self.node.workdir / f"soak-{job.id}.json").read_text())
        except (OSError, ValueError) as exc:
            return f"the batch script's `dgxvm job --json`: {exc}"
        # a job that claimed a warm VM runs in it under the warm VM's name
        name = rec.get("domain") if rec.get("warm") == "claimed" else f"job-{job.id}"
        if seen.get("name") != name or len(seen.get("gpus", ())) != job.gpus:
            return f"the batch script saw {seen.get('name')} with GPUs {seen.get('gpus')}"
        if job.fault == "gpu:reset-fail" and job.pci not in rec.get("quarantined", ""):
            return f"record does not name the quarantined {job.pci}: {rec.get('quarantined')!r}"
        if job.fault == "guest:crash" and "stopped before the job ended" not in rec.get("ended", ""):
            return f"record ended={rec.get('ended')!r}, not the crash"
        return None

    def quarantine_problems(self) -> list[str]:
        return [f"{name} placed on {q['pci']} while it was quarantined"
                for q in self.quarantines for name, pcis in self.placed_during(q)
                if q["pci"] in pcis]

    def flatness(self) -> list[Check]:
        """RSS and open fds of the node's daemons: start, each sample, end. RSS may grow while
        caches fill: compared from the first sample taken during the soak (the start when there
        is none) to the end, within max(16 MiB, 20%); fds from start to end (both idle),
        within +3."""
        first, end = self.usage[0][1], self.usage[-1][1]
        warm = self.usage[1][1] if len(self.usage) > 2 else first
        out = []
        for name in sorted(end):
            series = [u[name] for _l, u in self.usage if u.get(name)]
            if not series or end[name] is None:
                continue
            base = warm.get(name) or first.get(name) or series[0]
            rss_ok = end[name][0] - base[0] <= max(16 * 1024, 0.2 * base[0])
            fd0 = (first.get(name) or series[0])[2]
            fd_ok = end[name][2] - fd0 <= 3
            out.append(Check(
                f"{name} RSS / fds flat", rss_ok and fd_ok,
                "RSS MiB " + " ".join(f"{u[0] / 1024:.1f}" for u in series)
                + "; fds " + " ".join(str(u[2]) for u in series),
                "RSS end <= warm + max(16 MiB, 20%); fds end <= start + 3"))
        hwm = self.sampler.hook_hwm
        out.append(Check("short-lived dgxvm hooks: peak RSS (VmHWM)", True,
                         ", ".join(f"{v} {kib / 1024:.1f} MiB" for v, kib in sorted(hwm.items()))
                         + f" ({len(self.sampler.hook_pids)} processes seen)"))
        return out
