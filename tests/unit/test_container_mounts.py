"""--container-mounts as pyxis takes it (SRC[:DST[:FLAGS]], ',' between entries, '+' between
flags), and every entry dgxvm will not mount refused naming it (exit 2)."""

from __future__ import annotations

import pytest

from slurm_dgxvm.containers.mounts import Mount, parse
from slurm_dgxvm.errors import ContainerMountError


def test_the_issues_example_and_pyxis_forms():
    assert parse("/scratch/data:/data:ro") == (
        Mount("/scratch/data", "/data", read_only=True, flags=("ro",)),)
    assert parse("/home/alice/work,/etc/os-release:/host/os-release,/d:/e:ro+rprivate") == (
        Mount("/home/alice/work", "/home/alice/work"),
        Mount("/etc/os-release", "/host/os-release"),
        Mount("/d", "/e", read_only=True, flags=("ro", "rprivate")))
    assert parse("/a/b/:/c//d/") == (Mount("/a/b", "/c/d"),)       # normalised, not refused
    assert parse("/d:/e:") == (Mount("/d", "/e"),)
    assert str(parse("/d:/e:ro+rprivate")[0]) == "/d:/e:ro+rprivate"
    assert parse("/home/a b/ü:/w")[0].source == "/home/a b/ü"      # as given


@pytest.mark.parametrize("text, entry, named", [
    ("", "", "an argument is required"),
    ("/a,", "", "source '' is empty"),
    ("data:/data", "data:/data", "source 'data' is not an absolute path"),
    ("/data:data", "/data:data", "destination 'data' is not an absolute path"),
    ("/data:/", "/data:/", "the destination cannot be /"),
    ("/", "/", "the destination cannot be /"),
    ("/data://", "/data://", "the destination cannot be /"),
    ("//", "//", "the destination cannot be /"),
    ("/x/../etc:/etc2", "/x/../etc:/etc2", "'..' component"),
    ("/x:/y/./z", "/x:/y/./z", "'.' or '..' component"),
    ("/x:/y:ro:extra", "/x:/y:ro:extra", "more than SRC:DST:FLAGS"),
    ("/x:/y:suid", "/x:/y:suid", "flag(s) 'suid' not allowed"),
    ("/x:/y:ro+dev+exec", "/x:/y:ro+dev+exec", "'dev', 'exec' not allowed"),
    ("/x:/y:ro+rw", "/x:/y:ro+rw", "both ro and rw"),
    ("/x\n:/y", "/x\n:/y", "control characters"),
    ("/a:/data,/b:/data/", "/b:/data", "/data is already the destination of /a:/data"),
])
def test_what_dgxvm_will_not_mount_is_refused_naming_the_entry(text, entry, named):
    with pytest.raises(ContainerMountError) as info:
        parse(text)
    assert named in str(info.value) and f"entry {entry!r}" in str(info.value)
    assert info.value.exit_code == 2
