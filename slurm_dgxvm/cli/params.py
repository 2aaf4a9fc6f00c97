"""click parameter types that validate at the edge and name the bad value; and the flags that
placement's errors name."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator

import click

from ..errors import GpuListError, QuantityNamed
from ..names import path_problem
from ..ranges import parse_index_list

_SIZE = re.compile(r"^(\d+)\s*([KMGT]i?B?|[KMGT])?$", re.IGNORECASE)
_FACTOR_KIB = {"K": 1, "M": 1024, "G": 1024 ** 2, "T": 1024 ** 3}
_MAX_KIB = 1024 ** 4          # 1 PiB: no VM is larger; a bigger number is a typo, not a request


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
        if len(m.group(1)) > 20:
            self.fail(f"{value!r} is larger than 1P", param, ctx)
        number, suffix = int(m.group(1)), (m.group(2) or self.unit)[0].upper()
        kib = number * _FACTOR_KIB[suffix]
        if kib > _MAX_KIB:
            self.fail(f"{value!r} is larger than 1P", param, ctx)
        unit_kib = _FACTOR_KIB[self.unit]
        if kib % unit_kib:
            self.fail(f"{value!r} is not a whole number of {self.unit}iB", param, ctx)
        return kib // unit_kib


class WorkDir(click.Path):
    """An existing directory, made absolute, that a seed and a guest can carry: UTF-8, no
    control character (spaces, quotes and non-ASCII letters are fine). Symlinks are NOT
    resolved: the share policy refuses a path with a symlink component, naming it."""

    def __init__(self):
        super().__init__(exists=True, file_okay=False)

    def convert(self, value, param, ctx):
        path = os.path.abspath(super().convert(value, param, ctx))
        problem = path_problem(str(path))
        if problem:
            self.fail(f"{str(path)!r}: {problem}", param, ctx)
        return path


#: The flag of ``dgxvm plan`` and ``dgxvm create`` that sets each quantity of a placement request.
REQUEST_FLAGS = {"gpu_index": "--gpu-index", "vcpus": "--vcpus", "memory_mib": "--memory",
                 "disk_gib": "--disk-size", "ib": "--ib"}


@contextlib.contextmanager
def request_flags() -> Iterator[None]:
    """Placement names a quantity (``vcpus 5``); in the block, its error names the flag that
    gave it (``--vcpus 5``)."""
    try:
        yield
    except QuantityNamed as exc:
        flag = REQUEST_FLAGS.get(exc.quantity)
        if flag is None:
            raise
        raise exc.naming(f"{flag} {exc.amount}") from None


GPU_LIST = GpuList()
MIB = Size("M")
GIB = Size("G")
