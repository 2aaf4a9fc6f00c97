"""The installed ``dgxvm`` command, run as separate processes, as an admin or a script would.

No mocks: the console script from the environment, simulated sysfs trees on disk, the ledger
file shared by concurrent processes, and the README's first command end to end.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from harness.node import default_dgxvm
from slurm_dgxvm.ledger import Allocation, Ledger
from slurm_dgxvm.placement import Request, place
from slurm_dgxvm.topology import SysfsRoot, discover

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
DGXVM = default_dgxvm()


def run(*args, env=None, check=True):
    proc = subprocess.run([str(DGXVM), *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"dgxvm {' '.join(args)} -> {proc.returncode}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def dgx2(tmp_path_factory):
    if not DGXVM.exists():
        pytest.fail(f"no dgxvm at {DGXVM}: run `bash tests/run`, which installs the package")
    root = tmp_path_factory.mktemp("int") / "dgx2"
    out = run("simulate", "dgx2", "--out", str(root)).stdout
    assert str(root) in out
    return root


def test_the_headline_plan_through_the_installed_command(dgx2, tmp_path):
    env = {"DGXVM_SYSFS_ROOT": str(dgx2), "DGXVM_STATE_DIR": str(tmp_path / "state")}
    doc = json.loads(run("plan", "--gpu-count", "4", "--slurm-gpus", "5,6,7,11", "--json",
                         env=env).stdout)
    assert doc["aligned"] is True and doc["slurm_gpus"] == [5, 6, 7, 11]
    assert doc["gpus"] == [4, 5, 6, 7] and doc["numa_nodes"] == [0]
    node0 = set(range(0, 24)) | set(range(48, 72))
    assert set(doc["cpus"]) <= node0 and len(doc["cpus"]) == doc["vcpus"] == 22
    assert doc["nvswitches"] == ["0000:65:00.0", "0000:66:00.0", "0000:67:00.0"]
    assert doc["fm_partition"] is None and doc["simulated"] == "dgx2"
    assert not (tmp_path / "state" / "ledger.json").exists(), "plan must not write the ledger"


@pytest.mark.parametrize("args, exit_code, named", [
    (("plan", "--gpu-count", "4", "--slurm-gpus", "0-3,x"), 2, "0-3,x"),
    (("plan", "--gpu-count", "4", "--gpu-index", "3"), 2, "--gpu-index 3"),
    (("plan", "--gpu-count", "17"), 2, "17"),
    (("--sysfs-root", "/nonexistent/dgxvm", "topology", "show"), 3, "/nonexistent/dgxvm"),
])
def test_bad_input_exits_non_zero_with_one_line_naming_the_value(dgx2, tmp_path, args, exit_code,
                                                                  named):
    env = {"DGXVM_SYSFS_ROOT": str(dgx2), "DGXVM_STATE_DIR": str(tmp_path / "state")}
    proc = run(*args, env=env, check=False)
    assert proc.returncode == exit_code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dgxvm: error:") and named in lines[0], lines
    assert not (tmp_path / "state").exists() or not any((tmp_path / "state").iterdir())


def test_concurrent_processes_never_share_a_gpu_or_core(dgx2, tmp_path):
    """16 processes each take a 1-GPU VM through the ledger at once; then a 17th finds no GPU."""
    state = tmp_path / "state"
    code = ("import sys\n"
            "from slurm_dgxvm.ledger import Allocation, Ledger\n"
            "from slurm_dgxvm.placement import Request, place\n"
            "from slurm_dgxvm.topology import SysfsRoot, discover\n"
            "host = discover(SysfsRoot(sys.argv[1])); led = Ledger(sys.argv[2]); j = int(sys.argv[3])\n"
            "with led.transaction() as t:\n"
            "    p = place(host, t.occupancy(), Request(count=1))\n"
            "    t.allocate(Allocation.from_placement(f'job:{j}', p, owner='job', job_id=j,"
            " domain=f'vm{j}'))\n")

    def one(j):
        return subprocess.run([sys.executable, "-c", code, str(dgx2), str(state), str(j)],
                              capture_output=True, text=True, timeout=120)

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(1, 17)))
    assert all(r.returncode == 0 for r in results), [r.stderr for r in results if r.returncode]
    allocs = Ledger(state).read().allocations
    assert len(allocs) == 16
    gpus = [g for a in allocs.values() for g in a.gpu_pcis]
    cpus = [c for a in allocs.values() for c in a.cpus]
    assert len(set(gpus)) == 16 and len(set(cpus)) == len(cpus)
    proc = run("plan", "--gpu-count", "1", env={"DGXVM_SYSFS_ROOT": str(dgx2),
                                                 "DGXVM_STATE_DIR": str(state)}, check=False)
    assert proc.returncode == 4 and "only 0 GPU(s) free" in proc.stderr
    shown = json.loads(run("topology", "show", "--json", env={
        "DGXVM_SYSFS_ROOT": str(dgx2), "DGXVM_STATE_DIR": str(state)}).stdout)
    assert {g["held_by"] for g in shown["gpus"]} == {f"job:{j}" for j in range(1, 17)}


def test_a_corrupt_ledger_is_reported_and_left_untouched(dgx2, tmp_path):
    state = tmp_path / "state"
    host = discover(SysfsRoot(dgx2))
    Ledger(state).allocate(Allocation.from_placement(
        "job:1", place(host, Ledger(state).read().occupancy(), Request(count=2)), owner="job",
        job_id=1, domain="vm1"))
    path = state / "ledger.json"
    damaged = path.read_text().replace('"job:1"', '"job:2"', 1)
    path.write_text(damaged)
    proc = run("topology", "show", env={"DGXVM_SYSFS_ROOT": str(dgx2),
                                        "DGXVM_STATE_DIR": str(state)}, check=False)
    assert proc.returncode == 5 and "corrupt" in proc.stderr and str(path) in proc.stderr
    assert path.read_text() == damaged


@pytest.mark.libvirt_lifecycle     # it runs a libvirtd of its own: a pytest of its own
def test_the_readme_demo_runs_and_leaves_nothing_behind(no_session_libvirt_stack):
    """README's first command (set-up included). It must exit 0 and remove its work dir."""
    before = {p.name for p in Path("/tmp").glob("dgxvm-demo.*")}
    # as a reader runs it: none of the tests' DGXVM_* variables, so the demo runs this
    # checkout's .venv (and its copy for the demo's user), not the package the rest tests
    env = {k: v for k, v in os.environ.items() if not k.startswith("DGXVM_")}
    proc = subprocess.run(["bash", str(REPO / "demo" / "run")], capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "SIMULATED" in out and "job 102:  4 GPU(s)  Slurm chose 1-4    -> VM gets 4-7" in out
    assert "released 6 jobs; ledger now holds 0 allocation(s)" in out
    # every job ran its work in a container in its own VM, which wrote into the work dir
    # as the demo's user, as themselves (pyxis's default), not as root: the uid the same
    # job's plain `dgxvm run` saw in its VM
    uids = set(re.findall(r"inside: .*, uid (\d+),", out))
    assert len(uids) == 1 and uids != {"0"}, out[-3000:]
    uid = uids.pop()
    wrote = [line for line in out.splitlines() if f"in container hello-1: uid {uid}," in line]
    assert len(wrote) == 10, out[-3000:]
    assert {p.name for p in Path("/tmp").glob("dgxvm-demo.*")} == before
