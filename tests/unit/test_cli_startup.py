"""What ``dgxvm run``, ``dgxvm shell`` and ``dgxvm job`` import.

Every task of a job runs ``dgxvm run``, so its start-up is the user's wait: it must not import
what only the verbs that make and unmake VMs use (libvirt, jinja2, the designer, the lifecycle's
create and delete, the host topology and the placer, the image store, filelock). A structural
check in a fresh interpreter, never a timing (timings are noisy): cli.main loads the other
modules' commands when they are looked up, lifecycle and placement import their names on first
use, and lifecycle.env, slurm.job and fsutil import the heavy parts where they are used.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest

from slurm_dgxvm.cli.main import cli

REPO = Path(__file__).resolve().parents[2]

NOT_FOR_RUN = ("libvirt", "jinja2", "filelock", "slurm_dgxvm.design", "slurm_dgxvm.virt.hypervisor",
               "slurm_dgxvm.lifecycle.create", "slurm_dgxvm.lifecycle.delete",
               "slurm_dgxvm.placement.place", "slurm_dgxvm.topology", "slurm_dgxvm.images")

PROBE = """
import json, sys
from slurm_dgxvm.cli.main import main
rc = main(sys.argv[2:])
prefixes = tuple(json.loads(sys.argv[1]))
print(json.dumps({"rc": rc, "modules": sorted(sys.modules),
                  "heavy": sorted(m for m in sys.modules if m.startswith(prefixes))}))
"""


def probe(tmp_path, *argv: str) -> dict:
    """``dgxvm ARGV`` in a fresh interpreter: its exit code, what it imported, and which of
    NOT_FOR_RUN; no job in the environment, an empty config, an empty state dir."""
    cfg = tmp_path / "dgxvm.toml"
    cfg.write_text("")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DGXVM_", "SLURM_"))} | {"PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", PROBE, json.dumps(NOT_FOR_RUN), "--config",
                        str(cfg), "--state-dir", str(tmp_path / "state"), *argv],
                       capture_output=True, text=True, cwd="/", env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.splitlines()[-1])


@pytest.mark.parametrize("argv, rc", [
    (("run", "--", "true"), 125),                   # no job: fails before reading any record
    (("run", "--job", "5", "--", "true"), 125),     # reads the VM records: no VM of job 5
    (("run", "--help"), 0),
    (("shell", "--job", "5"), 125),
    (("job", "--job", "5"), 2),
])
def test_the_job_verbs_do_not_import_the_vm_makers(tmp_path, argv, rc):
    seen = probe(tmp_path, *argv)
    assert seen["rc"] == rc
    assert seen["heavy"] == []
    # not vacuous: the verb's own module, and for --job the VM records, were imported
    assert ("slurm_dgxvm.cli.slurm" if argv[0] == "job" else "slurm_dgxvm.cli.run") in seen["modules"]
    if "--job" in argv:
        assert {"slurm_dgxvm.access.target", "slurm_dgxvm.records"} <= set(seen["modules"])


def test_every_command_is_listed_and_loads_under_its_name():
    """cli.main names the other modules' commands itself (LAZY_COMMANDS): each of their
    commands is there, under its own name, and help lists them with the ones main defines."""
    from slurm_dgxvm.cli import (gpu, host as host_cli, image_cache, images, metrics, reconcile,
                                 run as run_cli, share, simulate, slurm as slurm_cli,
                                 topology, version, vms, warm)
    theirs = {c.name: c for c in (*vms.COMMANDS, *slurm_cli.COMMANDS, *run_cli.COMMANDS,
                                  *metrics.COMMANDS, *reconcile.COMMANDS, *gpu.COMMANDS,
                                  images.image, host_cli.host,
                                  image_cache.image_cache, *topology.COMMANDS,
                                  *simulate.COMMANDS, *share.COMMANDS, *version.COMMANDS,
                                      warm.warm)}
    ctx = click.Context(cli)
    for name, command in theirs.items():
        assert cli.get_command(ctx, name) is command
    names = cli.list_commands(ctx)
    assert names == sorted(set(theirs) | set(cli.commands))
    assert cli.get_command(ctx, "nope") is None


def test_help_lists_every_visible_command_with_its_short_help():
    from click.testing import CliRunner
    out = CliRunner().invoke(cli, ["--help"], terminal_width=100).output
    listed = out.split("Commands:\n", 1)[1]
    ctx = click.Context(cli)
    for name in cli.list_commands(ctx):
        command = cli.get_command(ctx, name)
        if command.hidden:
            assert f"  {name} " not in listed
        else:
            assert f"  {name} " in listed
            assert command.get_short_help_str(limit=45)[:20] in listed
