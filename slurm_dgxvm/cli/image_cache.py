"""``dgxvm image-cache list|prune``: the caller's own container image cache on this node
(containers.cache_admin: where it is, root's refusal, the listing, the prune and its lines).
Registered by the main CLI by name (``cli.main.LAZY_COMMANDS``, imported when looked up); errors
are DgxvmError, which ``main()`` turns into one line and the error's exit code.
"""

from __future__ import annotations

import json
import math
import time

import click

from ..containers.cache import EntryUsage
from ..containers.cache_admin import (ago, cache_path, evicted_line, label, limits_text, listing,
                                      prune, prune_limits, user_cache)
from ..images import human_bytes
from ..names import shown


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


@click.group("image-cache")
def image_cache():
    """Your container image cache on this node (dgxvm run --container-image): list, prune."""


@image_cache.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (stable keys).")
@click.pass_obj
def list_cmd(obj, as_json):
    """List the images in your cache: digest, size, last use, whether a run uses it now, and
    the references that resolved to it."""
    shown_cache = listing(obj.config.containers)
    if as_json:
        click.echo(json.dumps(shown_cache.to_json(), indent=2, sort_keys=True))
        return
    rows = shown_cache.rows
    if not rows:
        click.echo(f"no images in {shown_cache.path}")
        return
    now = time.time()
    table = [("DIGEST", "SIZE", "LAST USED", "IN USE", "REFERENCES")]
    for e, used in sorted(rows, key=lambda r: r[0].last_used, reverse=True):
        table.append((e.digest[:19], human_bytes(e.size),
                      f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(e.last_used))} "
                      f"({ago(now - e.last_used)} ago)", "yes" if used else "no",
                      ", ".join(shown(r) for r in e.refs) or "-"))
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]) - 1)]
    for r in table:
        click.echo("  ".join([c.ljust(w) for c, w in zip(r, widths)] + [r[-1]]).rstrip())
    click.echo(f"{len(rows)} image{'s' if len(rows) != 1 else ''}, "
               f"{human_bytes(shown_cache.total)} in {shown_cache.path} "
               f"({limits_text(shown_cache.max_bytes, shown_cache.max_age_s)})")


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
    max_bytes, max_age_s = prune_limits(cfg, max_gib=max_gib, max_age_days=max_age_days,
                                        everything=everything)
    if max_bytes is None and max_age_s is None:
        click.echo("nothing to prune: no limit is set ([containers] cache_max_gib and "
                   "cache_max_age_days are 0; give --max-gib, --max-age-days or --all)")
        return
    path = user_cache(cfg)
    if path is None:
        click.echo(f"no images in {cache_path(cfg)}")
        return
    now = time.time()

    def report(e: EntryUsage) -> None:
        click.echo(evicted_line(e, now=now, max_bytes=max_bytes, max_age_s=max_age_s,
                                verb="would evict" if dry_run else "evicted"))
    done = prune(path, max_bytes=max_bytes, max_age_s=max_age_s, now=now, dry_run=dry_run,
                 report=report)
    for e in done.kept:
        click.echo(f"kept {label(e)} ({human_bytes(e.size)}): a running dgxvm run uses it")
    gone, left = done.gone, done.left
    n_gone, n_left = len(gone), len(left)
    click.echo(f"{'would free' if dry_run else 'freed'} {human_bytes(sum(e.size for e in gone))} "
               f"({n_gone} image{'s' if n_gone != 1 else ''}); {human_bytes(sum(e.size for e in left))}"
               f" in {n_left} image{'s' if n_left != 1 else ''} {'would be ' if dry_run else ''}"
               f"left in {path}")


__all__ = ["NonNegative", "image_cache"]
