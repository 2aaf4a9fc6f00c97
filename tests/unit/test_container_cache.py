"""containers.registry and containers.cache, the parts that need no registry: what skopeo's
failures mean, choosing linux/amd64 from an index, where credentials are, the cache's layout,
what eviction picks and what it leaves alone, where a pull's progress goes (a stand-in skopeo
that talks as skopeo 1.9 does). Pulls are in tests/integration/test_container_pull.py."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pty
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurm_dgxvm.containers.cache import (CachedImage, EntryUsage, ImageCache, image_config,
                                          plan_eviction, remove_tree)
from slurm_dgxvm.containers.ref import parse
from slurm_dgxvm.containers.registry import (Registry, authfile_has, classify, default_authfile,
                                             manifest_digest, select_platform, skopeo_said)
from slurm_dgxvm.errors import (ContainerAuthError, ContainerCacheError, ContainerDiskFull,
                                ContainerImageError, ContainerImageNotFound,
                                ContainerRegistryUnreachable)

REF = parse("127.0.0.1:5000/test/busybox:1")
D1, D2, D3 = ("sha256:" + c * 64 for c in "abc")


def fatal(msg: str) -> str:
    """skopeo 1.9's last line on stderr, as it logs a fatal error."""
    return f'time="2026-11-26T20:07:48Z" level=fatal msg="{msg}"\n'


# -- what skopeo's failures mean (samples of skopeo 1.9.3 against distribution 2.8.2) ---------------
CLASSIFY = [
    ("unknown repository", fatal('Error parsing image name \\"docker://127.0.0.1:5000/test/nope:1\\": '
                                 'reading manifest 1 in 127.0.0.1:5000/test/nope: manifest unknown: '
                                 'manifest unknown'), ContainerImageNotFound, "no tag '1'"),
    ("unknown tag, on copy", fatal("initializing source docker://127.0.0.1:5000/test/busybox:nope: "
                                   "reading manifest nope in 127.0.0.1:5000/test/busybox: manifest "
                                   "unknown: manifest unknown"), ContainerImageNotFound, "in 127.0.0.1"),
    ("list-tags of an unknown repository", fatal("Error listing repository tags: fetching tags list: "
                                                 "invalid status code from registry 404 (Not Found)"),
     ContainerImageNotFound, "no tag"),
    ("registry down", fatal('Error parsing image name \\"docker://127.0.0.1:5998/test/busybox:1\\": '
                            'pinging container registry 127.0.0.1:5998: Get \\"http://127.0.0.1:5998/v2/'
                            '\\": dial tcp 127.0.0.1:5998: connect: connection refused'),
     ContainerRegistryUnreachable, "cannot be reached"),
    ("plain HTTP registry over TLS", fatal("pinging container registry 127.0.0.1:5000: Get "
                                           '\\"https://127.0.0.1:5000/v2/\\": http: server gave HTTP '
                                           "response to HTTPS client"),
     ContainerRegistryUnreachable, "speaks plain HTTP"),
    ("unknown host", fatal("pinging container registry nowhere.example: dial tcp: lookup "
                           "nowhere.example: no such host"), ContainerRegistryUnreachable, "reached"),
    ("untrusted certificate", fatal("pinging container registry r.example: Get \\\"https://r.example/"
                                    "v2/\\\": x509: certificate signed by unknown authority"),
     ContainerRegistryUnreachable, "not trusted"),
    ("auth required", fatal("reading manifest 1 in 127.0.0.1:5000/priv/bb: unauthorized: "
                            "authentication required"), ContainerAuthError, "no credentials were given"),
    ("bad password, token", fatal("Error listing repository tags: unable to retrieve auth token: "
                                  "invalid username/password: unauthorized: authentication required"),
     ContainerAuthError, "denied access"),
    ("docker hub, private or missing", fatal("reading manifest latest in docker.io/x/y: denied: "
                                             "requested access to the resource is denied"),
     ContainerAuthError, "does not exist"),
    ("disk full, pulling", fatal("writing blob: write /c/tmp/x/oci/oci-put-blob41136: no space left "
                                 "on device"), ContainerDiskFull, "disk is full"),
    ("quota", fatal("writing blob: write /c/tmp/x: disk quota exceeded"), ContainerDiskFull, "full"),
    ("anything else", fatal("copying config: something new"), ContainerImageError, "something new"),
]


@pytest.mark.parametrize("stderr,cls,words", [c[1:] for c in CLASSIFY], ids=[c[0] for c in CLASSIFY])
def test_skopeo_failures_become_errors_naming_the_reference(stderr, cls, words):
    err = classify(stderr, REF)
    assert type(err) is cls
    assert str(err).startswith(f"container image {REF}: ")
    assert words in str(err)
    assert "level=fatal" not in str(err)      # skopeo's log dressing is taken off


def test_exit_codes_the_users_fault_is_2_the_hosts_3_the_caches_5():
    assert ContainerImageNotFound(ref="r", reason="x").exit_code == 2
    assert ContainerAuthError(ref="r", reason="x").exit_code == 2
    assert ContainerRegistryUnreachable(ref="r", reason="x").exit_code == 3
    assert ContainerDiskFull(ref="r", reason="x").exit_code == 3
    assert ContainerImageError(ref="r", reason="x").exit_code == 3
    assert ContainerCacheError(path="/c", reason="x").exit_code == 5


def test_an_auth_error_says_whether_credentials_were_given_missing_or_refused(tmp_path):
    said = fatal("reading manifest 1 in 127.0.0.1:5000/priv/bb: unauthorized: authentication required")
    none = tmp_path / "none.json"
    assert "has no credentials for 127.0.0.1:5000" in str(classify(said, REF, authfile=none,
                                                                   has_creds=False))
    assert f"refused the credentials in {none}" in str(classify(said, REF, authfile=none,
                                                                has_creds=True))


def test_skopeo_said_unquotes_the_fatal_message_and_leaves_other_text_alone():
    assert skopeo_said(fatal('a \\"b\\" c')) == 'a "b" c'
    assert skopeo_said("plain words") == "plain words"


# -- the platform ---------------------------------------------------------------------------------
def _index(*platforms):
    return {"mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [{"digest": d, "platform": {"os": o, "architecture": a}}
                          for d, (o, a) in zip((D1, D2, D3), platforms)]}


def test_select_platform_takes_linux_amd64_wherever_it_is_in_the_index():
    assert select_platform(_index(("linux", "arm64"), ("linux", "amd64")), REF) == D2
    assert select_platform(_index(("windows", "amd64"), ("linux", "amd64")), REF) == D2


def test_an_index_without_linux_amd64_is_refused_naming_what_it_has():
    with pytest.raises(ContainerImageNotFound, match=r"no linux/amd64 image; the index has "
                                                     r"linux/arm64, linux/ppc64le"):
        select_platform(_index(("linux", "arm64"), ("linux", "ppc64le")), REF)


@pytest.mark.parametrize("digest", ["../../etc", "sha256:abc", "SHA256:" + "a" * 64, None, 7,
                                    "sha256:" + "a" * 64 + "/.."])
def test_an_index_entry_digest_that_is_not_a_digest_is_refused(digest):
    """It would become a directory name in the cache."""
    index = {"manifests": [{"digest": digest, "platform": {"os": "linux", "architecture": "amd64"}}]}
    with pytest.raises(ContainerImageError, match="bad digest"):
        select_platform(index, REF)


def test_a_manifest_digest_is_the_sha256_of_its_bytes():
    raw = '{"schemaVersion":2}'
    assert manifest_digest(raw) == "sha256:" + hashlib.sha256(raw.encode()).hexdigest()


# -- credentials ----------------------------------------------------------------------------------
def test_the_credentials_file_is_docker_config_else_home_docker_config(tmp_path):
    home, dc = tmp_path / "home", tmp_path / "dc"
    (home / ".docker").mkdir(parents=True)
    dc.mkdir()
    assert default_authfile({}, str(home)) is None                    # none: anonymous
    (home / ".docker" / "config.json").write_text("{}")
    assert default_authfile({}, str(home)) == home / ".docker" / "config.json"
    assert default_authfile({"DOCKER_CONFIG": str(dc)}, str(home)) is None
    (dc / "config.json").write_text("{}")
    assert default_authfile({"DOCKER_CONFIG": str(dc)}, str(home)) == dc / "config.json"


def test_authfile_has_finds_the_registry_however_docker_wrote_its_key(tmp_path):
    f = tmp_path / "config.json"
    f.write_text(json.dumps({"auths": {"https://index.docker.io/v1/": {"auth": "eA=="},
                                       "127.0.0.1:5000": {"auth": "eA=="}},
                             "credHelpers": {"nvcr.io": "x"}}))
    assert authfile_has(f, "127.0.0.1:5000") is True
    assert authfile_has(f, "registry-1.docker.io") is True
    assert authfile_has(f, "nvcr.io") is True
    assert authfile_has(f, "127.0.0.1:5001") is False
    assert authfile_has(None, "127.0.0.1:5000") is False
    (tmp_path / "bad.json").write_text("{")
    assert authfile_has(tmp_path / "bad.json", "x") is None


def test_skopeo_gets_the_authfile_or_no_creds_and_tls_per_registry():
    ref = parse("127.0.0.1:5000/a/b:1")
    insecure = Registry(insecure=frozenset({"127.0.0.1:5000"}))
    assert insecure._common(ref, "--tls-verify") == ["--tls-verify=false", "--no-creds"]
    secure = Registry(authfile=Path("/h/.docker/config.json"))
    assert secure._common(ref, "--src-tls-verify") == [
        "--src-tls-verify=true", "--src-authfile=/h/.docker/config.json"]
    assert secure._source(parse("ubuntu")) == "docker://registry-1.docker.io/library/ubuntu:latest"
    assert secure._source(ref, D1) == f"docker://127.0.0.1:5000/a/b@{D1}"


# -- the layout -----------------------------------------------------------------------------------
def test_entries_live_under_their_digest_and_refs_cannot_collide(tmp_path):
    cache = ImageCache(tmp_path)
    assert cache.entry_path(D1) == tmp_path / "sha256" / ("a" * 64)
    a = cache.ref_path(parse("r.io/a:b"))
    sub = cache.ref_path(parse("r.io/a/b:c"))
    assert a == tmp_path / "refs" / "r.io" / "a@b"
    assert not str(sub).startswith(str(a) + "/")
    assert cache.ref_path(parse(f"r.io/a@{D1}")) == tmp_path / "refs" / "r.io" / f"a@{D1}"


@pytest.mark.parametrize("bad", ["", "sha256:", "../x", "sha256:../../" + "a" * 58, "md5:" + "a" * 32])
def test_a_string_that_is_not_a_digest_never_becomes_a_path(tmp_path, bad):
    with pytest.raises(ValueError):
        ImageCache(tmp_path).entry_path(bad)


def _write_blob(layout: Path, doc) -> dict:
    data = json.dumps(doc).encode()
    hex_ = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (layout / "blobs" / "sha256" / hex_).write_bytes(data)
    return {"digest": f"sha256:{hex_}", "size": len(data)}


def _layout(path: Path, runtime: dict, tag: str = "image") -> Path:
    cfg = _write_blob(path, {"architecture": "amd64", "os": "linux", "config": runtime})
    man = _write_blob(path, {"schemaVersion": 2, "config": cfg, "layers": []})
    (path / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {**man, "annotations": {"org.opencontainers.image.ref.name": tag}}]}))
    return path


def test_image_config_keeps_what_a_container_runs_with(tmp_path):
    layout = _layout(tmp_path / "oci", {"Env": ["PATH=/bin"], "Cmd": ["sh"], "Entrypoint": None,
                                        "WorkingDir": "/w", "User": "1000:1000", "Labels": {"a": "b"},
                                        "ExposedPorts": {"80/tcp": {}}})
    assert image_config(layout) == {"Env": ["PATH=/bin"], "Cmd": ["sh"], "WorkingDir": "/w",
                                    "User": "1000:1000"}


def test_image_config_refuses_a_layout_without_the_tag_or_with_a_bad_blob_digest(tmp_path):
    with pytest.raises(ValueError, match="0 manifests tagged 'image'"):
        image_config(_layout(tmp_path / "a", {}, tag="other"))
    bad = tmp_path / "b"
    bad.mkdir()
    (bad / "index.json").write_text(json.dumps({"manifests": [
        {"digest": "sha256:../../../etc/passwd",
         "annotations": {"org.opencontainers.image.ref.name": "image"}}]}))
    with pytest.raises(ValueError, match="bad blob digest"):
        image_config(bad)


def _entry(cache: ImageCache, digest: str, size: int, last_used: float) -> Path:
    path = cache.entry_path(digest)
    (path / "bundle" / "rootfs").mkdir(parents=True)
    (path / "image.json").write_text(json.dumps({"digest": digest, "config": {"Cmd": ["x"]}}))
    (path / "bundle" / "rootfs" / "data").write_bytes(os.urandom(size))
    (path / "last-used").touch()
    os.utime(path / "last-used", (last_used, last_used))
    return path


def test_lookup_sees_a_complete_entry_and_never_a_leftover_in_tmp(tmp_path):
    cache = ImageCache(tmp_path)
    cache._ensure_dirs()
    assert cache.lookup(D1, REF) is None
    (tmp_path / "tmp" / f"{'a' * 64}.123.abcd" / "bundle").mkdir(parents=True)   # a dead writer
    assert cache.lookup(D1, REF) is None and cache.entries() == []
    _entry(cache, D1, 10, 1000)
    image = cache.lookup(D1, REF)
    assert isinstance(image, CachedImage)
    assert image.rootfs == tmp_path / "sha256" / ("a" * 64) / "bundle" / "rootfs"
    assert image.config == {"Cmd": ["x"]}


def test_a_corrupt_entry_is_an_error_naming_it(tmp_path):
    cache = ImageCache(tmp_path)
    path = cache.entry_path(D1)
    path.mkdir(parents=True)
    (path / "image.json").write_text("{not json")
    with pytest.raises(ContainerCacheError, match=r"image\.json: unreadable entry"):
        cache.lookup(D1, REF)


def test_what_is_not_a_regular_file_in_the_cache_is_refused_never_read(tmp_path):
    """The cache is its user's to change: a FIFO at image.json (reading one waits for a writer
    for ever), a symlink to a device, a refs/ entry that is a FIFO: refused or passed over at
    once, and evict removes a FIFO in tmp/ without opening it."""
    cache = ImageCache(tmp_path)
    path = cache.entry_path(D1)
    path.mkdir(parents=True)
    os.mkfifo(path / "image.json")
    t0 = time.monotonic()
    with pytest.raises(ContainerCacheError, match=r"image\.json: unreadable entry \(image\.json "
                                                  r"is a FIFO \(named pipe\), not a regular file"):
        cache.lookup(D1, REF)
    (path / "image.json").unlink()
    (path / "image.json").symlink_to("/dev/zero")
    with pytest.raises(ContainerCacheError, match="a symbolic link, not a regular file"):
        cache.lookup(D1, REF)
    assert cache.entries() == []
    os.makedirs(tmp_path / "refs" / "r.example")
    os.mkfifo(tmp_path / "refs" / "r.example" / "x@latest")
    assert cache.refs() == {}
    (tmp_path / "tmp").mkdir()
    os.mkfifo(tmp_path / "tmp" / f"{'a' * 64}.1.fifo")
    cache.evict(max_bytes=0)
    assert os.listdir(tmp_path / "tmp") == []
    assert time.monotonic() - t0 < 5.0


# -- eviction -------------------------------------------------------------------------------------
EVICTION = [
    # (entries (digest, size, last used), max_bytes, max_age_s, keep, evicted in order)
    ("fits: nothing", [(D1, 5, 1), (D2, 3, 2)], 8, None, (), []),
    ("least recently used first", [(D1, 5, 1), (D2, 3, 2), (D3, 2, 3)], 5, None, (), [D1]),
    ("until it fits", [(D1, 5, 3), (D2, 3, 2), (D3, 2, 1)], 5, None, (), [D3, D2]),
    ("too old, whatever the size", [(D1, 5, 1), (D2, 3, 30), (D3, 2, 99)], None, 60, (), [D1, D2]),
    ("old first, then size", [(D1, 1, 10), (D2, 8, 90), (D3, 8, 95)], 10, 80, (), [D1, D2]),
    ("kept ones stay but count", [(D1, 5, 1), (D2, 3, 2), (D3, 2, 3)], 4, None, (D1,), [D2, D3]),
    ("everything, with 0 bytes", [(D1, 5, 1), (D2, 3, 2)], 0, None, (), [D1, D2]),
]


@pytest.mark.parametrize("rows,max_bytes,max_age,keep,expected", [e[1:] for e in EVICTION],
                         ids=[e[0] for e in EVICTION])
def test_plan_eviction(rows, max_bytes, max_age, keep, expected):
    entries = [EntryUsage(d, s, t) for d, s, t in rows]
    assert plan_eviction(entries, max_bytes=max_bytes, max_age_s=max_age, now=100,
                         keep=keep) == expected


def test_evict_removes_the_least_recently_used_and_its_refs(tmp_path):
    cache = ImageCache(tmp_path)
    cache._ensure_dirs()
    now = time.time()
    _entry(cache, D1, 40_000, now - 300)
    _entry(cache, D2, 40_000, now - 200)
    _entry(cache, D3, 40_000, now - 100)
    cache._remember(parse("r.io/a:old"), D1)
    cache._remember(parse("r.io/a:new"), D3)
    sizes = {e.digest: e.size for e in cache.entries()}
    assert cache.evict(max_bytes=sizes[D2] + sizes[D3]) == [D1]
    assert not cache.entry_path(D1).exists() and cache.entry_path(D2).exists()
    assert not cache.ref_path(parse("r.io/a:old")).exists()
    assert cache.ref_path(parse("r.io/a:new")).exists()
    assert cache.evict(max_age_s=150) == [D2]
    assert list((tmp_path / "tmp").iterdir()) == []


def test_evict_never_touches_an_entry_whose_lock_a_get_holds(tmp_path):
    cache = ImageCache(tmp_path)
    cache._ensure_dirs()
    _entry(cache, D1, 1000, 1)
    _entry(cache, D2, 1000, 2)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import filelock, sys, time; l = filelock.FileLock(sys.argv[1]); l.acquire(); "
        "print('held', flush=True); time.sleep(30)"), str(cache._lock_path(D1))],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert cache.evict(max_bytes=0) == [D2]
        assert cache.entry_path(D1).exists()
    finally:
        holder.kill()
        holder.wait()
    assert cache.evict(max_bytes=0) == [D1]


def _hold_in_use(root: Path, digest: str) -> subprocess.Popen:
    """Another process that holds ``digest`` in use, as a running dgxvm run does, until killed."""
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\n"
        "from slurm_dgxvm.containers.cache import ImageCache\n"
        "with ImageCache(sys.argv[1]).in_use(sys.argv[2]):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(60)\n"), str(root), digest], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_an_image_another_process_uses_is_never_evicted_and_others_go_in_its_stead(tmp_path):
    cache = ImageCache(tmp_path)
    cache._ensure_dirs()
    _entry(cache, D1, 40_000, 1)              # the least recently used, but a run holds it
    _entry(cache, D2, 40_000, 2)
    _entry(cache, D3, 40_000, 3)
    sizes = {e.digest: e.size for e in cache.entries()}
    holder = _hold_in_use(tmp_path, D1)
    try:
        assert cache.is_in_use(D1) and not cache.is_in_use(D2)
        # room for two: D1 stays, so the next least recently used goes instead
        assert cache.evict(max_bytes=sizes[D1] + sizes[D3]) == [D2]
        assert cache.evict(max_age_s=0) == [D3]
        assert cache.evict(max_bytes=0) == []
        assert cache.entry_path(D1).is_dir() and cache.lookup(D1, REF) is not None
    finally:
        holder.kill()                          # SIGKILL: the kernel drops its lock
        holder.wait()
    assert not cache.is_in_use(D1)
    assert cache.evict(max_bytes=0) == [D1]
    assert cache.entries() == [] and list((tmp_path / "tmp").iterdir()) == []


def test_in_use_in_this_process_protects_too_and_many_may_hold_one_image(tmp_path):
    """flock is per open file: evict's own open of the lock file conflicts with a holder's in
    the same process (dgxvm run holds its image, then evicts), and holders share it."""
    cache = ImageCache(tmp_path)
    cache._ensure_dirs()
    _entry(cache, D1, 1000, 1)
    _entry(cache, D2, 1000, 2)
    with cache.in_use(D1), cache.in_use(D1):
        assert cache.evict(max_bytes=0) == [D2]
        assert cache.is_in_use(D1)
    assert not cache.is_in_use(D1)
    assert cache.evict(max_bytes=0) == [D1]


def test_in_use_waits_for_an_eviction_holding_the_lock_then_says_so(tmp_path):
    cache = ImageCache(tmp_path)
    cache._ensure_dirs()
    _entry(cache, D1, 1000, 1)
    with cache.in_use(D1):                     # a run that has ended
        pass
    with cache._try_use(D1) as free:           # what evict holds while it moves the entry
        assert free
        t0 = time.monotonic()
        with pytest.raises(ContainerCacheError) as exc:
            with cache.in_use(D1, timeout=0.3):
                pass
        assert time.monotonic() - t0 >= 0.3
    assert str(exc.value) == (f"container cache {cache._use_path(D1)}: an eviction of {D1} "
                              f"held it for more than 0.3s")
    with cache.in_use(D1, timeout=0.3):        # free again
        pass


def test_the_use_lock_file_is_private_and_never_followed_through_a_symlink(tmp_path):
    cache = ImageCache(tmp_path)
    cache._ensure_dirs()
    _entry(cache, D1, 1000, 1)
    _entry(cache, D2, 1000, 2)
    with cache.in_use(D1):
        assert oct(cache._use_path(D1).stat().st_mode & 0o777) == "0o600"
    elsewhere = tmp_path / "elsewhere"
    cache._use_path(D2).symlink_to(elsewhere)
    with pytest.raises(ContainerCacheError, match=r"sha256-b+\.use: "):
        with cache.in_use(D2):
            pass
    assert not elsewhere.exists()
    assert cache.evict(max_bytes=0) == [D1]    # a lock it cannot take: that entry stays
    assert cache.entry_path(D2).is_dir()


def test_in_use_counts_as_a_use_until_it_ends(tmp_path):
    """A week-long job's image is "unused" from the job's end, not from its start."""
    cache = ImageCache(tmp_path)
    cache._ensure_dirs()
    _entry(cache, D1, 1000, 1)
    with cache.in_use(D1):
        assert cache.entries()[0].last_used == 1
    assert cache.entries()[0].last_used > time.time() - 60


def test_get_held_gets_again_an_image_evicted_before_it_was_held(tmp_path, monkeypatch):
    cache = ImageCache(tmp_path)
    cache._ensure_dirs()
    calls = []

    def get(ref, **kw):
        calls.append(kw)
        if cache.lookup(D1, ref) is None:
            _entry(cache, D1, 1000, time.time())      # pulled again
        image = cache.lookup(D1, ref)
        if len(calls) == 1:                            # an eviction right after the get
            assert cache.evict(max_bytes=0) == [D1]
        return image

    monkeypatch.setattr(cache, "get", get)
    with contextlib.ExitStack() as hold:
        image = cache.get_held(REF, hold, progress=print)
        assert len(calls) == 2 and calls[1] == {"progress": print}
        assert image.digest == D1 and cache.lookup(D1, REF) is not None
        assert cache.is_in_use(D1)
        assert cache.evict(max_bytes=0) == []
    assert not cache.is_in_use(D1)


def test_evict_reports_what_it_removes_and_a_dry_run_removes_nothing(tmp_path):
    cache = ImageCache(tmp_path)
    cache._ensure_dirs()
    _entry(cache, D1, 1000, 1)
    _entry(cache, D2, 1000, 2)
    cache._remember(parse("r.io/a:1"), D1)
    cache._remember(parse("r.io/b:2"), D1)
    seen = []
    assert cache.evict(max_bytes=0, dry_run=True, report=seen.append) == [D1, D2]
    assert [e.digest for e in cache.entries()] == [D1, D2]
    assert cache.ref_path(parse("r.io/a:1")).exists()
    assert [(e.digest, e.refs) for e in seen] == [(D1, ("r.io/a:1", "r.io/b:2")), (D2, ())]
    seen.clear()
    assert cache.evict(max_age_s=50, now=100, report=seen.append) == [D1, D2]
    assert [e.digest for e in seen] == [D1, D2] and cache.entries() == []


def test_entries_take_the_size_recorded_at_pull_and_count_one_without(tmp_path):
    cache = ImageCache(tmp_path)
    cache._ensure_dirs()
    _entry(cache, D1, 40_000, 1)
    counted = cache.entries()[0].size
    assert counted >= 40_000
    meta = json.loads((cache.entry_path(D1) / "image.json").read_text())
    (cache.entry_path(D1) / "image.json").write_text(json.dumps({**meta, "size": 123}))
    assert cache.entries()[0].size == 123
    (cache.entry_path(D1) / "image.json").write_text(json.dumps({**meta, "size": "big"}))
    assert cache.entries()[0].size == counted


def test_one_eviction_at_a_time_and_a_runs_own_skips_when_another_is_running(tmp_path):
    cache = ImageCache(tmp_path, lock_timeout_s=0.3)
    cache._ensure_dirs()
    _entry(cache, D1, 1000, 1)
    lock = tmp_path / "locks" / "evict.lock"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import filelock, sys, time; l = filelock.FileLock(sys.argv[1]); l.acquire(); "
        "print('held', flush=True); time.sleep(30)"), str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        t0 = time.monotonic()
        assert cache.evict(max_bytes=0, skip_if_busy=True) == []
        assert time.monotonic() - t0 < 0.3
        with pytest.raises(ContainerCacheError, match=rf"^container cache {lock}: another "
                           r"eviction held it for more than 0\.3s$"):
            cache.evict(max_bytes=0)
        assert cache.entry_path(D1).is_dir()
    finally:
        holder.kill()
        holder.wait()
    assert cache.evict(max_bytes=0, skip_if_busy=True) == [D1]


def test_evict_removes_leftovers_of_dead_writers(tmp_path):
    cache = ImageCache(tmp_path)
    cache._ensure_dirs()
    left = tmp_path / "tmp" / f"{'b' * 64}.4242.0a0b"
    (left / "oci").mkdir(parents=True)
    assert cache.evict() == []
    assert not left.exists()


def test_remove_tree_goes_through_directories_without_write_permission(tmp_path):
    top = tmp_path / "rootfs"
    (top / "ro" / "deeper").mkdir(parents=True)
    (top / "ro" / "deeper" / "f").write_text("x")
    (top / "ro" / "deeper").chmod(0o555)
    (top / "ro").chmod(0o500)
    remove_tree(top)
    assert not top.exists()
    remove_tree(top)                          # gone already: nothing to do


def test_a_registry_that_never_answers_is_unreachable_once_skopeo_is_killed(tmp_path):
    """run_tool's time-out: the stand-in skopeo hangs like one whose registry accepts the
    connection and never answers."""
    hang = tmp_path / "skopeo"
    hang.write_text("#!/bin/sh\nexec sleep 30\n")
    hang.chmod(0o755)
    registry = Registry(skopeo=str(hang), resolve_timeout_s=0.3)
    with pytest.raises(ContainerRegistryUnreachable, match=r"registry 127\.0\.0\.1:5000 did not "
                       r"answer: skopeo inspect .* did not finish in 0\.3s"):
        registry.resolve(REF)
    with pytest.raises(ContainerImageError, match=r"no-such-skopeo not found \(Debian package "
                       r"skopeo\)"):
        Registry(skopeo=str(tmp_path / "no-such-skopeo")).resolve(REF)


# -- a pull's progress: bars on a terminal, nothing but the stage lines in a batch log -------------
# skopeo 1.9's copy report, as it writes it to its stdout: on a terminal, bars redrawn in place
# (cursor up, erase; seen on a pty); to anything else one line per blob. Errors go to stderr.
FAKE_SKOPEO = """#!{python}
import json, os, shutil, sys
args = sys.argv[1:]
with open({log!r}, "a") as f:
    f.write(json.dumps(args) + "\\n")
if "inspect" in args:
    sys.stdout.write(open({manifest!r}).read())
    sys.exit(0)
if {fail!r}:
    sys.stderr.write('time="t" level=fatal msg="initializing source docker://r/x@sha256:0: '
                     'reading manifest sha256:0 in r/x: manifest unknown: manifest unknown"\\n')
    sys.exit(1)
if "--quiet" not in args:
    if os.isatty(1):
        sys.stdout.write("Getting image source signatures\\nCopying blob b83ec68765a5 [=====>    ] "
                         "0.5MiB / 1.0MiB\\r\\n\\x1b[1A\\x1b[JCopying blob b83ec68765a5 done\\r\\n")
    else:
        sys.stdout.write("Getting image source signatures\\nCopying blob sha256:b83e\\n")
dest = args[-1].split(":")[1]
shutil.copytree({layout!r}, dest)
digestfile = [a.split("=", 1)[1] for a in args if a.startswith("--digestfile=")][0]
open(digestfile, "w").write({digest!r})
"""


@pytest.fixture
def fake_pull(tmp_path):
    """``(cache, calls, fail)``: a cache whose skopeo and umoci are stand-ins; ``calls()`` the
    argv of each skopeo run; ``fail()`` makes the next copy fail as skopeo does."""
    layout = _layout(tmp_path / "layout", {"Cmd": ["sh"]})
    index = json.loads((layout / "index.json").read_text())
    digest = index["manifests"][0]["digest"]
    manifest = tmp_path / "manifest.json"
    manifest.write_bytes((layout / "blobs" / "sha256" / digest.split(":")[1]).read_bytes())
    log = tmp_path / "skopeo.log"

    def write(fail: bool) -> Path:
        skopeo = tmp_path / "skopeo"
        skopeo.write_text(FAKE_SKOPEO.format(python=sys.executable, log=str(log), layout=str(layout),
                                             manifest=str(manifest), digest=digest, fail=fail))
        skopeo.chmod(0o755)
        return skopeo
    umoci = tmp_path / "umoci"
    umoci.write_text('#!/bin/sh\nfor last; do :; done\nmkdir -p "$last/rootfs"\n')
    umoci.chmod(0o755)
    cache = ImageCache(tmp_path / "cache", Registry(skopeo=str(write(False))), umoci=str(umoci))

    def calls():
        return [json.loads(line) for line in log.read_text().splitlines()]
    return cache, calls, lambda: write(True)


def _pty():
    """A terminal: (master, slave as a file), 100 columns like a user's."""
    import fcntl
    import struct
    import termios
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    return master, os.fdopen(slave, "w")


def _drain(master: int) -> bytes:
    os.set_blocking(master, False)
    out = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except (BlockingIOError, OSError):
            return out
        if not chunk:
            return out
        out += chunk


def test_a_pull_in_a_batch_log_says_one_line_per_stage_and_skopeo_runs_quiet(fake_pull, tmp_path):
    cache, calls, _ = fake_pull
    log = tmp_path / "slurm-7.err"
    with open(log, "w") as err:              # sbatch's stderr: a file, not a terminal
        image = cache.get(REF, live=err, progress=lambda line: print(f"dgxvm: {line}", file=err))
    assert image.config == {"Cmd": ["sh"]}
    text = log.read_text()
    assert [line.split()[1] for line in text.splitlines()] == ["resolving", "pulling",
                                                               "unpacking", "done:"]
    assert "\r" not in text and "\x1b" not in text and "Copying" not in text
    copy = [c for c in calls() if "copy" in c]
    assert len(copy) == 1 and "--quiet" in copy[0]


def test_a_pull_on_a_terminal_shows_skopeos_bars_there(fake_pull):
    cache, calls, _ = fake_pull
    master, term = _pty()
    lines: list[str] = []
    try:
        with term:
            cache.get(REF, live=term, progress=lines.append)
        shown = _drain(master)
    finally:
        os.close(master)
    assert b"Copying blob b83ec68765a5 [=====>" in shown and b"\x1b[1A\x1b[J" in shown
    assert [line.split()[0] for line in lines] == ["resolving", "pulling", "unpacking", "done:"]
    assert "--quiet" not in [c for c in calls() if "copy" in c][0]


def test_a_failed_pull_on_a_terminal_is_the_same_clear_error(fake_pull, tmp_path):
    cache, _, fail = fake_pull
    fail()
    master, term = _pty()
    errors = []
    try:
        with term, open(tmp_path / "batch.err", "w") as batch:
            for live in (term, batch, None):
                with pytest.raises(ContainerImageNotFound) as exc:
                    cache.get(REF, live=live)
                errors.append(str(exc.value))
    finally:
        os.close(master)
    assert errors == [f"container image {REF}: no tag '1' in {REF.name}: initializing source "
                      f"docker://r/x@sha256:0: reading manifest sha256:0 in r/x: manifest "
                      f"unknown: manifest unknown"] * 3
    assert cache.entries() == [] and list((cache.root / "tmp").iterdir()) == []


PANIC = ("panic: runtime error: invalid memory address or nil pointer dereference\n"
         + "goroutine 7 [running]:\ngithub.com/klauspost/pgzip.(*Reader).doReadAhead.func1()\n"
         + "\tgithub.com/klauspost/pgzip/gunzip.go:399 +0x1ee\n" * 200)


@pytest.mark.parametrize("full", [True, False])
def test_umoci_dying_without_a_word_on_a_full_disk_is_still_a_full_disk(fake_pull, tmp_path,
                                                                         monkeypatch, full):
    """umoci can panic on a full disk (a race in its gzip reader): its tail is a goroutine dump,
    no "no space left". A full filesystem under the entry says it was the disk; otherwise it is
    umoci's failure, quoted. Either way nothing is left in the cache."""
    cache, _, _ = fake_pull
    (tmp_path / "panic.txt").write_text(PANIC)
    Path(cache.umoci).write_text(f'#!/bin/sh\ncat {tmp_path / "panic.txt"} >&2\nexit 2\n')
    seen = []
    monkeypatch.setattr("slurm_dgxvm.fsutil.filesystem_full",
                        lambda path: seen.append(Path(path)) or full)
    with pytest.raises(ContainerImageError) as exc:
        cache.get(REF)
    assert isinstance(exc.value, ContainerDiskFull) is full
    said = str(exc.value)
    if full:
        assert said.startswith(f"container image {REF}: the disk is full: {seen[0]} has less "
                               f"than 1 MiB left after umoci unpack failed (exit 2): ")
        assert seen[0].parent == cache.root / "tmp"
    else:
        assert said.startswith(f"container image {REF}: umoci unpack failed (exit 2): ")
    assert "klauspost/pgzip/gunzip.go:399" in said
    assert cache.entries() == [] and list((cache.root / "tmp").iterdir()) == []


def test_an_error_naming_the_full_disk_anywhere_in_umocis_output_is_a_full_disk(fake_pull,
                                                                               tmp_path):
    cache, _, _ = fake_pull
    (tmp_path / "said.txt").write_text("write /c/x: no space left on device\n" + PANIC)
    Path(cache.umoci).write_text(f'#!/bin/sh\ncat {tmp_path / "said.txt"} >&2\nexit 2\n')
    with pytest.raises(ContainerDiskFull, match=rf"^container image {REF}: the disk is full: "):
        cache.get(REF)
