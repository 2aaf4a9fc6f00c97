"""Integration fixtures: a real libvirt stack (harness/libvirt.py) for tests that need one.

``libvirt_stack`` is session-scoped and lazy: the stack (virtlogd + libvirtd inside network
namespace ``dgxvm-test``) starts when the first test asks for it and stops at the end of the
session. Only one system libvirtd can run at a time, so tests that start stacks of their own are
marked ``libvirt_lifecycle`` and run in a pytest of their own (tests/run: ``-m
libvirt_lifecycle``), where no test starts the shared stack; ``no_session_libvirt_stack`` fails
them clearly if one did. Tests that replace and purge the installed package are marked
``package_lifecycle`` and run in a pytest of their own too, after the rest. A session that
selects either kind with other tests leaves them out and says so: no test relies on where it
runs in a session. The multi-node tests (marker ``multinode``, harness/cluster.py) run a cluster
in namespaces of their own, with their own /run/libvirt in each node's mount namespace, beside
the session's stack: they run in the ordinary session.
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
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # `harness` lives at the repo root, outside the package
    sys.path.insert(0, str(REPO))

from harness.libvirt import LibvirtStack  # noqa: E402
from harness.node import default_dgxvm  # noqa: E402

DGXVM = default_dgxvm()   # $DGXVM_UNDER_TEST (CI: the installed package), else .venv's

_ACTIVE: dict[str, LibvirtStack] = {}


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "libvirt_lifecycle: starts and stops libvirt stacks of its own; runs in a "
        "pytest of its own (tests/run: `-m libvirt_lifecycle`), where the shared libvirt_stack "
        "never starts")
    config.addinivalue_line(
        "markers", "multinode: runs a local cluster of several nodes (harness/cluster.py) in "
        "namespaces of its own, apart from the session's libvirt stack; runs in the ordinary "
        "integration session (select it alone with `-m multinode`)")
    config.addinivalue_line(
        "markers", "package_lifecycle: upgrades and purges the installed slurm-dgxvm "
        "(DGXVM_UNDER_TEST); runs in a pytest of its own (tests/run: `-m package_lifecycle`, "
        "after the other integration tests, which run with `-m 'not package_lifecycle'`)")


#: the tests that need a pytest of their own, and why
OWN_SESSION = {
    "libvirt_lifecycle": "they start libvirt stacks of their own, which the session's shared "
                         "stack would be running beside",
    "package_lifecycle": "they replace and purge the package every other test runs",
}


@pytest.hookimpl(trylast=True)   # after -k and -m have deselected what they deselect
def pytest_collection_modifyitems(session, config, items):
    """A kind of OWN_SESSION selected with any other test is left out of the session and said
    so: no order inside one session makes it safe."""
    for marker, why in OWN_SESSION.items():
        own = [i for i in items if i.get_closest_marker(marker)]
        if not own or len(own) == len(items):
            continue
        items[:] = [i for i in items if i not in own]
        config.hook.pytest_deselected(items=own)
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(
                f"tests/integration: {len(own)} {marker} test(s) deselected ({why}): they run "
                f"in a pytest of their own (-m {marker}, as tests/run does)", yellow=True)


@pytest.fixture(scope="session")
def libvirt_stack(tmp_path_factory, vm_base):
    """The session's libvirt stack: ``stack.uri`` is qemu:///system, ``stack.netns`` the
    namespace its networks live in, dgxvm's qemu and network hooks installed (with the VM
    tests' config).
    Tests undefine the domains and networks they define; the stack only destroys (stops) what
    is still running when the session ends."""
    from slurm_dgxvm.lifecycle import libvirt_hook_script
    from slurm_dgxvm.netfilter import network_hook_script
    hook = libvirt_hook_script(str(DGXVM), str(vm_base.config))
    stack = LibvirtStack(tmp_path_factory.mktemp("libvirt-stack"), hook=hook,
                         network_hook=network_hook_script(str(DGXVM), str(vm_base.config)))
    _ACTIVE["session"] = stack
    try:
        stack.start()
        yield stack
    finally:
        try:
            stack.stop()
        finally:
            _ACTIVE.pop("session", None)


# -- processes, seen from the tests' side (not through the harness under test) -----------------
def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _netns_of(pid: int) -> int | None:
    try:
        link = os.readlink(f"/proc/{pid}/ns/net")  # "net:[4026532281]"
    except OSError:
        return None
    return int(link[link.index("[") + 1:-1])


@pytest.fixture
def alive():
    """``alive(pid)``: the process exists and is neither a zombie nor dead."""
    return _alive


@pytest.fixture
def netns_of():
    """``netns_of(pid)``: the inode of the process's network namespace (None: no process)."""
    return _netns_of


@pytest.fixture
def no_session_libvirt_stack():
    """For tests that run stacks of their own: the shared one must not be running."""
    if "session" in _ACTIVE:
        pytest.fail("the session libvirt_stack is running; a test that starts its own stack "
                    "must be marked libvirt_lifecycle, which runs in a pytest of its own")



# -- the VM lifecycle's environment: a config, a built test guest, a user, libvirt with our hook -
GUEST_BUILD = REPO / "guest-image" / "build"
CLOUD_BUILD = REPO / "guest-image" / "debian-cloud" / "build"
TEST_USER = "dgxvmtest"
TEST_CIDR = "10.213.0.0/24"


class VmEnv:
    """One simulated DGX-2 node's dgxvm set-up for the integration tests: config, state dir,
    image store, work dir and an ordinary user. ``stack`` and ``manifest`` are set by the
    ``vmenv`` fixture once libvirt runs and the guest is built."""

    def __init__(self, base: Path, sysfs: Path):
        self.base = base
        self.repo = REPO
        self.dgxvm_path = DGXVM
        self.stack = None
        self.netns = None
        self.manifest = None
        self.cmdline = None
        self.uri = "qemu:///system"
        self.network = "dgxvmtest"
        self.state_dir = base / "state"
        self.store = base / "images"
        self.workdir = base / "work"
        self.containers = base / "containers"   # [containers] cache_dir: QEMU's virtiofsd and
                                                # the user must reach it (not under /var/lib)
        self.sysfs = sysfs
        self.config = base / "dgxvm.toml"
        self.config_text = (
            f'[host]\nsysfs_root = "{sysfs}"\nstate_dir = "{self.state_dir}"\n\n'
            f'[libvirt]\nuri = "{self.uri}"\ndomain_type = "qemu"\nnetwork = "{self.network}"\n'
            f'network_cidr = "{TEST_CIDR}"\nready_timeout_s = 240.0\nshutdown_timeout_s = 30.0\n'
            f'allow_host_services = ["tcp/5000", "udp/5001"]\n\n'
            f'[images]\nstore = "{self.store}"\n\n'
            f'[vm]\nshare = "virtiofs"\nshare_roots = ["{base}"]\nfit_vcpus = 1\n'
            f'fit_memory_mib = 384\n\n'
            f'[containers]\ncache_dir = "{self.containers}"\n'
            f'insecure_registries = ["127.0.0.1:5000"]\n')   # the registry in the namespace
        self.config.write_text(self.config_text)
        import pwd
        pw = pwd.getpwnam(TEST_USER)
        self.user, self.uid, self.gid = TEST_USER, pw.pw_uid, pw.pw_gid

    def dgxvm(self, *args, config=None, timeout=400):
        env = {**os.environ, "DGXVM_CONFIG": str(config or self.config)}
        env.pop("DGXVM_STATE_DIR", None)
        env.pop("DGXVM_SYSFS_ROOT", None)
        return subprocess.run([str(DGXVM), *args], capture_output=True, text=True,
                              timeout=timeout, env=env)

    def virsh(self, *args, check=True):
        r = subprocess.run(["virsh", "-c", self.uri, *args], capture_output=True, text=True,
                           timeout=120)
        if check and r.returncode != 0:
            raise AssertionError(f"virsh {' '.join(args)} -> {r.returncode}: {r.stderr}")
        return r

    def wait_state(self, name, state, timeout=120):
        import libvirt
        conn = libvirt.open(self.uri)
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if conn.lookupByName(name).state()[0] == state:
                    return
                time.sleep(0.2)
            raise AssertionError(f"{name} did not reach state {state} in {timeout}s")
        finally:
            conn.close()


def _ensure_user(name: str) -> bool:
    """Create the ordinary user jobs and VMs run as; True if this run created it."""
    import pwd
    try:
        pwd.getpwnam(name)
        return False
    except KeyError:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", name], check=True)
        return True


@pytest.fixture(scope="session")
def guest_manifest() -> Path:
    """The test guest, built from Debian packages by guest-image/build (cached by versions)."""
    r = subprocess.run([str(GUEST_BUILD)], capture_output=True, text=True, timeout=1500)
    if r.returncode != 0:
        pytest.fail(f"guest-image/build failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return Path(r.stdout.strip().splitlines()[-1]) / "manifest.json"


@pytest.fixture(scope="session")
def cloud_manifest() -> Path:
    """The Debian 12 cloud guest (systemd, cloud-init, podman), built from Debian packages by
    guest-image/debian-cloud/build (cached by versions)."""
    t0 = time.monotonic()
    r = subprocess.run([str(CLOUD_BUILD)], capture_output=True, text=True, timeout=1500)
    if r.returncode != 0:
        pytest.fail(f"guest-image/debian-cloud/build failed ({r.returncode}):\n"
                    f"{r.stderr[-3000:]}")
    print(f"\ndebian-cloud image: {time.monotonic() - t0:.1f}s ({r.stderr.strip()[-200:]})")
    return Path(r.stdout.strip().splitlines()[-1]) / "manifest.json"


@pytest.fixture(scope="session")
def vm_base():
    """Config, directories, the simulated DGX-2 and the test user, made before libvirtd starts
    (its hook needs the config). Kept outside pytest's 0700 tmp tree: QEMU runs as libvirt-qemu
    and must reach the VM disks through every parent directory."""
    base = Path(tempfile.mkdtemp(prefix="dgxvm-it-", dir="/var/tmp"))
    os.chmod(base, 0o755)
    created_user = _ensure_user(TEST_USER)
    try:
        for d in ("state", "images", "work"):
            (base / d).mkdir(mode=0o755)
        sysfs = base / "dgx2"
        subprocess.run([str(DGXVM), "simulate", "dgx2", "--out", str(sysfs)], check=True,
                       capture_output=True)
        env = VmEnv(base, sysfs)
        os.chown(env.workdir, env.uid, env.gid)
        yield env
    finally:
        shutil.rmtree(base, ignore_errors=True)
        if created_user:
            subprocess.run(["userdel", "--remove", TEST_USER], check=False, capture_output=True)


@pytest.fixture(scope="session")
def vmenv(vm_base, libvirt_stack, guest_manifest):
    """vm_base with libvirt running (dgxvm's hook installed) and the test guest installed as the
    default image. At the end, any VM a failed test left goes through `dgxvm delete`, and the
    network is removed; the stack then stops every process by PID."""
    env = vm_base
    env.stack, env.netns = libvirt_stack, libvirt_stack.netns
    env.manifest = guest_manifest
    env.cmdline = json.loads(guest_manifest.read_text())["cmdline"]
    r = env.dgxvm("image", "install", str(guest_manifest), "--name", "testguest", "--default")
    assert r.returncode == 0, r.stderr
    try:
        yield env
    finally:
        for name in [p.name for p in (env.state_dir / "vms").glob("*")]:
            env.dgxvm("delete", "--domain", name)
        env.virsh("net-destroy", env.network, check=False)
        env.virsh("net-undefine", env.network, check=False)


# -- a Slurm cluster on the session's libvirt stack ---------------------------------------------
@pytest.fixture(scope="session")
def slurm_node(vmenv):
    """munged, MariaDB + slurmdbd, slurmctld and slurmd for the simulated DGX-2 in the libvirt
    stack's namespace, Prolog/Epilog = this checkout's prolog/ and epilog/ with the VM tests'
    config. Partition ``batch`` (default) uses the default image; partition ``broken`` names an
    image that is not installed (a misconfigured node); partition ``warm`` keeps a warm VM of the
    GPU count of its last job (refilled after its jobs). Stopped by PID at the end."""
    from harness.node import Jobs, dgxvm_for_users, slurm_cluster
    env = vmenv
    env.config.write_text(env.config_text + '\n[partitions.broken]\nimage = "gone"\n'
                          # test_slurm_warm: a warm VM of its last job's size kept
                          '\n[partitions.warm]\nwarm_recent = 1\n')
    run_dir = Path(tempfile.mkdtemp(prefix="dgxvm-slurm-", dir="/var/tmp"))
    os.chmod(run_dir, 0o755)
    jobs_dir = env.workdir / "jobs"
    jobs_dir.mkdir(exist_ok=True)
    os.chown(jobs_dir, env.uid, env.gid)
    cluster = slurm_cluster(run_dir, netns=env.netns, dgxvm=DGXVM, config=env.config,
                            sysfs=env.sysfs,
                            extra_conf="PartitionName=broken Nodes=dgx01 MaxTime=INFINITE "
                                       "State=UP\n"
                                       # the Debian cloud guest's (test_slurm_cloud_guest)
                                       "PartitionName=cloud Nodes=dgx01 MaxTime=INFINITE "
                                       "State=UP\n"
                                       "PartitionName=warm Nodes=dgx01 MaxTime=INFINITE "
                                       "State=UP\n")
    try:
        cluster.start()
        cluster.add_user(TEST_USER)
        yield SimpleNamespace(env=env, cluster=cluster,
                              jobs=Jobs(cluster, user=TEST_USER, workdir=jobs_dir,
                                        config=env.config,
                                        dgxvm=dgxvm_for_users(run_dir / "dgxvm-for-users")))
    finally:
        try:
            cluster.stop()
        finally:
            env.config.write_text(env.config_text)
            shutil.rmtree(run_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def multinode():
    """Two simulated DGX H100 nodes (harness/cluster.py: each its own namespaces, libvirt and
    slurmd, one slurmctld) with the job fabric on and InfiniBand VFs in per-job partition keys
    at the UFM stand-in (partition ``batch``; partition ``cloud`` is for the Debian cloud
    guest, test_multinode_cloud.py), for the session's multi-node tests; started
    when the first asks for it (about 16 s), stopped at the end. Each test leaves both nodes
    idle and empty."""
    from harness.cluster import LocalCluster
    c = LocalCluster(nodes=("dgxa", "dgxb"), machine="dgx-h100", user="dgxvmmn", jobnet=True,
                     ib="ufm", slurm_extra="PartitionName=cloud Nodes=dgxa,dgxb "
                                           "MaxTime=INFINITE State=UP\n")
    c.start()
    try:
        yield c
    finally:
        c.stop()
