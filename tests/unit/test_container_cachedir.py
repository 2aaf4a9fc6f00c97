"""<cache_dir>/<uid>: made by root for the user, never through a symlink, safe to race."""

from __future__ import annotations

import multiprocessing
import os
import stat
from pathlib import Path

import pytest

from slurm_dgxvm import config as config_mod
from slurm_dgxvm.lifecycle.cachedir import user_cache_dir
from slurm_dgxvm.errors import ContainerCacheError
from slurm_dgxvm.shares import policy

UID, GID = 54331, 54332


@pytest.fixture
def base(traversable_tmp):
    return traversable_tmp


def cfg_for(cache_dir) -> config_mod.Config:
    return config_mod.from_dict({"containers": {"cache_dir": str(cache_dir)}})


def owner_mode(path: Path) -> tuple[int, int, int]:
    st = os.lstat(path)
    return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)


def test_a_fresh_cache_dir_and_the_users_entry_are_made(base):
    root = base / "lib" / "containers"
    path = user_cache_dir(cfg_for(root), UID, GID)
    assert path == root / str(UID)
    assert owner_mode(root) == (0, 0, 0o711)
    assert owner_mode(path) == (UID, GID, 0o700)
    # the user reaches their own entry through the 0711 root, as the share will open it
    spec = policy.pin(str(path), UID, GID, [GID])
    assert (spec.dev, spec.ino) == (path.stat().st_dev, path.stat().st_ino)


def test_an_existing_entry_is_kept_as_it_is(base):
    root = base / "containers"
    path = user_cache_dir(cfg_for(root), UID, GID)
    (path / "sha256").mkdir()
    os.chmod(path, 0o750)                       # the user's own choice
    ino = path.stat().st_ino
    assert user_cache_dir(cfg_for(root), UID, GID + 1) == path
    assert path.stat().st_ino == ino and (path / "sha256").is_dir()
    assert owner_mode(path) == (UID, GID, 0o750)


def test_another_users_entry_is_made_beside_it(base):
    root = base / "containers"
    a = user_cache_dir(cfg_for(root), UID, GID)
    b = user_cache_dir(cfg_for(root), UID + 1, GID)
    assert a != b and owner_mode(b)[0] == UID + 1


@pytest.mark.parametrize("make, reason", [
    (lambda p, elsewhere: p.symlink_to(elsewhere), "symbolic link"),
    (lambda p, elsewhere: p.write_text("x"), "not a directory"),
    (lambda p, elsewhere: (p.mkdir(), os.chown(p, UID + 7, GID)), "owned by uid 54338"),
    (lambda p, elsewhere: (p.mkdir(), (p / "x").write_text("x")), "owned by uid 0"),
])
def test_an_entry_that_is_not_the_users_real_directory_is_refused_naming_it(base, make,
                                                                              reason):
    root = base / "containers"
    root.mkdir(mode=0o711)
    elsewhere = base / "etc"
    elsewhere.mkdir()
    os.chown(elsewhere, UID, GID)
    entry = root / str(UID)
    make(entry, elsewhere)
    with pytest.raises(ContainerCacheError) as info:
        user_cache_dir(cfg_for(root), UID, GID)
    assert str(entry) in str(info.value) and reason in str(info.value)
    assert info.value.path == str(entry)
    assert owner_mode(elsewhere) == (UID, GID, 0o755)   # the link was not followed
    assert os.listdir(elsewhere) == []


def test_an_empty_entry_a_killed_creator_left_to_root_is_given_to_the_user(base):
    root = base / "containers"
    root.mkdir(mode=0o711)
    (root / str(UID)).mkdir(mode=0o755)
    path = user_cache_dir(cfg_for(root), UID, GID)
    assert owner_mode(path) == (UID, GID, 0o700)


@pytest.mark.parametrize("make, reason", [
    (lambda root, real: root.symlink_to(real), "symbolic link"),
    (lambda root, real: (root.mkdir(), os.chown(root, UID, GID)), "owner uid 54331"),
    (lambda root, real: (root.mkdir(), os.chmod(root, 0o1777)), "mode 1777"),
    (lambda root, real: root.write_text(""), "not a directory"),
])
def test_a_cache_dir_that_is_not_roots_alone_is_refused(base, make, reason):
    real = base / "real"
    real.mkdir(mode=0o711)
    root = base / "containers"
    make(root, real)
    with pytest.raises(ContainerCacheError) as info:
        user_cache_dir(cfg_for(root), UID, GID)
    assert str(root) in str(info.value) and reason in str(info.value)
    assert os.listdir(real) == []


def test_no_cache_dir_or_root_is_refused(base):
    with pytest.raises(ContainerCacheError, match="not set"):
        user_cache_dir(cfg_for(""), UID, GID)
    with pytest.raises(ContainerCacheError, match="uid 0"):
        user_cache_dir(cfg_for(base / "c"), 0, 0)
    assert not (base / "c").exists()


def _race(root: str, uid: int, start, out) -> None:
    start.wait()
    try:
        out.put((uid, str(user_cache_dir(cfg_for(root), uid, GID))))
    except Exception as exc:  # noqa: BLE001 - the test names it
        out.put((uid, f"ERROR {exc}"))


def test_concurrent_prologs_of_one_user_and_of_others_all_succeed(base):
    """16 processes at once, 8 of them for one user (two Prologs of one user's jobs), on a
    cache dir that does not exist yet: every one gets its entry, owned as it must be."""
    root = base / "containers"
    ctx = multiprocessing.get_context("fork")
    start, out = ctx.Barrier(16), ctx.Queue()
    uids = [UID] * 8 + [UID + 1 + i for i in range(8)]
    procs = [ctx.Process(target=_race, args=(str(root), u, start, out)) for u in uids]
    for p in procs:
        p.start()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert sorted(results) == sorted((u, str(root / str(u))) for u in uids)
    assert owner_mode(root) == (0, 0, 0o711)
    for u in set(uids):
        assert owner_mode(root / str(u)) == (u, GID, 0o700)


# -- the VM's share of it (lifecycle.create) ------------------------------------------------------
def request(**kw):
    from slurm_dgxvm.lifecycle import CreateRequest
    from slurm_dgxvm.placement import Request
    return CreateRequest(**{"name": "vm1", "placement": Request(count=1), "user": "alice",
                            "uid": UID, "gid": GID, "groups": (GID + 5,), **kw})


def test_a_users_vm_gets_its_cache_pinned_as_a_share(base):
    from slurm_dgxvm.lifecycle.create import image_cache_share
    root = base / "containers"
    spec = image_cache_share(cfg_for(root), request(), None)
    path = root / str(UID)
    st = path.stat()
    assert (spec.path, spec.uid, spec.gid, spec.groups, spec.dev, spec.ino) == \
        (str(path), UID, GID, (GID, GID + 5), st.st_dev, st.st_ino)


def test_no_cache_share_for_root_without_a_cache_dir_or_without_virtiofs(base):
    from slurm_dgxvm.lifecycle.create import image_cache_share
    root = base / "containers"
    assert image_cache_share(cfg_for(root), request(uid=0, gid=0, user="root"), None) is None
    assert image_cache_share(cfg_for(""), request(), None) is None
    none = config_mod.from_dict({"containers": {"cache_dir": str(root)},
                                 "vm": {"share": "none"}})
    assert image_cache_share(none, request(), None) is None
    assert not root.exists()            # nothing made for a VM that gets no share


def test_a_work_dir_that_is_the_cache_is_shared_once(base):
    from slurm_dgxvm.lifecycle.create import image_cache_share
    root = base / "containers"
    path = user_cache_dir(cfg_for(root), UID, GID)
    work = policy.pin(str(path), UID, GID, [GID])
    assert image_cache_share(cfg_for(root), request(workdir=str(path)), work) is None


def test_a_cache_the_user_cannot_reach_is_the_nodes_fault_naming_it(base):
    from slurm_dgxvm.lifecycle.create import image_cache_share
    hidden = base / "private"
    hidden.mkdir(mode=0o700)
    with pytest.raises(ContainerCacheError) as info:
        image_cache_share(cfg_for(hidden / "containers"), request(), None)
    assert str(hidden / "containers" / str(UID)) in str(info.value)
    assert "cannot reach" in str(info.value) and info.value.exit_code == 5


def test_a_cache_the_user_shut_themselves_out_of_is_the_jobs_fault_naming_it(base):
    """chmod 000 of their own <cache_dir>/<uid>, as the user may: the job is refused (a job
    fault: the Prolog cancels it and the node stays in service), never ContainerCacheError."""
    from slurm_dgxvm.errors import ImageCacheRefused, is_job_fault
    from slurm_dgxvm.lifecycle.create import image_cache_share
    root = base / "containers"
    path = user_cache_dir(cfg_for(root), UID, GID)
    os.chmod(path, 0o000)
    with pytest.raises(ImageCacheRefused) as info:
        image_cache_share(cfg_for(root), request(), None)
    assert is_job_fault(info.value) and info.value.exit_code == 2
    assert str(info.value).startswith(f"container image cache '{path}' is not shared into the "
                                      f"VM: the job's user cannot open it as themselves: the "
                                      f"job's user cannot read {path} (Permission denied)")


def test_share_refused_no_share_boots_without_the_cache_and_says_why(base):
    from slurm_dgxvm.errors import ImageCacheRefused
    from slurm_dgxvm.lifecycle.create import check_image_cache
    root = base / "containers"
    path = user_cache_dir(cfg_for(root), UID, GID)
    os.chmod(path, 0o000)
    no_share = config_mod.from_dict({"containers": {"cache_dir": str(root)},
                                     "vm": {"share_refused": "no-share"}})
    spec, why = check_image_cache(no_share, request(), None)
    assert spec is None and f"container image cache '{path}'" in why and "cannot read" in why
    with pytest.raises(ImageCacheRefused):
        check_image_cache(cfg_for(root), request(), None)            # "refuse", the default
    os.chmod(path, 0o700)
    spec, why = check_image_cache(no_share, request(), None)
    assert why is None and spec.ino == path.stat().st_ino


def test_a_cache_whose_pin_does_not_answer_is_refused_in_seconds(base, monkeypatch):
    """The user's files stall the pin (a FUSE mount or a process of theirs stopped): after the
    deadline the job is refused, the node's fault it is not."""
    import signal
    import time
    from slurm_dgxvm.errors import ImageCacheRefused, is_job_fault
    from slurm_dgxvm.lifecycle.create import image_cache_share
    from slurm_dgxvm.shares import asuser
    root = base / "containers"
    path = user_cache_dir(cfg_for(root), UID, GID)
    real_walk = policy._walk
    monkeypatch.setattr(asuser, "DEADLINE_S", 0.5)
    monkeypatch.setattr(policy, "_walk",
                        lambda p: (os.kill(os.getpid(), signal.SIGSTOP), real_walk(p))[1])
    t0 = time.monotonic()
    with pytest.raises(ImageCacheRefused) as info:
        image_cache_share(cfg_for(root), request(), None)
    assert time.monotonic() - t0 < 0.5 + 2.0
    assert is_job_fault(info.value)
    assert f"'{path}'" in str(info.value) and "did not answer within 0.5s" in str(info.value)


def test_a_cache_share_virtiofsd_that_refused_its_directory_is_the_jobs_fault(tmp_path):
    """Its virtiofsd refuses a directory the user changed since the Prolog's pin (the job's
    fault, like the work dir's); any other failure to serve it is the node's."""
    from slurm_dgxvm.errors import HostError, ImageCacheRefused, ShareRefused, is_job_fault
    from slurm_dgxvm.lifecycle.create import _share_refusal
    from slurm_dgxvm.records import IMAGE_CACHE_SPEC
    from slurm_dgxvm.shares import virtiofsd
    assert virtiofsd.error_file_of(tmp_path / IMAGE_CACHE_SPEC) == tmp_path / "image-cache.error"
    assert virtiofsd.error_file_of(tmp_path / "share.json") == tmp_path / virtiofsd.ERROR_FILE
    _share_refusal(tmp_path)                                      # nothing said: nothing raised
    cache = "/var/lib/dgxvm/containers/1000"
    said = str(ShareRefused(value=cache, reason="it is no longer the directory that was checked"))
    (tmp_path / "image-cache.error").write_text(f"refused: {said}\n")
    with pytest.raises(ImageCacheRefused) as info:
        _share_refusal(tmp_path, cache)
    assert is_job_fault(info.value)
    assert str(info.value) == (f"container image cache '{cache}' is not shared into the VM: "
                               f"when the VM started: it is no longer the directory that was "
                               f"checked")
    (tmp_path / "image-cache.error").write_text("virtiofsd as the job's user: OSError: x\n")
    with pytest.raises(HostError, match="container image cache share could not be served"):
        _share_refusal(tmp_path, cache)
    (tmp_path / virtiofsd.ERROR_FILE).write_text("refused: swapped\n")
    with pytest.raises(ShareRefused):                             # the work dir's: the job's
        _share_refusal(tmp_path, cache)


def test_the_virtiofsd_writes_its_error_beside_its_own_spec(tmp_path):
    from slurm_dgxvm.shares import virtiofsd
    spec = tmp_path / "image-cache.json"
    spec.write_text("{}")
    assert virtiofsd.main([str(spec)]) == 1
    assert (tmp_path / "image-cache.error").read_text().startswith("virtiofsd as the job's user")
    assert not (tmp_path / virtiofsd.ERROR_FILE).exists()


@pytest.fixture
def full_fs(base):
    """A real filesystem with no room left (a tmpfs of 16 inodes, every one taken)."""
    import subprocess
    mnt = base / "full"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,nr_inodes=16,mode=0711", "tmpfs",
                    str(mnt)], check=True)
    try:
        (mnt / "containers").mkdir(mode=0o711)
        n = 0
        while True:
            try:
                (mnt / f"pulled-{n}").touch()
            except OSError:
                break
            n += 1
        yield mnt / "containers"
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_a_cache_dir_filled_by_users_pulls_refuses_the_job_not_the_node(full_fs):
    """Another user's pulls filled the caches' filesystem: a new user's entry cannot be made.
    That must not drain the node: the job is refused (or its VM gets no cache, no-share)."""
    from slurm_dgxvm.errors import ImageCacheRefused, is_job_fault
    from slurm_dgxvm.lifecycle.create import check_image_cache
    with pytest.raises(ImageCacheRefused) as info:
        check_image_cache(cfg_for(full_fs), request(), None)
    assert is_job_fault(info.value)
    assert f"'{full_fs}/{UID}'" in str(info.value) and "is full" in str(info.value)
    no_share = config_mod.from_dict({"containers": {"cache_dir": str(full_fs)},
                                     "vm": {"share_refused": "no-share"}})
    spec, why = check_image_cache(no_share, request(), None)
    assert spec is None and "No space left on device" in why
    assert not (full_fs / str(UID)).exists()


# -- something mounted over the user's entry ------------------------------------------------------
def test_a_mount_over_the_users_entry_is_never_entered_by_root(base):
    """Only the user (FUSE) or an admin can mount over ``<cache_dir>/<uid>``: root sees that
    something is there without entering it, and the job is refused, not the node drained."""
    import subprocess
    from slurm_dgxvm.errors import ImageCacheRefused, is_job_fault
    root = base / "containers"
    entry = user_cache_dir(cfg_for(root), UID, GID)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(entry)], check=True)
    try:
        with pytest.raises(ImageCacheRefused) as info:
            user_cache_dir(cfg_for(root), UID, GID)
        assert is_job_fault(info.value) and "something is mounted over it" in str(info.value)
    finally:
        subprocess.run(["umount", str(entry)], check=True)
    assert user_cache_dir(cfg_for(root), UID, GID) == entry


@pytest.fixture
def users_fuse(base):
    """The attack as a user makes it on a stock Debian node (fuse3: /dev/fuse 0666, the setuid
    fusermount3): ``nobody`` mounts bindfs over their own cache entry, then stops its daemon.
    Yields (cache_dir, entry); the mount is taken away after."""
    import shutil
    import signal
    import subprocess
    import time
    assert shutil.which("bindfs") and shutil.which("fusermount3"), "bootstrap installs bindfs"
    mode = stat.S_IMODE(os.stat("/dev/fuse").st_mode)
    os.chmod("/dev/fuse", 0o666)                         # Debian's own mode for it
    root = base / "containers"
    entry = user_cache_dir(cfg_for(root), 65534, 65534)
    src = base / "fuse-src"
    src.mkdir()
    os.chown(src, 65534, 65534)
    as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    subprocess.run([*as_nobody, "bindfs", "--no-allow-other", str(src), str(entry)],
                   check=True, capture_output=True)
    daemon = None
    try:
        deadline = time.monotonic() + 10
        while daemon is None and time.monotonic() < deadline:
            for p in Path("/proc").iterdir():
                try:
                    if p.name.isdigit() and str(entry) in (p / "cmdline").read_text() \
                            and p.stat().st_uid == 65534:
                        daemon = int(p.name)
                except OSError:
                    continue
        assert daemon is not None, "bindfs is not running"
        os.kill(daemon, signal.SIGSTOP)                  # the user stops their FUSE daemon
        yield root, entry
    finally:
        if daemon is not None:
            os.kill(daemon, signal.SIGCONT)
        subprocess.run(["umount", "-l", str(entry)], capture_output=True)
        os.chmod("/dev/fuse", mode)


def test_a_stopped_fuse_mount_of_the_users_refuses_the_job_in_seconds(users_fuse, monkeypatch):
    import time
    from slurm_dgxvm.errors import ImageCacheRefused, is_job_fault
    from slurm_dgxvm.lifecycle.create import check_image_cache, image_cache_share
    root, entry = users_fuse
    req = request(uid=65534, gid=65534, groups=(), user="nobody")
    t0 = time.monotonic()
    with pytest.raises(ImageCacheRefused) as info:
        image_cache_share(cfg_for(root), req, None)
    assert time.monotonic() - t0 < 2.0                   # root asked the daemon nothing
    assert is_job_fault(info.value) and "mounted over it" in str(info.value)
    no_share = config_mod.from_dict({"containers": {"cache_dir": str(root)},
                                     "vm": {"share_refused": "no-share"}})
    spec, why = check_image_cache(no_share, req, None)
    assert spec is None and "mounted over it" in why
