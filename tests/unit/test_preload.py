"""A package upgrade under a running Prolog: the files of a copy of the package are replaced
the way dpkg replaces them (a new file renamed over the old) while a process runs. A process
that preloaded goes on with the version it started with; one that did not imports the new
version half-way (the hazard preload exists for)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import slurm_dgxvm
from slurm_dgxvm import preload as P

PACKAGE_DIR = Path(slurm_dgxvm.__file__).resolve().parent

# The late steps of a long command: a module first imported on an error path, a template
# rendered, the guest helper written into a seed.
CHILD = r"""
import sys
preload = sys.argv[1] == "preload"
if preload:
    from slurm_dgxvm.preload import load_everything
    load_everything()
else:
    import slurm_dgxvm.cli.main      # what any command has imported by the time it runs
print("started", flush=True)
sys.stdin.readline()                 # the test upgrades the package meanwhile
from slurm_dgxvm.access.target import view_for
from slurm_dgxvm.design.domain_xml import _env
from slurm_dgxvm.seed import guest_helper
print("template", _env().get_template("network.xml.j2").render(
    name="n", gateway="10.0.0.1", netmask="255.255.255.0", range_start="10.0.0.2",
    range_end="10.0.0.9", hosts=[], lease_min=10).split()[0])
print("helper", "of version 2" if "version 2" in guest_helper() else "as started")
"""


def _copy_package(dest: Path) -> Path:
    shutil.copytree(PACKAGE_DIR, dest / "slurm_dgxvm",
                    ignore=shutil.ignore_patterns("__pycache__"))
    return dest / "slurm_dgxvm"


def _upgrade(pkg: Path) -> None:
    """Version 2 lands as dpkg lands it: each file written beside, then renamed over the old.
    Every module of version 2 fails on import; its templates and guest helper differ."""
    for path in sorted(pkg.rglob("*")):
        if path.is_dir() or "__pycache__" in path.parts:
            continue
        if path.suffix == ".py":
            text = 'raise RuntimeError("version 2 of ' + path.name + ' imported")\n'
        else:
            text = "#!/bin/sh\n# version 2\n{{ version_2_only }}\n"
        new = path.with_name(path.name + ".dpkg-new")
        new.write_text(text)
        os.replace(new, path)


def _run_child(tmp_path: Path, mode: str) -> str:
    pkg = _copy_package(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, mode], cwd=tmp_path, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout.readline().strip() == "started"
        _upgrade(pkg)
        out, _ = proc.communicate("go\n", timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return out


def test_a_preloaded_command_finishes_on_the_version_it_started_with(tmp_path):
    out = _run_child(tmp_path, "preload")
    assert "version 2" not in out, out
    assert "template <network" in out, out
    assert "helper as started" in out, out


def test_without_preload_an_upgrade_mid_command_mixes_in_the_new_version(tmp_path):
    """The control: the same steps without the preload import version 2 half-way."""
    out = _run_child(tmp_path, "lazy")
    assert "RuntimeError: version 2 of" in out, out


def test_files_changed_during_the_preload_start_the_command_again(monkeypatch):
    calls = []
    snapshots = iter([{"a": (1, 1)}, {"a": (2, 2)}])    # before, after: an upgrade landed
    monkeypatch.setattr(P, "_files", lambda root: next(snapshots))
    monkeypatch.setattr(P, "load_everything", lambda: [])
    monkeypatch.delenv(P.RESTARTS_ENV, raising=False)
    P.preload(execv=lambda exe, argv: calls.append((exe, argv)))
    assert calls == [(sys.executable, list(sys.orig_argv))]
    assert os.environ[P.RESTARTS_ENV] == "1"


def test_a_package_that_keeps_changing_is_restarted_at_most_three_times(monkeypatch):
    calls = []
    monkeypatch.setattr(P, "_files", lambda root: {"a": (len(calls), 0), "n": object()})
    monkeypatch.setattr(P, "load_everything", lambda: [])
    monkeypatch.setenv(P.RESTARTS_ENV, str(P.MAX_RESTARTS))
    P.preload(execv=lambda exe, argv: calls.append(argv))
    assert calls == []


def test_an_unchanged_package_is_not_restarted(monkeypatch):
    monkeypatch.setattr(P, "load_everything", lambda: [])
    P.preload(execv=lambda exe, argv: pytest.fail("restarted"))


def test_every_module_of_the_package_loads(monkeypatch):
    assert P.load_everything() == []
    assert "slurm_dgxvm.access.target" in sys.modules


@pytest.mark.parametrize("argv, preloaded", [
    (["epilog"], True), (["prolog"], True), (["delete", "--domain", "x"], True),
    (["list"], False), (["topology", "show"], False), (["run", "--", "true"], False),
])
def test_the_node_changing_commands_preload_and_the_quick_ones_do_not(monkeypatch, argv,
                                                                       preloaded, tmp_path):
    from slurm_dgxvm.cli.main import main
    seen = []
    monkeypatch.setattr(P, "preload", lambda: seen.append(argv[0]))
    monkeypatch.setenv("DGXVM_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("DGXVM_CONFIG", str(tmp_path / "absent.toml"))
    main(argv)   # each fails later for want of a job or a host: only the preload matters here
    assert seen == ([argv[0]] if preloaded else [])
