"""Tenants through the real Slurm cluster: what a job's user controls (its work dir, its user
name) and what root in its VM does can never reach the host, another tenant, or drain the node.

Each refused job must end CANCELLED before its script runs, with the reason in its AdminComment
and slurmd's log, the node still in service and nothing left behind. Jobs that are legitimate
(a path with a space, a user named john.doe) must get their VM and their share.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt
import pytest

from harness.guest_agent import domain, guest_exec
from harness.slurm import SLURMD_PORT
from slurm_dgxvm.slurm.accounting import decode

from test_slurm_jobs import nothing_left, slurmd_lines

pytestmark = pytest.mark.integration

OTHER_USER = "john.doe"

EVIDENCE = """#!/bin/sh
touch "$SLURM_SUBMIT_DIR/ran-$SLURM_JOB_ID"
"""

SHARE_SCRIPT = """#!/bin/sh
# the work dir (with a space) is shared: the VM reads what the host wrote, and writes back
set -e
eval "$(dgxvm job --env)"
echo "from the host" > host-file
$DGXVM_SSH "cd \\"$PWD\\" && cat host-file && id -un > guest-file && id -u >> guest-file"
touch ready-$SLURM_JOB_ID
sleep {hold}
"""


def refused(node, job, fragment):
    node.jobs.wait_done([job], timeout=180)
    row = node.jobs.sacct([job])[job]
    assert row["State"].startswith("CANCELLED"), row
    rec = decode(row["AdminComment"])
    assert rec is not None and rec["state"] == "refused", row["AdminComment"]
    assert fragment in rec["cause"], rec["cause"]
    [line] = [ln for ln in slurmd_lines(node, job) if "refused" in ln]
    assert fragment in line and "job cancelled, node stays in service" in line
    assert not (node.jobs.workdir / f"ran-{job}").exists(), "the batch script ran"
    node.cluster.wait_idle(timeout=120, drained_fails=True)    # in service



@pytest.fixture(scope="module")
def other_user(slurm_node):
    """A second user, named the way sites name people: john.doe."""
    created = subprocess.run(["getent", "passwd", OTHER_USER], capture_output=True).returncode
    if created:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", OTHER_USER], check=True)
    slurm_node.cluster.add_user(OTHER_USER)
    try:
        yield OTHER_USER
    finally:
        if created:
            subprocess.run(["userdel", "--remove", OTHER_USER], capture_output=True)


def test_work_dirs_that_may_not_be_shared_cancel_the_job_and_keep_the_node(slurm_node):
    node = slurm_node
    base = node.env.workdir
    private = base / "private"                      # under share_roots: another user's, 0700
    private.mkdir(mode=0o700, exist_ok=True)
    os.chown(private, 65534, 65534)
    link = node.jobs.workdir / "to-etc"              # the user's own symlink to /etc
    if not link.is_symlink():
        link.symlink_to("/etc")
    os.lchown(link, node.env.uid, node.env.gid)
    cases = [("/etc", "not under vm.share_roots"), ("/", "not under vm.share_roots"),
             (str(private), "cannot read"), (str(link), "is a symbolic link")]
    jobs = {node.jobs.sbatch(EVIDENCE, gpus=1, chdir=path,
                             output=f"{node.jobs.workdir}/slurm-%j.out"): (path, why)
            for path, why in cases}
    for job, (path, why) in jobs.items():
        refused(node, job, why)
        assert path in decode(node.jobs.sacct([job])[job]["AdminComment"])["cause"]
    nothing_left(node)


def test_legitimate_names_and_paths_get_their_vm_and_another_user_sees_nothing(
        slurm_node, other_user):
    node = slurm_node
    spaced = node.jobs.workdir / "a b"
    spaced.mkdir(exist_ok=True)
    os.chown(spaced, node.env.uid, node.env.gid)
    theirs = Path(node.env.workdir) / "john"        # john.doe's own work dir, under the roots
    theirs.mkdir(exist_ok=True)
    import pwd
    jd = pwd.getpwnam(other_user)
    os.chown(theirs, jd.pw_uid, jd.pw_gid)
    a = node.jobs.sbatch(SHARE_SCRIPT.format(hold=60), gpus=2, chdir=spaced,
                         output=f"{spaced}/slurm-%j.out")
    b = node.jobs.sbatch(SHARE_SCRIPT.format(hold=60), gpus=1, chdir=theirs, user=other_user,
                         output=f"{theirs}/slurm-%j.out")
    try:
        deadline = time.monotonic() + 400
        while not ((spaced / f"ready-{a}").exists() and (theirs / f"ready-{b}").exists()):
            assert time.monotonic() < deadline, (slurmd_lines(node, a), slurmd_lines(node, b))
            time.sleep(0.5)
        assert (spaced / "guest-file").read_text().split() == [node.env.user, str(node.env.uid)]
        assert (spaced / "guest-file").stat().st_uid == node.env.uid
        assert (theirs / "guest-file").read_text().split() == [other_user, str(jd.pw_uid)]

        # root in job a's VM (the user has sudo there) tries the other tenant and the host's
        # Slurm: both must fail, while the host itself reaches both
        rec_a, rec_b = (json.loads((node.env.state_dir / "vms" / f"job-{j}" / "record.json")
                                   .read_text()) for j in (a, b))
        conn = libvirt.open(node.env.uri)
        try:
            net = ET.fromstring(conn.networkLookupByName(node.env.network).XMLDesc(0))
        finally:
            conn.close()
        gateway = net.find("ip").get("address")
        for target, port in ((rec_b["address"], 22), (gateway, SLURMD_PORT)):
            control = subprocess.run(
                ["ip", "netns", "exec", node.env.netns, "python3", "-c",
                 f"import socket; socket.create_connection(({target!r}, {port}), 5)"],
                capture_output=True, text=True, timeout=30)
            assert control.returncode == 0, (target, port, control.stderr)
            conn, dom = domain(node.env.uri, f"job-{a}")
            try:
                r = guest_exec(dom, f"nc -w 3 {target} {port} </dev/null; echo rc=$?")
            finally:
                conn.close()
            assert "rc=0" not in r.out, f"job {a}'s VM reached {target}:{port}: {r.out}"

        # john.doe asks for the other user's job: the same answer as for no VM at all
        dgxvm = [str(node.jobs.dgxvm), "--config", str(node.jobs.config)]
        r = node.cluster.run([*dgxvm, "job", "--job", str(a), "--json"],
                             user=other_user, check=False, timeout=60)
        assert r.returncode == 2 and f"job {a} has no VM of yours" in r.stderr, r
        assert node.env.user not in r.stdout and "address" not in r.stdout
        vmdir = node.env.state_dir / "vms" / f"job-{a}"
        for name in ("record.json", "job.json", "id_ed25519", "known_hosts", "console.log",
                     "seed.iso", "domain.xml"):
            r = node.cluster.run(["cat", str(vmdir / name)], user=other_user, check=False)
            assert r.returncode != 0 and not r.stdout, name
        r = node.cluster.run(["ls", str(vmdir)], user=other_user, check=False)
        assert r.returncode != 0
        # the job's own user gets its VM
        r = node.cluster.run([*dgxvm, "job", "--job", str(a), "--json"],
                             user=node.env.user, check=False, timeout=60)
        assert r.returncode == 0 and '"address"' in r.stdout, r.stderr
    finally:
        node.cluster.run(["scancel", str(a), str(b)], check=False)
        node.jobs.wait_done([a, b], timeout=300)
    for job in (a, b):
        assert not [ln for ln in slurmd_lines(node, job) if "failed" in ln]
    node.cluster.wait_idle(timeout=120, drained_fails=True)    # in service
    nothing_left(node)
