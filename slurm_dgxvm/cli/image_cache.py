"""``dgxvm image-cache list|prune``: the caller's own container image cache on this node, and the
eviction ``dgxvm run --container-image`` does after its get (:func:`evict_for_run`).

The cache is ``<[containers] cache_dir>/<uid>`` of the calling user (README "Container image
cache"). Root is refused: the directory is the user's, and root must not walk a tree the user
controls (a symlink the user swapped in would send root's deletions anywhere); root runs it as
the user (``runuser -u NAME -- dgxvm image-cache prune``). Registered by the main CLI by name
(``cli.main.LAZY_COMMANDS``, imported when looked up); errors are DgxvmError, which ``main()``
turns into one line and the error's exit code.
"""

from __future__ import annotations

import json
import math
import os
import stat
import time
from collections.abc import Iterable
from pathlib import Path

import click

from ..config import ContainersConfig
from ..containers.cache import EntryUsage, ImageCache, plan_eviction
from ..errors import BadInput, ContainerCacheError, DgxvmError
from ..images import human_bytes
from ..names import shown

GIB = 1024 ** 3
DAY_S = 86400.0


def limits(max_gib: float, max_age_days: float) -> tuple[int | None, float | None]:
    """``(max_bytes, max_age_s)`` for :meth:`ImageCache.evict` of the config's numbers (0 = no
    limit: None)."""
    return (int(max_gib * GIB) if max_gib > 0 else None,
            max_age_days * DAY_S if max_age_days > 0 else None)


def _ago(seconds: float) -> str:
    seconds = max(seconds, 0.0)
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * DAY_S:
        return f"{seconds / 3600:.1f} hours"
    return f"{seconds / DAY_S:.1f} days"


def _label(e: EntryUsage) -> str:
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
    head = f"{verb} {_label(e)} ({human_bytes(e.size)}, unused for {_ago(unused)})"
    if max_age_s is not None and unused > max_age_s:
        return f"{head}: unused for more than {max_age_s / DAY_S:g} days"
    if max_bytes == 0:
        return f"{head}: not in use"
    return f"{head} to keep the cache under {max_bytes / GIB:g} GiB"


def evict_for_run(cache: ImageCache, cfg: ContainersConfig, keep: Iterable[str], *,
                  quiet: bool) -> None:
    """The eviction after a ``dgxvm run``'s get, with ``[containers] cache_max_gib`` and
    ``cache_max_age_days`` (none when both are 0). One ``dgxvm: evicted ...`` line per image
    removed on stderr (none with ``quiet``). It never fails the run: any failure is one
    ``dgxvm: note:`` line instead. Skipped when another eviction of this cache is running, and
    for root: root must not delete in a tree the user controls (root's ``dgxvm run --job`` of
    another user's job has become that user before it gets here, access.target; this guard
    keeps any other path from evicting as root)."""
    max_bytes, max_age_s = limits(cfg.cache_max_gib, cfg.cache_max_age_days)
    if (max_bytes is None and max_age_s is None) or os.geteuid() == 0:
        return
    now = time.time()

    def report(e: EntryUsage) -> None:
        if not quiet:
            click.echo("dgxvm: " + evicted_line(e, now=now, max_bytes=max_bytes,
                                                max_age_s=max_age_s), err=True)
    try:
        cache.evict(max_bytes=max_bytes, max_age_s=max_age_s, keep=keep, now=now,
                    report=report, skip_if_busy=True)
    except Exception as exc:      # noqa: BLE001 -- the user's run goes on whatever this was
        what = str(exc) if isinstance(exc, DgxvmError) else f"{type(exc).__name__}: {exc}"
        click.echo(f"dgxvm: note: the image cache was not pruned: {what}", err=True)


# -- the caller's cache ----------------------------------------------------------------------------
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


class NonNegative(click.ParamType):
    """A finite number >= 0 (``1.5``, ``0``); the refusal names the value as given."""

    name = "N"

    def convert(self, value, param, ctx):
        if isinstance(value, float):
            return value
        try:
            number = float(str(value).strip())
        except ValueError:
            number = None
        if number is None or not math.isfinite(number) or number < 0:
            self.fail(f"{value!r} is not a number >= 0", param, ctx)
        return number


def _limits_text(max_bytes: int | None, max_age_s: float | None) -> str:
    parts = ([f"at most {max_bytes / GIB:g} GiB"] if max_bytes is not None else []) + \
            ([f"images unused for more than {max_age_s / DAY_S:g} days go"]
             if max_age_s is not None else [])
    return "; ".join(parts) or "no limit"


@click.group("image-cache")
def image_cache():
    """Your container image cache on this node (dgxvm run --container-image): list, prune."""


@image_cache.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (stable keys).")
@click.pass_obj
def list_cmd(obj, as_json):
    """List the images in your cache: digest, size, last use, whether a run uses it now, and
    the references that resolved to it."""
    cfg = obj.config.containers
    path = user_cache(cfg)
    cache = ImageCache(path) if path is not None else None
    entries = cache.entries() if cache is not None else []
    rows = [(e, cache.is_in_use(e.digest)) for e in entries]
    max_bytes, max_age_s = limits(cfg.cache_max_gib, cfg.cache_max_age_days)
    total = sum(e.size for e in entries)
    if as_json:
        click.echo(json.dumps({
            "cache": str(Path(cfg.cache_dir) / str(os.getuid())), "exists": path is not None,
            "max_bytes": max_bytes, "max_age_s": max_age_s, "total_bytes": total,
            "images": [{"digest": e.digest, "refs": list(e.refs), "size": e.size,
                        "last_used": e.last_used, "in_use": used} for e, used in rows],
        }, indent=2, sort_keys=True))
        return
    if not rows:
        click.echo(f"no images in {path or Path(cfg.cache_dir) / str(os.getuid())}")
        return
    now = time.time()
    table = [("DIGEST", "SIZE", "LAST USED", "IN USE", "REFERENCES")]
    for e, used in sorted(rows, key=lambda r: r[0].last_used, reverse=True):
        table.append((e.digest[:19], human_bytes(e.size),
                      f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(e.last_used))} "
                      f"({_ago(now - e.last_used)} ago)", "yes" if used else "no",
                      ", ".join(shown(r) for r in e.refs) or "-"))
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]) - 1)]
    for r in table:
        click.echo("  ".join([c.ljust(w) for c, w in zip(r, widths)] + [r[-1]]).rstrip())
    click.echo(f"{len(rows)} image{'s' if len(rows) != 1 else ''}, {human_bytes(total)} in "
               f"{path} ({_limits_text(max_bytes, max_age_s)})")


@image_cache.command("prune")
@click.option("--max-gib", type=NonNegative(), metavar="N",
              help="Remove least recently used images until the cache is at most N GiB "
                   "(0: no size limit). [default: [containers] cache_max_gib]")
@click.option("--max-age-days", type=NonNegative(), metavar="D",
              help="Remove images unused for more than D days (0: no age limit). "
                   "[default: [containers] cache_max_age_days]")
@click.option("--all", "everything", is_flag=True,
              help="Remove every image that no run uses now.")
@click.option("--dry-run", is_flag=True, help="Say what would be removed; remove nothing.")
@click.pass_obj
def prune_cmd(obj, max_gib, max_age_days, everything, dry_run):
    """Remove images from your cache: those unused for too long, then the least recently used
    until it fits; never one that a running dgxvm run uses (it is listed as kept)."""
    cfg = obj.config.containers
    if everything and (max_gib is not None or max_age_days is not None):
        raise click.UsageError("--all removes every image not in use: give it without "
                               "--max-gib and --max-age-days")
    max_bytes, max_age_s = (0, None) if everything else limits(
        cfg.cache_max_gib if max_gib is None else max_gib,
        cfg.cache_max_age_days if max_age_days is None else max_age_days)
    if max_bytes is None and max_age_s is None:
        click.echo("nothing to prune: no limit is set ([containers] cache_max_gib and "
                   "cache_max_age_days are 0; give --max-gib, --max-age-days or --all)")
        return
    path = user_cache(cfg)
    if path is None:
        click.echo(f"no images in {Path(cfg.cache_dir) / str(os.getuid())}")
        return
    cache = ImageCache(path)
    now = time.time()
    before = cache.entries()
    gone: list[EntryUsage] = []

    def report(e: EntryUsage) -> None:
        gone.append(e)
        click.echo(evicted_line(e, now=now, max_bytes=max_bytes, max_age_s=max_age_s,
                                verb="would evict" if dry_run else "evicted"))
    cache.evict(max_bytes=max_bytes, max_age_s=max_age_s, now=now, dry_run=dry_run,
                report=report)
    # what the limits would have taken but a running dgxvm run holds
    wanted = set(plan_eviction(before, max_bytes=max_bytes, max_age_s=max_age_s, now=now))
    for e in before:
        if e.digest in wanted and e not in gone and cache.is_in_use(e.digest):
            click.echo(f"kept {_label(e)} ({human_bytes(e.size)}): a running dgxvm run uses it")
    removed = {e.digest for e in gone}
    left = [e for e in (before if dry_run else cache.entries()) if e.digest not in removed]
    n_gone, n_left = len(gone), len(left)
    click.echo(f"{'would free' if dry_run else 'freed'} {human_bytes(sum(e.size for e in gone))} "
               f"({n_gone} image{'s' if n_gone != 1 else ''}); {human_bytes(sum(e.size for e in left))}"
               f" in {n_left} image{'s' if n_left != 1 else ''} {'would be ' if dry_run else ''}"
               f"left in {path}")


__all__ = ["NonNegative", "evict_for_run", "evicted_line", "image_cache", "limits", "user_cache"]
