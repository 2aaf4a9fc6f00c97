"""Fake sysfs trees of real DGX machines (``dgxvm simulate``), and GPU faults injected into them."""

from .faults import KINDS as FAULT_KINDS
from .faults import inject, inject_all, parse_fault
from .machines import MACHINES
from .sysfs_tree import render

__all__ = ["FAULT_KINDS", "MACHINES", "inject", "inject_all", "parse_fault", "render"]
