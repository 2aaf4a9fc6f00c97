"""The Prolog's and Epilog's decisions without a cluster: which failures drain the node
(exit 1) and which refuse only the job (exit 0 + cancel/requeue), the one line each writes, and
the Epilog's cleanup of half-made state. libvirt is its test driver (test:///default); the
Slurm commands are small recording scripts (the real ones run in tests/integration)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from slurm_dgxvm import config as config_mod
from slurm_dgxvm.images import ImageStore
from slurm_dgxvm.ledger import Allocation, job_key
from slurm_dgxvm.lifecycle import Env
from slurm_dgxvm.placement import EMPTY, Policy, Request, place
from slurm_dgxvm.slurm import hooks
from slurm_dgxvm.slurm.accounting import decode
from slurm_dgxvm.slurm.commands import Slurm

# nobody exists on every Debian host; root's jobs get no VM (tests/unit/test_job_input.py)
ENV = {"SLURM_JOB_ID": "42", "SLURM_JOB_UID": "65534", "SLURM_JOB_GID": "65534",
       "SLURM_JOB_USER": "nobody", "SLURM_JOB_GPUS": "0,1,2,3", "SLURM_JOB_PARTITION": "batch"}

RECORDER = """#!/bin/sh
printf '%s\\n' "$(basename "$0") $*" >> {log}
case "$(basename "$0") $*" in *{fail}*) echo "refused by test" >&2; exit 1;; esac
"""


@pytest.fixture(scope="module")
def image_store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("img")
    disk = root / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    ImageStore(root / "store").install(disk, name="base", default=True)
    return root / "store"


class World:
    def __init__(self, tmp_path, trees, image_store, *, fail="NEVER", partitions=None):
        bindir = tmp_path / "bin"
        bindir.mkdir(exist_ok=True)
        self.calls_log = tmp_path / "calls"
        for tool in ("scontrol", "sacctmgr", "scancel"):
            (bindir / tool).write_text(RECORDER.format(log=self.calls_log, fail=fail))
            (bindir / tool).chmod(0o755)
        cfg = {"host": {"sysfs_root": str(trees["dgx2"]), "state_dir": str(tmp_path / "state")},
               "libvirt": {"uri": "test:///default"}, "images": {"store": str(image_store)},
               "slurm": {"bin_dir": str(bindir)}}
        if partitions:
            cfg["partitions"] = partitions
        self.env = Env(config_mod.from_dict(cfg))
        self.slurm = Slurm(self.env.cfg.slurm)
        self.lines: list[str] = []

    def calls(self) -> list[str]:
        return self.calls_log.read_text().splitlines() if self.calls_log.exists() else []

    def prolog(self, **env) -> int:
        return hooks.prolog(self.env, {**ENV, **env}, self.slurm, self.lines.append)

    def epilog(self, **env) -> int:
        return hooks.epilog(self.env, {**ENV, **env}, self.slurm, self.lines.append)

    def admin_comment(self) -> dict:
        [call] = [c for c in self.calls() if "AdminComment=" in c]
        return decode(call.split("AdminComment=", 1)[1])


@pytest.fixture
def world(tmp_path, trees, image_store):
    return World(tmp_path, trees, image_store)


def test_a_job_without_gpus_gets_no_vm(world):
    assert world.prolog(SLURM_JOB_GPUS="") == 0
    assert world.lines == ["dgxvm prolog: job 42 (user nobody, Slurm GPUs none): no GPUs asked for, no VM"]
    assert world.calls() == []


def test_bad_comment_cancels_the_job_and_keeps_the_node(world):
    assert world.prolog(SLURM_JOB_COMMENT="dgxvm:imag=x") == 0
    [line] = world.lines
    assert line.startswith("dgxvm prolog: job 42 (user nobody, Slurm GPUs 0-3): refused at "
                           "reading the request (partition, job comment, image): job comment "
                           "'dgxvm:imag=x': unknown key 'imag'")
    assert line.endswith("job cancelled, node stays in service")
    assert world.calls()[-1] == "scancel 42"
    rec = world.admin_comment()
    assert rec["state"] == "refused" and "unknown key" in rec["cause"] and rec["domain"] == "job-42"
    assert world.env.ledger.read().allocations == {}


def test_missing_default_image_drains_the_node(tmp_path, trees, image_store):
    w = World(tmp_path, trees, image_store, partitions={"batch": {"image": "gone"}})
    assert w.prolog() == 1
    [line] = w.lines
    assert "failed at reading the request" in line and "gone" in line
    assert line.endswith("exit 1 drains the node, the job is requeued")
    assert not any(c.startswith("scancel") for c in w.calls())
    assert w.admin_comment()["state"] == "failed"


def test_fragmentation_under_strict_requeues_the_job(world):
    host = world.env.host
    # someone holds one GPU of every 4-block: 12 GPUs free, no aligned 4-block
    for i, first in enumerate((0, 4, 8, 12)):
        p = place(host, world.env.ledger.read().occupancy(), Request(count=1, gpu_index=first),
                  Policy())
        world.env.ledger.allocate(Allocation.from_placement(job_key(100 + i), p, owner="job",
                                                            job_id=100 + i, domain=f"x{i}"))
    assert world.prolog() == 0
    assert "job requeued to wait for an aligned block" in world.lines[-1]
    assert world.calls()[-1] == "scontrol requeue 42"
    assert job_key(42) not in world.env.ledger.read().allocations


@pytest.mark.parametrize("partitions, gpus, named", [
    ({"batch": {"vcpus_per_gpu": 5}}, "0",
     "vcpus 5 (partitions.batch.vcpus_per_gpu 5 x 1 GPU) is not a multiple of 2"),
    ({"default": {"memory_mib_per_gpu": 10 ** 7}}, "0,1,2,3",
     "memory 40000000 MiB (partitions.default.memory_mib_per_gpu 10000000 x 4 GPUs) is more "
     "than NUMA node(s) 0"),
])
def test_a_size_placement_refuses_names_the_partition_key_not_a_flag(tmp_path, trees,
                                                                      image_store, partitions,
                                                                      gpus, named):
    """A Slurm job has no --vcpus or --memory: its sizes are its partition's defaults, and the
    refusal names the key an admin must change (the job is cancelled, the node stays)."""
    w = World(tmp_path, trees, image_store, partitions=partitions)
    assert w.prolog(SLURM_JOB_GPUS=gpus) == 0
    [line] = w.lines
    assert named in line and "--" not in line, line
    assert line.endswith("job cancelled, node stays in service")
    assert w.calls()[-1] == "scancel 42"
    assert named in w.admin_comment()["cause"]
    assert w.env.ledger.read().allocations == {}


def test_a_failed_create_leaves_the_stages_it_reached_in_the_admin_comment(world):
    """For real: libvirt's test driver has no network dgxvm can use, so the create fails in
    its seed stage (the node's fault) after placing the VM."""
    from slurm_dgxvm.observe import opstats
    from slurm_dgxvm.slurm.accounting import parse_stages
    assert world.prolog() == 1
    rec = world.admin_comment()
    assert rec["state"] == "failed" and rec["ended"] == "failed at keys, address and seed"
    assert list(parse_stages(rec["create_stages"])) == ["preflight", "placement", "seed"]
    counted = opstats.read(world.env.cfg.host.state_dir)
    assert counted.failures == {("create", "node", "vm"): 1}      # counted once, by create


def test_a_node_fault_before_the_lifecycle_is_counted_and_a_jobs_own_is_not(tmp_path, trees,
                                                                           image_store):
    from slurm_dgxvm.observe import opstats
    w = World(tmp_path, trees, image_store, partitions={"batch": {"image": "gone"}})
    assert w.prolog() == 1                                   # the partition's image is missing
    assert w.prolog(SLURM_JOB_COMMENT="dgxvm:imag=x") == 0   # the job's comment: refused
    counted = opstats.read(w.env.cfg.host.state_dir)
    assert counted.failures == {("prolog", "node", "bad_input"): 1}
    assert counted.ops == {}                                 # no create was made


def test_a_job_that_cannot_be_cancelled_drains(tmp_path, trees, image_store):
    w = World(tmp_path, trees, image_store, fail="scancel")
    assert w.prolog(SLURM_JOB_COMMENT="dgxvm:image=nope") == 1
    assert "could not cancel the job" in w.lines[-1] and "refused by test" in w.lines[-1]


def test_accounting_that_fails_does_not_fail_the_job(tmp_path, trees, image_store):
    w = World(tmp_path, trees, image_store, fail="AdminComment")
    assert w.prolog(SLURM_JOB_COMMENT="dgxvm:image=nope") == 0
    assert any("accounting not written (the job is not affected)" in line for line in w.lines)


def test_not_a_job_drains(world):
    assert world.prolog(SLURM_JOB_ID="") == 1
    assert "SLURM_JOB_ID is not set" in world.lines[-1]


def test_epilog_with_nothing_to_do(world):
    assert world.epilog() == 0 and world.epilog() == 0
    assert world.lines == [] and world.calls() == []


def test_epilog_releases_a_ledger_entry_without_a_vm(world):
    p = place(world.env.host, EMPTY, Request(count=4), Policy())
    world.env.ledger.allocate(Allocation.from_placement(job_key(42), p, owner="job", job_id=42,
                                                        domain="job-42"))
    world.env.vms.make_dir("job-42")          # a Prolog killed before it wrote the record
    assert world.epilog() == 0
    assert world.env.ledger.read().allocations == {}
    assert not world.env.vms.dir("job-42").exists()
    assert "cleaned up what was left of job-42" in world.lines[-1]
    assert world.lines[-1].endswith("`dgxvm reconcile` checks the rest of the node")
    assert world.epilog() == 0                # twice is fine


def test_the_epilog_removes_the_vm_the_jobs_ledger_entry_names(world):
    """The job's VM is the one its ledger entry names, whatever its name (a VM named before the
    job had it; the domain prefix changed between the job's Prolog and its Epilog): the job's
    GPUs must not stay held by an entry nothing would ever release."""
    p = place(world.env.host, EMPTY, Request(count=4), Policy())
    world.env.ledger.allocate(Allocation.from_placement(job_key(42), p, owner="job", job_id=42,
                                                        domain="old-42"))
    world.env.vms.make_dir("old-42")
    assert world.epilog() == 0
    assert world.env.ledger.read().allocations == {}
    assert not world.env.vms.dir("old-42").exists()
    assert world.lines == ["dgxvm epilog: job 42 (user nobody, Slurm GPUs 0-3): cleaned up what "
                           "was left of old-42 (no VM record: a Prolog killed before it wrote "
                           "one, or its directory removed by hand); `dgxvm reconcile` checks "
                           "the rest of the node"]
    assert world.epilog() == 0 and len(world.lines) == 1


def test_the_epilog_also_removes_what_is_left_under_the_jobs_own_name_and_says_so(world):
    p = place(world.env.host, EMPTY, Request(count=4), Policy())
    world.env.ledger.allocate(Allocation.from_placement(job_key(42), p, owner="job", job_id=42,
                                                        domain="old-42"))
    world.env.vms.make_dir("old-42")
    world.env.vms.make_dir("job-42")          # a Prolog killed before its ledger entry
    assert world.epilog() == 0
    assert world.env.ledger.read().allocations == {}
    assert not world.env.vms.dir("old-42").exists() and not world.env.vms.dir("job-42").exists()
    where = "dgxvm epilog: job 42 (user nobody, Slurm GPUs 0-3): "
    assert world.lines == [where + "inconsistent: its VM was old-42, and job-42 was here too; "
                                   "removed it; `dgxvm reconcile` checks the rest of the node",
                           where + "cleaned up what was left of old-42 (no VM record: a Prolog "
                                   "killed before it wrote one, or its directory removed by "
                                   "hand); `dgxvm reconcile` checks the rest of the node"]
    assert world.epilog() == 0 and len(world.lines) == 2


def test_a_jobs_vm_is_the_one_its_ledger_entry_names(world):
    from slurm_dgxvm.lifecycle.identity import vm_of_job
    env = world.env
    assert vm_of_job(env, 42) == "job-42"                 # no entry: the name it would get
    p = place(env.host, EMPTY, Request(count=4), Policy())
    env.ledger.allocate(Allocation.from_placement(job_key(42), p, owner="job", job_id=42,
                                                  domain="warm-3"))
    assert vm_of_job(env, 42) == "warm-3" and vm_of_job(env, 7) == "job-7"
    Path(env.ledger.path).write_text("{not json")
    assert vm_of_job(env, 42) == "job-42"                 # a corrupt ledger names nothing


def test_dgxvm_job_finds_a_vm_named_before_its_job_through_the_ledger(world):
    from slurm_dgxvm.access.target import view_for
    from slurm_dgxvm.records import VmRecord
    env = world.env
    p = place(env.host, EMPTY, Request(count=4), Policy())
    a = Allocation.from_placement(job_key(42), p, owner="job", job_id=42, domain="warm-3",
                                  user="alice")
    env.ledger.allocate(a)
    env.vms.make_dir("warm-3")
    env.vms.save(VmRecord(name="warm-3", uuid="u", state="running", owner="job",
                          ledger_key=job_key(42), job_id=42, user="alice", uid=4242, gid=4343,
                          workdir=None, image="base", image_version="1", address="10.0.0.7",
                          mac="52:54:01:00:00:07", network="dgxvm", allocation=a, placement=p))
    view = view_for(env, 42)
    assert view["record"]["name"] == "warm-3" and view["address"] == "10.0.0.7"


def test_epilog_leaves_other_jobs_alone(world):
    p = place(world.env.host, EMPTY, Request(count=4), Policy())
    world.env.ledger.allocate(Allocation.from_placement(job_key(7), p, owner="job", job_id=7,
                                                        domain="job-7"))
    assert world.epilog() == 0
    assert set(world.env.ledger.read().allocations) == {job_key(7)}


def test_record_is_roots_and_the_users_view_is_theirs_alone(world):
    # `dgxvm job` runs as the job's user in its batch script: it reads job.json, which belongs
    # to that user (0600); record.json (allocation, MAC, what the hook trusts) stays root's.
    p = place(world.env.host, EMPTY, Request(count=4), Policy())
    from slurm_dgxvm.records import VmRecord
    vmdir = world.env.vms.make_dir("job-42")
    world.env.vms.save(VmRecord(name="job-42", uuid="u", state="running", owner="job",
                                ledger_key=job_key(42), job_id=42, user="alice", uid=4242,
                                gid=4343, workdir=None, image="base", image_version="1",
                                address="10.0.0.2", mac="52:54:00:00:00:01", network="dgxvm",
                                allocation=Allocation.from_placement(job_key(42), p, owner="job",
                                                                     job_id=42, domain="job-42",
                                                                     user="alice"),
                                placement=p))
    assert vmdir.stat().st_mode & 0o777 == 0o711          # QEMU reaches its disks; no listing
    rec = (vmdir / "record.json").stat()
    assert (rec.st_uid, rec.st_mode & 0o777) == (0, 0o600)
    view = (vmdir / "job.json").stat()
    assert (view.st_uid, view.st_mode & 0o777) == (4242, 0o600)
    doc = json.loads((vmdir / "job.json").read_text())
    assert doc["address"] == "10.0.0.2" and doc["uid"] == 4242 and doc["gpus"] == list(p.gpus)
    assert "mac" not in doc and "ledger_key" not in doc


def test_the_cli_exit_status_is_the_hooks(tmp_path, trees, image_store, monkeypatch, capsys):
    """Slurm sees `dgxvm prolog`'s exit status: 1 must reach it (it drains the node)."""
    from slurm_dgxvm.cli.main import main
    w = World(tmp_path, trees, image_store, partitions={"batch": {"image": "gone"}})
    cfg = tmp_path / "dgxvm.toml"
    cfg.write_text(
        f'[host]\nsysfs_root = "{trees["dgx2"]}"\nstate_dir = "{tmp_path / "state"}"\n'
        f'[libvirt]\nuri = "test:///default"\n[images]\nstore = "{image_store}"\n'
        f'[slurm]\nbin_dir = "{tmp_path / "bin"}"\nlog_file = ""\n'
        f'[partitions.batch]\nimage = "gone"\n')
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    assert main(["--config", str(cfg), "prolog"]) == 1
    err = capsys.readouterr().err
    assert "dgxvm prolog: job 42 (user nobody, Slurm GPUs 0-3): failed at" in err
    assert main(["--config", str(cfg), "epilog"]) == 0
    monkeypatch.setenv("SLURM_JOB_GPUS", "")
    assert main(["--config", str(cfg), "prolog"]) == 0
    assert w.env.ledger.read().allocations == {}


# -- a job on several nodes -------------------------------------------------------------------------
STATEFUL_SCONTROL = """#!/bin/sh
printf '%s\\n' "scontrol $*" >> {log}
case "$1" in
    update) printf '%s' "${{3#AdminComment=}}" > {state} ;;
    -o) printf 'JobId=42 JobName=x AdminComment=%s NumNodes=2\\n' "$(cat {state} 2>/dev/null)" ;;
    *) ;;
esac
"""


def multi_node_world(tmp_path, trees, image_store, monkeypatch) -> World:
    """A World whose scontrol keeps the job's AdminComment, with the job fabric on (dgxa and
    dgxb), and accounting's read-back pauses made short."""
    from slurm_dgxvm.slurm import accounting
    w = World(tmp_path, trees, image_store)
    state = tmp_path / "admin-comment"
    scontrol = tmp_path / "bin" / "scontrol"
    scontrol.write_text(STATEFUL_SCONTROL.format(log=w.calls_log, state=state))
    w.env = Env(config_mod.from_dict({
        "host": {"sysfs_root": str(trees["dgx2"]), "state_dir": str(tmp_path / "state")},
        "libvirt": {"uri": "test:///default"}, "images": {"store": str(image_store)},
        "slurm": {"bin_dir": str(tmp_path / "bin")},
        "jobnet": {"enabled": True, "nodes": {"dgxa": "192.168.213.11",
                                              "dgxb": "192.168.213.12"}}}))
    w.state = state
    monkeypatch.setattr(accounting, "CONFIRM_AFTER_S", (0.01, 0.01))
    return w


def test_a_node_list_the_fabric_does_not_know_refuses_the_job_not_the_node(
        tmp_path, trees, image_store, monkeypatch):
    w = multi_node_world(tmp_path, trees, image_store, monkeypatch)
    assert w.prolog(SLURMD_NODENAME="dgxa", SLURM_NODELIST="dgxa,dgxz",
                    SLURM_JOB_COMMENT="") == 0
    [line] = w.lines
    assert "refused at reading the request" in line and "'dgxz'" in line
    assert line.endswith("job cancelled, node stays in service")
    assert "scancel 42" in w.calls()
    assert w.env.ledger.read().allocations == {}


def test_each_nodes_prolog_keeps_the_other_nodes_record(tmp_path, trees, image_store,
                                                        monkeypatch):
    """Two nodes' Prologs refuse the same job (its comment); the AdminComment ends with both
    records, each naming its node, read back after writing."""
    from slurm_dgxvm.slurm.accounting import decode_all
    w = multi_node_world(tmp_path, trees, image_store, monkeypatch)
    for node in ("dgxb", "dgxa"):
        assert w.prolog(SLURMD_NODENAME=node, SLURM_NODELIST="dgxa,dgxb",
                        SLURM_JOB_COMMENT="dgxvm:imag=x") == 0
    records = decode_all(w.state.read_text())
    assert [(r["node"], r["state"]) for r in records] == [("dgxa", "refused"),
                                                          ("dgxb", "refused")]
    assert sum(1 for c in w.calls() if c.startswith("scontrol -o show job 42")) >= 6
    # a job on one node writes once and names no node, as before
    w.state.unlink()
    assert w.prolog(SLURMD_NODENAME="dgxa", SLURM_JOB_NODELIST="dgxa",
                    SLURM_JOB_COMMENT="dgxvm:imag=x") == 0
    [rec] = decode_all(w.state.read_text())
    assert "node" not in rec and rec["state"] == "refused"
