"""The container image cache against a real docker-registry on 127.0.0.1 (harness/registry.py):
skopeo pulls, umoci unpacks, and the registry's access log says how often anything was fetched.

One public and one private (htpasswd) registry serve the whole module; each test that needs a
never-pulled image builds its own (a busybox image with its own /marker: ~0.2 s)."""

from __future__ import annotations

import contextlib
import fcntl
import multiprocessing
import os
import pty
import re
import signal
import struct
import subprocess
import termios
import threading
import time
from pathlib import Path

import pytest

from harness.registry import LocalRegistry, build_image, free_port, push_multiarch
from slurm_dgxvm.containers import cache_admin
from slurm_dgxvm.config import ContainersConfig
from slurm_dgxvm.containers.cache import ImageCache, tree_size
from slurm_dgxvm.containers.ref import parse
from slurm_dgxvm.containers.registry import Registry
from slurm_dgxvm.errors import (ContainerAuthError, ContainerDiskFull, ContainerImageNotFound,
                                ContainerRegistryUnreachable)

pytestmark = pytest.mark.integration
USERS = {"alice": "correct horse"}


@pytest.fixture(scope="module")
def reg(tmp_path_factory):
    with LocalRegistry(tmp_path_factory.mktemp("registry")) as r:
        yield r
    assert r.pid() is None


@pytest.fixture(scope="module")
def private(tmp_path_factory):
    with LocalRegistry(tmp_path_factory.mktemp("private"), users=USERS, name="private") as r:
        yield r


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("images")


@pytest.fixture(scope="module")
def busybox(reg, work):
    """test/busybox:1 on the public registry; its manifest digest."""
    return build_image(reg, "test/busybox", "1", work)


@pytest.fixture
def cache(tmp_path, reg, private):
    return ImageCache(tmp_path / "cache",
                      Registry(insecure=frozenset({reg.endpoint, private.endpoint})))


def fresh(reg, work, name: str) -> tuple[str, str]:
    """A new image nobody pulled yet: (reference, digest)."""
    digest = build_image(reg, f"test/{name}", "1", work, marker=f"{name} {time.time_ns()}")
    return f"{reg.endpoint}/test/{name}:1", digest


def blob_gets(reg, repository: str) -> int:
    return reg.count("GET", rf"^/v2/{re.escape(repository)}/blobs/")


# -- pulls ----------------------------------------------------------------------------------------
def test_a_pull_by_tag_unpacks_the_image_and_reads_its_config(cache, reg, busybox):
    lines: list[str] = []
    image = cache.get(parse(f"{reg.endpoint}/test/busybox:1"), progress=lines.append)
    assert image.digest == busybox
    assert image.path == cache.root / "sha256" / busybox.split(":")[1]
    assert image.config == {"Cmd": ["/bin/busybox", "echo", "hello"], "Env": ["PATH=/bin"],
                            "WorkingDir": "/"}
    out = subprocess.run([image.rootfs / "bin" / "sh", "-c", "echo ran"], capture_output=True,
                         text=True, timeout=10)
    assert out.stdout == "ran\n"
    assert (image.oci_dir / "index.json").is_file()
    assert [line.split()[0] for line in lines] == ["resolving", "pulling", "unpacking", "done:"]
    assert oct(cache.root.stat().st_mode & 0o777) == "0o700"
    assert list((cache.root / "tmp").iterdir()) == []


def test_a_second_get_by_tag_asks_for_the_tag_only_and_fetches_no_blob(cache, reg, busybox):
    ref = parse(f"{reg.endpoint}/test/busybox:1")
    cache.get(ref)
    blobs, by_tag = blob_gets(reg, "test/busybox"), reg.count("GET", r"/test/busybox/manifests/1$")
    by_digest = reg.count("GET", r"/test/busybox/manifests/sha256:")
    lines: list[str] = []
    t0 = time.perf_counter()
    image = cache.get(ref, progress=lines.append)
    took = time.perf_counter() - t0
    assert image.digest == busybox and "is cached" in lines[-1]
    assert blob_gets(reg, "test/busybox") == blobs
    assert reg.count("GET", r"/test/busybox/manifests/1$") == by_tag + 1
    assert reg.count("GET", r"/test/busybox/manifests/sha256:") == by_digest   # no copy ran
    assert took < 2.0


def test_a_pull_by_digest_and_a_second_one_that_asks_the_registry_nothing(cache, reg, work):
    name, digest = fresh(reg, work, "pinned")
    ref = parse(f"{name.rsplit(':', 1)[0]}@{digest}")
    assert cache.get(ref).digest == digest
    before = len(reg.requests())
    image = cache.get(ref)
    assert image.digest == digest and (image.rootfs / "marker").read_text().startswith("pinned")
    assert len(reg.requests()) == before                  # not even a ping


def test_a_multi_arch_index_gives_the_linux_amd64_image(cache, reg, work):
    pushed = push_multiarch(reg, "test/multi", "1", work)
    image = cache.get(parse(f"{reg.endpoint}/test/multi:1"))
    assert image.digest == pushed["amd64"]
    assert (image.rootfs / "marker").read_text() == "amd64"
    by_index = cache.get(parse(f"{reg.endpoint}/test/multi@{pushed['index']}"))
    assert by_index.digest == pushed["amd64"]
    before = len(reg.requests())
    cache.get(parse(f"{reg.endpoint}/test/multi@{pushed['index']}"))
    assert len(reg.requests()) == before                  # the index digest is remembered


def _get_in_child(root, endpoint, ref, barrier, results):
    lines: list[str] = []
    barrier.wait()
    image = ImageCache(root, Registry(insecure=frozenset({endpoint}))).get(
        parse(ref), progress=lines.append)
    results.put((image.digest, lines[-1]))


def test_ten_concurrent_gets_of_a_new_image_make_one_pull(cache, reg, work):
    ref, digest = fresh(reg, work, "crowd")
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(10), ctx.Queue()
    procs = [ctx.Process(target=_get_in_child, args=(cache.root, reg.endpoint, ref, barrier,
                                                     results)) for _ in range(10)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * 10
    got = [results.get(timeout=5) for _ in procs]
    assert [d for d, _ in got] == [digest] * 10
    assert sum("pulled and unpacked" in last for _, last in got) == 1
    assert reg.count("GET", rf"/test/crowd/manifests/{digest}$") == 1   # skopeo copy, once
    assert blob_gets(reg, "test/crowd") == 2                            # its config and layer
    assert reg.count("GET", r"/test/crowd/manifests/1$") == 10          # each resolved the tag
    assert list((cache.root / "tmp").iterdir()) == []


# -- faults ---------------------------------------------------------------------------------------
def _die_at(root, endpoint, ref, stage):
    def progress(line):
        if line.startswith(stage):
            if stage == "unpacking":      # the pull is complete on disk: the worst moment
                assert any((Path(root) / "tmp").glob("*/oci/index.json"))
            os.kill(os.getpid(), signal.SIGKILL)
    ImageCache(root, Registry(insecure=frozenset({endpoint}))).get(parse(ref), progress=progress)


@pytest.mark.parametrize("stage", ["pulling", "unpacking"])
def test_a_get_killed_half_way_leaves_nothing_usable_and_the_next_get_cleans_up(
        cache, reg, work, stage):
    ref, digest = fresh(reg, work, f"killed-{stage}")
    child = multiprocessing.get_context("fork").Process(
        target=_die_at, args=(cache.root, reg.endpoint, ref, stage))
    child.start()
    child.join(60)
    assert child.exitcode == -signal.SIGKILL
    left = list((cache.root / "tmp").iterdir())
    assert len(left) == 1 and left[0].name.startswith(digest.split(":")[1])
    assert cache.lookup(digest, parse(ref)) is None and cache.entries() == []
    image = cache.get(parse(ref))
    assert image.digest == digest and (image.rootfs / "bin" / "busybox").is_file()
    assert list((cache.root / "tmp").iterdir()) == []


@pytest.mark.parametrize("size,stage", [("600k", "pulling"), ("1600k", "unpacking")])
def test_a_full_disk_fails_clearly_and_keeps_nothing(tmp_path, reg, busybox, size, stage):
    """The cache on a tmpfs too small for the blob (skopeo fails) or for the unpacked tree
    (umoci fails). Root only (mount); the tests run as root."""
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", small], check=True)
    try:
        cache = ImageCache(small / "cache", Registry(insecure=frozenset({reg.endpoint})))
        lines: list[str] = []
        with pytest.raises(ContainerDiskFull) as exc:
            cache.get(parse(f"{reg.endpoint}/test/busybox:1"), progress=lines.append)
        assert str(exc.value).startswith(f"container image {reg.endpoint}/test/busybox:1: the "
                                         f"disk is full")
        assert lines[-1].startswith(stage)
        assert cache.entries() == [] and list((small / "cache" / "tmp").iterdir()) == []
    finally:
        subprocess.run(["umount", small], check=True)


# -- refusals -------------------------------------------------------------------------------------
def test_a_private_image_needs_the_users_credentials(cache, private, work, tmp_path):
    good = private.authfile(tmp_path / "good" / "config.json")
    digest = build_image(private, "team/secret", "1", work, authfile=good)
    ref = parse(f"{private.endpoint}/team/secret:1")
    with pytest.raises(ContainerAuthError, match=rf"^container image {re.escape(str(ref))}: "
                       r".*no credentials were given"):
        cache.get(ref)
    wrong = private.authfile(tmp_path / "wrong" / "config.json", password="guess")
    with pytest.raises(ContainerAuthError, match=rf"refused the credentials in {wrong}"):
        cache.get(ref, auth=wrong)
    other = tmp_path / "other.json"
    other.write_text('{"auths": {"127.0.0.2:1": {"auth": "eDp5"}}}')
    with pytest.raises(ContainerAuthError, match=rf"{other} has no credentials for "
                       rf"{re.escape(private.endpoint)}"):
        cache.get(ref, auth=other)
    assert cache.entries() == []
    assert cache.get(ref, auth=good).digest == digest


@pytest.mark.parametrize("name,words", [
    ("test/nope:1", "unknown repository 'test/nope' in registry"),
    ("test/busybox:2", "unknown tag '2' in {ep}/test/busybox (it has: 1)"),
    ("test/busybox@sha256:" + "0" * 64, "no manifest sha256:0000"),
])
def test_an_unknown_image_tag_or_digest_is_refused_naming_it(cache, reg, busybox, name, words):
    ref = parse(f"{reg.endpoint}/{name}")
    with pytest.raises(ContainerImageNotFound) as exc:
        cache.get(ref)
    assert str(exc.value).startswith(f"container image {ref}: ")
    assert words.format(ep=reg.endpoint) in str(exc.value)
    assert exc.value.exit_code == 2


def test_a_registry_that_is_down_fails_clearly_unless_a_cached_tag_may_do(tmp_path, work):
    down = LocalRegistry(tmp_path / "short-lived", name="short-lived").start()
    try:
        build_image(down, "test/busybox", "1", work, marker="short-lived")
        cache = ImageCache(tmp_path / "cache", Registry(insecure=frozenset({down.endpoint})))
        ref = parse(f"{down.endpoint}/test/busybox:1")
        digest = cache.get(ref).digest
    finally:
        assert down.stop() == []
    with pytest.raises(ContainerRegistryUnreachable, match=rf"^container image {re.escape(str(ref))}: "
                       rf"registry {re.escape(down.endpoint)} cannot be reached: .*connection refused"):
        cache.get(ref)
    assert cache.get(ref, offline_ok=True).digest == digest
    never = parse(f"127.0.0.1:{free_port()}/test/other:1")
    with pytest.raises(ContainerRegistryUnreachable):
        cache.get(never, offline_ok=True)


# -- eviction -------------------------------------------------------------------------------------
def test_eviction_drops_the_least_recently_used_image_and_a_later_get_pulls_it_again(
        cache, reg, work):
    old_ref, old = fresh(reg, work, "evict-old")
    new_ref, new = fresh(reg, work, "evict-new")
    cache.get(parse(old_ref))
    cache.get(parse(new_ref))
    past = time.time() - 3600
    os.utime(cache.entry_path(old) / "last-used", (past, past))
    sizes = {e.digest: e.size for e in cache.entries()}
    assert cache.evict(max_bytes=sizes[new]) == [old]
    assert [e.digest for e in cache.entries()] == [new]
    blobs = blob_gets(reg, "test/evict-old")
    assert cache.get(parse(old_ref)).digest == old
    assert blob_gets(reg, "test/evict-old") == blobs + 2
    assert cache.evict(max_age_s=1800) == []              # both used just now


def _hold(root, endpoint, ref, ready, stop):
    """A dgxvm run of ``ref``, as far as the cache can tell: got and held until told to stop."""
    with contextlib.ExitStack() as hold:
        ImageCache(root, Registry(insecure=frozenset({endpoint}))).get_held(parse(ref), hold)
        ready.set()
        stop.wait(60)


def test_a_configured_limit_evicts_real_images_but_never_one_a_run_holds(
        cache, reg, work, monkeypatch, capsys):
    """What dgxvm run does after its get (containers.cache_admin.evict_for_run, as an ordinary user:
    root never evicts in a user's cache), on images pulled for real: their recorded sizes add
    up, the one another process holds stays, the others go, one line each."""
    held_ref, held = fresh(reg, work, "limit-held")
    old_ref, old = fresh(reg, work, "limit-old")
    mine_ref, mine = fresh(reg, work, "limit-mine")
    ctx = multiprocessing.get_context("fork")
    ready, stop = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(cache.root, reg.endpoint, held_ref, ready, stop))
    holder.start()
    try:
        assert ready.wait(60)
        cache.get(parse(old_ref))
        cache.get(parse(mine_ref))
        past = time.time() - 3 * 86400
        for digest in (held, old):
            os.utime(cache.entry_path(digest) / "last-used", (past, past))
        sizes = {e.digest: e.size for e in cache.entries()}
        for digest, size in sizes.items():         # recorded at pull: the tree, give or take
            assert size <= tree_size(cache.entry_path(digest)) <= size + 16384   # image.json
        monkeypatch.setattr(cache_admin.os, "geteuid", lambda: 1000)
        limit = ContainersConfig(cache_max_gib=(sizes[mine] + 1) / 1024 ** 3)
        cache_admin.evict_for_run(cache, limit, keep={mine}, quiet=False)
        assert sorted(e.digest for e in cache.entries()) == sorted([held, mine])
        err = capsys.readouterr().err
        assert re.fullmatch(rf"dgxvm: evicted {re.escape(old_ref)}@{old} \(\d+\.\d [KM]iB, "
                            rf"unused for 3\.0 days\) to keep the cache under [\d.e-]+ GiB\n", err)
    finally:
        stop.set()
        holder.join(60)
    assert holder.exitcode == 0
    cache_admin.evict_for_run(cache, limit, keep={mine}, quiet=True)      # the run has ended
    assert [e.digest for e in cache.entries()] == [mine]
    assert capsys.readouterr().err == ""


# -- progress ------------------------------------------------------------------------------------
def _terminal():
    """A pty as a user's terminal (100 columns; skopeo draws nothing in 0), its output read in
    a thread as it comes: (terminal file, stop-and-return-what-it-showed)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    shown = bytearray()

    def read():
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:                   # EIO: the slave side is closed
                return
            if not chunk:
                return
            shown.extend(chunk)
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    term = os.fdopen(slave, "w")

    def close() -> bytes:
        term.close()
        reader.join(10)
        os.close(master)
        return bytes(shown)
    return term, close


def test_a_pull_on_a_terminal_shows_skopeos_progress_and_a_batch_log_only_the_stages(
        cache, reg, work, tmp_path):
    ref, digest = fresh(reg, work, "progress-tty")
    term, close = _terminal()
    lines: list[str] = []
    try:
        assert cache.get(parse(ref), live=term, progress=lines.append).digest == digest
    finally:
        shown = close()
    assert [line.split()[0] for line in lines] == ["resolving", "pulling", "unpacking", "done:"]
    assert re.search(rb"Copying blob [0-9a-f]{12} ", shown) and b"done" in shown
    assert b"\x1b[" in shown                    # bars redrawn in place: a terminal's
    batch_ref, _ = fresh(reg, work, "progress-batch")
    log = tmp_path / "slurm-1.err"
    with open(log, "w") as err:
        cache.get(parse(batch_ref), live=err, progress=lambda line: print(f"dgxvm: {line}", file=err))
    text = log.read_text()
    assert len(text.splitlines()) == 4 and "\r" not in text and "\x1b" not in text
    assert "Copying" not in text


def test_a_failed_pull_on_a_terminal_says_the_same_clear_error(cache, reg, busybox, tmp_path):
    """The copy itself fails (a digest the registry does not have): skopeo's stderr is still
    what the error is made of, while its stdout was the terminal."""
    ref = parse(f"{reg.endpoint}/test/busybox:1")
    missing = "sha256:" + "0" * 64
    said = []
    term, close = _terminal()
    try:
        for live in (term, None):
            with pytest.raises(ContainerImageNotFound) as exc:
                cache.registry.pull(ref, missing, tmp_path / f"oci-{len(said)}", "image",
                                    progress_to=live)
            said.append(str(exc.value))
    finally:
        close()
    assert said[0] == said[1]
    assert said[0].startswith(f"container image {ref}: no tag '1' in {ref.name}: ")
    assert "manifest unknown" in said[0] and "level=fatal" not in said[0]
