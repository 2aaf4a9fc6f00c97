"""Write each of dgxvm's on-disk and accounting formats, as this version writes them, into
tests/data/formats/<version>/ (tests/unit/test_formats_across_versions.py reads every version
kept there). Run once per release whose formats a later one must still read:

    PYTHONPATH=. python3 tests/data/formats/generate.py
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from slurm_dgxvm import config as config_mod
from slurm_dgxvm.observe import opstats
from slurm_dgxvm.config import Config
from slurm_dgxvm.health.store import HealthStore
from slurm_dgxvm.host.kernel import for_roots
from slurm_dgxvm.host.roots import HostRoots
from slurm_dgxvm.host.setup import apply, plan_setup
from slurm_dgxvm.ledger import Allocation, job_key
from slurm_dgxvm.lifecycle import Env
from slurm_dgxvm.placement import EMPTY, Policy, Request, place
from slurm_dgxvm.records import VmRecord
from slurm_dgxvm.simulate.hostops import as_bare_metal
from slurm_dgxvm.slurm import accounting
from slurm_dgxvm.observe.stages import StageTimer
from slurm_dgxvm.topology import discover

REPO = Path(__file__).resolve().parents[3]


def version() -> str:
    import re
    return re.search(r'^version = "(.+)"$', (REPO / "pyproject.toml").read_text(), re.M)[1]


def main() -> None:
    out = Path(__file__).resolve().parent / version()
    out.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run([sys.executable, "-m", "slurm_dgxvm.cli.main", "simulate", "dgx2",
                        "--out", str(tmp / "dgx2")], check=True, capture_output=True)
        state = tmp / "state"
        env = Env(config_mod.from_dict({"host": {"sysfs_root": str(tmp / "dgx2"),
                                                  "state_dir": str(state)}}))
        p = place(env.host, EMPTY, Request(count=4, slurm_gpus=(4, 5, 6, 7)), Policy())
        alloc = Allocation.from_placement(job_key(4242), p, owner="job", job_id=4242,
                                          domain="dgxvm-job-4242", user="alice")
        alloc = dataclasses.replace(alloc, created=1790000000.0)
        env.ledger.allocate(alloc)
        shutil.copy(state / "ledger.json", out / "ledger.json")
        rec = VmRecord(name="dgxvm-job-4242", uuid="5b0c3f0e-8d0e-4c39-9a55-0d7f2c1f4242",
                       state="running", owner="job", ledger_key=alloc.key, job_id=4242,
                       user="alice", uid=1000, gid=1000, workdir="/home/alice/run",
                       image="dgx-os", image_version="6.3.1", address="10.213.0.12",
                       mac="52:54:00:4a:10:92", network="dgxvm", allocation=alloc, placement=p,
                       created=1790000000.0, started=1790000051.2, boot_s=51.2, lock_s=0.05,
                       image_cache="/var/lib/dgxvm/containers/1000", groups=(1000, 54321),
                       create_stages={"placement": 0.056, "start": 6.5, "ready": 44.1},
                       gpu_resets={"0000:34:00.0": 1.2}, quarantined={})
        # file names as in a state dir: the test reads the directory as one
        (out / "vm-record.json").write_text(json.dumps(rec.to_json(), indent=2,
                                                         sort_keys=True) + "\n")
        (out / "admin-comment.txt").write_text(
            accounting.encode(accounting.vm_fields(rec, state="running")) + "\n")
        t = StageTimer(clock=iter([0.0, 0.5, 0.5, 7.0]).__next__)
        with t.stage("placement"):
            pass
        with t.stage("start"):
            pass
        opstats.observe(state, "create", t)
        opstats.observe(state, "teardown", t, RuntimeError("x"))
        shutil.copy(opstats.path_of(state), out / "opstats.json")
        HealthStore(state).quarantine("0000:bc:00.0", "reset failed", by="epilog", job=4242)
        shutil.copy(state / "gpu-health.json", out / "gpu-health.json")
        # dgxvm host setup's record, on a bare-metal simulated DGX H100
        subprocess.run([sys.executable, "-m", "slurm_dgxvm.cli.main", "simulate", "dgx-h100",
                        "--out", str(tmp / "h100")], check=True, capture_output=True)
        as_bare_metal(tmp / "h100")
        roots = HostRoots.make(tmp / "h100", tmp / "h100/state")
        binder, pages = for_roots(roots)
        apply(plan_setup(roots, Config(), discover(roots.sysfs), binder, pages,
                         dgxvm_path="/usr/bin/dgxvm"), roots, binder, pages)
        shutil.copy(tmp / "h100/state/host-setup.json", out / "host-setup.json")
    print(out)


if __name__ == "__main__":
    main()
