"""containers.runtime and access.container: the container a `dgxvm run --container-image`
command gets, as the OCI config runc reads. Pure; what a user relies on: pyxis's environment
rule, the working directory rule, who they are in the container, what is mounted and how, and
mount sources the VM does not have refused by name."""

from __future__ import annotations

import json

import pytest

from slurm_dgxvm.access.container import ContainerFlags, check_mounts, container_request, env_names
from slurm_dgxvm.access.request import Request
from slurm_dgxvm.containers import runtime
from slurm_dgxvm.containers.mounts import parse
from slurm_dgxvm.errors import BadInput, ContainerMountError

IMAGE = {"Env": ["PATH=/opt/conda/bin:/usr/bin", "CUDA_VERSION=12.3", "LANG=C.UTF-8"],
         "WorkingDir": "/workspace"}


def spec(**kw):
    base = dict(rootfs="/cache/1000/sha256/ab/bundle/rootfs", image_config=IMAGE,
                argv=("python", "train.py"), env={"CUDA_VERSION": "job", "MYVAR": "1",
                                                   "PATH": "/host/bin"},
                cwd="/home/u/run", uid=1000, gid=1000, shared=("/home/u/run",))
    base.update(kw)
    return runtime.ContainerSpec(**base)


def env_of(config) -> dict:
    return dict(item.split("=", 1) for item in config["process"]["env"])


def test_the_image_env_wins_except_for_container_env_names_and_path_is_the_images():
    env = env_of(runtime.oci_config(spec()))
    assert env["CUDA_VERSION"] == "12.3"          # the image sets it: the image's
    assert env["MYVAR"] == "1"                   # the job's, the image does not set it
    assert env["PATH"] == "/opt/conda/bin:/usr/bin"
    env = env_of(runtime.oci_config(spec(keep_env=("CUDA_VERSION", "PATH"))))
    assert env["CUDA_VERSION"] == "job"           # --container-env CUDA_VERSION
    assert env["PATH"] == "/opt/conda/bin:/usr/bin"   # never the host's PATH


def test_an_image_without_path_gets_a_standard_one():
    env = env_of(runtime.oci_config(spec(image_config={})))
    assert env["PATH"] == runtime.DEFAULT_PATH


@pytest.mark.parametrize("kw, cwd", [
    ({}, "/home/u/run"),
    ({"workdir": "/data"}, "/data"),
    ({"cwd": None}, "/workspace"),
    ({"cwd": None, "image_config": {}}, "/"),
])
def test_working_directory(kw, cwd):
    assert runtime.oci_config(spec(**kw))["process"]["cwd"] == cwd


def test_by_default_the_container_runs_as_the_users_own_uid_gid_and_groups():
    """pyxis's default: the user is themselves in the container (mpirun refuses root), with
    their groups; the container's root is the subordinate id 1 of the helper's namespace."""
    c = runtime.oci_config(spec(groups=(1000, 5000, 0, 6000, 5000)))
    assert c["process"]["user"] == {"uid": 1000, "gid": 1000, "additionalGids": [5000, 6000]}
    assert c["linux"]["uidMappings"] == [{"containerID": 1000, "hostID": 0, "size": 1},
                                         {"containerID": 0, "hostID": 1, "size": 1}]
    assert c["linux"]["gidMappings"] == [{"containerID": 1000, "hostID": 0, "size": 1},
                                         {"containerID": 0, "hostID": 1, "size": 1},
                                         {"containerID": 5000, "hostID": 2, "size": 1},
                                         {"containerID": 6000, "hostID": 3, "size": 1}]
    assert c["process"]["noNewPrivileges"] is True
    assert all(not caps for caps in c["process"]["capabilities"].values())


def test_remap_root_makes_the_user_root_in_the_container_and_nothing_more():
    for kw in ({"remap_root": True}, {"uid": 0, "gid": 0}, {"gid": 0}):
        c = runtime.oci_config(spec(groups=(5000,), **kw))
        uid, gid = kw.get("uid", 1000), kw.get("gid", 1000)
        assert c["process"]["user"] == {"uid": 0, "gid": 0}
        assert c["linux"]["uidMappings"] == [{"containerID": 0, "hostID": uid, "size": 1}]
        assert c["linux"]["gidMappings"] == [{"containerID": 0, "hostID": gid, "size": 1}]
        assert c["process"]["noNewPrivileges"] is True


def test_an_own_uid_container_runs_runc_in_the_guest_helpers_user_namespace():
    flags = ContainerFlags(image="x")
    kw = dict(argv=("id",), env={}, cwd=None, shared=(), uid=1000, gid=1000,
              rootfs="/nonexistent", image_config={}, run_name="abc", prepare=False)
    own = container_request(flags, groups=(5000, 1000, 6000), **kw).command.decode()
    assert own.startswith("/usr/lib/dgxvm/dgxvm-guest userns 5000,6000 - - - runc --root ")
    assert container_request(flags, **kw).command.decode().startswith(
        "/usr/lib/dgxvm/dgxvm-guest userns - - - - runc ")
    remap = container_request(ContainerFlags(image="x", remap_root=True), **kw).command
    assert remap.decode().startswith("runc --root ")


def test_rootfs_is_read_only_no_network_namespace_and_shm_is_not_capped():
    c = runtime.oci_config(spec())
    assert c["root"] == {"path": "/cache/1000/sha256/ab/bundle/rootfs", "readonly": True}
    kinds = {n["type"] for n in c["linux"]["namespaces"]}
    assert "network" not in kinds and "user" in kinds and "pid" in kinds
    shm = next(m for m in c["mounts"] if m["destination"] == "/dev/shm")
    assert not any(o.startswith("size=") for o in shm["options"])


def test_mounts_are_binds_that_never_allow_suid_or_devices():
    c = runtime.oci_config(spec(mounts=parse("/home/u/run/data:/data:ro,/scratch:/s")))
    binds = {m["destination"]: m for m in c["mounts"] if m["type"] == "bind"}
    assert binds["/home/u/run"]["source"] == "/home/u/run"
    assert "ro" not in binds["/home/u/run"]["options"]
    assert binds["/data"]["source"] == "/home/u/run/data" and "ro" in binds["/data"]["options"]
    assert "ro" not in binds["/s"]["options"]
    for m in binds.values():
        assert {"nosuid", "nodev"} <= set(m["options"]) or m["destination"] == "/sys"


def test_gpu_devices_are_bound_only_when_the_image_has_the_driver():
    assert not [m for m in runtime.oci_config(spec())["mounts"] if "nvidia" in m["source"]]
    got = {m["source"] for m in runtime.oci_config(spec(gpu_devices=2))["mounts"]
           if "nvidia" in m["source"]}
    assert {"/dev/nvidia0", "/dev/nvidia1", "/dev/nvidiactl", "/dev/nvidia-uvm"} <= got
    assert "/dev/nvidia2" not in got


def test_a_host_path_the_vm_does_not_have_is_refused_by_name(tmp_path):
    host_only = tmp_path / "scratch"
    host_only.mkdir()
    with pytest.raises(ContainerMountError) as e:
        check_mounts(f"{host_only}:/scratch", ("/home/u/run",))
    assert str(host_only) in str(e.value) and "/home/u/run" in str(e.value)
    # under the share: fine; a path the host does not have is the guest's own
    assert check_mounts("/home/u/run/x:/x", ("/home/u/run",))[0].target == "/x"
    assert check_mounts("/no/such/host/path:/y", ("/home/u/run",))[0].source == "/no/such/host/path"


@pytest.mark.parametrize("bad", ["1X", "A-B", "A B", "$X"])
def test_container_env_names_are_variable_names(bad):
    with pytest.raises(BadInput):
        env_names(f"OK,{bad}")


def test_the_request_runs_runc_on_the_config_and_cleans_up_by_name():
    r = container_request(ContainerFlags(image="x"), argv=("id",), env={"A": "1"},
                          cwd="/home/u/run", shared=("/home/u/run",), uid=1000, gid=1000,
                          rootfs="/c/rootfs", image_config={}, run_name="abc123",
                          prepare=False)
    assert isinstance(r, Request)
    assert b"runc --root" in r.command and b"dgxvm-abc123" in r.command
    assert b"delete --force dgxvm-abc123" in r.cleanup
    assert json.loads(r.files["config.json"])["process"]["args"] == ["id"]
    assert r.env == {}          # the environment is the container's, in its config


# -- writable roots, named containers, the user's account -------------------------------------
def test_a_writable_or_named_container_gets_a_layer_in_the_helpers_namespace():
    kw = dict(argv=("id",), env={}, cwd=None, shared=(), uid=1000, gid=1000,
              rootfs="/cache/1000/sha256/ab/bundle/rootfs", image_config={}, run_name="abc",
              prepare=False)
    for flags, name in ((ContainerFlags(image="x", writable=True), "-"),
                        (ContainerFlags(image="x", name="env1"), "env1"),
                        (ContainerFlags(image=None, name="env1:auto"), "env1")):
        r = container_request(flags, **kw)
        assert r.command.decode().startswith(
            "/usr/lib/dgxvm/dgxvm-guest userns - '/cache/1000/sha256/ab/bundle/rootfs' "
            f'"$DGXVM_RUN_DIR/rootfs" {name} runc ')
        config = json.loads(r.files["config.json"])
        assert config["root"] == {"path": "rootfs", "readonly": False}
    # root mapped to the user, writable: in the helper's namespace, whose 0 is the user
    r = container_request(ContainerFlags(image="x", writable=True, remap_root=True), **kw)
    config = json.loads(r.files["config.json"])
    assert config["linux"]["uidMappings"] == [{"containerID": 0, "hostID": 0, "size": 1}]
    assert config["process"]["user"] == {"uid": 0, "gid": 0}
    # read-only stays the cache's own path
    r = container_request(ContainerFlags(image="x", writable=False), **kw)
    assert json.loads(r.files["config.json"])["root"]["readonly"] is True


@pytest.mark.parametrize("flags, bad", [
    (ContainerFlags(image="x", name="a b"), "a b"),
    (ContainerFlags(image="x", name="../etc"), "../etc"),
    (ContainerFlags(image="x", name=""), ""),
    (ContainerFlags(image="x", name="env:exec"), "env:exec"),
    (ContainerFlags(image="x", name="env", writable=False), "env"),
])
def test_bad_container_names_and_flags_are_refused_naming_them(flags, bad):
    with pytest.raises(BadInput) as e:
        flags.check()
    assert e.value.value == bad and bad in str(e.value)


def test_a_writable_layer_over_a_path_overlayfs_cannot_carry_is_refused():
    with pytest.raises(BadInput, match="cache_dir"):
        container_request(ContainerFlags(image="x", writable=True), argv=("id",), env={},
                          cwd=None, shared=(), uid=1000, gid=1000, rootfs="/ca,che/rootfs",
                          image_config={}, run_name="abc", prepare=False)


def test_the_user_is_in_the_containers_passwd_and_group(tmp_path):
    from slurm_dgxvm.containers import accounts
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\nbin:x:1000:1:b:/:/x\n")
    (root / "etc/group").write_text("root:x:0:\nvideo:x:44:\nalice:x:7:\n")
    got = accounts.files(root, user="alice", uid=1001, gid=1001, home="/home/alice",
                         groups=(("video", 44), ("proj", 5000)))
    assert got["passwd"].decode().splitlines()[-1] == "alice:x:1001:1001::/home/alice:/bin/sh"
    # the image's gid 44 stays; a name the image uses for another gid becomes g<gid>
    assert got["group"].decode().splitlines() == [
        "root:x:0:", "video:x:44:", "alice:x:7:", "g1001:x:1001:", "proj:x:5000:alice"]
    # an image whose passwd is a symlink is not read (it might point at the host's)
    (root / "etc/passwd").unlink()
    (root / "etc/passwd").symlink_to("/etc/passwd")
    got = accounts.files(root, user="alice", uid=1001, gid=1001, home="/h")
    assert got["passwd"].decode() == ("root:x:0:0:root:/root:/bin/sh\n"
                                      "alice:x:1001:1001::/h:/bin/sh\n")


def test_an_own_uid_run_binds_the_accounts_from_its_run_directory(tmp_path):
    root = tmp_path / "rootfs"
    root.mkdir()
    r = container_request(ContainerFlags(image="x"), argv=("id",), env={}, cwd=None,
                          shared=(), uid=1000, gid=1000, rootfs=str(root), image_config={},
                          run_name="abc", user="alice", home="/home/alice")
    assert b"alice:x:1000:1000:" in r.files["passwd"] and b"alice:x:1000:" in r.files["group"]
    binds = {m["destination"]: m for m in json.loads(r.files["config.json"])["mounts"]}
    assert binds["/etc/passwd"]["source"] == "passwd" and "ro" in binds["/etc/passwd"]["options"]
    assert binds["/etc/group"]["source"] == "group"
    remap = container_request(ContainerFlags(image="x", remap_root=True), argv=("id",), env={},
                              cwd=None, shared=(), uid=1000, gid=1000, rootfs=str(root),
                              image_config={}, run_name="abc", user="alice")
    assert "passwd" not in remap.files
