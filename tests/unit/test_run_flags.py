"""``dgxvm run`` and ``dgxvm shell`` check every flag before they do anything, and root's run into
a user's job is that user's.

The invalid table is pyxis's own (NVIDIA/pyxis ``tests/invalid_args.bats``, every case, one row
each), then dgxvm's: each is refused with one ``dgxvm: error:`` line naming the flag and the bad
value, exit 125, and nothing was done: the command runs with tripwires on the config and the job's
record, the image cache, the registry, the VM session and every subprocess, so a check that ran
after any of them would trip one. The valid table is the same flags' good forms: accepted, and
they reach the container as given. Root's drop is checked in a process of its own (a drop cannot
be undone)."""

from __future__ import annotations

import base64
import json
import os
import pwd
import subprocess
import sys
from pathlib import Path

import pytest

from slurm_dgxvm.access import session
from slurm_dgxvm.access.request import Request
from slurm_dgxvm.access.target import Target
from slurm_dgxvm.containers import cache_admin
from slurm_dgxvm.cli import main as cli_main
from slurm_dgxvm.access import runner
from slurm_dgxvm.containers import ranlog
from slurm_dgxvm.containers.cache import ImageCache
from slurm_dgxvm.containers.registry import Registry
from slurm_dgxvm.images import profile

pytestmark = pytest.mark.usefixtures("clean_env")  # tests/unit/conftest.py

REPO = Path(__file__).resolve().parents[2]
NOBODY = 65534
DIGEST = "sha256:" + "d" * 64
LONG_IMAGE = base64.b64encode(bytes(range(256)) * 6).decode()   # pyxis: 2048 random bytes, base64

# (flags, the flag the message names, the bad value it shows). pyxis's rows first, in the order
# of tests/invalid_args.bats (NVIDIA/pyxis 1075199, "invalid arg: ..."), their images as given
PYXIS_INVALID = [
    (["--container-image="], "--container-image", "''"),
    ([f"--container-image={LONG_IMAGE}"], "--container-image", LONG_IMAGE[:40]),
    (["--container-image=./"], "--container-image", "'./'"),
    (["--container-image=/dev/urandom"], "--container-image", "'/dev/urandom'"),
    # "--container-name without --container-image": needs the job's containers, see below
    (["--container-name=/tmp/foo", "--container-image=ubuntu:18.04"], "--container-name", "/tmp/foo"),
    (["--container-name=:attach", "--container-image=ubuntu:22.04"], "--container-name", ":attach"),
    ([f"--container-name={'a' * 300}", "--container-image=ubuntu:24.04"], "--container-name", "a" * 300),
    (["--container-mounts=", "--container-image=ubuntu:18.04"], "--container-mounts", "''"),
    (["--container-mounts=:", "--container-image=ubuntu:18.04"], "--container-mounts", "':'"),
    (["--container-mounts=/tmp:", "--container-image=ubuntu:18.04"], "--container-mounts", "'/tmp:'"),
    (["--container-workdir=", "--container-image=ubuntu:18.04"], "--container-workdir", "''"),
    (["--container-readonly", "--container-writable", "--container-image=ubuntu:20.04"],
     "--container-writable", "--container-readonly"),
    (["--container-env=", "--container-image=ubuntu:22.04"], "--container-env", "''"),
    (["--container-env", "FOO,", "--container-image=ubuntu:22.04"], "--container-env", "'FOO,'"),
    (["--container-save=/tmp/", "--container-image=ubuntu:24.04"], "--container-save", ""),
    (["--container-save=/", "--container-image=ubuntu:24.04"], "--container-save", ""),
    (["--container-save=./", "--container-image=ubuntu:24.04"], "--container-save", ""),
]
DGXVM_INVALID = [
    (["--container-image", "a:1", "--container-image", "b:1"], "--container-image", "'a:1', 'b:1'"),
    (["--container-image", "Ubuntu"], "--container-image", "'Ubuntu'"),
    (["--container-image", "dockerd://ubuntu"], "--container-image", "'dockerd://ubuntu'"),
    (["--container-image", "ubuntu:-bad"], "--container-image", "'ubuntu:-bad'"),
    (["--container-remap-root", "--no-container-remap-root", "--container-image", "u"],
     "--container-remap-root", "--no-container-remap-root"),
    (["--container-name", "env1", "--container-readonly", "--container-image", "u"],
     "--container-name", "env1"),
    (["--container-name", "env1:exec", "--container-image", "u"], "--container-name", "env1:exec"),
    (["--container-name", "a", "--container-name", "b", "--container-image", "u"],
     "--container-name", "'a', 'b'"),
    (["--container-name="], "--container-name", "''"),
    (["--container-mounts", "/a:/b:suid", "--container-image", "u"], "--container-mounts", "/a:/b:suid"),
    (["--container-mounts", "data:/data", "--container-image", "u"], "--container-mounts", "data:/data"),
    (["--container-mounts", "/a:/d", "--container-mounts", "/b:/d", "--container-image", "u"],
     "--container-mounts", "/b:/d"),
    (["--container-mounts", "/a:/b", "--container-mounts=", "--container-image", "u"],
     "--container-mounts", "''"),
    (["--container-mounts", "/a"], "--container-mounts", "without --container-image"),
    (["--container-workdir", "rel/dir", "--container-image", "u"], "--container-workdir", "'rel/dir'"),
    (["--container-workdir", "/a/../b", "--container-image", "u"], "--container-workdir", "'/a/../b'"),
    (["--container-workdir", "/a", "--container-workdir", "/b", "--container-image", "u"],
     "--container-workdir", "'/a', '/b'"),
    (["--container-workdir", "/w"], "--container-workdir", "without --container-image"),
    (["--container-env", "A-B", "--container-image", "u"], "--container-env", "'A-B'"),
    (["--container-env", ",A", "--container-image", "u"], "--container-env", "',A'"),
    (["--container-env", "A", "--container-env=", "--container-image", "u"], "--container-env", "''"),
    (["--container-writable"], "--container-writable", "without --container-image"),
    (["--container-remap-root"], "--container-remap-root", "without --container-image"),
    (["--job", "0"], "--job", "0"),
    (["--job", "x"], "--job", "'x'"),
    (["--job", "5", "--job", "6"], "--job", "5, 6"),
]
SHELL_FLAGS = ("--container-image", "--container-name", "--container-mounts",
               "--container-writable", "--container-readonly", "--container-remap-root",
               "--no-container-remap-root", "--job")


def _rows(table, prefix):
    return [pytest.param(flags, named, value, id=f"{prefix}:{' '.join(flags)[:60]}")
            for flags, named, value in table]


class Tripwire(Exception):
    pass


@pytest.fixture
def tripwires(monkeypatch):
    """Everything a run does after its checks raises Tripwire and is listed in the result: the
    config and the job's record, the drop, the image cache, the registry, the VM session,
    any subprocess (skopeo, umoci, ssh)."""
    touched: list[str] = []

    def wire(name):
        def tripped(*a, **kw):
            touched.append(name)
            raise Tripwire(name)
        return tripped
    monkeypatch.setattr(cli_main.Context, "env", property(wire("config/env")))
    monkeypatch.setattr(runner, "target_for", wire("target_for"))
    monkeypatch.setattr(runner, "become_job_user", wire("become_job_user"), raising=False)
    for name in ("__init__", "get", "get_held", "lookup", "in_use"):
        monkeypatch.setattr(ImageCache, name, wire(f"ImageCache.{name}"))
    for name in ("resolve", "pull", "for_user"):
        monkeypatch.setattr(Registry, name, wire(f"Registry.{name}"))
    monkeypatch.setattr(session, "run", wire("session.run"))
    monkeypatch.setattr(session.Session, "run", wire("Session.run"))
    monkeypatch.setattr(subprocess, "Popen", wire("subprocess.Popen"))
    monkeypatch.setattr(os, "fork", wire("os.fork"))
    return touched


def dgxvm(capsys, *argv: str) -> tuple[int, str]:
    rc = cli_main.main(list(argv))
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("flags, named, value",
                         _rows(PYXIS_INVALID, "pyxis") + _rows(DGXVM_INVALID, "dgxvm"))
def test_a_bad_flag_is_refused_naming_it_before_anything_is_done(tripwires, capsys, monkeypatch,
                                                                 flags, named, value):
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    rc, err = dgxvm(capsys, "run", *flags, "--", "true")
    assert rc == 125, err
    assert err.startswith("dgxvm: error: ") and err.count("\n") == 1, err
    assert named in err and value in err, err
    assert "internal error" not in err and tripwires == []


@pytest.mark.parametrize("flags, named, value",
                         [p for p in _rows(PYXIS_INVALID, "pyxis") + _rows(DGXVM_INVALID, "dgxvm")
                          if all(f.split("=")[0] in SHELL_FLAGS for f in p.values[0]
                                 if f.startswith("-"))])
def test_dgxvm_shell_checks_its_flags_the_same_way(tripwires, capsys, monkeypatch, flags, named,
                                                   value):
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    rc, err = dgxvm(capsys, "shell", *flags)
    assert rc == 125, err
    assert named in err and value in err and tripwires == [], err


def test_the_tripwires_are_live(tripwires, capsys, monkeypatch):
    """Not vacuous: good flags go on to the job's record, which trips."""
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    rc, err = dgxvm(capsys, "run", "--container-image", "ubuntu", "--", "true")
    assert rc == 125 and tripwires == ["config/env"], err


# -- what needs the VM's facts: checked before any pull ---------------------------------------
@pytest.fixture
def job(tmp_path, monkeypatch):
    """Job 7 of an ordinary user (the caller, as far as dgxvm can tell): its record is read,
    the guest image runs runc; the image cache, the registry, the session and subprocesses
    are tripwires, so nothing is pulled or reached."""
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "vm").mkdir()
    target = Target(job_id=7, domain="job-7", address="10.0.0.2", user="u",
                    key=str(tmp_path / "vm" / "key"), known_hosts="kh", state="running",
                    workdir=str(work), gpus=(), slurm_gpus=(), uid=1000, gid=1000,
                    image="noble", image_cache=str(tmp_path / "cache"))
    monkeypatch.setattr(cli_main.Context, "env",
                        property(lambda c: type("E", (), {"cfg": c.config})()))
    monkeypatch.setattr(runner, "target_for", lambda env, job: target)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(profile, "runtime_of", lambda store, name: ("runc", "none"))
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    return target


def test_pyxis_container_name_without_image_is_refused_when_the_job_has_none(
        tripwires, job, capsys, monkeypatch):
    rc, err = dgxvm(capsys, "run", "--container-name=args-test", "--", "true")
    assert rc == 125
    assert err == ("dgxvm: error: job 7 has no container named args-test: make it with "
                   "--container-image REF --container-name args-test\n")
    assert tripwires == []


def test_a_mount_source_the_vm_does_not_have_is_refused_before_the_pull(
        tripwires, job, capsys, monkeypatch, tmp_path):
    host_only = tmp_path / "scratch"
    host_only.mkdir()
    rc, err = dgxvm(capsys, "run", "--container-image", "127.0.0.1:9/nowhere/x:1",
                    "--container-mounts", f"{job.workdir}:/w,{host_only}:/s", "--", "true")
    assert rc == 125 and tripwires == [], err
    assert f"--container-mounts entry '{host_only}:/s'" in err
    assert "host path the VM does not have" in err and job.workdir in err


def test_a_guest_image_without_a_container_runtime_is_refused_before_the_pull(
        tripwires, job, capsys, monkeypatch):
    monkeypatch.setattr(profile, "runtime_of", lambda store, name: ("none", "none"))
    rc, err = dgxvm(capsys, "run", "--container-image", "u", "--", "true")
    assert rc == 125 and "container runtime is 'none'" in err and tripwires == []


# -- the valid forms: accepted, and meant as given ---------------------------------------------
VALID = [
    # (flags, what the container gets: ContainerFlags fields, or None for no container)
    (["--container-image", "ubuntu"], {"image": "ubuntu", "ref": "docker.io/library/ubuntu:latest"}),
    (["--container-image=nvcr.io#nvidia/pytorch:24.01-py3"],
     {"ref": "nvcr.io/nvidia/pytorch:24.01-py3"}),
    ([f"--container-image=docker://alice@nvcr.io#nvidia/pytorch@{DIGEST}"],
     {"ref": f"nvcr.io/nvidia/pytorch@{DIGEST}"}),
    (["--container-image", "127.0.0.1:5000/test/busy:1", "--container-image", "127.0.0.1:5000/test/busy:1"],
     {"ref": "127.0.0.1:5000/test/busy:1"}),
    (["--container-image", "u", "--container-mounts", "/a:/b:ro+rprivate,/c"],
     {"mounts": "/a:/b:ro+rprivate,/c"}),
    (["--container-image", "u", "--container-mounts", "/a:/b", "--container-mounts", "/c:/d:ro"],
     {"mounts": "/a:/b,/c:/d:ro"}),
    (["--container-image", "u", "--container-mounts", "/a:/b", "--container-mounts", "/a:/b"],
     {"mounts": "/a:/b,/a:/b"}),
    (["--container-image", "u", "--container-mounts=/d:/e:"], {"mounts": "/d:/e:"}),
    (["--container-image", "u", "--container-workdir", "/workspace"], {"workdir": "/workspace"}),
    (["--container-image", "u", "--container-env", "A,B", "--container-env", "C"],
     {"env": "A,B,C"}),
    (["--container-image", "u", "--container-name", "env1"], {"name": "env1", "writable": None}),
    (["--container-image", "u", "--container-name", "env1:auto", "--container-writable"],
     {"name": "env1:auto", "writable": True}),
    (["--container-image", "u", "--container-writable", "--container-writable"], {"writable": True}),
    (["--container-image", "u", "--container-readonly"], {"writable": False}),
    (["--container-image", "u", "--container-remap-root"], {"remap_root": True}),
    (["--container-image", "u", "--no-container-remap-root"], {"remap_root": False}),
    (["--container-image", "u", "--job", "7", "--job", "7", "-q"], {"image": "u"}),
    (["--container-readonly", "--no-container-remap-root"], None),   # the defaults, said
    ([], None),
]


@pytest.fixture
def accepted(job, monkeypatch):
    """What reached the cache, the container and the session (all faked)."""
    seen: dict = {}

    class Image:
        digest = DIGEST
        rootfs = Path(job.image_cache) / "sha256" / ("d" * 64) / "bundle" / "rootfs"
        config: dict = {}

    def get_held(self, ref, hold, **kw):
        seen["ref"] = str(ref)
        return Image()

    def request(flags, **kw):
        seen["flags"] = flags
        return Request(argv=kw["argv"], env={}, cwd=None)
    monkeypatch.setattr(ImageCache, "get_held", get_held)
    monkeypatch.setattr(ranlog, "append", lambda *a: None)
    monkeypatch.setattr(cache_admin, "evict_for_run", lambda *a, **kw: None)
    monkeypatch.setattr(runner, "container_request", request)
    def session_run(target, request, **kw):
        seen["ran"] = request
        return 0
    monkeypatch.setattr(session, "run", session_run)
    return seen


@pytest.mark.parametrize("flags, want", [pytest.param(f, w, id=" ".join(f)[:60] or "none")
                                         for f, w in VALID])
def test_the_valid_forms_are_accepted_and_reach_the_container_as_given(accepted, capsys, flags,
                                                                       want):
    rc, err = dgxvm(capsys, "run", *flags, "--", "true")
    assert rc == 0, err
    assert "ran" in accepted                                   # the session was reached
    if want is None:
        assert "flags" not in accepted and "ref" not in accepted   # no container
        return
    flags_seen = accepted["flags"]
    for key, value in want.items():
        got = accepted["ref"] if key == "ref" else getattr(flags_seen, key)
        assert got == value, (key, got)


def test_dgxvm_shell_accepts_the_same_forms(accepted, capsys):
    rc, err = dgxvm(capsys, "shell", "--container-image", "u", "--container-mounts", "/a:/b",
                    "--container-mounts", "/c", "--container-readonly", "--container-remap-root")
    assert rc == 0, err
    f = accepted["flags"]
    assert (f.mounts, f.writable, f.remap_root) == ("/a:/b,/c", False, True)


# -- root's run into a user's job is the user's ----------------------------------------------------
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="a drop of privileges needs root")


def _free_uid() -> int:
    uid = 4_100_000
    while True:
        try:
            pwd.getpwuid(uid)
        except KeyError:
            return uid
        uid += 1


@pytest.mark.parametrize("uid, user, why", [
    (None, "ghost", "does not exist on this node"),
    (NOBODY, "not-nobody", f"is not the job's user: uid {NOBODY} is nobody on this node now"),
])
def test_root_is_refused_when_the_jobs_user_cannot_be_become(job, capsys, monkeypatch, uid, user,
                                                             why):
    from slurm_dgxvm.access import target as target_mod
    uid = _free_uid() if uid is None else uid
    bad = Target(**{**job.__dict__, "uid": uid, "gid": uid, "user": user})
    monkeypatch.setattr(runner, "target_for", lambda env, j: bad)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    dropped = []
    for name in ("setgroups", "setresgid", "setresuid"):
        monkeypatch.setattr(os, name, lambda *a, n=name: dropped.append(n))
    monkeypatch.setattr(target_mod, "close_descriptors", lambda: dropped.append("close"))
    monkeypatch.setattr(session, "run", lambda *a, **kw: dropped.append("session") or 0)
    rc, err = dgxvm(capsys, "run", "--", "true")
    assert rc == 125 and dropped == []
    assert err == (f"dgxvm: error: job 7's user {user} (uid {uid}) {why}: root's dgxvm "
                   f"run/shell runs as the job's user\n")


ROOT_RUN = r"""
import json, os, socket, sys
from pathlib import Path
from slurm_dgxvm.access import session
from slurm_dgxvm.access.request import Request
from slurm_dgxvm.access.target import Target
from slurm_dgxvm.containers import cache_admin
from slurm_dgxvm.cli import main as cli_main
from slurm_dgxvm.access import runner
from slurm_dgxvm.containers import ranlog
from slurm_dgxvm.containers.cache import ImageCache
from slurm_dgxvm.containers.registry import Registry
from slurm_dgxvm.images import profile

tmp, report = Path(sys.argv[1]), {}
secret = os.open("/etc/shadow", os.O_RDONLY)          # root's: must not reach the user
left = socket.socketpair()                             # as a libvirt connection would be
target = Target(job_id=7, domain="job-7", address="10.0.0.2", user="nobody",
                key=str(tmp / "vm" / "key"), known_hosts="kh", state="running", workdir=None,
                gpus=(), slurm_gpus=(), uid=65534, gid=65534, image="noble",
                image_cache=str(tmp / "cache"))
runner.target_for = lambda env, job: target
cli_main.Context.env = property(lambda c: type("E", (), {"cfg": c.config})())
profile.runtime_of = lambda store, name: ("runc", "none")

def _open(fd):
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False

def get_held(self, ref, hold, **kw):
    import tempfile
    report.update(ids=[os.getresuid(), os.getresgid()], groups=os.getgroups(),
                  authfile=str(self.registry.authfile), fds=sorted(os.listdir("/proc/self/fd")),
                  env={k: os.environ.get(k) for k in ("HOME", "USER", "LOGNAME", "DOCKER_CONFIG",
                                                      "XDG_RUNTIME_DIR", "TMPDIR", "KEEP")},
                  tempdir=tempfile.gettempdir(),
                  open=[fd for fd in (secret, *(s.fileno() for s in left)) if _open(fd)])
    for probe in (lambda: os.setresuid(0, 0, 0), lambda: os.setuid(0),
                  lambda: open("/etc/shadow").close()):
        try:
            probe()
            report.setdefault("regained", []).append(True)
        except PermissionError:
            pass
    mine = tmp / "cache" / "made-by-the-run"
    mine.touch()
    report["made_owner"] = mine.stat().st_uid
    raise RuntimeError("stop here: nothing to pull")
ImageCache.get_held = get_held
rc = cli_main.main(["run", "--job", "7", "--container-image", "127.0.0.1:9/x:1", "--", "id"])
print(json.dumps(report))
"""


@root_only
def test_roots_run_is_the_jobs_users_own_with_their_credentials_not_roots(traversable_tmp):
    """In a process of its own: root's run of nobody's job, with root's DOCKER_CONFIG pointing
    at credentials, XDG_RUNTIME_DIR and TMPDIR of root's, a root-only file and a socket open.
    When the cache is reached it is nobody for good, with nobody's home and no credential of
    root's, and none of root's descriptors."""
    (traversable_tmp / "vm").mkdir()
    cache = traversable_tmp / "cache"
    cache.mkdir(mode=0o700)
    os.chown(cache, NOBODY, NOBODY)
    config = traversable_tmp / "dgxvm.toml"
    config.write_text("")
    docker = traversable_tmp / "root-docker"
    docker.mkdir()
    (docker / "config.json").write_text(json.dumps({"auths": {"127.0.0.1:9": {"auth": "eDp5"}}}))
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(REPO),
           "HOME": "/root", "USER": "root", "DOCKER_CONFIG": str(docker),
           "XDG_RUNTIME_DIR": "/run/user/0", "TMPDIR": "/root", "KEEP": "kept",
           "DGXVM_CONFIG": str(config)}
    r = subprocess.run([sys.executable, "-c", ROOT_RUN, str(traversable_tmp)], env=env,
                       capture_output=True, text=True, timeout=60, cwd="/")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout.splitlines()[-1])
    assert report["ids"] == [[NOBODY] * 3, [NOBODY] * 3]
    assert report["groups"] == [NOBODY]                 # nobody's own list, not root's 0
    assert "regained" not in report                     # no setuid(0), no root-only file
    assert report["fds"] == ["0", "1", "2", "3"]        # stdio, and the listing's own
    assert report["open"] == []                         # root's file and socket: closed
    assert report["authfile"] == "None"                 # anonymous: root's login not used
    assert report["env"] == {"HOME": pwd.getpwuid(NOBODY).pw_dir, "USER": "nobody",
                             "LOGNAME": "nobody", "DOCKER_CONFIG": None,
                             "XDG_RUNTIME_DIR": None, "TMPDIR": None, "KEEP": "kept"}
    assert report["tempdir"] == "/tmp"
    assert report["made_owner"] == NOBODY               # the user's cache, as the user


@root_only
def test_roots_run_of_roots_own_job_stays_root(job, capsys, monkeypatch):
    root_job = Target(**{**job.__dict__, "uid": 0, "gid": 0, "user": "root"})
    monkeypatch.setattr(runner, "target_for", lambda env, j: root_job)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(runner, "become_job_user",
                        lambda *a: pytest.fail("root's own job needs no drop"))
    monkeypatch.setattr(session, "run", lambda *a, **kw: 0)
    rc, err = dgxvm(capsys, "run", "--", "true")
    assert rc == 0, err
