"""jobnet.hostlist: Slurm's hostlist syntax, expanded as ``scontrol show hostnames`` does.

The good expressions are compared with Slurm's own expansion (scontrol parses locally; it only
needs a slurm.conf to read, no daemon); the bad ones are a table, each refused naming the part
at fault."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from slurm_dgxvm.jobnet.hostlist import MAX_NAMES, expand

GOOD = [
    "dgx01",
    "dgx[01-03,07],login1",
    "n[8-11]",                      # widths grow past the first number's
    "n[08-11]",                     # padding: the first number's width
    "n[098-101]",
    "n[8-011]",                     # the width is the low bound's, not the high one's
    "n[00-02]",
    "n0[1-2]",
    "n[2-3,1]",                     # order kept, not sorted
    "b1,a1,b1",                     # duplicates kept (plan refuses them)
    "a[1-2]-b[3-4]",                # two groups
    "a[1-2]b[1-3]",
    "a[1-3]b[1-2]c[1-2]",           # three: Slurm's own order, not the plain product
    "x[1-2]y[1-2]z[1-2]w[1-2]",
    "n[1,3-4]m[7,5]",
    "n[1-2],m[5,7-8],login",
    "a-b[1-2]",
    "node.rack1[1-2]",
    "N_x[1-2]",
    "n[0-299]",
]


@pytest.fixture(scope="module")
def scontrol(tmp_path_factory):
    exe = shutil.which("scontrol")
    if exe is None:
        pytest.skip("scontrol is not installed (Debian: slurm-client)")
    conf = tmp_path_factory.mktemp("slurm") / "slurm.conf"
    conf.write_text("ClusterName=hostlist\nSlurmctldHost=localhost\nNodeName=n1\n"
                    "PartitionName=p Nodes=n1\n")

    def show(expr: str) -> tuple[str, ...]:
        r = subprocess.run([exe, "show", "hostnames", expr], capture_output=True, text=True,
                           timeout=30, env={"SLURM_CONF": str(conf), "PATH": "/usr/bin:/bin"},
                           check=True)
        return tuple(r.stdout.split())
    return show


@pytest.mark.parametrize("expr", GOOD)
def test_expansion_is_slurms(scontrol, expr):
    assert expand(expr) == scontrol(expr)


def test_a_simple_list_and_padding():
    assert expand("dgx[01-03,07],login1") == ("dgx01", "dgx02", "dgx03", "dgx07", "login1")
    assert expand("a[1-2]-b[3-4]") == ("a1-b3", "a1-b4", "a2-b3", "a2-b4")


@pytest.mark.parametrize("expr, part", [
    ("", "empty"),
    ("n[1-2", "'n[1-2'"),                   # unclosed
    ("n1-2]", "'n1-2]'"),                   # no opening bracket
    ("n[[1-2]]", "'n[['"),                  # nested
    ("n[3-1]", "'3-1' runs backwards"),
    ("n[]", "''"),
    ("n[1-]", "'1-'"),                      # Slurm takes it as n1; refused here
    ("n[+1]", "'+1'"),                      # Slurm takes it as n01
    ("n[-1]", "'-1'"),
    ("n[1-2,]", "''"),
    ("x[a-b]", "'a-b'"),
    ("n[1-3]x", "'x' after the last bracket"),
    ("n1,,n2", "'n1,,n2'"),                 # an empty name
    ("n1,", "'n1,'"),
    ("n 1", "'n 1'"),                       # Slurm splits at spaces; refused here
    ("n1;reboot", "'n1;reboot'"),
    ("[1-2]", "'[1-2]'"),
    ("-n1", "'-n1'"),
    ("n/1", "'n/1'"),
    ("n[0-65536]", f"more than {MAX_NAMES}"),
    ("n[0-300]m[0-300]", f"more than {MAX_NAMES}"),
    ("a[0-40000],b[0-40000]", f"more than {MAX_NAMES}"),
    ("n[" + ",".join(["0-65535"] * 3) + "]", f"more than {MAX_NAMES}"),
])
def test_bad_hostlists_are_refused_naming_the_bad_part(expr, part):
    with pytest.raises(ValueError) as err:
        expand(expr)
    assert part in str(err.value)


def test_the_cap_is_on_the_total():
    assert len(expand(f"n[1-{MAX_NAMES}]")) == MAX_NAMES
    with pytest.raises(ValueError, match="more than"):
        expand(f"n[1-{MAX_NAMES}],m1")
