"""The Debian 12 cloud guest (systemd, cloud-init, OpenSSH) on the job fabric, for real: a
two-node job on the local cluster's partition ``cloud`` boots that image on both nodes; what
cloud-init applied from dgxvm's seed makes the fabric usable as written on bare metal: each VM's
fabric NIC (found by its MAC) has its address and MTU, the job's node names resolve to the
VMs' fabric addresses (through the hosts template cloud-init renders /etc/hosts from), the
tasks meet over TCP at the first node's name, and the job's user reaches the other VM over SSH
with the job's derived key, the other VM's derived host key already known. The job runs from
the user's home, shared into the VMs: the user's own ~/.ssh there is left exactly as it was
(dgxvm's keys live under the guest's /etc/ssh). Afterwards nothing is left on either node."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

import pytest

from harness.cluster import CONFIG_PATH
from slurm_dgxvm.slurm.accounting import decode_all
from test_multinode_fabric import ADDR, NODES, nothing_left, slurmd_logs, wait_ended

pytestmark = [pytest.mark.integration, pytest.mark.multinode]

IMAGE = "cloudguest"

#: a rendezvous at MASTER_ADDR and an all-reduce of two ranks over TCP, in the cloud guest's
#: Python (it has no netcat)
ALLREDUCE = """\
import os, socket, time
rank, v = int(os.environ["SLURM_PROCID"]), (int(os.environ["SLURM_PROCID"]) + 1) * 10
if rank == 0:
    with socket.create_server(("", 29500)) as s:
        c, _ = s.accept()
        total = int(c.makefile().readline()) + v
        c.sendall(f"{total}\\n".encode())
else:
    for _ in range(300):
        try:
            c = socket.create_connection((os.environ["MASTER_ADDR"], 29500), timeout=3)
            break
        except OSError:
            time.sleep(0.2)
    c.sendall(f"{v}\\n".encode())
    total = int(c.makefile().readline())
print(f"rank {rank} of {os.environ['SLURM_NTASKS']} on {os.environ['SLURMD_NODENAME']} "
      f"sum {total}", flush=True)
"""

JOB = """#!/bin/sh
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
srun -N2 --ntasks-per-node=1 dgxvm run -- python3 ./allreduce.py
dgxvm run -- sh -c 'getent hosts dgxb; ip -o link show | grep -c "mtu 1450 "; \
ssh -o BatchMode=yes dgxb ip -o -4 addr show | grep -o "inet 10\\.64\\.[0-9.]*/16"'
"""


@pytest.fixture
def cloud(multinode, cloud_manifest):
    """Partition ``cloud`` (in the cluster's slurm.conf) runs the cloud guest on every node,
    with the memory systemd and cloud-init need; the user's home may be shared into VMs."""
    c = multinode
    before = {}
    for name in NODES:
        node = c.node(name)
        node.dgxvm_cmd("image", "install", str(cloud_manifest), "--name", IMAGE)
        conf = node.path(CONFIG_PATH)
        before[name] = conf.read_text()
        home = pwd.getpwnam(c.user).pw_dir
        text = before[name].replace("fit_memory_mib = 384", "fit_memory_mib = 1024")
        text = text.replace(f'share_roots = ["{c.workdir}"]',
                            f'share_roots = ["{c.workdir}", "{home}"]')
        assert home in text
        conf.write_text(text + f'\n[partitions.cloud]\nimage = "{IMAGE}"\n')
    try:
        yield "cloud"
    finally:
        for name, text in before.items():
            c.node(name).path(CONFIG_PATH).write_text(text)
            c.node(name).dgxvm_cmd("image", "remove", IMAGE, check=False)


def test_two_cloud_guests_of_one_job_meet_on_the_fabric_by_name_over_tcp_and_ssh(
        multinode, cloud):
    c = multinode
    pw = pwd.getpwnam(c.user)
    home = Path(pw.pw_dir)
    # the user's own SSH files in the home the job runs from (and shares into its VMs)
    own = {"authorized_keys": "# the user's own keys\n", "id_ed25519": "the user's own key\n",
           "known_hosts": "# the user's own known hosts\n"}
    ssh = home / ".ssh"
    ssh.mkdir(mode=0o700, exist_ok=True)
    for name, text in own.items():
        (ssh / name).write_text(text)
        (ssh / name).chmod(0o600)
    for path in (ssh, *ssh.iterdir()):
        os.chown(path, pw.pw_uid, pw.pw_gid)
    (home / "allreduce.py").write_text(ALLREDUCE)
    try:
        job = c.jobs.sbatch(JOB, gpus=1, nodes=len(NODES), partition=cloud, chdir=home,
                            output=f"{c.workdir}/slurm-%j.out")
        out = wait_ended(c, job, timeout=900)
        assert {p.name: p.read_text() for p in ssh.iterdir()} == own, out
    finally:
        (home / "allreduce.py").unlink(missing_ok=True)
        for p in ssh.iterdir():
            p.unlink()
        ssh.rmdir()
    lines = out.splitlines()
    assert "rank 0 of 2 on dgxa sum 30" in lines, out
    assert "rank 1 of 2 on dgxb sum 30" in lines, out
    # dgxb by name, the fabric NIC's MTU, and SSH as the job's user to dgxb's VM, whose
    # fabric address answers (BatchMode: no prompt for a key or an unknown host)
    assert [ADDR["dgxb"], "dgxb"] in [x.split() for x in lines], out
    assert "1" in lines, out
    assert f"inet {ADDR['dgxb']}/16" in lines, out
    row = c.jobs.sacct([job])[job]
    assert row["State"] == "COMPLETED", (out, slurmd_logs(c))
    records = decode_all(c.cluster.run(["sacct", "-j", str(job), "-X", "-n", "-P", "-o",
                                        "AdminComment"], check=True).stdout.strip())
    assert sorted((r["node"], r["state"], r["image"].split("@")[0]) for r in records) == [
        ("dgxa", "ended", IMAGE), ("dgxb", "ended", IMAGE)], records
    c.wait_idle()
    nothing_left(c)
