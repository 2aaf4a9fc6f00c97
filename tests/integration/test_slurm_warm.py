"""Warm VMs through Slurm: an admin boots a VM ahead (``dgxvm warm boot``); the Prolog of a job
whose block it is claims it instead of booting one, and the job runs in it as its own user,
with its own key and work dir; the Epilog deletes it like any job's VM. A job of another block
deletes the warm VM in its way and starts cold. Submitted by the ordinary user with sbatch.
"""

from __future__ import annotations

import json
import time

import pytest

from conftest import DGXVM
from slurm_dgxvm.ledger import Ledger
from slurm_dgxvm.slurm.accounting import decode
from test_slurm_jobs import nothing_left, slurmd_lines, wait_job_state

pytestmark = pytest.mark.integration

SCRIPT = """#!/bin/sh
set -e
eval "$(dgxvm job --env)"
dgxvm job --json > vm-$SLURM_JOB_ID.json
$DGXVM_SSH "id -u; hostname; echo from-the-vm > $PWD/in-vm-$SLURM_JOB_ID; \\
    wc -c < /root/.ssh/authorized_keys 2>/dev/null || echo unreadable" > ssh-$SLURM_JOB_ID.txt
"""


def boot_warm(node, gpus: int, *extra: str) -> str:
    r = node.env.dgxvm("warm", "boot", "--gpu-count", str(gpus), *extra)
    assert r.returncode == 0, r.stderr
    name = r.stdout.split(":")[0]
    listed = node.env.dgxvm("warm", "list", "--json")
    assert name in [json.loads(line)["name"] for line in listed.stdout.splitlines()]
    return name


def run_job(node, gpus: int, **kw) -> tuple[int, dict, list[str]]:
    """Submit SCRIPT on ``gpus`` GPUs and wait: (job id, its sacct row, its slurmd lines); the
    job completed."""
    job = node.jobs.sbatch(SCRIPT, gpus=gpus, **kw)
    node.jobs.wait_done([job], timeout=300)
    row = node.jobs.sacct([job])[job]
    lines = slurmd_lines(node, job)
    assert row["State"] == "COMPLETED", (row, lines)
    return job, row, lines


def test_a_job_claims_the_warm_vm_of_its_block_and_runs_in_it_as_its_user(slurm_node):
    node = slurm_node
    name = boot_warm(node, 2)
    job, row, lines = run_job(node, 2)
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


def test_a_job_with_no_room_beside_the_warm_vms_deletes_one_in_its_way_and_starts_cold(
        slurm_node):
    """2-GPU warm VMs on GPUs 0-1 and 8-9 leave no free 8-GPU block: an 8-GPU job deletes the
    one on its block and runs cold; the other stays warm (a job fitting beside them would have
    left both)."""
    node = slurm_node
    first = boot_warm(node, 2, "--gpu-index", "0")
    second = boot_warm(node, 2, "--gpu-index", "8")
    try:
        job, row, lines = run_job(node, 8)
        assert any(f"warm VM {first} deleted: it held devices of this job's block" in ln
                   for ln in lines), lines
        assert not any(f"warm VM {second} deleted" in ln for ln in lines), lines
        assert any(f"VM job-{job} ready in" in ln for ln in lines), lines
        assert decode(row["AdminComment"]).get("warm") is None
        assert [v["name"] for v in waiting_vms(node)] == [second]
    finally:
        node.env.dgxvm("delete", "--domain", second)
    assert Ledger(node.env.state_dir).read().allocations == {}
    nothing_left(node)
    node.cluster.wait_idle(timeout=120, drained_fails=True)


def waiting_vms(node) -> list[dict]:
    r = node.env.dgxvm("warm", "list", "--json")
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines()]


def warm_hits(node) -> int:
    r = node.env.dgxvm("metrics", "--textfile", "-")
    assert r.returncode == 0, r.stderr
    [line] = [ln for ln in r.stdout.splitlines()
              if ln.startswith('dgxvm_warm_claims_total{outcome="hit"}')]
    return int(line.split()[-1])


def wait_for_refill(node, timeout=180) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        vms = waiting_vms(node)
        paths = [node.env.state_dir / "vms" / v["name"] / "record.json" for v in vms]
        if not vms or not all(p.exists() for p in paths):     # placed, not designed yet
            time.sleep(1)
            continue
        rec = [json.loads(p.read_text()) for p in paths]
        if all(r["state"] == "running" and r["extra"].get("warm") == "waiting" for r in rec):
            return [v | {"uuid": r["uuid"]} for v, r in zip(vms, rec)]
        time.sleep(1)
    log = node.env.state_dir / "warm-refill.log"
    raise AssertionError(f"no warm VM after {timeout}s; refill log: "
                         f"{log.read_text() if log.exists() else '(none)'}")


def test_a_partitions_warm_policy_follows_its_jobs_is_refilled_trimmed_and_stopped(slurm_node):
    node = slurm_node
    first = node.jobs.sbatch(SCRIPT, gpus=2, partition="warm")
    node.jobs.wait_done([first], timeout=300)
    assert node.jobs.sacct([first])[first]["State"] == "COMPLETED"
    assert any("warm refill of partition warm started" in ln for ln in slurmd_lines(node, first))
    [vm] = wait_for_refill(node)                     # warm_recent = 1: its last job had 2 GPUs
    assert len(vm["gpus"]) == 2 and vm["partition"] == "warm"
    listed = node.env.dgxvm("warm", "list").stdout
    assert "partition warm keeps [2] GPU(s) warm (warm = []; its last 1 jobs here: [2])" in listed
    # a warm VM the policy does not keep (an admin's extra boot) goes at the next refill
    extra = node.env.dgxvm("warm", "boot", "--gpu-count", "1", "--partition", "warm")
    assert extra.returncode == 0, extra.stderr
    extra_name = extra.stdout.split(":")[0]
    r = node.cluster.run(["env", f"DGXVM_CONFIG={node.env.config}", str(DGXVM), "warm", "refill",
                          "--partition", "warm", "--node", node.cluster.node_name], check=False,
                         timeout=300)
    assert r.returncode == 0 and f"deleting {extra_name}: partition warm's policy no longer " \
        f"keeps it" in r.stdout and "the policy is met" in r.stdout, r.stdout
    assert [(v["name"], v["uuid"]) for v in wait_for_refill(node)] == [(vm["name"], vm["uuid"])]
    hits = warm_hits(node)
    second = node.jobs.sbatch(SCRIPT, gpus=2, partition="warm")
    node.jobs.wait_done([second], timeout=300)
    row = node.jobs.sacct([second])[second]
    assert row["State"] == "COMPLETED" and decode(row["AdminComment"])["domain"] == vm["name"]
    [again] = wait_for_refill(node)                  # used once: a new one replaces it
    assert again["uuid"] != vm["uuid"]
    assert warm_hits(node) == hits + 1
    r = node.env.dgxvm("warm", "stop")
    assert r.returncode == 0 and again["name"] in r.stdout, r.stdout
    try:
        third = node.jobs.sbatch(SCRIPT, gpus=2, partition="warm")
        node.jobs.wait_done([third], timeout=300)
        assert node.jobs.sacct([third])[third]["State"] == "COMPLETED"
        assert not any("warm refill" in ln for ln in slurmd_lines(node, third))
        assert waiting_vms(node) == []
    finally:
        assert node.env.dgxvm("warm", "start").returncode == 0
    nothing_left(node)
    node.cluster.wait_idle(timeout=120, drained_fails=True)


def test_no_refill_on_a_node_drained_while_its_job_ran(slurm_node):
    node = slurm_node
    log = node.env.state_dir / "warm-refill.log"
    before = log.read_text() if log.exists() else ""
    job = node.jobs.sbatch("#!/bin/sh\nsleep 8\n", gpus=2, partition="warm")
    try:
        wait_job_state(node, job, ("RUNNING",), timeout=180)
        node.cluster.run(["scontrol", "update", "NodeName=dgx01", "State=DRAIN",
                          "Reason=maintenance"])
        node.jobs.wait_done([job], timeout=300)
        deadline = time.monotonic() + 120
        while "stopped: the node is not in service (State=IDLE+DRAIN)" not in log.read_text()[len(before):]:
            assert time.monotonic() < deadline, log.read_text()[len(before):]
            time.sleep(0.5)
        assert waiting_vms(node) == []
    finally:
        node.cluster.resume_node()
        node.cluster.wait_idle(timeout=60)
    nothing_left(node)
