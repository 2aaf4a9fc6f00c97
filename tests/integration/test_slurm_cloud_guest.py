"""A real Slurm job on a partition whose image is the Debian 12 cloud guest (systemd, cloud-init
reading dgxvm's NoCloud seed, podman), in a warm VM: `dgxvm warm boot` boots the cloud guest
ahead (ready once cloud-init has applied the warm VM's seed), the job's Prolog claims it (the
identity applied by dgxvm-claim under the guest's dash, the keys where its sshd reads them, the
work dir plugged live), the batch script's `srun dgxvm run` steps run as the job's ordinary
user in the guest and in a rootless podman container, their statuses are the steps' in sacct,
the record says which guest image and which container image, and the Epilog leaves nothing.
The cold path of the cloud guest through Slurm is test_multinode_cloud's (a multi-node job
always starts cold)."""

from __future__ import annotations

import os

import pytest

from slurm_dgxvm.lifecycle.identity import hostname_for
from slurm_dgxvm.slurm.accounting import decode
from test_slurm_jobs import nothing_left, slurmd_lines
from test_slurm_run import _step_rows

pytestmark = pytest.mark.integration

IMAGE = "cloudguest"

JOB_SCRIPT = """#!/bin/sh
srun dgxvm run -- sh -c 'echo "uid=$(id -u) gid=$(id -g) host=$(hostname)"; \
cloud-init status --long | sed -n "s/^status: /cloud-init=/p"; \
k=/etc/ssh/dgxvm/authorized_keys; echo "keys root=$(grep -c ssh- $k/root) \
user=$(grep -c ssh- $k/$(id -un))"; echo "in-work-dir=$(cat $PWD/cloud-marker)"'
srun dgxvm run --container-image {ref} -- sh -c 'echo "in $(cat /marker) as $(whoami)"; exit 7'
"""


@pytest.fixture
def cloud_partition(slurm_node, cloud_manifest):
    """Partition ``cloud`` (in slurm.conf since the cluster started) runs the cloud guest, with
    the memory systemd, cloud-init and podman need (the other tests' VMs get 384 MiB)."""
    env = slurm_node.env
    r = env.dgxvm("image", "install", str(cloud_manifest), "--name", IMAGE)
    assert r.returncode == 0, r.stderr
    before = env.config.read_text()
    env.config.write_text(before.replace("fit_memory_mib = 384", "fit_memory_mib = 1024")
                          + f'\n[partitions.cloud]\nimage = "{IMAGE}"\n')
    try:
        yield "cloud"
    finally:
        env.config.write_text(before)
        env.dgxvm("image", "remove", IMAGE)


@pytest.fixture
def registry(slurm_node, tmp_path):
    from harness.registry import LocalRegistry, build_image
    reg = LocalRegistry(tmp_path / "reg", port=5000, netns=slurm_node.env.netns)
    reg.start()
    try:
        digest = build_image(reg, "cloud/busy", "1", tmp_path / "build", marker="cloud-busy")
        yield f"{reg.endpoint}/cloud/busy:1", digest
    finally:
        reg.stop()


def test_a_job_on_the_cloud_guest_partition_runs_its_steps_there_and_in_podman(
        slurm_node, cloud_partition, registry):
    node = slurm_node
    ref, digest = registry
    marker = node.jobs.workdir / "cloud-marker"
    marker.write_text("the-users-file\n")
    os.chown(marker, node.env.uid, node.env.gid)
    r = node.env.dgxvm("warm", "boot", "--gpu-count", "2", "--partition", cloud_partition,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    name = r.stdout.split(":")[0]
    job = node.jobs.sbatch(JOB_SCRIPT.format(ref=ref), gpus=2, partition=cloud_partition)
    node.jobs.wait_done([job], timeout=900)
    out = (node.jobs.workdir / f"slurm-{job}.out").read_text()
    row = node.jobs.sacct([job])[job]
    rec = decode(row["AdminComment"])
    assert rec is not None and rec["image"].startswith(f"{IMAGE}@"), (row, slurmd_lines(node, job))
    # the seed, as cloud-init applied it: the job's user, the VM's hostname; cloud-init's
    # init stages done without errors (ready does not wait for its config and final stages,
    # where the seed has nothing: `cloud-init status` may still say running)
    lines = slurmd_lines(node, job)
    assert rec["domain"] == name and rec["warm"] == "claimed", (rec, lines)
    assert any(f"warm VM {name} claimed" in ln for ln in lines), lines
    assert (f"uid={node.env.uid} gid={node.env.gid} host={hostname_for(rec['domain'])}\n"
            in out), out
    # the key root had at the warm boot is gone from wherever sshd reads it; the work dir,
    # plugged live, is the user's
    assert "keys root=0 user=1\n" in out and "in-work-dir=the-users-file\n" in out, out
    assert "cloud-init=running\n" in out or "cloud-init=done\n" in out, out
    assert "cloud-init=error" not in out, out
    # the container step ran under podman as the job's user; its status is the step's
    assert f"in cloud-busy as {node.env.user}\n" in out, out
    steps = _step_rows(node, job)
    assert steps[f"{job}.0"]["ExitCode"] == "0:0", steps
    assert steps[f"{job}.1"]["ExitCode"] == "7:0", steps
    assert steps[str(job)]["State"] == "FAILED" and steps[str(job)]["ExitCode"] == "7:0", steps
    assert rec["containers"] == f"{ref}@{digest}", rec
    assert rec["state"] == "ended" and float(rec["claim_s"]) > 0, rec
    node.cluster.wait_idle(timeout=120)
    nothing_left(node)
