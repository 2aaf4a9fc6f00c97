"""The job's GPU variables in the guest's numbering: host indices become the job's positions,
job-relative ones stay, UUIDs stay, a task's subset stays a subset, anything else is refused."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from slurm_dgxvm.containers.gpuenv import translate
from slurm_dgxvm.errors import JobInputError


def test_a_job_on_host_gpus_4_to_7_sees_0_to_3():
    env = {"SLURM_JOB_GPUS": "4,5,6,7", "CUDA_VISIBLE_DEVICES": "4,5,6,7",
           "GPU_DEVICE_ORDINAL": "4,5,6,7", "PATH": "/usr/bin"}
    assert translate(env, (4, 5, 6, 7), relative=False) == {
        "SLURM_JOB_GPUS": "0,1,2,3", "CUDA_VISIBLE_DEVICES": "0,1,2,3",
        "GPU_DEVICE_ORDINAL": "0,1,2,3"}


def test_a_tasks_subset_stays_a_subset_in_its_own_order():
    env = {"SLURM_JOB_GPUS": "8,9,10,11", "SLURM_STEP_GPUS": "10,11",
           "CUDA_VISIBLE_DEVICES": "11,10"}
    assert translate(env, (8, 9, 10, 11), relative=False) == {
        "SLURM_JOB_GPUS": "0,1,2,3", "SLURM_STEP_GPUS": "2,3", "CUDA_VISIBLE_DEVICES": "3,2"}


def test_with_constrained_devices_cuda_indices_are_already_the_jobs():
    env = {"SLURM_JOB_GPUS": "12,13", "CUDA_VISIBLE_DEVICES": "0,1", "GPU_DEVICE_ORDINAL": "1"}
    assert translate(env, (12, 13), relative=True) == {
        "SLURM_JOB_GPUS": "0,1", "CUDA_VISIBLE_DEVICES": "0,1", "GPU_DEVICE_ORDINAL": "1"}


def test_uuids_and_empty_values_are_kept():
    env = {"CUDA_VISIBLE_DEVICES": "GPU-8f1c-aa,MIG-1a2b", "SLURM_STEP_GPUS": ""}
    assert translate(env, (0, 1), relative=False) == {
        "CUDA_VISIBLE_DEVICES": "GPU-8f1c-aa,MIG-1a2b", "SLURM_STEP_GPUS": ""}


@pytest.mark.parametrize("env, relative, named", [
    ({"CUDA_VISIBLE_DEVICES": "3"}, False, "GPU 3 is not one of the job's (4,5)"),
    ({"SLURM_STEP_GPUS": "0"}, True, "GPU 0 is not one of the job's (4,5)"),
    ({"CUDA_VISIBLE_DEVICES": "2"}, True, "GPU 2 is not one of the job's 2 GPU(s)"),
    ({"CUDA_VISIBLE_DEVICES": "4,x"}, False, "'x' is not a GPU index or UUID"),
    ({"GPU_DEVICE_ORDINAL": "-1"}, False, "'-1' is not a GPU index or UUID"),
])
def test_an_index_that_is_not_the_jobs_is_refused_naming_the_variable(env, relative, named):
    with pytest.raises(JobInputError) as info:
        translate(env, (4, 5), relative=relative)
    (var, value), = env.items()
    assert named in str(info.value) and var in str(info.value) and repr(value) in str(info.value)


@given(st.sets(st.integers(0, 15), min_size=1, max_size=16).flatmap(
    lambda gpus: st.tuples(st.just(sorted(gpus)), st.permutations(sorted(gpus)).flatmap(
        lambda p: st.integers(0, len(p)).map(lambda k: p[:k])))))
def test_host_indices_map_one_to_one_onto_the_guests(case):
    gpus, subset = case
    got = translate({"SLURM_JOB_GPUS": ",".join(map(str, gpus)),
                     "CUDA_VISIBLE_DEVICES": ",".join(map(str, subset))},
                    tuple(gpus), relative=False)
    assert got["SLURM_JOB_GPUS"] == ",".join(str(i) for i in range(len(gpus)))
    guest = [int(x) for x in got["CUDA_VISIBLE_DEVICES"].split(",")] if subset else []
    assert [gpus[i] for i in guest] == list(subset)     # the same GPUs, in the task's order
