"""The node-local, per-user container image cache: pulled once per digest, unpacked once.

One cache per user per node, at a directory the caller gives (in production
``/var/lib/dgxvm/containers/<uid>/``, the user's own, 0700). ``dgxvm run`` uses it as the user,
with the user's credentials; the job's VM sees it read-only through a share. A private image is
never served to another user, and there is no privileged daemon.

Layout under ``root``::

    sha256/<hex>/            one complete entry per linux/amd64 image manifest digest
        oci/                 the OCI image layout skopeo wrote (tag "image")
        bundle/              umoci's unpack: rootfs/ (the image's files), config.json (an OCI
                             runtime spec), umoci.json, the mtree
        image.json           what the entry is: digest, ref, the image config, when pulled
        last-used            touched by every get (its mtime); eviction goes by it
    refs/<registry>/<repository>@<tag or digest>
                             the digest a reference resolved to last (JSON); a digest that names
                             an index maps to its linux/amd64 manifest for good
    locks/<algo>-<hex>.lock  per-digest pull lock (never removed: a waiter may hold its inode)
    locks/<algo>-<hex>.use   per-digest use lock: held shared by every run of the image, taken
                             exclusively by evict (never removed either, for the same reason)
    locks/evict.lock         one eviction at a time
    tmp/<hex>.<pid>.<rand>/  an entry being built, and what evict moves away before deleting

Publishing: an entry is built in ``tmp/`` and renamed to ``sha256/<hex>`` as a whole, under the
digest's lock, only if no entry is there: a reader sees a complete entry or none. A writer that
dies (SIGKILL, the disk full, a crash) leaves only its ``tmp/<hex>.*`` directory, which nothing
reads; the next get of that digest removes it under the lock (no other writer of that digest can
be running then), and :meth:`ImageCache.evict` removes those of any digest it can lock.

In use: a run holds its image's use lock shared (:meth:`ImageCache.in_use`, a ``flock`` held for
as long as the run lasts and released by the kernel when the process dies, however it dies);
:meth:`ImageCache.evict` removes an entry only while it holds that lock exclusively, and never
one whose pull lock is held. :meth:`ImageCache.get_held` is a get whose entry is then held in use.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import secrets
import shutil
import stat
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO

from .. import fsutil
from ..errors import (ContainerCacheError, ContainerDiskFull, ContainerImageError,
                      ContainerRegistryUnreachable)
from ..shares.asuser import Refused, read_file
from ..tools import output_tail, run_tool, tail
from .ref import ImageRef
from .registry import DIGEST, Registry

OCI_TAG = "image"
LOCK_TIMEOUT_S = 3600.0          # a waiter waits for a whole pull by another process
LOCK_POLL_S = 0.05
UNPACK_TIMEOUT_S = 3600.0
CONFIG_KEYS = ("Env", "Cmd", "Entrypoint", "WorkingDir", "User")

Progress = Callable[[str], None]


@dataclass(frozen=True)
class CachedImage:
    """A complete cache entry. ``digest`` is the registry's linux/amd64 manifest digest (the
    key); ``ref`` the reference it was asked for this time; ``config`` the image config's
    Env, Cmd, Entrypoint, WorkingDir and User (those it sets)."""

    digest: str
    ref: ImageRef
    path: Path
    oci_dir: Path
    rootfs: Path
    config: dict


@dataclass(frozen=True)
class EntryUsage:
    """What eviction knows of an entry: its digest, bytes on disk, last use (epoch seconds),
    and the references the refs/ index says resolved to it (for messages)."""

    digest: str
    size: int
    last_used: float
    refs: tuple[str, ...] = ()


def plan_eviction(entries: Iterable[EntryUsage], *, max_bytes: int | None = None,
                  max_age_s: float | None = None, now: float, keep: Iterable[str] = ()) -> list[str]:
    """The digests to evict, least recently used first: every entry unused for more than
    ``max_age_s``, then the least recently used until the rest fit in ``max_bytes``. Entries in
    ``keep`` are never chosen (they still count towards the size). Pure.

    Example: a 5, b 3, c 2 bytes used at t=1, 2, 3; max_bytes=5 -> ["a"] (b+c = 5 fit).
    """
    keep = set(keep)
    ordered = sorted(entries, key=lambda e: (e.last_used, e.digest))
    chosen: list[str] = []
    total = sum(e.size for e in ordered)
    for e in ordered:
        if e.digest in keep:
            continue
        old = max_age_s is not None and now - e.last_used > max_age_s
        big = max_bytes is not None and total > max_bytes
        if old or big:
            chosen.append(e.digest)
            total -= e.size
    return chosen


def image_config(oci_dir: Path, tag: str = OCI_TAG) -> dict:
    """The runtime part of the image config in the OCI layout ``oci_dir`` (index.json -> the
    manifest tagged ``tag`` -> its config blob): the keys of CONFIG_KEYS it sets. ValueError
    (with what is wrong) for a layout that does not hold one; OSError propagates."""
    index = _read_json(oci_dir / "index.json")
    manifests = [m for m in index.get("manifests", []) if isinstance(m, dict)
                 and (m.get("annotations") or {}).get("org.opencontainers.image.ref.name") == tag]
    if len(manifests) != 1:
        raise ValueError(f"index.json has {len(manifests)} manifests tagged {tag!r}")
    manifest = _read_json(_blob(oci_dir, manifests[0].get("digest")))
    config = _read_json(_blob(oci_dir, (manifest.get("config") or {}).get("digest")))
    runtime = config.get("config") or {}
    if not isinstance(runtime, dict):
        raise ValueError("the image config's 'config' is not an object")
    return {k: runtime[k] for k in CONFIG_KEYS if runtime.get(k) not in (None, "", [])}


def _blob(oci_dir: Path, digest) -> Path:
    if not isinstance(digest, str) or not DIGEST.fullmatch(digest):
        raise ValueError(f"bad blob digest {tail(str(digest), 80)!r}")
    algo, hex_ = digest.split(":", 1)
    return oci_dir / "blobs" / algo / hex_


#: the most a JSON file of the cache (image.json, a refs/ entry, an OCI index or config) may hold
JSON_MAX = 16 << 20


def _read_json(path: Path) -> dict:
    """The JSON object in ``path``: a regular file, opened without following a symbolic link
    and without blocking, and read only up to :data:`JSON_MAX` bytes. The cache is its user's
    to change, and one read as root's sweep (``dgxvm reconcile``, as the user) must not wait
    for ever on a FIFO put in its place nor read a device without end. The read is
    :func:`slurm_dgxvm.shares.asuser.read_file`'s: anything but a regular file, one that cannot
    be opened or one too large is ValueError naming it (FileNotFoundError passes)."""
    try:
        data = read_file(str(path), limit=JSON_MAX, show=path.name)
    except Refused as exc:
        raise ValueError(str(exc)) from None
    doc = json.loads(data)
    if not isinstance(doc, dict):
        raise ValueError(f"{path.name} is not a JSON object")
    return doc


def tree_size(path: Path) -> int:
    """Bytes ``path`` takes on disk (allocated blocks; hard links counted once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for name in [*dirnames, *filenames, None]:
            p = dirpath if name is None else os.path.join(dirpath, name)
            try:
                st = os.lstat(p)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
    return total


def remove_tree(path: Path) -> None:
    """``rm -rf path``, also through directories an image left without write permission for
    its owner (a rootless unpack keeps the image's modes)."""
    def fix(func, p, exc):
        err = exc[1] if isinstance(exc, tuple) else exc
        if isinstance(err, FileNotFoundError):
            return
        if not isinstance(err, PermissionError):
            raise err
        parent = os.path.dirname(p)
        os.chmod(parent, stat.S_IMODE(os.lstat(parent).st_mode) | stat.S_IRWXU)
        with contextlib.suppress(OSError):
            if os.path.isdir(p) and not os.path.islink(p):
                os.chmod(p, stat.S_IMODE(os.lstat(p).st_mode) | stat.S_IRWXU)
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p, onerror=fix)
        else:
            os.unlink(p)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        # a file, a symlink, a FIFO a user put there: unlinked, never opened (rmtree opens
        # its top before it looks, and an open of a FIFO waits for a writer)
        os.unlink(path)
        return
    shutil.rmtree(path, onerror=fix)


class ImageCache:
    """The cache at ``root`` (created 0700 if missing). ``registry`` is how the user reaches
    registries (their credentials, the insecure list); ``umoci`` the unpacker."""

    def __init__(self, root: Path | str, registry: Registry | None = None, *,
                 umoci: str = "umoci", lock_timeout_s: float = LOCK_TIMEOUT_S,
                 unpack_timeout_s: float = UNPACK_TIMEOUT_S):
        self.root = Path(root)
        self.registry = registry or Registry()
        self.umoci = umoci
        self.lock_timeout_s = lock_timeout_s
        self.unpack_timeout_s = unpack_timeout_s

    # -- paths ------------------------------------------------------------------------------
    def entry_path(self, digest: str) -> Path:
        """``root/<algo>/<hex>``: where the entry of ``digest`` is (ValueError for a string
        that is not a digest: it becomes a path)."""
        if not DIGEST.fullmatch(digest):
            raise ValueError(f"not a digest: {digest!r}")
        algo, hex_ = digest.split(":", 1)
        return self.root / algo / hex_

    def ref_path(self, ref: ImageRef, reference: str | None = None) -> Path:
        """``root/refs/<registry>/<repository>@<tag or digest>``: '@' is in no repository
        component, so a repository and its sub-repositories never collide."""
        return self.root / "refs" / ref.registry / f"{ref.repository}@{reference or ref.reference}"

    def _lock_path(self, digest: str) -> Path:
        return self.root / "locks" / f"{digest.replace(':', '-')}.lock"

    def _use_path(self, digest: str) -> Path:
        self.entry_path(digest)               # a digest, or ValueError: it becomes a name
        return self.root / "locks" / f"{digest.replace(':', '-')}.use"

    # -- reading ----------------------------------------------------------------------------
    def lookup(self, digest: str, ref: ImageRef) -> CachedImage | None:
        """The complete entry of ``digest``, or None. No network, no lock: an entry exists
        only once complete."""
        path = self.entry_path(digest)
        try:
            meta = _read_json(path / "image.json")
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise ContainerCacheError(path=str(path / "image.json"),
                                      reason=f"unreadable entry ({e}); remove it") from None
        return CachedImage(digest=digest, ref=ref, path=path, oci_dir=path / "oci",
                           rootfs=path / "bundle" / "rootfs", config=meta.get("config") or {})

    def _remembered(self, ref: ImageRef) -> str | None:
        try:
            digest = _read_json(self.ref_path(ref)).get("digest")
        except (OSError, ValueError):
            return None
        return digest if isinstance(digest, str) and DIGEST.fullmatch(digest) else None

    def _remember(self, ref: ImageRef, digest: str) -> None:
        path = self.ref_path(ref)
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fsutil.atomic_write_json(path, {"digest": digest, "ref": str(ref),
                                            "resolved": int(time.time())})
        except OSError as e:          # the index is a shortcut: a failure costs a request later
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ContainerDiskFull(ref=str(ref), reason=f"the disk is full: {path}") from None

    def _used(self, image: CachedImage) -> CachedImage:
        with contextlib.suppress(OSError):
            (image.path / "last-used").touch()
        return image

    # -- in use -----------------------------------------------------------------------------
    def _open_use(self, digest: str, *, create: bool) -> int | None:
        """A descriptor of ``digest``'s use lock file (made 0600 with ``create``; None when it
        is missing and not ``create``). Never through a symlink; anything but a regular file
        there is refused."""
        path = self._use_path(digest)
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        try:
            fd = os.open(path, flags | (os.O_CREAT if create else 0), 0o600)
        except FileNotFoundError:
            if create:
                raise
            return None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        return fd

    @contextlib.contextmanager
    def in_use(self, digest: str, *, timeout: float | None = None):
        """Hold ``digest``'s use lock shared for the block: :meth:`evict` leaves the entry alone
        while any process holds it. Many holders at once are fine (shared); the lock goes with
        the process however it ends (the kernel drops a dead process's ``flock``). Waits (up to
        ``timeout``, default :attr:`lock_timeout_s`) only while an eviction holds it
        exclusively, which it does just long enough to move the entry away: the entry may then
        be gone when the block starts (:meth:`get_held` gets it again). On the way out the
        entry's last use is now, so an image a long job ran counts as used until its end.
        ContainerCacheError naming the lock file when it cannot be opened or taken in time."""
        path = self._use_path(digest)
        timeout = self.lock_timeout_s if timeout is None else timeout
        try:
            fd = self._open_use(digest, create=True)
        except OSError as e:
            raise ContainerCacheError(path=str(path), reason=e.strerror or str(e)) from None
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise ContainerCacheError(path=str(path), reason=f"an eviction of "
                                                  f"{digest} held it for more than "
                                                  f"{timeout:g}s") from None
                    time.sleep(LOCK_POLL_S)
            try:
                yield
            finally:
                with contextlib.suppress(OSError):
                    os.utime(self.entry_path(digest) / "last-used")
        finally:
            os.close(fd)

    def is_in_use(self, digest: str) -> bool:
        """Whether some process holds ``digest``'s use lock now (a probe: true at once may be
        false a moment later, and the other way round)."""
        with self._try_use(digest) as free:
            return not free

    @contextlib.contextmanager
    def _try_use(self, digest: str):
        """Yields whether nobody held ``digest``'s use lock, which is then held exclusively for
        the block (True too when there is no lock file: nobody ever held it)."""
        try:
            fd = self._open_use(digest, create=False)
        except OSError:
            yield False                        # not a lock we can take: leave the entry be
            return
        if fd is None:
            yield True
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                free = True
            except BlockingIOError:
                free = False
            yield free
        finally:
            os.close(fd)

    def get_held(self, ref: ImageRef, hold: contextlib.ExitStack, **kw) -> CachedImage:
        """:meth:`get`, then :meth:`in_use` of its digest entered on ``hold`` (the caller's
        stack, closed when the image is no longer used). An eviction that removed the entry
        between the two (it held the use lock before this did) is met by getting it again:
        once this returns, the entry is there and stays until ``hold`` closes."""
        for _ in range(3):
            image = self.get(ref, **kw)
            with contextlib.ExitStack() as mine:
                mine.enter_context(self.in_use(image.digest))
                if self.lookup(image.digest, ref) is not None:
                    hold.enter_context(mine.pop_all())
                    return image
        raise ContainerCacheError(path=str(self.entry_path(image.digest)),
                                  reason="evicted again each time it was got (3 times); is "
                                         "something pruning the cache in a loop?")

    # -- get --------------------------------------------------------------------------------
    def get(self, ref: ImageRef, *, auth: Path | str | None = None,
            progress: Progress | None = None, offline_ok: bool = False,
            live: IO | int | None = None) -> CachedImage:
        """The cached image of ``ref``, pulled and unpacked first if needed.

        A tag is always resolved to its digest with one registry request (a moved tag is seen
        at once); only with ``offline_ok`` does an unreachable registry fall back to the digest
        the tag resolved to last time, if that entry is here. A digest reference already here
        needs no network at all. ``auth`` (a Docker config.json) replaces the registry's
        credentials file for this call. ``progress`` gets one line per stage: resolving, pulling,
        unpacking, done (or cached). ``live``: a terminal (file or descriptor) where skopeo shows
        the pull's progress bars between "pulling" and "unpacking"; not a terminal, or None, and
        nothing but the stage lines is said (:meth:`Registry.pull`).

        Ten processes getting one new image make one pull: the first takes the digest's lock
        and pulls, the others wait for it and find the entry. Raises the registry's errors
        (:mod:`.registry`), ContainerDiskFull, ContainerCacheError (the lock not acquired in
        :attr:`lock_timeout_s`, an unusable cache directory), ContainerImageError (umoci).
        """
        say = progress or (lambda line: None)
        registry = self.registry if auth is None else replace(self.registry, authfile=Path(auth))
        self._ensure_dirs()
        say(f"resolving {ref}")
        if ref.digest:
            for digest in (ref.digest, self._remembered(ref)):
                if digest and (image := self.lookup(digest, ref)) is not None:
                    say(f"done: {ref} is cached ({digest})")
                    return self._used(image)
        try:
            resolved = registry.resolve(ref)
        except ContainerRegistryUnreachable:
            digest = self._remembered(ref) if offline_ok else None
            if digest and (image := self.lookup(digest, ref)) is not None:
                say(f"done: registry unreachable; using {ref} as cached ({digest})")
                return self._used(image)
            raise
        digest = resolved.digest
        if (image := self.lookup(digest, ref)) is None:
            image = self._fill(registry, ref, digest, say, live)
        else:
            say(f"done: {ref} is cached ({digest})")
        self._remember(ref, digest)
        return self._used(image)

    def _fill(self, registry: Registry, ref: ImageRef, digest: str, say: Progress,
              live: IO | int | None = None) -> CachedImage:
        """Pull and unpack ``digest`` under its lock, unless another process did meanwhile."""
        lock = self._lock_path(digest)
        with self._locked(lock, f"another pull of {ref}"):
            self._clean_leftovers(digest)
            if (image := self.lookup(digest, ref)) is not None:
                say(f"done: {ref} was pulled by another process ({digest})")
                return image
            work = self.root / "tmp" / f"{digest.split(':', 1)[1]}.{os.getpid()}.{secrets.token_hex(4)}"
            try:
                self._build(registry, ref, digest, work, say, live)
                self._publish(work, digest, ref)
            finally:
                remove_tree(work)
        image = self.lookup(digest, ref)
        if image is None:
            raise ContainerCacheError(path=str(self.entry_path(digest)),
                                      reason="the entry vanished right after it was published")
        say(f"done: {ref} pulled and unpacked ({digest})")
        return image

    def _build(self, registry: Registry, ref: ImageRef, digest: str, work: Path,
               say: Progress, live: IO | int | None = None) -> None:
        try:
            work.mkdir(mode=0o700)
            (work / "skopeo-tmp").mkdir(mode=0o700)
        except OSError as e:
            raise self._os_error(ref, work, e) from None
        say(f"pulling {ref} ({digest})")
        oci_digest = registry.pull(ref, digest, work / "oci", OCI_TAG,
                                   tmpdir=work / "skopeo-tmp", progress_to=live)
        say(f"unpacking {ref}")

        def unpack_error(reason: str) -> ContainerImageError:
            return ContainerImageError(ref=str(ref), reason=reason)
        result = run_tool([self.umoci, "unpack", "--rootless", "--image",
                           f"{work / 'oci'}:{OCI_TAG}", work / "bundle"],
                          timeout=self.unpack_timeout_s, error=unpack_error,
                          what=f"umoci unpack {ref}", hint=" (Debian package umoci)", check=False)
        if result.returncode != 0:
            said = output_tail(result)
            everything = f"{result.stderr or ''}\n{result.stdout or ''}"
            if re.search(r"no space left on device|disk quota exceeded", everything, re.I):
                raise ContainerDiskFull(ref=str(ref), reason=f"the disk is full: {said}")
            if fsutil.filesystem_full(work):
                raise ContainerDiskFull(ref=str(ref), reason=f"the disk is full: {work} has less "
                                        f"than {fsutil.FULL_BELOW_BYTES >> 20} MiB left after "
                                        f"umoci unpack failed (exit {result.returncode}): {said}")
            raise ContainerImageError(ref=str(ref), reason=f"umoci unpack failed "
                                      f"(exit {result.returncode}): {said}")
        try:
            config = image_config(work / "oci")
        except (OSError, ValueError) as e:
            raise ContainerImageError(ref=str(ref), reason=f"the pulled image has no usable "
                                      f"config: {e}") from None
        try:
            remove_tree(work / "skopeo-tmp")
            # an entry never changes once published: its size, counted once here, is what
            # eviction adds up on every run without walking every image's tree
            fsutil.atomic_write_json(work / "image.json", {
                "digest": digest, "oci_manifest_digest": oci_digest, "ref": str(ref),
                "config": config, "pulled": int(time.time()), "size": tree_size(work)})
            (work / "last-used").touch()
        except OSError as e:
            raise self._os_error(ref, work, e) from None

    def _publish(self, work: Path, digest: str, ref: ImageRef) -> None:
        """Rename ``work`` to the entry's name. Under the digest's lock, after lookup() found
        none: nothing can be there but an empty directory (which rename would replace), so a
        complete entry is never overwritten; anything else there is refused."""
        path = self.entry_path(digest)
        try:
            os.rename(work, path)
            fsutil.fsync_dir(path.parent)
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise ContainerCacheError(path=str(path), reason="a directory that is not a "
                                          "complete entry is in the way; remove it") from None
            raise self._os_error(ref, path, e) from None

    def _os_error(self, ref: ImageRef, path: Path, e: OSError) -> ContainerImageError:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return ContainerDiskFull(ref=str(ref), reason=f"the disk is full: {path}")
        return ContainerCacheError(path=str(path), reason=e.strerror or str(e))

    def _ensure_dirs(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
            for sub in ("sha256", "sha512", "refs", "locks", "tmp"):
                (self.root / sub).mkdir(exist_ok=True, mode=0o700)
        except OSError as e:
            raise ContainerCacheError(path=str(self.root), reason=e.strerror or str(e)) from None

    def _clean_leftovers(self, digest: str) -> list[Path]:
        """Remove what dead writers of ``digest`` left in tmp/. Only under its lock."""
        hex_ = digest.split(":", 1)[1]
        gone = []
        for p in (self.root / "tmp").glob(f"{hex_}.*"):
            remove_tree(p)
            gone.append(p)
        return gone

    # -- eviction ---------------------------------------------------------------------------
    def entries(self) -> list[EntryUsage]:
        """Every complete entry with its size (as recorded when it was pulled; counted for an
        entry from before that), last use and the references that resolved to it. An entry
        that vanishes while it is read (evicted) is left out."""
        refs = self.refs()
        out = []
        for algo in ("sha256", "sha512"):
            base = self.root / algo
            try:
                names = sorted(os.listdir(base))
            except OSError:
                continue
            for name in names:
                digest, p = f"{algo}:{name}", base / name
                if not DIGEST.fullmatch(digest):
                    continue
                try:
                    meta = _read_json(p / "image.json")
                    meta_mtime = (p / "image.json").stat().st_mtime
                except (OSError, ValueError):
                    continue
                try:
                    last = (p / "last-used").stat().st_mtime
                except OSError:
                    last = meta_mtime
                size = meta.get("size")
                if type(size) is not int or size < 0:
                    size = tree_size(p)
                out.append(EntryUsage(digest=digest, size=size, last_used=last,
                                      refs=tuple(sorted(refs.get(digest, ())))))
        return out

    def refs(self) -> dict[str, list[str]]:
        """``{digest: [reference, ...]}`` from the refs/ index: what each entry was asked for
        as (the last time each reference was resolved)."""
        out: dict[str, list[str]] = {}
        for p in (self.root / "refs").rglob("*@*"):
            try:
                doc = _read_json(p)
            except (OSError, ValueError):
                continue
            digest, ref = doc.get("digest"), doc.get("ref")
            if isinstance(digest, str) and isinstance(ref, str):
                out.setdefault(digest, []).append(ref)
        return out

    def evict(self, *, max_bytes: int | None = None, max_age_s: float | None = None,
              keep: Iterable[str] = (), now: float | None = None, dry_run: bool = False,
              report: Callable[[EntryUsage], None] | None = None,
              skip_if_busy: bool = False) -> list[str]:
        """Remove entries unused for ``max_age_s``, then least recently used ones until the
        cache fits in ``max_bytes`` (:func:`plan_eviction`); digests in ``keep`` stay. An entry
        in use (:meth:`in_use`: a run holds it) is never removed, nor chosen in its stead: the
        plan is made of the others. An entry whose pull lock is held (a get is pulling or
        publishing it) is skipped. Each is first renamed into tmp/ while its use lock is held
        exclusively and its pull lock is held (it vanishes at once for readers), then deleted;
        leftovers of dead writers of digests it can lock go too, and refs/ that point at no
        entry. One eviction at a time (``locks/evict.lock``; a second waits up to
        :attr:`lock_timeout_s`, or with ``skip_if_busy`` returns [] at once: the one running
        does the work, as a run's own eviction wants). ``report`` is called with each entry
        removed; with ``dry_run`` nothing is removed and the entries that would be are
        reported. Returns the digests removed (or that would be)."""
        self._ensure_dirs()
        lock = self.root / "locks" / "evict.lock"
        if skip_if_busy:
            with self._try_lock_file(lock) as held:
                return self._evict(max_bytes, max_age_s, keep, now, dry_run, report) if held else []
        with self._locked(lock, "another eviction"):
            return self._evict(max_bytes, max_age_s, keep, now, dry_run, report)

    def _evict(self, max_bytes, max_age_s, keep, now, dry_run, report) -> list[str]:
        """:meth:`evict` under ``locks/evict.lock``."""
        now = time.time() if now is None else now
        entries = self.entries()
        busy = {e.digest for e in entries if self.is_in_use(e.digest)}
        by_digest = {e.digest: e for e in entries}
        removed = []
        for digest in plan_eviction(entries, max_bytes=max_bytes, max_age_s=max_age_s,
                                    now=now, keep={*keep, *busy}):
            if self._evict_one(digest, dry_run):
                removed.append(digest)
                if report is not None:
                    report(by_digest[digest])
        if dry_run:
            return removed
        for p in (self.root / "tmp").iterdir():
            hex_ = p.name.split(".")[0]
            digest = f"sha{'512' if len(hex_) == 128 else '256'}:{hex_}"
            if DIGEST.fullmatch(digest):
                with self._try_lock(digest) as held:
                    if held:
                        self._clean_leftovers(digest)
        self._prune_refs()
        return removed

    def _evict_one(self, digest: str, dry_run: bool) -> bool:
        """Remove ``digest``'s entry if nobody uses it and no get holds its pull lock."""
        with contextlib.ExitStack() as use:
            if not use.enter_context(self._try_use(digest)):
                return False
            with self._try_lock(digest) as held:
                if not held:
                    return False
                path = self.entry_path(digest)
                if dry_run:
                    return path.is_dir()
                grave = self.root / "tmp" / f"{path.name}.evict.{secrets.token_hex(4)}"
                try:
                    os.rename(path, grave)
                except FileNotFoundError:
                    return False
                use.close()        # gone for readers: a run waiting in in_use() may go on
                remove_tree(grave)             # (and a get of it waits for this pull lock)
                return True

    def _locked(self, lock: Path, holder: str):
        """``lock`` held for the block, waiting up to :attr:`lock_timeout_s`;
        ContainerCacheError naming it (and ``holder``, who had it) otherwise."""
        return fsutil.locked(lock, timeout=self.lock_timeout_s, mode=0o600,
                             timed_out=lambda: ContainerCacheError(
                                 path=str(lock), reason=f"{holder} held it for more than "
                                 f"{self.lock_timeout_s:g}s"),
                             failed=lambda e: ContainerCacheError(path=str(lock),
                                                                  reason=e.strerror or str(e)))

    def _try_lock(self, digest: str):
        """Yields whether the digest's lock was free (and is now held for the block)."""
        return self._try_lock_file(self._lock_path(digest))

    @contextlib.contextmanager
    def _try_lock_file(self, path: Path):
        """Yields whether the lock file ``path`` was free (and is now held for the block)."""
        stack = contextlib.ExitStack()
        try:
            stack.enter_context(fsutil.locked(path, timeout=0, mode=0o600,
                                              timed_out=TimeoutError, failed=lambda e: e))
            held = True
        except (TimeoutError, OSError):
            held = False
        with stack:
            yield held

    def _prune_refs(self) -> None:
        for p in (self.root / "refs").rglob("*@*"):
            try:
                digest = _read_json(p).get("digest")
                if not (isinstance(digest, str) and DIGEST.fullmatch(digest)
                        and (self.entry_path(digest) / "image.json").is_file()):
                    p.unlink()
            except (OSError, ValueError):
                with contextlib.suppress(OSError):
                    p.unlink()


__all__ = ["CONFIG_KEYS", "CachedImage", "EntryUsage", "ImageCache", "image_config",
           "plan_eviction", "remove_tree", "tree_size"]
