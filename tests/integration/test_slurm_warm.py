"""Warm VMs through Slurm: an admin boots a VM ahead (``dgxvm warm boot``); the Prolog of a job
whose block it is claims it instead of booting one, and the job runs in it as its own user,
with its own key and work dir; the Epilog deletes it like any job's VM. A job of another block
deletes the warm VM in its way and starts cold. Submitted by the ordinary user with sbatch.
"""

from __future__ import annotations

import json

import pytest

from slurm_dgxvm.ledger import Ledger
from slurm_dgxvm.slurm.accounting import decode
from test_slurm_jobs import nothing_left, slurmd_lines

pytestmark = pytest.mark.integration

SCRIPT = """#!/bin/sh
set -e
eval "$(dgxvm job --env)"
dgxvm job --json > vm-$SLURM_JOB_ID.json
$DGXVM_SSH "id -u; hostname; echo from-the-vm > $PWD/in-vm-$SLURM_JOB_ID; \\
    wc -c < /root/.ssh/authorized_keys 2>/dev/null || echo unreadable" > ssh-$SLURM_JOB_ID.txt
"""


def boot_warm(node, gpus: int) -> str:
    r = node.env.dgxvm("warm", "boot", "--gpu-count", str(gpus))
    assert r.returncode == 0, r.stderr
    name = r.stdout.split(":")[0]
    listed = node.env.dgxvm("warm", "list", "--json")
    assert name in [json.loads(line)["name"] for line in listed.stdout.splitlines()]
    return name


def test_a_job_claims_the_warm_vm_of_its_block_and_runs_in_it_as_its_user(slurm_node):
    node = slurm_node
    name = boot_warm(node, 2)
    job = node.jobs.sbatch(SCRIPT, gpus=2)
    node.jobs.wait_done([job], timeout=300)
    row = node.jobs.sacct([job])[job]
    lines = slurmd_lines(node, job)
    assert row["State"] == "COMPLETED", (row, lines)
    assert any(f"warm VM {name} claimed" in ln for ln in lines), lines
    wd = node.jobs.workdir
    vm = json.loads((wd / f"vm-{job}.json").read_text())
    assert vm["name"] == name and vm["job_id"] == job
    uid, host, root_keys = (wd / f"ssh-{job}.txt").read_text().split()
    assert (uid, host) == (str(node.env.uid), name)
    assert root_keys == "unreadable", "the job's user can read root's keys"
    made = wd / f"in-vm-{job}"
    assert made.read_text() == "from-the-vm\n"
    assert (made.stat().st_uid, made.stat().st_gid) == (node.env.uid, node.env.gid)
    rec = decode(row["AdminComment"])
    assert rec["domain"] == name and rec["warm"] == "claimed" and float(rec["claim_s"]) > 0
    assert rec["state"] == "ended" and rec["ended"].startswith("job ended; deleted")
    nothing_left(node)
    node.cluster.wait_idle(timeout=120, drained_fails=True)


def test_a_job_of_a_larger_block_deletes_the_warm_vm_in_its_way_and_starts_cold(slurm_node):
    node = slurm_node
    name = boot_warm(node, 2)
    job = node.jobs.sbatch(SCRIPT, gpus=4)
    node.jobs.wait_done([job], timeout=300)
    row = node.jobs.sacct([job])[job]
    lines = slurmd_lines(node, job)
    assert row["State"] == "COMPLETED", (row, lines)
    assert any(f"warm VM {name} deleted: it held devices of this job's block" in ln
               for ln in lines), lines
    assert any(f"VM job-{job} ready in" in ln for ln in lines), lines
    assert decode(row["AdminComment"]).get("warm") is None
    assert Ledger(node.env.state_dir).read().allocations == {}
    nothing_left(node)
    node.cluster.wait_idle(timeout=120, drained_fails=True)
