"""Shared fixtures: simulated sysfs trees of the three DGX machines, rendered once per session.

``machine`` is a fixture (default ``dgx2``) that tests override with
``@pytest.mark.parametrize("machine", [...])``; ``tree`` and ``host`` follow it. The trees are
shared by every test of the session: never change them (copy or render a private one).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from slurm_dgxvm.simulate import render
from slurm_dgxvm.topology import SysfsRoot, discover

MACHINES = ("dgx2", "dgx-a100", "dgx-h100")
DEGRADED = "dgx2-degraded"
DEGRADED_MISSING = "0000:39:00.0"
DEGRADED_UNKNOWN_NUMA = "0000:b7:00.0"


@pytest.fixture(scope="session")
def trees(tmp_path_factory) -> dict[str, Path]:
    """``{machine: rendered sysfs root}`` for dgx2, dgx-a100, dgx-h100 and dgx2-degraded."""
    base = tmp_path_factory.mktemp("sysfs")
    out = {key: render(key, base / key) for key in MACHINES}
    out[DEGRADED] = render("dgx2", base / DEGRADED, missing_gpus=(DEGRADED_MISSING,),
                           unknown_numa=(DEGRADED_UNKNOWN_NUMA,))
    return out


@pytest.fixture(scope="session")
def _hosts(trees) -> dict:
    """Discovery is deterministic and Host is frozen: discover each tree once."""
    return {}


@pytest.fixture
def machine() -> str:
    return "dgx2"


@pytest.fixture
def tree(trees, machine) -> Path:
    return trees[machine]


@pytest.fixture
def host(_hosts, tree, machine):
    if machine not in _hosts:
        _hosts[machine] = discover(SysfsRoot(tree))
    return _hosts[machine]

