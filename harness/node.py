"""One simulated DGX node for real: dgxvm's Slurm Prolog/Epilog on a local Slurm cluster, VMs on
a local libvirt, everything inside one network namespace.

Two ways in:

* :func:`slurm_cluster` builds the Slurm side (not started) on a libvirt stack that already
  runs, for the integration tests, whose session fixture owns the libvirt stack;
* :class:`LocalNode` does it all, for the demo and the benchmark: a simulated DGX-2 sysfs tree, a
  dgxvm config and state dir, an ordinary user, the test guest (guest-image/build, cached),
  virtlogd + libvirtd with dgxvm's qemu hook (harness/libvirt.py), the guest installed as the
  default image, then munged, MariaDB + slurmdbd, slurmctld and slurmd (harness/slurm.py) with
  Prolog/Epilog pointing at this checkout. ``stop()`` deletes any VM left, then stops every
  process by PID (Slurm first, so the Epilogs run while libvirt is still there).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .libvirt import LibvirtStack
from .slurm import DGX2_SHAPE, SlurmCluster, ensure_user

REPO = Path(__file__).resolve().parents[1]
NODE_NAME = "dgx01"
GUEST_BUILD = REPO / "guest-image" / "build"


#: The dgxvm under test, when set: an installed package's (CI installs the .deb and sets
#: DGXVM_UNDER_TEST=/usr/bin/dgxvm), which admins, the Prolog/Epilog (the package's own, beside
#: it in ../lib/slurm-dgxvm/) and job users all run as installed. Unset: this checkout's .venv.
UNDER_TEST = "DGXVM_UNDER_TEST"


def installed_dgxvm() -> Path | None:
    """``$DGXVM_UNDER_TEST`` checked (an absolute path to an executable), or None."""
    value = os.environ.get(UNDER_TEST)
    if not value:
        return None
    path = Path(value)
    if not path.is_absolute() or not path.is_file() or not os.access(path, os.X_OK):
        raise RuntimeError(f"{UNDER_TEST}={value!r}: not the absolute path of an executable "
                           "dgxvm (an installed package's is /usr/bin/dgxvm)")
    return path


def default_dgxvm() -> Path:
    """The dgxvm under test: ``$DGXVM_UNDER_TEST``, else this checkout's virtual environment's
    (or the one beside this Python)."""
    installed = installed_dgxvm()
    if installed is not None:
        return installed
    venv = REPO / ".venv" / "bin" / "dgxvm"
    return venv if venv.exists() else Path(sys.executable).with_name("dgxvm")


def slurm_scripts() -> tuple[Path, Path]:
    """The Prolog and Epilog slurm.conf names: an installed package's (``/usr/lib/slurm-dgxvm``
    beside ``/usr/bin/dgxvm``) when one is under test, else this checkout's."""
    installed = installed_dgxvm()
    if installed is None:
        return REPO / "prolog" / "dgxvm-prolog", REPO / "epilog" / "dgxvm-epilog"
    lib = installed.parent.parent / "lib" / "slurm-dgxvm"
    scripts = lib / "dgxvm-prolog", lib / "dgxvm-epilog"
    for script in scripts:
        if not os.access(script, os.X_OK):
            raise RuntimeError(f"{UNDER_TEST}={installed}: no executable {script} beside it")
    return scripts


def dgxvm_for_users(dest: Path) -> Path:
    """The dgxvm job users run: an installed package's as it is (``/usr/bin/dgxvm`` runs on
    Debian's python3 for every user); else this checkout's, copied for them under ``dest``
    (:func:`install_for_users`)."""
    installed = installed_dgxvm()
    return installed if installed is not None else install_for_users(dest)


# What `dgxvm` needs at run time, copied from this checkout's environment for job users.
_RUNTIME = ("click", "jinja2", "markupsafe", "libvirt.py", "libvirt_qemu.py",
            "libvirt_lxc.py", "libvirtaio.py", "libvirtmod*.so")


def install_for_users(dest: Path) -> Path:
    """Install dgxvm where ordinary users can run it, as an admin installs /usr/local/bin/dgxvm
    on a node: jobs' batch scripts run ``dgxvm job``. This checkout's .venv may use an
    interpreter under /root (pyenv) that other users cannot reach, so the package and its
    runtime dependencies are copied under ``dest`` and run by the system's python3 (Debian 12:
    3.11, the same ABI). Returns the executable."""
    import libvirt
    site = Path(libvirt.__file__).parent
    lib, bindir = dest / "lib", dest / "bin"
    lib.mkdir(parents=True, exist_ok=True)
    bindir.mkdir(exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__")
    for pattern in _RUNTIME:
        for src in site.glob(pattern):
            if src.is_dir():
                shutil.copytree(src, lib / src.name, ignore=ignore, dirs_exist_ok=True)
            else:
                shutil.copy2(src, lib / src.name)
    shutil.copytree(REPO / "slurm_dgxvm", lib / "slurm_dgxvm", ignore=ignore,
                    dirs_exist_ok=True)
    exe = bindir / "dgxvm"
    exe.write_text(f"#!/bin/sh\n# dgxvm for job users (harness/node.py install_for_users)\n"
                   f"PYTHONPATH={lib} exec /usr/bin/python3 -c 'import sys; "
                   f"from slurm_dgxvm.cli.main import main; sys.argv[0] = \"dgxvm\"; "
                   f"sys.exit(main())' \"$@\"\n")
    # compiled once, as a package's postinst does (py3compile): users cannot write the
    # __pycache__ of a root-owned tree, and every run would compile the modules again
    subprocess.run(["/usr/bin/python3", "-m", "compileall", "-q", str(lib)], check=True,
                   stdout=subprocess.DEVNULL)
    for path in [dest, *dest.rglob("*")]:
        path.chmod(0o755 if path.is_dir() or path == exe else 0o644)
    return exe


def hook_wrappers(run_dir: Path, dgxvm: Path, config: Path,
                  noop_comment: str | None = None) -> tuple[Path, Path]:
    """prolog/epilog scripts for slurm.conf that run the Prolog and Epilog under test
    (:func:`slurm_scripts`: the package's or this checkout's) with ``dgxvm`` and ``config``
    (slurmd gives hooks only Slurm's environment, so the wrapper names them).
    ``noop_comment``: jobs whose comment holds it get a hook that does nothing (the benchmark's
    baseline)."""
    out = []
    run_dir.mkdir(parents=True, exist_ok=True)
    gate = (f'case "$SLURM_JOB_COMMENT" in *{noop_comment}*) exit 0;; esac\n'
            if noop_comment else "")
    for which, script in zip(("prolog", "epilog"), slurm_scripts()):
        path = run_dir / f"dgxvm-{which}-wrapper"
        path.write_text(f"#!/bin/sh\n{gate}DGXVM={dgxvm} DGXVM_CONFIG={config}\n"
                        f"export DGXVM DGXVM_CONFIG\nexec {script}\n")
        path.chmod(0o755)
        out.append(path)
    return out[0], out[1]


def gres_conf(dgxvm: Path, sysfs: Path, dev_dir: Path) -> str:
    r = subprocess.run([str(dgxvm), "--sysfs-root", str(sysfs), "gres-conf", "--dev-dir",
                        str(dev_dir), "--node-name", NODE_NAME],
                       capture_output=True, text=True, check=True, timeout=60)
    return r.stdout


def slurm_cluster(run_dir: Path, *, netns: str, dgxvm: Path, config: Path, sysfs: Path,
                  prolog: Path | None = None, epilog: Path | None = None,
                  extra_conf: str = "", noop_comment: str | None = None) -> SlurmCluster:
    """The Slurm side of the node (not started): slurm.conf with the dgxvm hooks (or the
    ``prolog``/``epilog`` given), gres.conf from ``dgxvm gres-conf``, a simulated DGX-2."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(run_dir, 0o755)
    wrappers = hook_wrappers(run_dir / "hooks", dgxvm, config, noop_comment)
    return SlurmCluster(
        run_dir / "slurm", netns=netns, node_name=NODE_NAME, node=DGX2_SHAPE,
        gres_conf=gres_conf(dgxvm, sysfs, run_dir / "slurm" / "dev" / "vfio"),
        prolog=str(prolog or wrappers[0]), epilog=str(epilog or wrappers[1]),
        prolog_epilog_timeout_s=600, batch_start_timeout_s=600, extra_conf=extra_conf)


#: the node's registry (harness/registry.py) listens on this port of its namespace's loopback
REGISTRY_PORT = 5000


def config_text(base: Path, sysfs: Path, *, network: str, cidr: str, extra: str = "") -> str:
    return (f'[host]\nsysfs_root = "{sysfs}"\nstate_dir = "{base / "state"}"\n\n'
            f'[libvirt]\nuri = "qemu:///system"\ndomain_type = "qemu"\nnetwork = "{network}"\n'
            f'network_cidr = "{cidr}"\nready_timeout_s = 300.0\nshutdown_timeout_s = 30.0\n\n'
            f'[images]\nstore = "{base / "images"}"\n\n'
            f'[vm]\nshare = "virtiofs"\nshare_roots = ["{base}"]\nfit_vcpus = 1\n'
            f'fit_memory_mib = 384\n\n'
            f'[containers]\ncache_dir = "{base / "containers"}"\n'
            f'insecure_registries = ["127.0.0.1:{REGISTRY_PORT}"]\n' + extra)


def build_guest() -> Path:
    """The test guest's manifest (guest-image/build, cached by package versions)."""
    r = subprocess.run([str(GUEST_BUILD)], capture_output=True, text=True, timeout=1500)
    if r.returncode != 0:
        raise RuntimeError(f"guest-image/build failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return Path(r.stdout.strip().splitlines()[-1]) / "manifest.json"


class LocalNode:
    """Everything for one simulated DGX-2 node under Slurm; see the module docstring."""

    def __init__(self, *, netns: str = "dgxvm-node", user: str = "dgxvmuser",
                 network: str = "dgxvmnode", cidr: str = "10.214.0.0/24",
                 prolog: Path | None = None, epilog: Path | None = None,
                 config_extra: str = "", slurm_extra: str = "",
                 noop_comment: str | None = None):
        self.netns, self.user, self.network, self.cidr = netns, user, network, cidr
        self._prolog, self._epilog = prolog, epilog
        self.config_extra, self.slurm_extra = config_extra, slurm_extra
        self.noop_comment = noop_comment
        self.dgxvm = default_dgxvm()
        self.base: Path | None = None
        self.stack: LibvirtStack | None = None
        self.cluster: SlurmCluster | None = None
        self.jobs: Jobs | None = None
        self.created_user = False
        self.timings: dict[str, float] = {}

    # -- paths -------------------------------------------------------------------------------------
    @property
    def config(self) -> Path:
        return self.base / "dgxvm.toml"

    @property
    def state_dir(self) -> Path:
        return self.base / "state"

    @property
    def workdir(self) -> Path:
        return self.base / "work"

    def __enter__(self) -> LocalNode:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> LocalNode:
        t0 = time.monotonic()
        self.base = Path(tempfile.mkdtemp(prefix="dgxvm-node-", dir="/var/tmp"))
        os.chmod(self.base, 0o755)        # QEMU (libvirt-qemu) reaches the disks through it
        try:
            import pwd
            try:
                pwd.getpwnam(self.user)
            except KeyError:
                self.created_user = True
            uid, gid, _home = ensure_user(self.user)
            for d in ("state", "images", "work"):
                (self.base / d).mkdir(mode=0o755)
            os.chown(self.workdir, uid, gid)
            sysfs = self.base / "dgx2"
            self.dgxvm_cmd("simulate", "dgx2", "--out", str(sysfs))
            self.config.write_text(config_text(self.base, sysfs, network=self.network,
                                               cidr=self.cidr, extra=self.config_extra))
            manifest = build_guest()
            self.timings["guest_s"] = round(time.monotonic() - t0, 2)
            from slurm_dgxvm.lifecycle import libvirt_hook_script
            from slurm_dgxvm.netfilter import network_hook_script
            self.stack = LibvirtStack(
                self.base / "libvirt", netns=self.netns,
                hook=libvirt_hook_script(str(self.dgxvm), str(self.config)),
                network_hook=network_hook_script(str(self.dgxvm), str(self.config)))
            self.stack.start()
            self.dgxvm_cmd("image", "install", str(manifest), "--name", "testguest", "--default")
            self.cluster = slurm_cluster(self.base / "cluster", netns=self.netns,
                                         dgxvm=self.dgxvm, config=self.config, sysfs=sysfs,
                                         prolog=self._prolog, epilog=self._epilog,
                                         extra_conf=self.slurm_extra,
                                         noop_comment=self.noop_comment)
            self.cluster.start()
            self.cluster.add_user(self.user)
            self.jobs = Jobs(self.cluster, user=self.user, workdir=self.workdir,
                             config=self.config,
                             dgxvm=dgxvm_for_users(self.base / "dgxvm-for-users"))
        except BaseException:
            self.stop()
            raise
        self.timings["start_s"] = round(time.monotonic() - t0, 2)
        return self

    def stop(self) -> None:
        """Slurm first (its Epilogs need libvirt), then any VM left, then libvirt; all by PID."""
        problems = []
        if self.cluster is not None:
            try:
                self.cluster.stop()
            except RuntimeError as exc:
                problems.append(str(exc))
            self.cluster = None
        if self.stack is not None:
            for name in sorted(p.name for p in (self.state_dir / "vms").glob("*")):
                r = self.dgxvm_cmd("delete", "--domain", name, check=False)
                if r.returncode != 0:
                    problems.append(f"dgxvm delete {name}: {r.stderr.strip()}")
            subprocess.run(["virsh", "-c", "qemu:///system", "net-destroy", self.network],
                           capture_output=True, timeout=60)
            subprocess.run(["virsh", "-c", "qemu:///system", "net-undefine", self.network],
                           capture_output=True, timeout=60)
            try:
                self.stack.stop()
            except RuntimeError as exc:
                problems.append(str(exc))
            self.stack = None
        if self.base is not None:
            shutil.rmtree(self.base, ignore_errors=True)
            self.base = None
        if self.created_user:
            subprocess.run(["userdel", "--remove", self.user], capture_output=True, timeout=60)
            self.created_user = False
        if problems:
            raise RuntimeError("local node stopped with problems: " + "; ".join(problems))

    # -- using it ----------------------------------------------------------------------------------
    def dgxvm_cmd(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items()
               if k not in ("DGXVM_STATE_DIR", "DGXVM_SYSFS_ROOT")}   # the node's config rules
        if self.base is not None:
            env["DGXVM_CONFIG"] = str(self.config)
        r = subprocess.run([str(self.dgxvm), *args], capture_output=True, text=True, env=env,
                           timeout=600)
        if check and r.returncode != 0:
            raise RuntimeError(f"dgxvm {' '.join(args)}: {r.stderr.strip()}")
        return r


class Jobs:
    """Submitting and following jobs on a node's cluster as its ordinary user."""

    def __init__(self, cluster: SlurmCluster, *, user: str, workdir: Path, config: Path | None,
                 dgxvm: Path):
        """``config``: the DGXVM_CONFIG jobs get; None: none (a cluster's nodes each have
        theirs at /etc/dgxvm/dgxvm.toml, harness/cluster.py)."""
        self.cluster, self.user, self.workdir = cluster, user, Path(workdir)
        self.config = Path(config) if config is not None else None
        self.dgxvm = Path(dgxvm)

    def sbatch(self, script: str, *, gpus: int | None, comment: str | None = None,
               partition: str | None = None, extra: tuple[str, ...] = (),
               chdir: Path | str | None = None, user: str | None = None,
               output: Path | str | None = None, nodes: int | None = None) -> int:
        """Submit ``script`` as the node's user (or ``user``) from its work dir (or ``chdir``,
        the job's SLURM_JOB_WORK_DIR); output in ``output`` (default: the work dir's
        slurm-%j.out); ``gpus`` per node (None: no ``--gres``), on ``nodes`` nodes (``--nodes``) when given.
        Returns the job id."""
        out = output or f"{self.workdir}/slurm-%j.out"
        config = f"DGXVM_CONFIG={self.config}," if self.config is not None else ""
        argv = ["sbatch", "--parsable", *([f"--gres=gpu:{gpus}"] if gpus is not None else []),
                "--chdir", str(chdir or self.workdir), f"--output={out}",
                f"--export=ALL,{config}PATH={self.dgxvm.parent}:/usr/bin:/bin",
                *([f"--nodes={nodes}"] if nodes is not None else []), *extra]
        if comment:
            argv.append(f"--comment={comment}")
        if partition:
            argv.append(f"--partition={partition}")
        r = self.cluster.run(argv, user=user or self.user, input=script, cwd=str(self.workdir))
        return int(r.stdout.strip().split(";")[0])

    def squeue(self) -> list[dict]:
        r = self.cluster.run(["squeue", "-h", "-o", "%i|%T|%b|%r"], timeout=15)
        out = []
        for line in r.stdout.splitlines():
            jid, state, gres, reason = line.split("|", 3)
            out.append({"job": int(jid), "state": state, "gres": gres, "reason": reason})
        return out

    def wait_done(self, jobs, timeout: float = 600.0) -> None:
        deadline = time.monotonic() + timeout
        want = {int(j) for j in jobs}
        while True:
            left = {q["job"] for q in self.squeue()} & want
            if not left:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"jobs {sorted(left)} still queued or running after "
                                   f"{timeout:.0f}s")
            time.sleep(0.5)

    def sacct(self, jobs) -> dict[int, dict]:
        """sacct rows of ``jobs`` (allocations), polled until every job has ended there."""
        fields = ["JobID", "User", "Account", "State", "Start", "End", "Submit", "ElapsedRaw",
                  "AllocTRES", "AdminComment"]
        want = {int(j) for j in jobs}
        deadline = time.monotonic() + 30
        while True:
            r = self.cluster.run(["sacct", "-X", "-n", "-P", "-a", "-j",
                                  ",".join(map(str, sorted(want))), "-o", ",".join(fields)],
                                 timeout=15)
            rows = {}
            for line in r.stdout.splitlines():
                vals = line.split("|", len(fields) - 1)
                if len(vals) == len(fields) and vals[0].isdigit():
                    rows[int(vals[0])] = dict(zip(fields, vals))
            done = all(j in rows and rows[j]["End"] not in ("Unknown", "") and
                       "dgxvm/1 state=running" not in rows[j]["AdminComment"] for j in want)
            if done or time.monotonic() > deadline:
                return rows
            time.sleep(0.3)

    def vms(self) -> list[dict]:
        if self.config is None:
            raise RuntimeError("Jobs.vms: no config (a cluster's nodes each have their own: "
                               "LocalCluster.node(NAME).vms())")
        env = {**os.environ, "DGXVM_CONFIG": str(self.config)}
        r = subprocess.run([str(self.dgxvm), "list", "--json"], capture_output=True, text=True,
                           env=env, timeout=60)
        if r.returncode != 0:
            raise RuntimeError(f"dgxvm list --json: exit {r.returncode}: {r.stderr.strip()}")
        return json.loads(r.stdout)
