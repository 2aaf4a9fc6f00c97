"""The caller's own container image cache on this node: where it is and whether root may touch it
(:func:`user_cache`), its listing (:func:`listing`), ``dgxvm image-cache prune``
(:func:`prune`) and the eviction ``dgxvm run --container-image`` does after its get
(:func:`evict_for_run`), with the lines that report them.

The cache is ``<[containers] cache_dir>/<uid>`` of the calling user (docs/admin/images.md, "The
container image cache"). Root is refused: the directory is the user's, and root must not walk a tree the user
controls (a symlink the user swapped in would send root's deletions anywhere); root runs it as
the user (``runuser -u NAME -- dgxvm image-cache prune``). Errors are DgxvmError.
"""

from __future__ import annotations

import os
import stat
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from ..config import ContainersConfig
from ..errors import BadInput, ContainerCacheError, DgxvmError
from ..images import human_bytes
from ..names import shown
from .cache import EntryUsage, ImageCache, plan_eviction

GIB = 1024 ** 3
DAY_S = 86400.0


def limits(max_gib: float, max_age_days: float) -> tuple[int | None, float | None]:
    """``(max_bytes, max_age_s)`` for :meth:`ImageCache.evict` of the config's numbers (0 = no
    limit: None)."""
    return (int(max_gib * GIB) if max_gib > 0 else None,
            max_age_days * DAY_S if max_age_days > 0 else None)


def ago(seconds: float) -> str:
    seconds = max(seconds, 0.0)
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * DAY_S:
        return f"{seconds / 3600:.1f} hours"
    return f"{seconds / DAY_S:.1f} days"


def label(e: EntryUsage) -> str:
    """``REF@DIGEST`` (the first reference the refs/ index names; the digest alone without).
    The reference is shown escaped (:func:`~slurm_dgxvm.names.shown`): the index is a file in
    the user's tree, and what it says must not write to the terminal."""
    if not e.refs:
        return e.digest
    ref = shown(e.refs[0])
    name = ref if ref.endswith(f"@{e.digest}") else f"{ref}@{e.digest}" if "@" not in ref \
        else f"{ref} ({e.digest})"
    return name + (f" (and {len(e.refs) - 1} more references)" if len(e.refs) > 1 else "")


def evicted_line(e: EntryUsage, *, now: float, max_bytes: int | None, max_age_s: float | None,
                 verb: str = "evicted") -> str:
    """``evicted REF@DIGEST (12.0 MiB, unused for 3.0 days) to keep the cache under 10 GiB``;
    the reason is the age when the entry is older than ``max_age_s`` (that alone chose it)."""
    unused = now - e.last_used
    head = f"{verb} {label(e)} ({human_bytes(e.size)}, unused for {ago(unused)})"
    if max_age_s is not None and unused > max_age_s:
        return f"{head}: unused for more than {max_age_s / DAY_S:g} days"
    if max_bytes == 0:
        return f"{head}: not in use"
    return f"{head} to keep the cache under {max_bytes / GIB:g} GiB"


def limits_text(max_bytes: int | None, max_age_s: float | None) -> str:
    parts = ([f"at most {max_bytes / GIB:g} GiB"] if max_bytes is not None else []) + \
            ([f"images unused for more than {max_age_s / DAY_S:g} days go"]
             if max_age_s is not None else [])
    return "; ".join(parts) or "no limit"


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def evict_for_run(cache: ImageCache, cfg: ContainersConfig, keep: Iterable[str], *,
                  quiet: bool, say: Callable[[str], None] = _stderr) -> None:
    """The eviction after a ``dgxvm run``'s get, with ``[containers] cache_max_gib`` and
    ``cache_max_age_days`` (none when both are 0). One ``dgxvm: evicted ...`` line per image
    removed to ``say`` (stderr; none with ``quiet``). It never fails the run: any failure is
    one ``dgxvm: note:`` line instead. Skipped when another eviction of this cache is running,
    and for root: root must not delete in a tree the user controls (root's ``dgxvm run --job``
    of another user's job has become that user before it gets here, access.target; this guard
    keeps any other path from evicting as root)."""
    max_bytes, max_age_s = limits(cfg.cache_max_gib, cfg.cache_max_age_days)
    if (max_bytes is None and max_age_s is None) or os.geteuid() == 0:
        return
    now = time.time()

    def report(e: EntryUsage) -> None:
        if not quiet:
            say("dgxvm: " + evicted_line(e, now=now, max_bytes=max_bytes, max_age_s=max_age_s))
    try:
        cache.evict(max_bytes=max_bytes, max_age_s=max_age_s, keep=keep, now=now,
                    report=report, skip_if_busy=True)
    except Exception as exc:      # noqa: BLE001 -- the user's run goes on whatever this was
        what = str(exc) if isinstance(exc, DgxvmError) else f"{type(exc).__name__}: {exc}"
        say(f"dgxvm: note: the image cache was not pruned: {what}")


# -- the caller's cache ----------------------------------------------------------------------------
def cache_path(cfg: ContainersConfig) -> Path:
    """``<cache_dir>/<uid>`` of the caller, whether it exists or not (unchecked)."""
    return Path(cfg.cache_dir) / str(os.getuid())


def user_cache(cfg: ContainersConfig) -> Path | None:
    """``<cache_dir>/<uid>`` of the caller, or None when it does not exist yet (no image was
    ever pulled here). BadInput for root; ContainerCacheError naming the path when there is no
    cache_dir, or the entry is not a real directory of the caller's."""
    if os.geteuid() == 0:
        raise BadInput("dgxvm image-cache works on the caller's own cache and is refused to "
                       "root (root must not walk a directory a user controls): run it as the "
                       "user, e.g. runuser -u NAME -- dgxvm image-cache prune", value="root")
    if not cfg.cache_dir:
        raise ContainerCacheError(path="(none)", reason="[containers] cache_dir is empty: this "
                                                        "node keeps no image cache")
    path = Path(cfg.cache_dir) / str(os.getuid())
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ContainerCacheError(path=str(path), reason=exc.strerror or str(exc)) from None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise ContainerCacheError(path=str(path), reason="not a directory of yours (a symbolic "
                                  "link, a file or another owner's): the node's admin must fix it")
    return path


@dataclass(frozen=True)
class Listing:
    """The caller's cache as ``dgxvm image-cache list`` shows it: each entry with whether a run
    uses it now, the config's limits and the total size."""
    path: Path                  # <cache_dir>/<uid>
    exists: bool
    rows: list[tuple[EntryUsage, bool]]
    max_bytes: int | None
    max_age_s: float | None

    @property
    def total(self) -> int:
        return sum(e.size for e, _ in self.rows)

    def to_json(self) -> dict:
        return {
            "cache": str(self.path), "exists": self.exists,
            "max_bytes": self.max_bytes, "max_age_s": self.max_age_s, "total_bytes": self.total,
            "images": [{"digest": e.digest, "refs": list(e.refs), "size": e.size,
                        "last_used": e.last_used, "in_use": used} for e, used in self.rows],
        }


def listing(cfg: ContainersConfig) -> Listing:
    """The caller's cache (:func:`user_cache`'s checks) and what is in it."""
    path = user_cache(cfg)
    cache = ImageCache(path) if path is not None else None
    entries = cache.entries() if cache is not None else []
    rows = [(e, cache.is_in_use(e.digest)) for e in entries]
    max_bytes, max_age_s = limits(cfg.cache_max_gib, cfg.cache_max_age_days)
    return Listing(path=cache_path(cfg), exists=path is not None, rows=rows,
                   max_bytes=max_bytes, max_age_s=max_age_s)


def prune_limits(cfg: ContainersConfig, *, max_gib: float | None, max_age_days: float | None,
                 everything: bool) -> tuple[int | None, float | None]:
    """``(max_bytes, max_age_s)`` of ``dgxvm image-cache prune``: every image not in use with
    ``everything``, else the flags' limits over the config's."""
    if everything:
        return 0, None
    return limits(cfg.cache_max_gib if max_gib is None else max_gib,
                  cfg.cache_max_age_days if max_age_days is None else max_age_days)


@dataclass(frozen=True)
class Pruned:
    """What a prune removed (or would), what the limits chose but a running ``dgxvm run``
    holds, and what is left."""
    path: Path
    gone: list[EntryUsage]
    kept: list[EntryUsage]
    left: list[EntryUsage]


def prune(path: Path, *, max_bytes: int | None, max_age_s: float | None, now: float,
          dry_run: bool, report: Callable[[EntryUsage], None]) -> Pruned:
    """Evict from the cache at ``path`` (:func:`user_cache`'s) to the limits, ``report``-ing
    each image as it goes (or would go, ``dry_run``)."""
    cache = ImageCache(path)
    before = cache.entries()
    gone: list[EntryUsage] = []

    def removed(e: EntryUsage) -> None:
        gone.append(e)
        report(e)
    cache.evict(max_bytes=max_bytes, max_age_s=max_age_s, now=now, dry_run=dry_run,
                report=removed)
    # what the limits would have taken but a running dgxvm run holds
    wanted = set(plan_eviction(before, max_bytes=max_bytes, max_age_s=max_age_s, now=now))
    kept = [e for e in before
            if e.digest in wanted and e not in gone and cache.is_in_use(e.digest)]
    digests = {e.digest for e in gone}
    left = [e for e in (before if dry_run else cache.entries()) if e.digest not in digests]
    return Pruned(path=path, gone=gone, kept=kept, left=left)


__all__ = ["DAY_S", "GIB", "Listing", "Pruned", "ago", "cache_path", "evict_for_run",
           "evicted_line", "label", "limits", "limits_text", "listing", "prune", "prune_limits",
           "user_cache"]
