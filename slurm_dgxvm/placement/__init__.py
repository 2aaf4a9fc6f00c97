"""Placement: pure functions from (host, what is taken, request) to a frozen Placement.

The names are imported from their submodules on first use (:mod:`slurm_dgxvm.lazy`): the
ledger and the VM records, which ``dgxvm run`` reads, need only :mod:`.model`, not the placer
and the sizing rules with the host topology they import."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

if TYPE_CHECKING:
    from .model import EMPTY, IB_MODES, IbFunction, NumaCell, Occupancy, Placement, Request
    from .place import place
    from .sizing import Policy, Template, templates

__all__ = ["place", "Policy", "Request", "Placement", "Occupancy", "NumaCell", "EMPTY",
           "IB_MODES", "IbFunction", "Template", "templates"]

__getattr__, __dir__ = lazy_exports(__name__, {
    "EMPTY": "model", "IB_MODES": "model", "IbFunction": "model", "NumaCell": "model",
    "Occupancy": "model", "Placement": "model", "Request": "model",
    "place": "place",
    "Policy": "sizing", "Template": "sizing", "templates": "sizing",
})
