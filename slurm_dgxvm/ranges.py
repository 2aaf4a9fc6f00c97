"""Index-list syntax shared by Linux cpulists, Slurm GPU lists and our own flags: ``0-3,8,10-11``."""

from __future__ import annotations

import re
from collections.abc import Iterable

from .errors import CpuListError, GpuListError

_ITEM = re.compile(r"^(\d+)(?:-(\d+))?$")


def parse_index_list(text: str, *, what: str = "GPU", allow_empty: bool = False,
                     allow_duplicates: bool = False) -> tuple[int, ...]:
    """Parse ``0-3,8`` into ``(0, 1, 2, 3, 8)``, in the order given.

    Raises GpuListError (or CpuListError when ``what == "CPU"``) naming the bad fragment for: an
    empty list (unless allowed), a non-number (``x``), a negative number (``-1``), a reversed range
    (``5-3``), and duplicates (``1,1`` or ``0-3,2``) unless allowed.
    """
    err = CpuListError if what == "CPU" else GpuListError
    raw = text.strip()
    if not raw:
        if allow_empty:
            return ()
        raise err(value=text, reason="empty list")
    out: list[int] = []
    seen: set[int] = set()
    for fragment in raw.split(","):
        frag = fragment.strip()
        m = _ITEM.match(frag)
        if not m:
            reason = ("negative index" if frag.startswith("-") and frag[1:].isdigit()
                      else f"{frag!r} is not an index or a range like 0-3")
            raise err(value=text, reason=reason)
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise err(value=text, reason=f"range {frag!r} goes backwards")
        for i in range(lo, hi + 1):
            if i in seen and not allow_duplicates:
                raise err(value=text, reason=f"{what} {i} is listed twice")
            if i not in seen:
                out.append(i)
                seen.add(i)
    return tuple(out)


def format_index_list(values: Iterable[int]) -> str:
    """``[0, 1, 2, 3, 8]`` -> ``"0-3,8"`` (sorted, compressed)."""
    items = sorted(set(values))
    parts: list[str] = []
    i = 0
    while i < len(items):
        j = i
        while j + 1 < len(items) and items[j + 1] == items[j] + 1:
            j += 1
        parts.append(str(items[i]) if i == j else f"{items[i]}-{items[j]}")
        i = j + 1
    return ",".join(parts)
