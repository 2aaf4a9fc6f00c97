"""errors.py: every error slurm-dgxvm raises lives there."""

from __future__ import annotations

import importlib
import pkgutil

import slurm_dgxvm
from slurm_dgxvm import errors
from slurm_dgxvm.errors import DgxvmError


def _subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def test_every_error_class_is_defined_in_errors_py():
    """No module keeps an error of its own (importing every module of the package finds them)."""
    for info in pkgutil.walk_packages(slurm_dgxvm.__path__, "slurm_dgxvm."):
        importlib.import_module(info.name)
    elsewhere = [f"{cls.__module__}.{cls.__name__}" for cls in _subclasses(DgxvmError)
                 if cls.__module__ != errors.__name__]
    assert elsewhere == []

