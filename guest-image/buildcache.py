"""What both guest image builders (build.py, debian-cloud/build.py) share: their cache
directory, how a build is made and published in it, how it stays bounded, and their command line.

A build lives in ``OUT/<key>/`` (12 hex digits over the builder's files and the package
versions): every change of a package or of the builder makes a new key. :func:`cached_build`
reuses a complete build of the key (its ``.complete`` marker, written last, exists); otherwise,
under the lock on ``OUT/.lock``, the builder makes its files in a fresh ``OUT/.work-<key>-*/``
and :func:`publish` moves the finished directory into the cache in one rename that never
replaces anything: a published build is never overwritten, in whole or in part (VM overlays and
image installs may read it while the next build runs). A forced rebuild of a key that has a build
is published beside it as ``<key>-2`` (then ``-3``, ...); the newest complete one of a key is
the one reused.

Without pruning the cache grew by a whole image each time (600 MB for the cloud guest).
:func:`prune` runs under the builder's lock after a new build: it keeps that build and the newest
``keep - 1`` others (one in use elsewhere, an image install reading it, is never the oldest), and
removes ``.work-*`` directories a killed build left.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import fcntl
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

KEY = re.compile(r"[0-9a-f]{12}(-[0-9]+)?\Z")   # a build: <key>, or <key>-N (a forced rebuild)
KEEP = 2
COMPLETE = ".complete"

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1


def complete(build: Path) -> bool:
    return (build / COMPLETE).is_file()


def _revision(name: str, key: str) -> int | None:
    """1 for ``key``, N for ``key-N``; None for any other name."""
    if name == key:
        return 1
    head, sep, tail = name.rpartition("-")
    return int(tail) if sep and head == key and tail.isdigit() and int(tail) >= 2 else None


def revisions(out_root: Path, key: str) -> list[tuple[int, Path]]:
    """``(revision, directory)`` of every directory of ``key`` in the cache, complete or not,
    the newest last."""
    try:
        names = os.listdir(out_root)
    except FileNotFoundError:
        return []
    found = ((_revision(n, key), out_root / n) for n in names)
    return sorted((r, p) for r, p in found if r is not None and p.is_dir())


def latest(out_root: Path, key: str) -> Path | None:
    """The newest complete build of ``key`` (None: none)."""
    done = [p for _, p in revisions(out_root, key) if complete(p)]
    return done[-1] if done else None


def rename_noreplace(src: Path, dst: Path) -> None:
    """``rename(src, dst)`` that fails with FileExistsError where ``dst`` exists, in one step
    (renameat2 RENAME_NOREPLACE). Where the kernel or file system lacks it, a check then a
    rename: atomic against the other builders only, which the caller's lock holds off."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except AttributeError:   # a libc before 2.28
        fn = None
    if fn is not None:
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                       ctypes.c_uint]
        if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS):
            raise OSError(err, os.strerror(err), str(src), None, str(dst))
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(src), None, str(dst))
    os.rename(src, dst)


def publish(result: Path, out_root: Path, key: str) -> Path:
    """Move the finished build ``result`` (on the cache's file system) into the cache as
    ``key``, or as the next free ``key-N`` where a directory of the key exists already: one
    rename onto a name nothing holds, so no published build is ever replaced. Returns where it
    went. Call with the lock held."""
    have = revisions(out_root, key)
    rev = have[-1][0] + 1 if have else 1
    while True:
        final = out_root / (key if rev == 1 else f"{key}-{rev}")
        try:
            rename_noreplace(result, final)
            return final
        except FileExistsError:   # a name taken by something that is not a build of ours
            rev += 1


def cached_build(out_root: Path, key: str, make: Callable[[Path, Path], None],
                 log: Callable[[str], None], *, force: bool = False,
                 started: float | None = None) -> Path:
    """The newest complete build of ``key`` in ``out_root`` (unless ``force``), else a new one:
    under ``out_root/.lock``, ``make(work, result)`` puts the image's files into ``result``, an
    empty directory in a fresh work directory ``work`` (for its scratch files too); then every
    file in ``result`` is made readable by all (0644), ``.complete`` is written last, the build
    is published (:func:`publish`), superseded builds are pruned and the work directory goes.
    ``started``: the ``time.monotonic()`` the times logged count from (default: now)."""
    t0 = time.monotonic() if started is None else started
    final = latest(out_root, key)
    if final is not None and not force:
        log(f"reusing {final} ({time.monotonic() - t0:.1f}s)")
        return final
    out_root.mkdir(parents=True, exist_ok=True)
    with open(out_root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        final = latest(out_root, key)
        if final is not None and not force:
            log(f"reusing {final} (built meanwhile)")
            return final
        work = Path(tempfile.mkdtemp(prefix=f".work-{key}-", dir=out_root))
        try:
            result = work / "out"
            result.mkdir()
            make(work, result)
            for p in result.iterdir():
                os.chmod(p, 0o644)
            (result / COMPLETE).write_text(key + "\n")
            final = publish(result, out_root, key)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        prune(out_root, final, log)
    log(f"built {final} in {time.monotonic() - t0:.1f}s")
    return final


def prune(out_root: Path, final: Path, log: Callable[[str], None], keep: int = KEEP) -> list[str]:
    """Remove superseded builds (all but ``final`` and the newest ``keep - 1`` others) and the
    work directories of killed builds; returns the names removed. Call with the lock held."""
    builds = sorted((p for p in out_root.iterdir()
                     if p.is_dir() and KEY.match(p.name) and p != final),
                    key=lambda p: p.stat().st_mtime, reverse=True)
    removed = []
    for old in builds[max(keep - 1, 0):]:
        log(f"removing superseded build {old.name}")
        shutil.rmtree(old, ignore_errors=True)
        removed.append(old.name)
    for work in out_root.glob(".work-*"):
        log(f"removing {work.name}, left by a build that did not finish")
        shutil.rmtree(work, ignore_errors=True)
        removed.append(work.name)
    return removed


def require(tools: tuple[str, ...], error: type[Exception], root_for: str) -> None:
    """The builder runs as root (``root_for`` says why) and finds each of ``tools`` in PATH;
    else ``error``."""
    if os.geteuid() != 0:
        raise error(f"must run as root ({root_for})")
    for tool in tools:
        if shutil.which(tool) is None:
            raise error(f"{tool} not found in PATH (scripts/bootstrap installs it)")


def main(argv: list[str] | None, *, description: str, default_out: Path, tag: str,
         build: Callable[[Path, bool], Path], print_key: Callable[[], str],
         error: type[Exception]) -> int:
    """A builder's command line: ``[--out DIR] [--force] [--print-key]``; the output directory
    is the last line of stdout; ``error`` is ``tag: ERROR ...`` on stderr and exit 1."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--out", type=Path, default=default_out,
                    help=f"cache directory (default {default_out})")
    ap.add_argument("--force", action="store_true", help="rebuild even if a complete build "
                    "with the same key exists")
    ap.add_argument("--print-key", action="store_true",
                    help="print the cache key for the current package versions and exit")
    args = ap.parse_args(argv)
    try:
        if args.print_key:
            print(print_key())
            return 0
        final = build(args.out.resolve(), args.force)
    except error as exc:
        print(f"{tag}: ERROR {exc}", file=sys.stderr)
        return 1
    print(final)
    return 0
