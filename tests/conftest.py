"""Shared fixtures: simulated sysfs trees of the three DGX machines, rendered once per session.

``machine`` is a fixture (default ``dgx2``) that tests override with
``@pytest.mark.parametrize("machine", [...])``; ``tree`` and ``host`` follow it. The trees are
shared by every test of the session: never change them (copy or render a private one).

No skips in CI: with ``DGXVM_NO_SKIP=1`` (tests/run sets it) or ``CI`` set (not ``false``/``0``)
a session in which any test or module was skipped ends with a non-zero status, naming each one
and why. A skip is a test that proved nothing; in CI every test must run.
"""

from __future__ import annotations

import os
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



# -- no skips in CI -----------------------------------------------------------------------------
def _skips_fail() -> bool:
    ci = os.environ.get("CI", "").strip().lower()
    return os.environ.get("DGXVM_NO_SKIP") == "1" or ci not in ("", "0", "false", "no")


_SKIPPED: list[tuple[str, str]] = []   # (node id, reason) of every skip this session


def _reason(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:   # (path, line, "Skipped: why")
        return f"{longrepr[2]} ({longrepr[0]}:{longrepr[1]})"
    return str(longrepr)


def pytest_runtest_logreport(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        _SKIPPED.append((report.nodeid, _reason(report)))


def pytest_collectreport(report):
    if report.skipped:   # a whole module skipped (pytest.skip(allow_module_level=True) & co.)
        _SKIPPED.append((report.nodeid or "(collection)", _reason(report)))


def pytest_terminal_summary(terminalreporter):
    if _SKIPPED and _skips_fail():
        terminalreporter.write_sep("=", f"{len(_SKIPPED)} skipped: a skip fails this run "
                                        "(DGXVM_NO_SKIP=1 or CI)", red=True)
        for nodeid, reason in _SKIPPED:
            terminalreporter.write_line(f"SKIPPED {nodeid}: {reason}")


def pytest_sessionfinish(session, exitstatus):
    if _SKIPPED and _skips_fail() and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
