"""``dgxvm image-cache list|prune`` on hand-made caches (no registry), run as an ordinary user
(nobody, through setpriv) since root is refused; and the eviction ``dgxvm run
--container-image`` does after its get, with the image it runs held in use for the whole run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurm_dgxvm.access.request import Request
from slurm_dgxvm.access.target import Target
from slurm_dgxvm.containers import cache_admin
from slurm_dgxvm.access import runner
from slurm_dgxvm.cli.main import main
from slurm_dgxvm.config import ContainersConfig
from slurm_dgxvm.containers import ranlog
from slurm_dgxvm.containers.cache import ImageCache
from slurm_dgxvm.containers.ref import parse
from slurm_dgxvm.images import profile

pytestmark = pytest.mark.usefixtures("clean_env")  # tests/unit/conftest.py

NOBODY = 65534
REPO = Path(__file__).resolve().parents[2]
D1, D2, D3 = ("sha256:" + c * 64 for c in "abc")
DAY = 86400


def entry(cache: ImageCache, digest: str, size: int, last_used: float, *refs: str) -> None:
    """A complete entry as a pull leaves it (its size recorded), and the refs that resolved to it."""
    cache._ensure_dirs()
    path = cache.entry_path(digest)
    (path / "bundle" / "rootfs").mkdir(parents=True)
    (path / "bundle" / "rootfs" / "data").write_bytes(b"x" * 100)
    (path / "image.json").write_text(json.dumps({"digest": digest, "config": {}, "size": size}))
    (path / "last-used").touch()
    os.utime(path / "last-used", (last_used, last_used))
    for ref in refs:
        cache._remember(parse(ref), digest)


@pytest.fixture
def node(traversable_tmp):
    """``(config file, cache_dir, nobody's cache)``: <cache_dir> root's 0711 as the Prolog
    makes it, <cache_dir>/65534 nobody's 0700."""
    cache_dir = traversable_tmp / "containers"
    cache_dir.mkdir(mode=0o711)
    cache_dir.chmod(0o711)
    cfg = traversable_tmp / "dgxvm.toml"
    cfg.write_text(f'[containers]\ncache_dir = "{cache_dir}"\n')
    cfg.chmod(0o644)
    return cfg, cache_dir, ImageCache(cache_dir / str(NOBODY))


def give_to_nobody(cache: ImageCache) -> None:
    for dirpath, dirnames, filenames in os.walk(cache.root):
        for name in [*dirnames, *filenames]:
            os.lchown(os.path.join(dirpath, name), NOBODY, NOBODY)
    os.chown(cache.root, NOBODY, NOBODY)
    cache.root.chmod(0o700)


def as_nobody(cfg: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                           sys.executable, "-m", "slurm_dgxvm.cli.main", "--config", str(cfg),
                           "image-cache", *args], capture_output=True, text=True, cwd="/",
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)


def hold_as_nobody(cache: ImageCache, digest: str) -> subprocess.Popen:
    """A running dgxvm run of ``digest``, as far as the cache can tell."""
    holder = subprocess.Popen(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}",
                               "--clear-groups", sys.executable, "-c", (
                                   "import sys, time\n"
                                   "from slurm_dgxvm.containers.cache import ImageCache\n"
                                   "with ImageCache(sys.argv[1]).in_use(sys.argv[2]):\n"
                                   "    print('held', flush=True)\n"
                                   "    time.sleep(60)\n"), str(cache.root), digest],
                              stdout=subprocess.PIPE, text=True, cwd="/",
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    assert holder.stdout.readline().strip() == "held"
    return holder


def digests(cache: ImageCache) -> list[str]:
    return [e.digest for e in cache.entries()]


# -- who may ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("args", [["list"], ["prune", "--all"]])
def test_root_is_refused_and_told_to_run_it_as_the_user(node, capsys, args):
    cfg, _, cache = node
    entry(cache, D1, 10, 1)
    assert main(["--config", str(cfg), "image-cache", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dgxvm: error: dgxvm image-cache works on the caller's own cache and "
                          "is refused to root")
    assert "runuser -u NAME -- dgxvm image-cache prune" in err
    assert digests(cache) == [D1]


def test_a_user_without_a_cache_here_has_no_images_and_nothing_is_made(node):
    cfg, cache_dir, cache = node
    for args in (["list"], ["prune", "--all"]):
        r = as_nobody(cfg, *args)
        assert r.returncode == 0, r.stderr
        assert r.stdout == f"no images in {cache.root}\n"
    doc = json.loads(as_nobody(cfg, "list", "--json").stdout)
    assert doc["images"] == [] and doc["exists"] is False
    assert os.listdir(cache_dir) == []


def test_a_cache_that_is_not_the_users_own_directory_is_refused_naming_it(node, tmp_path):
    cfg, _, cache = node
    cache.root.symlink_to(tmp_path)
    r = as_nobody(cfg, "prune", "--all")
    assert r.returncode == 5
    assert r.stderr == (f"dgxvm: error: container cache {cache.root}: not a directory of yours (a "
                        f"symbolic link, a file or another owner's): the node's admin must fix it\n")


# -- list ------------------------------------------------------------------------------------------
def test_list_shows_each_image_its_refs_size_last_use_and_whether_a_run_uses_it(node):
    cfg, _, cache = node
    now = time.time()
    entry(cache, D1, 3 * 1024 ** 2, now - 3 * DAY, "r.io/team/a:1", "r.io/team/a:latest")
    entry(cache, D2, 5 * 1024 ** 2, now - 60)
    give_to_nobody(cache)
    holder = hold_as_nobody(cache, D2)
    try:
        doc = json.loads(as_nobody(cfg, "list", "--json").stdout)
        text = as_nobody(cfg, "list").stdout.splitlines()
    finally:
        holder.kill()
        holder.wait()
    assert doc["cache"] == str(cache.root) and doc["exists"] is True
    assert doc["total_bytes"] == 8 * 1024 ** 2
    assert doc["max_bytes"] is None and doc["max_age_s"] is None
    assert [(i["digest"], i["refs"], i["size"], i["in_use"]) for i in doc["images"]] == [
        (D1, ["r.io/team/a:1", "r.io/team/a:latest"], 3 * 1024 ** 2, False),
        (D2, [], 5 * 1024 ** 2, True)]
    assert abs(doc["images"][0]["last_used"] - (now - 3 * DAY)) < 1
    assert text[0].split() == ["DIGEST", "SIZE", "LAST", "USED", "IN", "USE", "REFERENCES"]
    assert text[1].startswith(D2[:19]) and "5.0 MiB" in text[1] and " yes " in text[1]
    assert text[2].startswith(D1[:19]) and "(3.0 days ago)" in text[2] and " no " in text[2]
    assert text[2].endswith("r.io/team/a:1, r.io/team/a:latest")
    assert text[3] == f"2 images, 8.0 MiB in {cache.root} (no limit)"


def test_a_reference_written_into_the_index_cannot_write_to_the_terminal(node):
    """The refs/ index is a file in the user's tree (anyone who can write there, a script of
    theirs, a shared account): what it says is shown escaped in list and prune lines."""
    cfg, _, cache = node
    entry(cache, D1, 1024, time.time() - 3 * DAY)
    evil = "r.io/a:1\n\x1b[2Jevicted nothing\x1b[K"
    index = cache.root / "refs" / "r.io" / "a@1"
    index.parent.mkdir(parents=True)
    index.write_text(json.dumps({"digest": D1, "ref": evil}))
    give_to_nobody(cache)
    listed = as_nobody(cfg, "list")
    pruned = as_nobody(cfg, "prune", "--all", "--dry-run")
    assert listed.returncode == 0 and pruned.returncode == 0, (listed.stderr, pruned.stderr)
    for out in (listed.stdout, pruned.stdout):
        assert "\x1b" not in out and "r.io/a:1\\n\\x1b[2Jevicted nothing\\x1b[K" in out
    assert len(listed.stdout.splitlines()) == 3
    assert pruned.stdout.splitlines()[0].startswith(
        "would evict r.io/a:1\\n\\x1b[2Jevicted nothing\\x1b[K@" + D1)


# -- prune -----------------------------------------------------------------------------------------
def test_prune_removes_the_least_recently_used_never_one_in_use_and_says_which(node):
    cfg, _, cache = node
    now = time.time()
    entry(cache, D1, 400 * 1024 ** 2, now - 5 * DAY, "r.io/a:1")     # oldest: in use
    entry(cache, D2, 400 * 1024 ** 2, now - 4 * DAY, "r.io/b:1")
    entry(cache, D3, 400 * 1024 ** 2, now - 3 * DAY, "r.io/c:1")
    give_to_nobody(cache)
    holder = hold_as_nobody(cache, D1)
    try:
        dry = as_nobody(cfg, "prune", "--max-gib", "0.8", "--dry-run")
        assert dry.returncode == 0, dry.stderr
        assert digests(cache) == [D1, D2, D3]
        r = as_nobody(cfg, "prune", "--max-gib", "0.8")
        assert r.returncode == 0, r.stderr
        assert digests(cache) == [D1, D3]
    finally:
        holder.kill()
        holder.wait()
    assert dry.stdout.splitlines() == [
        f"would evict r.io/b:1@{D2} (400.0 MiB, unused for 4.0 days) to keep the cache under "
        f"0.8 GiB",
        f"kept r.io/a:1@{D1} (400.0 MiB): a running dgxvm run uses it",
        f"would free 400.0 MiB (1 image); 800.0 MiB in 2 images would be left in {cache.root}"]
    assert r.stdout.splitlines()[0] == dry.stdout.splitlines()[0].replace("would evict",
                                                                           "evicted")
    assert r.stdout.splitlines()[-1] == f"freed 400.0 MiB (1 image); 800.0 MiB in 2 images " \
                                        f"left in {cache.root}"
    assert not cache.ref_path(parse("r.io/b:1")).exists()
    r = as_nobody(cfg, "prune", "--all")                 # the run has ended
    assert r.returncode == 0, r.stderr
    assert digests(cache) == [] and len(r.stdout.splitlines()) == 3


def test_prune_takes_its_limits_from_the_config_and_says_when_there_are_none(node):
    cfg, cache_dir, cache = node
    now = time.time()
    entry(cache, D1, 10, now - 3 * DAY, "r.io/a:1")
    entry(cache, D2, 10, now - DAY / 2)
    give_to_nobody(cache)
    r = as_nobody(cfg, "prune")
    assert r.returncode == 0 and r.stdout.startswith("nothing to prune: no limit is set")
    assert digests(cache) == [D1, D2]
    cfg.write_text(f'[containers]\ncache_dir = "{cache_dir}"\ncache_max_age_days = 2\n')
    r = as_nobody(cfg, "prune")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == (f"evicted r.io/a:1@{D1} (10 B, unused for 3.0 days): "
                                        f"unused for more than 2 days")
    assert digests(cache) == [D2]
    r = as_nobody(cfg, "prune", "--max-age-days", "0.25")    # the flag wins over the config
    assert r.returncode == 0 and digests(cache) == []


@pytest.mark.parametrize("args,words", [
    (["--max-gib", "-1"], "Invalid value for '--max-gib': '-1' is not a number >= 0"),
    (["--max-gib", "nan"], "'nan' is not a number >= 0"),
    (["--max-gib", "inf"], "'inf' is not a number >= 0"),
    (["--max-age-days", "7d"], "Invalid value for '--max-age-days': '7d' is not a number >= 0"),
    (["--all", "--max-gib", "1"], "--all removes every image not in use: give it without"),
])
def test_a_bad_value_is_refused_naming_it_and_nothing_is_removed(node, args, words):
    cfg, _, cache = node
    entry(cache, D1, 10, 1)
    give_to_nobody(cache)
    r = as_nobody(cfg, "prune", *args)
    assert r.returncode == 2
    assert r.stderr.startswith("dgxvm: error: ") and words in r.stderr
    assert digests(cache) == [D1]


# -- dgxvm run: held for the whole run, then evicting within the configured limits -----------------
@pytest.fixture
def fake_run(tmp_path, monkeypatch):
    """``dgxvm run --container-image r.io/run:1`` with the VM, the registry and the guest
    faked: the get finds (or fabricates) D3, session.run calls ``during`` and returns 0.
    ``geteuid`` says an ordinary user (root never evicts in a user's cache)."""
    cache = ImageCache(tmp_path / "cache")
    cache._ensure_dirs()
    target = Target(job_id=7, domain="job-7", address="10.0.0.2", user="u",
                    key=str(tmp_path / "vm" / "key"), known_hosts="kh", state="running",
                    workdir=None, gpus=(), slurm_gpus=(), uid=1000, gid=1000, image="noble",
                    image_cache=str(cache.root))
    state = {"during": lambda: None}

    def get(self, ref, **kw):
        state["get"] = kw
        if self.lookup(D3, ref) is None:
            entry(self, D3, 10, time.time(), str(ref))
        return self.lookup(D3, ref)

    def session_run(tgt, request, **kw):
        state["during"]()
        return 0

    monkeypatch.setattr(runner, "target_for", lambda env, job: target)
    monkeypatch.setattr(runner, "job_request", lambda t, argv, cfg: (Request(argv=argv, env={},
                                                                           cwd=None), None))
    monkeypatch.setattr(profile, "runtime_of", lambda store, name: ("runc", "none"))
    monkeypatch.setattr(ImageCache, "get", get)
    monkeypatch.setattr(ranlog, "append", lambda *a: None)
    monkeypatch.setattr(runner, "container_request", lambda flags, **kw: kw)
    monkeypatch.setattr(runner.session, "run", session_run)
    monkeypatch.setattr(cache_admin.os, "geteuid", lambda: 1000)

    def run(config: str, *flags: str) -> int:
        path = tmp_path / "dgxvm.toml"
        path.write_text(config)
        return main(["--config", str(path), "run", "--job", "7", *flags,
                     "--container-image", "r.io/run:1", "--", "true"])
    return cache, state, run


def test_dgxvm_run_holds_its_image_for_the_whole_run_and_evicts_others_to_the_limit(
        fake_run, capsys):
    cache, state, run = fake_run
    now = time.time()
    entry(cache, D1, 600 * 1024 ** 2, now - 2 * DAY, "r.io/old:1")
    entry(cache, D2, 300 * 1024 ** 2, now - DAY, "r.io/mid:1")
    seen = {}

    def during():                  # the command runs: another process tries to remove D3
        seen["in_use"] = cache.is_in_use(D3)
        seen["evicted"] = subprocess.run([sys.executable, "-c", (
            "import sys; from slurm_dgxvm.containers.cache import ImageCache\n"
            "print(*ImageCache(sys.argv[1]).evict(max_bytes=0))"), str(cache.root)],
            capture_output=True, text=True, check=True, cwd="/",
            env={**os.environ, "PYTHONPATH": str(REPO)}).stdout.split()
    state["during"] = during
    assert run("[containers]\ncache_max_gib = 0.5\n") == 0
    err = capsys.readouterr().err
    assert err.splitlines() == [
        f"dgxvm: evicted r.io/old:1@{D1} (600.0 MiB, unused for 2.0 days) to keep the cache "
        f"under 0.5 GiB"]
    assert seen == {"in_use": True, "evicted": [D2]}      # everything but the running image
    assert digests(cache) == [D3] and not cache.is_in_use(D3)   # released when the run ended


def test_dgxvm_run_quiet_evicts_silently_and_no_limit_evicts_nothing(fake_run, capsys):
    cache, state, run = fake_run
    entry(cache, D1, 10, time.time() - 2 * DAY, "r.io/old:1")
    assert run("[containers]\n") == 0
    assert capsys.readouterr().err == "" and digests(cache) == [D1, D3]
    assert run("[containers]\ncache_max_age_days = 1\n", "--quiet") == 0
    assert capsys.readouterr().err == "" and digests(cache) == [D3]


def test_dgxvm_run_offers_its_stderr_for_skopeos_bars_unless_quiet(fake_run, capsys):
    """The registry shows them only if that is a terminal (tests/unit/test_container_cache.py)."""
    cache, state, run = fake_run
    assert run("") == 0
    assert state["get"]["live"] is sys.stderr
    assert run("", "-q") == 0
    assert state["get"]["live"] is None


def test_a_failed_eviction_never_fails_the_run(fake_run, capsys, monkeypatch):
    cache, state, run = fake_run
    ran = []
    state["during"] = lambda: ran.append(cache.is_in_use(D3))

    def broken(self, **kw):
        raise PermissionError(13, "Permission denied", str(self.root / "locks" / "evict.lock"))
    monkeypatch.setattr(ImageCache, "evict", broken)
    assert run("[containers]\ncache_max_gib = 1\n", "--quiet") == 0
    assert ran == [True]
    assert capsys.readouterr().err == (
        f"dgxvm: note: the image cache was not pruned: PermissionError: [Errno 13] Permission "
        f"denied: '{cache.root}/locks/evict.lock'\n")


def test_root_never_evicts_in_a_users_cache(tmp_path, monkeypatch):
    cache = ImageCache(tmp_path)
    entry(cache, D1, 10, 1)
    monkeypatch.setattr(cache_admin.os, "geteuid", lambda: 0)
    cache_admin.evict_for_run(cache, ContainersConfig(cache_max_age_days=1), keep=(), quiet=False)
    assert digests(cache) == [D1]
    monkeypatch.setattr(cache_admin.os, "geteuid", lambda: 1000)
    cache_admin.evict_for_run(cache, ContainersConfig(cache_max_age_days=1), keep=(), quiet=False)
    assert digests(cache) == []

