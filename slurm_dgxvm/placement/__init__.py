"""Placement: pure functions from (host, what is taken, request) to a frozen Placement."""

from .model import EMPTY, NumaCell, Occupancy, Placement, Request
from .place import place
from .sizing import Policy, Template, templates

__all__ = ["place", "Policy", "Request", "Placement", "Occupancy", "NumaCell", "EMPTY",
           "Template", "templates"]
