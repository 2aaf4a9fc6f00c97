"""containers.podman and access.container's podman profile: the `podman run` a
`dgxvm run --container-image` becomes in a guest image whose runtime is podman. Pure; what a user
relies on: the same container as the runc profile (who they are, their groups, the maps, the
mounts and their options, the environment rule, the working directory, a read-only image),
podman's state kept in the run's directory, and what podman's flags cannot carry refused by name
or passed another way."""

from __future__ import annotations

import os
import shlex
import subprocess

import pytest

from slurm_dgxvm.access.container import ContainerFlags, container_request
from slurm_dgxvm.containers import podman, runtime
from slurm_dgxvm.containers.mounts import parse
from slurm_dgxvm.errors import BadInput

IMAGE = {"Env": ["PATH=/opt/conda/bin:/usr/bin", "CUDA_VERSION=12.3"], "WorkingDir": "/ws"}


def spec(**kw):
    base = dict(rootfs="/cache/1000/sha256/ab/bundle/rootfs", image_config=IMAGE,
                argv=("python", "train.py", "a b"), env={"MYVAR": "1", "CUDA_VERSION": "job"},
                cwd="/home/u/run", uid=1000, gid=1000, shared=("/home/u/run",))
    base.update(kw)
    return runtime.ContainerSpec(**base)


def words(s, **kw) -> list[str]:
    """The command as the guest's sh splits it (``$DGXVM_RUN_DIR`` as /R, the shm size as
    the awk would print it)."""
    text = podman.sh(podman.command(s, name=podman.Raw(b'"dgxvm-${DGXVM_RUN_DIR##*/}"'), **kw))
    script = b'DGXVM_RUN_DIR=/R/0123456789abcdef; printf "%s\\n" ' + text
    out = subprocess.run(["sh", "-c", script.decode()], capture_output=True, check=True,
                         env={"PATH": os.environ["PATH"]}).stdout.decode()
    return out.splitlines()


def flag_values(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_the_container_is_the_users_own_uid_gid_and_groups_with_the_runc_profiles_maps():
    argv = words(spec(groups=(5000, 1000, 0, 6000)))
    assert flag_values(argv, "--user") == ["1000:1000"]
    assert flag_values(argv, "--group-add") == ["5000", "6000"]
    # podman runs in the helper's namespace (the user 0, a subordinate id 1, groups 2, 3):
    # the same numbers runc's config gets
    assert flag_values(argv, "--uidmap") == ["1000:0:1", "0:1:1"]
    assert flag_values(argv, "--gidmap") == ["1000:0:1", "0:1:1", "5000:2:1", "6000:3:1"]
    maps = runtime._mappings(spec(groups=(5000, 1000, 0, 6000)))
    assert [f"{m['containerID']}:{m['hostID']}:{m['size']}" for m in maps["gidMappings"]] == \
        flag_values(argv, "--gidmap")


def test_remap_root_is_root_in_the_container_mapped_to_the_user():
    argv = words(spec(remap_root=True))
    assert flag_values(argv, "--user") == ["0:0"]
    assert flag_values(argv, "--uidmap") == ["0:0:1"] and flag_values(argv, "--gidmap") == ["0:0:1"]
    assert "--group-add" not in argv


def test_podman_state_is_the_runs_and_the_image_is_read_only():
    argv = words(spec())
    assert argv[0] == "podman"
    assert flag_values(argv, "--root") == ["/R/0123456789abcdef/pm/storage"]
    assert flag_values(argv, "--runroot") == ["/R/0123456789abcdef/pm/run"]
    assert flag_values(argv, "--tmpdir") == ["/R/0123456789abcdef/pm/tmp"]
    assert flag_values(argv, "--name") == ["dgxvm-0123456789abcdef"]
    # podman refuses a runroot over 50 characters: the longest the guest can have
    longest = "/tmp/.dgxvm-4294967294/" + "f" * 16
    assert len(flag_values(argv, "--runroot")[0].replace("/R/0123456789abcdef", longest)) <= 50
    assert "--rm" in argv and "--read-only" in argv and "--interactive" in argv
    # --rootfs is podman's switch: the root is the first word after "--", the command next
    assert argv[argv.index("--rootfs") + 1:argv.index("--rootfs") + 3] == [
        "--", "/cache/1000/sha256/ab/bundle/rootfs"]
    assert flag_values(argv, "--cgroups") == ["disabled"]
    assert flag_values(argv, "--network") == ["host"]
    assert "--passwd=false" in argv
    assert "--init" not in argv        # PID 1 is the command: not found stays 127
    assert flag_values(argv, "--security-opt") == ["no-new-privileges"]
    assert "--tty" not in argv
    assert "--tty" in words(spec(terminal=True))
    # the command after the root, each argument one word, as given
    assert argv[argv.index("--") + 2:] == ["python", "train.py", "a b"]


def test_a_writable_root_is_the_helpers_overlay_on_the_runs_rootfs():
    argv = words(spec(writable=True))
    assert argv[argv.index("--") + 1] == "/R/0123456789abcdef/rootfs"
    assert "--read-only" not in argv


def test_shm_is_half_the_vms_memory_not_podmans_64_mib():
    argv = words(spec())
    [size] = flag_values(argv, "--shm-size")
    total_kib = int(open("/proc/meminfo").read().split("MemTotal:")[1].split()[0])
    assert size == f"{total_kib // 2}k"


def test_mounts_keep_nosuid_nodev_and_their_flags():
    argv = words(spec(mounts=parse("/data:/in:ro,/scratch:/scratch:rslave")))
    vols = flag_values(argv, "-v")
    assert "/home/u/run:/home/u/run:rw,rbind,nosuid,nodev" in vols
    assert "/data:/in:ro,rbind,nosuid,nodev" in vols
    assert "/scratch:/scratch:rw,rbind,nosuid,nodev,rslave" in vols


def test_a_shared_path_podmans_volume_syntax_cannot_carry_is_refused_by_name():
    with pytest.raises(BadInput, match="/home/u/a:b"):
        words(spec(shared=("/home/u/a:b",), cwd=None))


def test_account_files_and_gpu_devices():
    argv = words(spec(run_files=("/etc/passwd", "/etc/group"), gpu_devices=2))
    vols = flag_values(argv, "-v")
    assert "/R/0123456789abcdef/passwd:/etc/passwd:ro" in vols
    assert "/R/0123456789abcdef/group:/etc/group:ro" in vols
    assert flag_values(argv, "--device")[:2] == ["/dev/nvidia0", "/dev/nvidia1"]
    assert "/dev/nvidiactl" in flag_values(argv, "--device")


def test_the_environment_rule_is_the_runc_profiles_and_what_a_line_cannot_carry_goes_by_name():
    text, passed = podman.env_file(spec(env={"MYVAR": "1", "CUDA_VERSION": "job",
                                             "ML": "one\ntwo", "CR": "x\r", "SP": " lead ",
                                             "BIG": "y" * (podman.ENV_FILE_LINE_MAX + 1)},
                                        keep_env=("CUDA_VERSION",)))
    lines = text.decode().splitlines()
    assert "MYVAR=1" in lines and "SP= lead " in lines
    assert "CUDA_VERSION=job" in lines                   # --container-env: the job's value
    assert "PATH=/opt/conda/bin:/usr/bin" in lines       # the image's PATH
    assert {"ML", "CR", "BIG"} <= set(lines)             # by name: podman takes its own value
    assert passed == {"ML": "one\ntwo", "CR": "x\r", "BIG": "y" * (podman.ENV_FILE_LINE_MAX + 1)}
    assert flag_values(words(spec()), "--env-file") == ["/R/0123456789abcdef/podman.env"]
    assert flag_values(words(spec()), "--workdir") == ["/home/u/run"]
    assert flag_values(words(spec(cwd=None)), "--workdir") == ["/ws"]


KW = dict(argv=("id",), env={"A": "1", "ML": "x\ny"}, cwd=None, shared=(), uid=1000, gid=1000,
          image_config={}, run_name="abc", prepare=False, runtime_kind="podman")


def test_the_request_runs_podman_in_the_helpers_namespace_told_it_is_rootless():
    r = container_request(ContainerFlags(image="x"), rootfs="/c/rootfs", groups=(5000,), **KW)
    cmd = shlex.split(r.command.decode().replace('"$DGXVM_RUN_DIR', '"/R'))
    assert cmd[:6] == ["/usr/lib/dgxvm/dgxvm-guest", "userns", "5000", "-", "-", "-"]
    # podman's storage on a tmpfs of that namespace (what podman makes there is a
    # subordinate uid's, which the user could not remove)
    assert cmd[6:8] == ["sh", "-c"] and "mount -t tmpfs" in cmd[8]
    assert cmd[9] == "/R/pm/storage"
    assert cmd[10:14] == ["env", "_CONTAINERS_USERNS_CONFIGURED=done",
                          "_CONTAINERS_ROOTLESS_UID=1000", "_CONTAINERS_ROOTLESS_GID=1000"]
    assert cmd[14] == "podman"
    assert set(r.files) == {"podman.env"}
    assert r.env == {"ML": "x\ny"}          # podman's own environment: the one value by name
    assert r.cleanup == podman.cleanup("/usr/lib/dgxvm/dgxvm-guest")
    # the writable layer: the helper mounts it, podman runs on it
    w = container_request(ContainerFlags(image="x", name="env1"), rootfs="/c/rootfs", **KW)
    cmd = shlex.split(w.command.decode().replace('"$DGXVM_RUN_DIR', '"/R'))
    assert cmd[:6] == ["/usr/lib/dgxvm/dgxvm-guest", "userns", "-", "/c/rootfs", "/R/rootfs",
                       "env1"]


def test_a_job_of_roots_runs_podman_as_the_guests_root():
    kw = dict(KW, uid=0, gid=0)
    r = container_request(ContainerFlags(image="x"), rootfs="/c/rootfs", **kw)
    assert r.command.startswith(b"'podman' ")


def test_the_cleanup_kills_the_containers_init_by_the_pid_podman_wrote(tmp_path):
    """A killed `podman run` leaves conmon and the container: the cleanup (run as
    `sh RUN_DIR/cleanup`) SIGKILLs the container's PID 1 from podman's pidfile."""
    victim = subprocess.Popen(["sleep", "300"])
    try:
        userdata = tmp_path / "pm" / "run" / "vfs-containers" / ("a" * 64) / "userdata"
        userdata.mkdir(parents=True)
        (userdata / "pidfile").write_text(str(victim.pid))
        helper = tmp_path / "helper"
        helper.write_text('#!/bin/sh\necho "$@" >> "$(dirname "$0")/helper.log"\n')
        helper.chmod(0o755)
        (tmp_path / "cleanup").write_bytes(podman.cleanup(str(helper)) + b"\n")
        subprocess.run(["sh", str(tmp_path / "cleanup")], check=True, timeout=10)
        assert victim.wait(timeout=10) == -9
        # podman's state is removed in the helper's namespace (it has subordinate uids' files)
        assert (tmp_path / "helper.log").read_text() == f"userns - - - - rm -rf {tmp_path}/pm\n"
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait()
    # nothing to clean: no error
    subprocess.run(["sh", str(tmp_path / "cleanup")], check=True, timeout=10,
                   cwd=str(tmp_path))


def test_the_podman_profile_makes_the_mtab_link_a_read_only_root_needs(tmp_path):
    from slurm_dgxvm.containers import mountpoints
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    assert mountpoints.ensure_links(root, podman.ROOTFS_LINKS) == ["/etc/mtab"]
    assert os.readlink(root / "etc" / "mtab") == "../proc/self/mounts"
    assert mountpoints.ensure_links(root, podman.ROOTFS_LINKS) == []       # an image's own stays
    evil = tmp_path / "evil"
    (evil).mkdir()
    os.symlink(str(tmp_path / "outside"), evil / "etc")
    with pytest.raises(BadInput, match="symlink"):
        mountpoints.ensure_links(evil, podman.ROOTFS_LINKS)
    assert not (tmp_path / "outside").exists()


def test_preparing_a_podman_run_makes_what_podman_mounts_on_in_a_read_only_root(tmp_path):
    """Podman binds its own /etc/hostname and wants /etc/mtab: an image without them (busybox)
    gets them made on the host, as the cache's owner, before the guest runs it read-only."""
    root = tmp_path / "rootfs"
    root.mkdir()
    container_request(ContainerFlags(image="x"), rootfs=str(root), **dict(KW, prepare=True))
    assert (root / "etc" / "hostname").is_file() and (root / "etc" / "hosts").is_file()
    assert os.readlink(root / "etc" / "mtab") == "../proc/self/mounts"
    runc_root = tmp_path / "runc-rootfs"
    runc_root.mkdir()
    container_request(ContainerFlags(image="x"), rootfs=str(runc_root),
                      **dict(KW, prepare=True, runtime_kind="runc"))
    assert not (runc_root / "etc" / "hostname").exists()      # runc binds no hostname
