"""`dgxvm reconcile` on a real node, with Slurm answering which jobs are here. A job's Prolog
SIGKILLed while its VM boots: Slurm drains the node and holds the job, and the Epilog slurmd
runs for it removes the VM (measured: the leftovers are gone before reconcile could see them),
so reconcile finds the node consistent. An admin VM whose domain was undefined by hand leaves
its directory, disks and DHCP reservation: reconcile removes them, and a second run finds
nothing."""

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


def test_a_prolog_killed_while_its_vm_boots_leaves_a_consistent_node(slurm_node):
    """Slurm drains the node and holds the job; the Epilog slurmd runs for the job removes what
    the killed create left, and reconcile then finds nothing to do."""
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
        wait_job_state(node, job, ("PENDING",), timeout=120)
        deadline = time.monotonic() + 120
        while _domain_running(node.env.uri, name) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _domain_running(node.env.uri, name)
        assert not (node.jobs.workdir / f"ran-{job}").exists()
        r = reconcile(node, "--json")
        doc = json.loads(r.stdout)
        assert r.returncode == 0 and doc["consistent"], (r.stdout, r.stderr)
    finally:
        node.cluster.run(["scancel", str(job)], check=False)
        node.cluster.resume_node()
        node.cluster.wait_idle(timeout=180)
    nothing_left(node)


def test_an_admin_vm_whose_domain_was_undefined_by_hand_is_removed_by_reconcile(slurm_node):
    """`virsh destroy` + `virsh undefine` behind dgxvm's back leave the VM's directory, disks
    and DHCP reservation: reconcile --dry-run names them and changes nothing, reconcile removes
    them, a second run finds the node consistent."""
    node = slurm_node
    env = node.env
    r = env.dgxvm("create", "--gpu-count", "1", "--domain", "rcx", "--user", env.user)
    assert r.returncode == 0, r.stderr
    try:
        env.virsh("destroy", "rcx")
        env.virsh("undefine", "--nvram", "rcx", check=False)
        assert (env.state_dir / "vms" / "rcx").is_dir()
        dry = reconcile(node, "--dry-run", "--json")
        mine = [f for f in json.loads(dry.stdout)["findings"] if f.get("name") == "rcx"]
        assert mine and all(f["result"] == "would do" for f in mine), dry.stdout
        assert (env.state_dir / "vms" / "rcx").is_dir()          # a dry run changes nothing
        r = reconcile(node, "--json")
        doc = json.loads(r.stdout)
        mine = [f for f in doc["findings"] if f.get("name") == "rcx"]
        assert mine and all(f["result"] == "done" for f in mine), doc
        assert r.returncode == 0, (r.stdout, r.stderr)
        assert not (env.state_dir / "vms" / "rcx").exists()
        again = reconcile(node, "--json")
        assert again.returncode == 0 and json.loads(again.stdout)["consistent"], again.stdout
    finally:
        env.dgxvm("delete", "--domain", "rcx")
    nothing_left(node)
