"""The Slurm job as the hooks see it: environment, job comment, the VM request with the
partition's defaults, and which failures are the job's and which the node's."""

from __future__ import annotations

import subprocess

import pytest

from slurm_dgxvm import config as config_mod
from slurm_dgxvm.errors import (HypervisorError, ImageError, JobInputError, JobRefused,
                                LedgerError, NoFit, NotAJob, RequestError, ShareRefused)
from slurm_dgxvm.images import ImageStore
from slurm_dgxvm.slurm.job import SlurmJob, create_request, domain_for, is_job_fault, parse_comment

ENV = {"SLURM_JOB_ID": "42", "SLURM_JOB_UID": "1001", "SLURM_JOB_GID": "1002",
       "SLURM_JOB_USER": "alice", "SLURM_JOB_GPUS": "0,1,2,3", "SLURM_JOB_WORK_DIR": "/home/a/w",
       "SLURM_JOB_PARTITION": "batch", "SLURMD_NODENAME": "dgx01"}


def test_environment_is_parsed():
    job = SlurmJob.from_environ(ENV)
    assert (job.job_id, job.uid, job.gid, job.user) == (42, 1001, 1002, "alice")
    assert job.gpus == (0, 1, 2, 3) and job.work_dir == "/home/a/w"
    assert job.partition == "batch" and job.comment is None and job.node == "dgx01"
    assert job.describe() == "job 42 (user alice, Slurm GPUs 0-3)"


def test_no_gpus_is_an_empty_set():
    assert SlurmJob.from_environ({**ENV, "SLURM_JOB_GPUS": ""}).gpus == ()
    env = dict(ENV)
    del env["SLURM_JOB_GPUS"]
    assert SlurmJob.from_environ(env).gpus == ()


@pytest.mark.parametrize("var,value,says", [
    ("SLURM_JOB_ID", None, "SLURM_JOB_ID is not set"),
    ("SLURM_JOB_ID", "4x", "SLURM_JOB_ID='4x' is not a job id (not a plain decimal number)"),
    ("SLURM_JOB_UID", None, "SLURM_JOB_UID is not set"),
    ("SLURM_JOB_USER", "", "SLURM_JOB_USER is not set"),
])
def test_bad_environment_names_the_variable(var, value, says):
    env = dict(ENV)
    if value is None:
        del env[var]
    else:
        env[var] = value
    with pytest.raises(NotAJob) as exc:
        SlurmJob.from_environ(env)
    assert says in str(exc.value)


def test_bad_gpu_list_names_it():
    with pytest.raises(Exception) as exc:
        SlurmJob.from_environ({**ENV, "SLURM_JOB_GPUS": "0,x"})
    assert "SLURM_JOB_GPUS" in str(exc.value) and "'0,x'" in str(exc.value)


@pytest.mark.parametrize("comment,want", [
    (None, {}),
    ("", {}),
    ("my experiment 7", {}),
    ("dgxvm:image=cuda12", {"image": "cuda12"}),
    ("run 3 dgxvm:image=cuda12 more words", {"image": "cuda12"}),
    ("dgxvm:image=a dgxvm:image=a", {"image": "a"}),
])
def test_comment_settings(comment, want):
    assert parse_comment(comment) == want


@pytest.mark.parametrize("comment,says", [
    ("dgxvm:image", "'dgxvm:image': expected dgxvm:KEY=VALUE"),
    ("dgxvm:", "expected dgxvm:KEY=VALUE"),
    ("dgxvm:image=", "expected dgxvm:KEY=VALUE"),
    ("dgxvm:gpus=4", "unknown key 'gpus'"),
    ("dgxvm:image=a dgxvm:image=b", "image given twice ('a', 'b')"),
])
def test_bad_comment_is_refused_naming_the_word(comment, says):
    with pytest.raises(JobRefused) as exc:
        parse_comment(comment)
    assert says in str(exc.value)
    assert is_job_fault(exc.value)


# -- the request -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def store(tmp_path_factory) -> ImageStore:
    root = tmp_path_factory.mktemp("img")
    store = ImageStore(root / "store")
    for name in ("base", "cuda12"):
        disk = root / f"{name}.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
        store.install(disk, name=name, default=(name == "base"))
    return store


def cfg(**partitions):
    return config_mod.from_dict({"partitions": partitions} if partitions else {})


def test_request_keeps_slurms_gpus_and_the_job(store):
    req = create_request(cfg(), SlurmJob.from_environ(ENV), store, home="/home/alice")
    assert req.name == "job-42" and req.owner == "job" and req.job_id == 42
    assert req.placement.count == 4 and req.placement.slurm_gpus == (0, 1, 2, 3)
    assert req.placement.vcpus is None and req.placement.memory_mib is None
    assert (req.user, req.uid, req.gid, req.home) == ("alice", 1001, 1002, "/home/alice")
    assert req.workdir == "/home/a/w" and req.image == "base" and req.alignment is None


def test_partition_defaults_size_the_vm(store):
    c = cfg(batch={"image": "cuda12", "vcpus_per_gpu": 6, "memory_mib_per_gpu": 4096,
                   "disk_gib_per_gpu": 10, "data_disk_gib": 0, "alignment": "prefer"})
    req = create_request(c, SlurmJob.from_environ(ENV), store, home=None)
    assert req.image == "cuda12" and req.alignment == "prefer"
    assert (req.placement.vcpus, req.placement.memory_mib, req.placement.disk_gib) == (24, 16384, 40)
    assert req.data_disk_gib == 0


def test_default_partition_table_applies_to_other_partitions(store):
    c = cfg(default={"image": "cuda12"})
    assert create_request(c, SlurmJob.from_environ(ENV), store, home=None).image == "cuda12"


def test_comment_picks_an_image_the_partition_lists(store):
    job = SlurmJob.from_environ({**ENV, "SLURM_JOB_COMMENT": "dgxvm:image=cuda12"})
    c = cfg(batch={"images": ["base", "cuda12"]})
    assert create_request(c, job, store, home=None).image == "cuda12"


@pytest.mark.parametrize("partition,offered", [
    ({}, "base"),                                   # the store's default, nothing else
    ({"image": "base"}, "base"),
    ({"image": "base", "images": ["cuda12"]}, "base, cuda12"),
])
def test_a_partition_offers_only_its_image_unless_it_lists_more(store, partition, offered):
    """An empty ``images`` list used to let a comment boot any installed image."""
    job = SlurmJob.from_environ({**ENV, "SLURM_JOB_COMMENT": "dgxvm:image=other"})
    c = cfg(batch=partition) if partition else cfg()
    with pytest.raises(JobRefused) as exc:
        create_request(c, job, store, home=None)
    assert f"image 'other' is not offered in partition batch (offered: {offered};" in str(exc.value)
    assert is_job_fault(exc.value)
    ok = SlurmJob.from_environ({**ENV, "SLURM_JOB_COMMENT": "dgxvm:image=base"})
    assert create_request(c, ok, store, home=None).image == "base"


@pytest.mark.parametrize("comment,partition,says", [
    ("dgxvm:image=nope", {"images": ["base", "nope"]},
     "job comment dgxvm:image=nope: no image named nope; installed: base"),
    ("dgxvm:image=../etc", {}, "bad image name '../etc'"),
    ("dgxvm:image=cuda12", {"images": ["base"]},
     "image 'cuda12' is not offered in partition batch (offered: base;"),
])
def test_comment_image_that_cannot_be_had_refuses_the_job(store, comment, partition, says):
    job = SlurmJob.from_environ({**ENV, "SLURM_JOB_COMMENT": comment})
    c = cfg(batch=partition) if partition else cfg()
    with pytest.raises(JobRefused) as exc:
        create_request(c, job, store, home=None)
    assert says in str(exc.value)
    assert is_job_fault(exc.value)


def test_missing_partition_default_image_is_the_nodes_fault(store):
    with pytest.raises(ImageError) as exc:
        create_request(cfg(batch={"image": "gone"}), SlurmJob.from_environ(ENV), store, home=None)
    assert not is_job_fault(exc.value)


def test_fault_classes():
    assert is_job_fault(NoFit(count=8, reason="fragmented"))
    assert is_job_fault(RequestError(reason="3 is not a block size"))
    assert is_job_fault(JobInputError(what="SLURM_JOB_WORK_DIR", value="a", reason="relative"))
    assert is_job_fault(ShareRefused(value="/etc", reason="outside vm.share_roots"))
    for exc in (LedgerError(path="x", reason="y"), HypervisorError(uri="u", reason="r"),
                ImageError(name="x", reason="y"), RuntimeError("bug")):
        assert not is_job_fault(exc)


def test_domain_name_of_a_job():
    assert domain_for(cfg(), 7) == "job-7"
    assert domain_for(config_mod.from_dict({"slurm": {"domain_prefix": "vm"}}), 7) == "vm7"
