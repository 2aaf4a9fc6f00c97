"""Faults injected for real on the local Slurm cluster while other jobs' VMs run.

Two bystander jobs hold VMs through the whole module; every case checks that they keep running
untouched (same domain, same QEMU process, same ledger entry), that the node ends in the state
the README's "Failure modes" promises, and that nothing of the faulted job is left (domains,
QEMU processes, VM directories, DHCP reservations, ledger entries: ``gone``; the whole node at
the end: ``nothing_left``). The Prolog and Epilog are crashed exactly after a named step through
the root-owned fault points file (slurm_dgxvm/failpoints.py); the other faults are the real
thing: QEMU SIGKILLed, libvirtd and slurmd restarted by PID, the ledger truncated, a GPU reset
that the (simulated) kernel refuses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import libvirt
import pytest

from conftest import DGXVM
from harness.guest_agent import domain, guest_exec
from slurm_dgxvm.errors import LedgerCorrupt
from slurm_dgxvm.ledger import Ledger
from slurm_dgxvm.ranges import parse_index_list
from slurm_dgxvm.slurm.accounting import decode
from test_slurm_jobs import nothing_left, wait_job_state
from test_slurm_reconcile import _domain_running

pytestmark = pytest.mark.integration

# the batch script starts only once the Prolog is done (squeue says RUNNING while it runs)
STARTED = "#!/bin/sh\ntouch started-$SLURM_JOB_ID\n"


def started_job(node, script: str, gpus: int) -> int:
    """Submit ``script`` after STARTED and wait until it runs (its VM is ready)."""
    job = node.jobs.sbatch(STARTED + script, gpus=gpus)
    wait_for(f"job {job}'s script", lambda: (node.jobs.workdir / f"started-{job}").exists(),
             timeout=300)
    return job


# -- helpers ---------------------------------------------------------------------------------------
def root_dgxvm(node, *args: str, env: dict | None = None, timeout: float = 300):
    """dgxvm as root (the admin, or slurmd running a hook) in the cluster's namespace."""
    extra = [f"{k}={v}" for k, v in (env or {}).items()]
    return node.cluster.run(["env", f"DGXVM_CONFIG={node.env.config}", *extra, str(DGXVM),
                             *args], check=False, timeout=timeout)


def failpoint(node, point: str, vm: str) -> Path:
    path = node.env.state_dir / "failpoints"
    with open(path, "a") as f:
        f.write(f"{point} {vm} kill\n")
    path.chmod(0o644)
    return path


def fired(path: Path, vm: str) -> bool:
    return not path.exists() or f" {vm} " not in path.read_text()


def wait_for(what: str, cond, timeout: float = 180, step: float = 0.3):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(step)


def domains(node) -> dict[str, str]:
    """name -> UUID of every libvirt domain, running or not."""
    conn = libvirt.open(node.env.uri)
    try:
        return {d.name(): d.UUIDString() for d in conn.listAllDomains()}
    finally:
        conn.close()


def active(node, name: str) -> bool:
    return _domain_running(node.env.uri, name)


def qemu_pid(node, name: str) -> int | None:
    for pid in node.env.stack.qemu_pids():
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a.startswith(f"guest={name},".encode()) for a in argv):
            return pid
    return None


def guest_processes(node, name: str) -> str:
    """The command lines of the processes running in VM ``name`` (ps as root in the guest,
    through its QEMU guest agent)."""
    try:
        conn, dom = domain(node.env.uri, name)
    except libvirt.libvirtError:
        return ""
    try:
        return guest_exec(dom, "ps -o args 2>/dev/null || ps", timeout=30).out
    except (libvirt.libvirtError, TimeoutError):   # the agent not answering yet: asked again
        return ""
    finally:
        conn.close()


def gone(node, job: int) -> bool:
    """Nothing of job's VM is left: domain, QEMU, directory, ledger entry."""
    name = f"job-{job}"
    return (name not in domains(node) and qemu_pid(node, name) is None
            and not (node.env.state_dir / "vms" / name).exists()
            and f"job:{job}" not in Ledger(node.env.state_dir).read().allocations)


def held_gpus(node, job: int) -> tuple[str, ...]:
    return Ledger(node.env.state_dir).read().allocations[f"job:{job}"].gpu_pcis


def gpu_show(node) -> dict:
    return json.loads(root_dgxvm(node, "gpu", "show", "--json").stdout)


def reconcile_consistent(node) -> dict:
    r = root_dgxvm(node, "reconcile", "--node", node.cluster.node_name, "--json")
    doc = json.loads(r.stdout)
    assert r.returncode == 0 and doc["consistent"], (r.stdout, r.stderr)
    return doc


def diagnose(node, job: int) -> str:
    """What a stuck job looks like: its state, its output, slurmd's lines about it, the
    processes of its step."""
    out = node.jobs.workdir / f"slurm-{job}.out"
    q = node.cluster.run(["squeue", "-h", "-j", str(job), "-o", "%T|%r"], check=False)
    log = node.cluster.slurmd_log.read_text(errors="replace").splitlines()
    ps = subprocess.run(["ps", "-eo", "pid,ppid,etime,args"], capture_output=True,
                        text=True).stdout
    return (f"job {job}: {q.stdout.strip()}\noutput:\n"
            f"{out.read_text() if out.exists() else '(none)'}\nslurmd:\n"
            + "\n".join(line for line in log[-400:] if str(job) in line)
            + "\nprocesses:\n"
            + "\n".join(line for line in ps.splitlines()
                         if "ssh" in line or "dgxvm" in line or "slurmstepd" in line))


def admin_comment(node, job: int) -> dict:
    deadline = time.monotonic() + 60
    while True:
        row = node.jobs.sacct([job])[job]
        doc = decode(row["AdminComment"]) or {}
        if doc.get("state") == "ended" or time.monotonic() > deadline:
            return row | {"vm": doc}
        time.sleep(1)


# -- the jobs that must come through every fault untouched -----------------------------------------
@pytest.fixture(scope="module")
def bystanders(slurm_node):
    node = slurm_node
    jobs = []
    try:
        # their Prologs done (a create in progress would hold reconcile's ledger rebuild off)
        jobs += [started_job(node, "sleep 3600\n", gpus=1),
                 started_job(node, "sleep 3600\n", gpus=2)]
        seen = {}
        for job in jobs:
            name = f"job-{job}"
            wait_for(f"{name} running", lambda n=name: active(node, n), timeout=60)
            seen[job] = (domains(node)[name], qemu_pid(node, name),
                         Ledger(node.env.state_dir).read().allocations[f"job:{job}"])

        def untouched():
            allocs = Ledger(node.env.state_dir).read().allocations
            for job, (uuid, pid, alloc) in seen.items():
                name = f"job-{job}"
                assert domains(node).get(name) == uuid, f"{name} redefined or gone"
                assert active(node, name), f"{name} stopped"
                assert qemu_pid(node, name) == pid, f"{name}'s QEMU changed"
                assert allocs.get(f"job:{job}") == alloc, f"{name}'s ledger entry changed"
                q = node.cluster.run(["squeue", "-h", "-j", str(job), "-o", "%T"], check=False)
                assert q.stdout.strip() == "RUNNING", f"job {job}: {q.stdout.strip()!r}"
        yield SimpleNamespace(jobs=jobs, untouched=untouched)
    finally:
        for job in jobs:
            node.cluster.run(["scancel", str(job)], check=False)
        node.jobs.wait_done(jobs, timeout=300)
        if "drain" in node.cluster.node_state():
            node.cluster.resume_node()
        # slurmctld's own view: after these faults sinfo was seen to say "mixed" for minutes
        # while scontrol said State=IDLE CPUAlloc=0 with no job queued (measured in CI)
        wait_for("the node idle (scontrol)", lambda: _idle(node), timeout=180, step=1)
    nothing_left(node)


def _idle(node) -> bool:
    n = node.cluster.run(["scontrol", "show", "node", "-o", node.cluster.node_name],
                         check=False).stdout
    return " State=IDLE " in f" {n} " and " CPUAlloc=0 " in f" {n} "
    assert not Ledger(node.env.state_dir).read().allocations


def _resume(node, *jobs: int) -> None:
    for job in jobs:
        node.cluster.run(["scancel", str(job)], check=False)
    node.jobs.wait_done(jobs, timeout=300)
    state = node.cluster.node_state()
    if "drain" in state:
        node.cluster.resume_node()


# -- the Prolog and the Epilog crashed -------------------------------------------------------------
# after:define runs in CI in the soak smoke (tests/integration/test_soak_smoke.py)
@pytest.mark.parametrize("step", ["place", "disks", "start"])
def test_a_prolog_killed_after_a_create_step_leaves_nothing_and_spares_the_others(
        slurm_node, bystanders, step):
    """after:place (the ledger written), after:disks (the overlay made), after:start (the
    guest booting): Slurm drains the node ("Prolog error")
    and holds the job; the Epilog slurmd runs for it removes what the create made; reconcile
    then finds the node consistent."""
    node = slurm_node
    job = node.jobs.sbatch("#!/bin/sh\ntouch ran-$SLURM_JOB_ID\n", gpus=2, extra=("--hold",))
    try:
        fp = failpoint(node, f"after:{step}", f"job-{job}")
        node.cluster.run(["scontrol", "release", str(job)])
        wait_for(f"the Prolog of job {job} to die after {step}", lambda: fired(fp, f"job-{job}"))
        wait_for("the node drained for the Prolog", lambda: "drain" in node.cluster.node_state(),
                 timeout=120)
        wait_job_state(node, job, ("PENDING",), timeout=120)     # requeued, held
        wait_for(f"job {job}'s leftovers removed by its Epilog", lambda: gone(node, job))
        assert not (node.jobs.workdir / f"ran-{job}").exists()
        reconcile_consistent(node)
        bystanders.untouched()
    finally:
        _resume(node, job)


def test_an_epilog_killed_mid_teardown_and_run_again_finishes_the_teardown(slurm_node,
                                                                           bystanders):
    """Killed after undefine, before the GPUs' reset and the release: Slurm drains the node
    ("Epilog error"); the ledger still holds the GPUs, so no job gets them. The Epilog run
    again (as slurmd would, or an admin) resets them, releases everything and writes the
    job's record."""
    node = slurm_node
    job = node.jobs.sbatch("#!/bin/sh\ntrue\n", gpus=1, extra=("--hold",))
    try:
        fp = failpoint(node, "after:undefine", f"job-{job}")
        node.cluster.run(["scontrol", "release", str(job)])
        wait_for(f"the Epilog of job {job} to die after undefine",
                 lambda: fired(fp, f"job-{job}"), timeout=300)
        wait_for("the node drained for the Epilog", lambda: "drain" in node.cluster.node_state(),
                 timeout=60)
        allocs = Ledger(node.env.state_dir).read().allocations
        assert f"job:{job}" in allocs                         # still held: given to no one
        assert f"job-{job}" not in domains(node)
        r = root_dgxvm(node, "epilog", env={"SLURM_JOB_ID": str(job),
                                            "SLURMD_NODENAME": node.cluster.node_name})
        assert r.returncode == 0, (r.stdout, r.stderr)
        assert gone(node, job)
        vm = admin_comment(node, job)["vm"]
        assert vm["state"] == "ended" and "reset:" in vm["teardown_stages"], vm
        assert vm["ended"] == "removed a VM left deleting"
        reconcile_consistent(node)
        bystanders.untouched()
    finally:
        _resume(node, job)


# -- the guest crashes: QEMU SIGKILLed ---------------------------------------------------------------
def test_a_crashed_guest_ends_its_job_with_the_reason_and_its_gpus_are_reset(slurm_node,
                                                                             bystanders):
    node = slurm_node
    job = started_job(node, "exec dgxvm run -- sleep 3600\n", gpus=2)
    name = f"job-{job}"
    try:
        gpus = held_gpus(node, job)
        before = gpu_show(node)
        resets = {d["pci"]: d["resets"] for d in before["devices"]}
        # dgxvm run reached the guest: its command runs there (seen by the guest's root,
        # through its agent)
        wait_for(f"sleep 3600 running in {name}",
                 lambda: "sleep 3600" in guest_processes(node, name), timeout=120, step=1)
        os.kill(qemu_pid(node, name), signal.SIGKILL)
        try:
            node.jobs.wait_done([job], timeout=180)
        except TimeoutError as exc:
            raise AssertionError(diagnose(node, job)) from exc
        out = (node.jobs.workdir / f"slurm-{job}.out").read_text()
        assert "the VM stopped (stopped outside dgxvm (its guest powered off or crashed" in out
        row = admin_comment(node, job)
        assert row["State"] == "FAILED", row
        assert row["vm"]["ended"].startswith("the VM stopped before the job ended"), row["vm"]
        after = gpu_show(node)
        now = {d["pci"]: d for d in after["devices"]}
        for pci in gpus:                                     # reset (by the hook) and checked
            assert now[pci]["resets"] == resets[pci] + 1 and now[pci]["state"] != "quarantined"
        assert gone(node, job)
        assert "drain" not in node.cluster.node_state()      # a guest's crash is not the node's
        bystanders.untouched()
    finally:
        _resume(node, job)


# -- a GPU whose reset the kernel refuses ------------------------------------------------------------
def test_a_gpu_whose_reset_fails_is_quarantined_and_the_next_job_gets_another(slurm_node,
                                                                              bystanders):
    node = slurm_node
    job = started_job(node, "sleep 5\n", gpus=1)
    bad = None
    try:
        bad = held_gpus(node, job)[0]
        r = root_dgxvm(node, "simulate", "--fault", f"{bad}:reset-fail", "--into",
                       str(node.env.sysfs))
        assert r.returncode == 0, r.stderr
        node.jobs.wait_done([job], timeout=180)
        vm = admin_comment(node, job)["vm"]
        assert vm["quarantined"].startswith(f"{bad} (reset failed: writing "), vm
        assert "drain" not in node.cluster.node_state()      # degraded, still in service
        show = gpu_show(node)
        q = next(d for d in show["devices"] if d["pci"] == bad)
        assert q["state"] == "quarantined" and q["job"] == job
        # (the cluster's partition "broken" names a missing image on purpose: health fails
        # on that, so it is asked for its findings only)
        health = root_dgxvm(node, "health", "--node", node.cluster.node_name, "--no-drain",
                            "--json")
        cap = next(f for f in json.loads(health.stdout)["findings"] if f["check"] == "capacity")
        assert cap["ok"] and cap["detail"].startswith("DEGRADED: largest VM possible: 8 GPU(s)")
        # the next jobs never get it, whatever Slurm chose (it may well choose its index again)
        nxt = [node.jobs.sbatch("#!/bin/sh\ntrue\n", gpus=1) for _ in range(2)]
        node.jobs.wait_done(nxt, timeout=300)
        for j in nxt:
            row = admin_comment(node, j)
            assert row["State"] == "COMPLETED", row
            assert q["index"] not in parse_index_list(row["vm"]["gpus"], what="GPU"), row
        bystanders.untouched()
    finally:
        if bad is not None:
            root_dgxvm(node, "simulate", "--fault", f"{bad}:clear", "--into",
                       str(node.env.sysfs))
            root_dgxvm(node, "gpu", "clear", bad, "--note", "test over")
        _resume(node, job)
    show = gpu_show(node)
    assert not [d for d in show["devices"] if d["state"] == "quarantined"]


# -- the daemons restarted under running VMs -------------------------------------------------------
def test_libvirtd_restarted_while_vms_run_keeps_them_and_serves_the_next_job(slurm_node,
                                                                             bystanders):
    node = slurm_node
    node.env.stack.restart_libvirtd()
    bystanders.untouched()
    job = node.jobs.sbatch("#!/bin/sh\ntrue\n", gpus=1)
    node.jobs.wait_done([job], timeout=300)
    assert admin_comment(node, job)["State"] == "COMPLETED"
    assert gone(node, job)
    bystanders.untouched()


def test_slurmd_restarted_while_jobs_run_keeps_them_and_serves_the_next_job(slurm_node,
                                                                            bystanders):
    node = slurm_node
    node.cluster.restart_slurmd()
    bystanders.untouched()
    job = node.jobs.sbatch("#!/bin/sh\ntrue\n", gpus=1)
    node.jobs.wait_done([job], timeout=300)
    assert admin_comment(node, job)["State"] == "COMPLETED"
    assert gone(node, job)
    bystanders.untouched()


# -- the ledger truncated while VMs run ----------------------------------------------------------------
def test_a_truncated_ledger_stops_new_vms_until_reconcile_rebuilds_it(slurm_node, bystanders):
    """A power cut mid-write (by something that does not write atomically) leaves an empty
    ledger: the next Prolog refuses to place (the node is drained, the job held), `dgxvm
    health` names it with its fix, `dgxvm reconcile --rebuild-ledger` rebuilds it from libvirt's
    domains and the VM records, and the held job then runs; the running VMs never notice."""
    node = slurm_node
    ledger = node.env.state_dir / "ledger.json"
    truth = {k: a.gpu_pcis for k, a in Ledger(node.env.state_dir).read().allocations.items()}
    with open(ledger, "r+b") as f:
        f.truncate(0)
    job = node.jobs.sbatch("#!/bin/sh\ntrue\n", gpus=1)
    try:
        wait_for("the node drained by the Prolog", lambda: "drain" in node.cluster.node_state(),
                 timeout=120)
        wait_job_state(node, job, ("PENDING",), timeout=120)       # requeued, held
        health = root_dgxvm(node, "health", "--node", node.cluster.node_name, "--no-drain",
                            "--json")
        assert health.returncode == 1
        ledger_finding = next(f for f in json.loads(health.stdout)["findings"]
                              if f["check"] == "ledger")
        assert not ledger_finding["ok"] and "is corrupt" in ledger_finding["detail"]
        assert "dgxvm reconcile --rebuild-ledger" in ledger_finding["fix"]
        r = root_dgxvm(node, "reconcile", "--node", node.cluster.node_name, "--rebuild-ledger")
        assert r.returncode == 0, (r.stdout, r.stderr)
        rebuilt = Ledger(node.env.state_dir).read().allocations
        assert {k: a.gpu_pcis for k, a in rebuilt.items()} == truth
        assert list(node.env.state_dir.glob("ledger.json.corrupt-*"))      # kept aside
        bystanders.untouched()
        node.cluster.resume_node()
        node.cluster.run(["scontrol", "release", str(job)], check=False)
        node.jobs.wait_done([job], timeout=300)
        assert admin_comment(node, job)["State"] == "COMPLETED"
        assert gone(node, job)
        bystanders.untouched()
    finally:
        try:
            Ledger(node.env.state_dir).read()
        except LedgerCorrupt:         # the test failed before the rebuild: the others need it
            root_dgxvm(node, "reconcile", "--node", node.cluster.node_name, "--rebuild-ledger")
        _resume(node, job)
        for p in node.env.state_dir.glob("ledger.json.corrupt-*"):
            p.unlink()


# -- a tenant cannot get a GPU quarantined by what its guest says ------------------------------------
def test_a_tenant_cannot_get_a_gpu_quarantined_by_what_its_guest_reports(slurm_node, bystanders):
    """Root in the guest (qemu-ga: the stand-in for a user with sudo) writes GPU failures
    everywhere it can reach — its serial console (the host's console log), its kernel log, the
    shared work dir — then powers the VM off hard. The host's check reads none of it: the
    GPUs are reset, pass, and go back into service."""
    from harness.guest_agent import domain, guest_exec
    node = slurm_node
    job = started_job(node, "sleep 3600\n", gpus=2)
    name = f"job-{job}"
    try:
        gpus = held_gpus(node, job)
        lie = ("NVRM: Xid (PCI:0000:34:00): 79, GPU has fallen off the bus. "
               "dgxvm: GPU 0000:34:00.0 failed; quarantine it")
        conn, dom = domain(node.env.uri, name)
        try:
            r = guest_exec(dom, f"echo '{lie}' > /dev/console; echo '{lie}' > /dev/kmsg; "
                                f"echo '{lie}' > /dev/ttyS0; "
                                f"for f in gpu-health.json failpoints health; do "
                                f"echo '{lie}' > {node.jobs.workdir}/$f; done; true")
            assert r.code == 0, r
            guest_exec(dom, "echo o > /proc/sysrq-trigger || poweroff -f", timeout=10)
        except (TimeoutError, libvirt.libvirtError):
            pass                                                # the guest went away mid-call
        finally:
            conn.close()
        wait_for(f"{name} off", lambda: not active(node, name), timeout=120)
        wait_for("the hook's reset", lambda: f"job:{job}" not in
                 Ledger(node.env.state_dir).read().allocations, timeout=60)
        show = gpu_show(node)
        mine = {d["pci"]: d for d in show["devices"] if d["pci"] in gpus}
        assert all(d["state"] != "quarantined" and d["last_reset"]["ok"]
                   for d in mine.values()), mine
        assert not [d for d in show["devices"] if d["state"] == "quarantined"]
        bystanders.untouched()
    finally:
        _resume(node, job)
        for f in ("gpu-health.json", "failpoints", "health"):
            (node.jobs.workdir / f).unlink(missing_ok=True)
    assert gone(node, job)
