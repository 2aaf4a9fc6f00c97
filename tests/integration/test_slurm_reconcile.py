"""`dgxvm reconcile` on a real node: a job's Prolog SIGKILLed while its VM boots leaves a
running domain, its ledger entry, its VM directory and its DHCP reservation, and Slurm drains the
node and holds the job. Reconcile, asked by hand as an admin would, removes exactly that (the
job is no longer on the node), says why, and a second run finds nothing."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import libvirt
import pytest

from conftest import DGXVM
from test_slurm_jobs import nothing_left, wait_job_state

pytestmark = pytest.mark.integration


def _prolog_pid(job: int) -> int | None:
    """The `dgxvm prolog` process slurmd runs for ``job`` (found by its environment, killed
    by pid)."""
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            argv = (d / "cmdline").read_bytes().split(b"\0")
            env = (d / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"prolog" in argv and any(a.endswith(b"dgxvm") for a in argv[:2]) \
                and f"SLURM_JOB_ID={job}".encode() in env:
            return int(d.name)
    return None


def _domain_running(uri: str, name: str) -> bool:
    conn = libvirt.open(uri)
    try:
        return conn.lookupByName(name).isActive() == 1
    except libvirt.libvirtError:
        return False
    finally:
        conn.close()


def reconcile(node, *args: str):
    return node.cluster.run(["env", f"DGXVM_CONFIG={node.env.config}", str(DGXVM), "reconcile",
                             "--node", node.cluster.node_name, *args], check=False, timeout=300)


def test_a_prolog_killed_while_its_vm_boots_is_cleaned_by_reconcile(slurm_node):
    node = slurm_node
    job = node.jobs.sbatch("#!/bin/sh\ntouch ran-$SLURM_JOB_ID\n", gpus=2)
    name = f"job-{job}"
    try:
        deadline = time.monotonic() + 120
        pid = None
        while time.monotonic() < deadline:
            pid = _prolog_pid(job)
            if pid and _domain_running(node.env.uri, name):
                break
            time.sleep(0.2)
        assert pid and _domain_running(node.env.uri, name), "the Prolog never started the VM"
        os.kill(pid, signal.SIGKILL)
        # Slurm: a Prolog that failed drains the node and holds the job
        wait_job_state(node, job, ("PENDING",), timeout=120)
        # what the killed create left: the domain (booting), its ledger entry, its directory
        assert _domain_running(node.env.uri, name)
        assert (node.env.state_dir / "vms" / name).is_dir()
        ledger = json.loads((node.env.state_dir / "ledger.json").read_text())
        assert f"job:{job}" in json.dumps(ledger)

        dry = reconcile(node, "--dry-run", "--json")
        doc = json.loads(dry.stdout)
        assert any(f.get("name") == name for f in doc["findings"]), doc
        assert _domain_running(node.env.uri, name)            # a dry run changes nothing

        r = reconcile(node, "--json")
        doc = json.loads(r.stdout)
        mine = [f for f in doc["findings"] if f.get("name") == name]
        assert mine and all(f["result"] == "done" for f in mine), doc
        assert r.returncode == 0, (r.stdout, r.stderr)
        assert not (node.jobs.workdir / f"ran-{job}").exists()

        again = reconcile(node, "--json")
        assert again.returncode == 0 and json.loads(again.stdout)["consistent"], again.stdout
    finally:
        node.cluster.run(["scancel", str(job)], check=False)
        node.cluster.resume_node()
        node.cluster.wait_idle(timeout=180)
    nothing_left(node)
