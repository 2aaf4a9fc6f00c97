"""click parameter types that validate at the edge and name the bad value."""

from __future__ import annotations

import re

import click

from ..errors import GpuListError
from ..ranges import parse_index_list

_SIZE = re.compile(r"^(\d+)\s*([KMGT]i?B?|[KMGT])?$", re.IGNORECASE)
_FACTOR_KIB = {"K": 1, "M": 1024, "G": 1024 ** 2, "T": 1024 ** 3}


class GpuList(click.ParamType):
    """``0-3,8`` -> (0, 1, 2, 3, 8); rejects ``x``, ``-1``, duplicates, empty."""

    name = "GPU_LIST"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            return parse_index_list(str(value))
        except GpuListError as exc:
            self.fail(str(exc), param, ctx)


class Size(click.ParamType):
    """A size such as ``64G``, ``512M`` or ``65536``; converted to ``unit`` (a bare number is
    already in ``unit``)."""

    name = "SIZE"

    def __init__(self, unit: str):
        self.unit = unit

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        m = _SIZE.match(str(value).strip())
        if not m:
            self.fail(f"{value!r} is not a size like 64G, 512M or a number of {self.unit}iB",
                      param, ctx)
        number, suffix = int(m.group(1)), (m.group(2) or self.unit)[0].upper()
        kib = number * _FACTOR_KIB[suffix]
        unit_kib = _FACTOR_KIB[self.unit]
        if kib % unit_kib:
            self.fail(f"{value!r} is not a whole number of {self.unit}iB", param, ctx)
        return kib // unit_kib


GPU_LIST = GpuList()
MIB = Size("M")
GIB = Size("G")
