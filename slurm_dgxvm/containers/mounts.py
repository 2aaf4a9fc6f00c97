"""``--container-mounts`` as pyxis takes it, checked before anything runs.

``SRC[:DST[:FLAGS]][,SRC[:DST[:FLAGS]]...]``: entries are separated by ``,``; DST defaults to
SRC; FLAGS are mount options separated by ``+`` (pyxis's convention, since ``,`` already
separates entries), e.g. ``/scratch/data:/data:ro``. Every mount is a recursive bind.

What dgxvm accepts, each refusal naming the entry:
- SRC and DST are absolute, without ``.`` or ``..`` components, without ``:`` or ``,`` inside
  (the separators) and without control characters; DST is not ``/``.
- FLAGS: ``ro`` / ``rw`` and the propagation flags (``rprivate``, ``private``, ``rslave``,
  ``slave``). Nothing that would weaken the mount (``suid``, ``dev``, ``exec`` overrides) or
  is unknown: a container's mounts stay ``nosuid,nodev``.
- No two mounts on the same DST (the same mount given twice counts once, as in pyxis).

Whether SRC exists in the VM (a share or a path of the guest) is decided where the VM is known;
this module is pure.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ContainerMountError

ALLOWED_FLAGS = frozenset({"ro", "rw", "rprivate", "private", "rslave", "slave"})


@dataclass(frozen=True)
class Mount:
    source: str
    target: str
    read_only: bool = False
    flags: tuple[str, ...] = ()          # as given, in order (ro/rw included)

    def __str__(self) -> str:
        return f"{self.source}:{self.target}" + (f":{'+'.join(self.flags)}" if self.flags else "")


def _path(entry: str, what: str, value: str) -> str:
    def bad(reason: str) -> ContainerMountError:
        return ContainerMountError(value=entry, reason=f"{what} {value!r} {reason}")

    if not value:
        raise bad("is empty")
    if not value.startswith("/"):
        raise bad("is not an absolute path")
    if any(not c.isprintable() for c in value):
        raise bad("has control characters")
    parts = [p for p in value.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise bad("has a '.' or '..' component")
    return "/" + "/".join(parts)      # not normpath: it keeps a leading "//" (POSIX), "/" in disguise


def parse_one(entry: str) -> Mount:
    """One ``SRC[:DST[:FLAGS]]``."""
    fields = entry.split(":")
    if len(fields) > 3:
        raise ContainerMountError(value=entry, reason="more than SRC:DST:FLAGS (a ':' in a "
                                                      "path cannot be mounted)")
    src = _path(entry, "source", fields[0])
    dst = _path(entry, "destination", fields[1]) if len(fields) > 1 else src
    if dst == "/":
        raise ContainerMountError(value=entry, reason="the destination cannot be /")
    flags: tuple[str, ...] = ()
    if len(fields) == 3 and fields[2]:
        flags = tuple(fields[2].split("+"))
        unknown = [f for f in flags if f not in ALLOWED_FLAGS]
        if unknown:
            raise ContainerMountError(value=entry, reason=f"flag(s) {', '.join(map(repr, unknown))} "
                                      f"not allowed (allowed: {', '.join(sorted(ALLOWED_FLAGS))})")
        if "ro" in flags and "rw" in flags:
            raise ContainerMountError(value=entry, reason="both ro and rw")
    return Mount(source=src, target=dst, read_only="ro" in flags, flags=flags)


def parse(text: str) -> tuple[Mount, ...]:
    """Every mount of one ``--container-mounts`` value; ContainerMountError naming the bad
    entry."""
    if not text:
        raise ContainerMountError(value=text, reason="an argument is required")
    seen: dict[str, Mount] = {}
    for m in (parse_one(entry) for entry in text.split(",")):
        if seen.get(m.target) == m:
            continue                 # the same mount again (pyxis adds it once)
        if m.target in seen:
            raise ContainerMountError(value=str(m), reason=f"{m.target} is already the "
                                                           f"destination of {seen[m.target]}")
        seen[m.target] = m
    return tuple(seen.values())


__all__ = ["ALLOWED_FLAGS", "Mount", "parse", "parse_one"]
