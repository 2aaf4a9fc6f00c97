"""Fake sysfs trees of real DGX machines (``dgxvm simulate``)."""

from .machines import MACHINES
from .render import render

__all__ = ["MACHINES", "render"]
