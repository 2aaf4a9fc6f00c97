"""Slurm's hostlist expressions, expanded: ``dgx[01-03,07],login1`` -> dgx01 dgx02 dgx03 dgx07
login1, as ``scontrol show hostnames`` gives them (no daemon asked, nothing resolved).

The nodelist of a job (``SLURM_NODELIST`` in a Prolog) is a value the job's user may influence, so the
syntax taken is Slurm's ordinary one and nothing more: names of letters, digits, ``.``, ``_``,
``-``; bracket groups of numbers and ranges (``[1-3,7]``; a range's width is its first number's:
``[08-11]`` -> 08 09 10 11); several groups in one name (``a[1-2]-b[3-4]``), in the order Slurm
expands them; names separated by commas outside brackets. What Slurm also tolerates is refused
(spaces, empty names, ``[1-]``, ``[+1]``, text after the last group), as are more than
:data:`MAX_NAMES` names in all.
"""

from __future__ import annotations

import re

#: The most names one expression may expand to (Slurm's own hostlist caps a range at 65536).
MAX_NAMES = 65536

_LITERAL = re.compile(r"[A-Za-z0-9._-]+")
_RANGE = re.compile(r"(\d{1,9})(?:-(\d{1,9}))?")


def _split_top(expr: str) -> list[str]:
    """``expr`` cut at the commas outside brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(expr):
        if ch == "[":
            if depth:
                raise ValueError(f"{expr!r}: a bracket inside a bracket at {expr[start:i + 1]!r}")
            depth = 1
        elif ch == "]":
            if not depth:
                raise ValueError(f"{expr!r}: ']' without '[' in {expr[start:i + 1]!r}")
            depth = 0
        elif ch == "," and not depth:
            parts.append(expr[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"{expr!r}: '[' without ']' in {expr[start:]!r}")
    parts.append(expr[start:])
    return parts


def _group(part: str, body: str) -> tuple[str, ...]:
    """The numbers of one bracket group's ``body`` (``01-03,7``), as text, in order."""
    out: list[str] = []
    for item in body.split(","):
        m = _RANGE.fullmatch(item)
        if not m:
            raise ValueError(f"{part!r}: {item!r} is not a number or a range LOW-HIGH")
        lo_text, hi_text = m.group(1), m.group(2) or m.group(1)
        lo, hi = int(lo_text), int(hi_text)
        if hi < lo:
            raise ValueError(f"{part!r}: the range {item!r} runs backwards")
        if len(out) + hi - lo + 1 > MAX_NAMES:
            raise ValueError(f"{part!r}: more than {MAX_NAMES} numbers in one bracket")
        width = len(lo_text)
        out += [str(n).zfill(width) for n in range(lo, hi + 1)]
    return tuple(out)


def _name(part: str) -> tuple[list[str], list[tuple[str, ...]]]:
    """One name expression cut into its literal texts and bracket groups:
    ``a[1-2]-b[3-4]`` -> (["a", "-b"], [("1", "2"), ("3", "4")]); a name without brackets is
    ([name], [])."""
    if not part:
        raise ValueError("an empty name (two commas in a row, or one at an end)")
    literals, groups, pos = [], [], 0
    for m in re.finditer(r"\[([^\]]*)\]", part):
        text = part[pos:m.start()]
        if text and not _LITERAL.fullmatch(text):
            raise ValueError(f"{part!r}: {text!r} is not part of a node name (letters, digits, "
                             f"'.', '_', '-')")
        if not text and not groups:
            raise ValueError(f"{part!r}: a name cannot start with a bracket")
        literals.append(text)
        groups.append(_group(part, m.group(1)))
        pos = m.end()
    rest = part[pos:]
    if groups and rest:
        raise ValueError(f"{part!r}: text {rest!r} after the last bracket (Slurm refuses it)")
    if not groups:
        if not _LITERAL.fullmatch(part) or not part[0].isalnum():
            raise ValueError(f"{part!r} is not a node name (letters, digits, '.', '_', '-', "
                             f"starting with a letter or digit)")
        literals.append(part)
    elif not part[0].isalnum():
        raise ValueError(f"{part!r}: a node name starts with a letter or digit")
    return literals, groups


def _expand_name(literals: list[str], groups: list[tuple[str, ...]]) -> list[str]:
    """Every name of one expression, in Slurm's order: the last group varies fastest, then the
    first, the second, ... (``x[1-2]y[1-2]z[1-2]`` -> x1y1z1 x1y1z2 x2y1z1 x2y1z2 x1y2z1 ...):
    Slurm 22.05's hostlist expands a name's groups that way."""
    if not groups:
        return [literals[0]]
    k = len(groups)
    # loop order from the outermost: group k-2, k-3, ..., 0, then k-1 innermost
    order = list(range(k - 2, -1, -1)) + [k - 1]
    picks: list[dict[int, str]] = [{}]
    for g in order:
        picks = [{**p, g: n} for p in picks for n in groups[g]]
    return ["".join(lit + p[i] for i, lit in enumerate(literals)) for p in picks]


def expand(expr: str) -> tuple[str, ...]:
    """Every node name of the hostlist ``expr``, in order (a name listed twice stays twice).

    ``expand("dgx[01-03,07],login1")`` -> ("dgx01", "dgx02", "dgx03", "dgx07", "login1").
    Raises ValueError naming the bad part: bad syntax (see the module), an empty expression,
    more than :data:`MAX_NAMES` names."""
    if not isinstance(expr, str) or not expr:
        raise ValueError(f"{expr!r}: an empty hostlist")
    parsed, total = [], 0
    for part in _split_top(expr):
        try:
            literals, groups = _name(part)
        except ValueError as exc:
            raise ValueError(f"{expr[:200]!r}: {exc}" if not part else str(exc)) from None
        parsed.append((literals, groups))
        count = 1
        for g in groups:
            count *= len(g)
        total += count
        if total > MAX_NAMES:
            raise ValueError(f"{expr[:80]!r}: more than {MAX_NAMES} names")
    out: list[str] = []
    for literals, groups in parsed:
        out += _expand_name(literals, groups)
    return tuple(out)


__all__ = ["MAX_NAMES", "expand"]
