"""access.request: what a command run in the VM sees (argv, environment, cwd), as the sh script
the guest helper sources; quoting proven through real shells (dash and busybox sh)."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slurm_dgxvm.access.request import (GUEST_PATH, Request, guest_cwd, guest_environment, passes,
                                        quote)
from slurm_dgxvm.errors import JobInputError

BUSYBOX = "/bin/busybox"


def _shells() -> list[list[str]]:
    out = []
    dash = shutil.which("dash")
    if dash:
        out.append([dash])
    if os.access(BUSYBOX, os.X_OK):
        out.append([BUSYBOX, "sh"])
    return out


SHELLS = _shells()
SHELL_IDS = [os.path.basename(s[0]) for s in SHELLS]


def test_both_shells_are_here():
    assert len(SHELLS) == 2, "dash and busybox (busybox-static) are both needed"


def sh(shell: list[str], script: bytes, env: dict | None = None, cwd=None) -> bytes:
    return subprocess.run([*shell, "-c", script], check=True, capture_output=True, env=env,
                          cwd=cwd).stdout


HOSTILE = ["", "'", "''", "a'b", "'\\''", "\\", "\\'", "\\\\n", "\n", "a\nb\n", "$(echo pwned)",
           "`echo pwned`", "${HOME}", "$0", "*", "?[a]", "~", "a b\tc", "!x", '"', '"\'"',
           "-n", "--", "\x01\x7f", "ünïcödé ✓", os.fsdecode(b"\xff\xfe\x80 not utf-8"),
           "; rm -rf /tmp/nothing", "|&<>()"]


# -- quote -------------------------------------------------------------------------------------
@pytest.mark.parametrize("shell", SHELLS, ids=SHELL_IDS)
@pytest.mark.parametrize("value", HOSTILE)
def test_quote_round_trips_through_sh(shell, value):
    assert sh(shell, b"printf '%s' " + quote(value)) == os.fsencode(value)


@pytest.mark.parametrize("shell", SHELLS, ids=SHELL_IDS)
def test_quote_bytes_round_trip(shell):
    raw = bytes(b for b in range(1, 256))
    assert sh(shell, b"printf '%s' " + quote(raw)) == raw


def test_quote_is_one_single_quoted_word():
    assert quote("plain") == b"'plain'"
    assert quote("it's") == b"'it'\\''s'"
    assert quote(b"\xff") == b"'\xff'"
    assert quote(os.fsdecode(b"\xff")) == b"'\xff'"   # surrogateescape keeps the byte


@pytest.mark.parametrize("shell", SHELLS, ids=SHELL_IDS)
@settings(max_examples=40, deadline=None)
# text()'s own alphabet has no surrogates (Cs), in Debian 12's Hypothesis (6.67) and in today's;
# characters(exclude_categories=...) is newer than 6.67, which spells it blacklist_categories
@given(values=st.lists(st.text().filter(lambda s: "\x00" not in s) |
                       st.binary().filter(lambda b: b"\x00" not in b), max_size=6))
def test_quote_round_trips_anything(shell, values):
    script = b"set -- " + b" ".join(quote(v) for v in values) + b'; printf "%s\\0" "$#" "$@"'
    want = [str(len(values)).encode(), *(v if isinstance(v, bytes) else os.fsencode(v)
                                         for v in values)]
    assert sh(shell, script).split(b"\0")[:-1] == want


# -- the environment ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["PATH", "HOME", "USER", "LOGNAME", "SHELL", "PWD", "OLDPWD",
                                  "SHLVL", "_", "TMPDIR", "DISPLAY", "SSH_AUTH_SOCK",
                                  "SSH_CONNECTION", "SSH_TTY", "LD_PRELOAD", "LD_LIBRARY_PATH",
                                  "XDG_RUNTIME_DIR", "XDG_SESSION_ID", "DGXVM_CONFIG",
                                  "DGXVM_STATE_DIR", "BASH_FUNC_x%%", "BASH_FUNC_module%%",
                                  "1ABC", "A-B", "A.B", "", "A B", "é"])
def test_host_only_and_unexportable_names_are_dropped(name):
    assert not passes(name)


@pytest.mark.parametrize("name", ["SLURM_JOB_ID", "SLURM_PROCID", "OMP_NUM_THREADS", "LANG",
                                  "LC_ALL", "TERM", "NCCL_DEBUG", "CUDA_VISIBLE_DEVICES",
                                  "PATH_EXTRA", "HOMEDIR", "SSH", "LD", "_X", "a", "MY_VAR2"])
def test_other_names_pass(name):
    assert passes(name)


def test_guest_environment_drops_keeps_and_replaces_path():
    environ = {"PATH": "/host/bin", "HOME": "/home/host", "SSH_AUTH_SOCK": "/tmp/agent",
               "LD_PRELOAD": "/lib/evil.so", "XDG_RUNTIME_DIR": "/run/user/1",
               "DGXVM_CONFIG": "/etc/x", "BASH_FUNC_x%%": "() { :; }", "A-B": "1",
               "SLURM_JOB_ID": "42", "OMP_NUM_THREADS": "8", "MULTI": "a\nb 'c' $(d)",
               "EMPTY": ""}
    before = dict(environ)
    env = guest_environment(environ, (), relative=False)
    assert env == {"SLURM_JOB_ID": "42", "OMP_NUM_THREADS": "8", "MULTI": "a\nb 'c' $(d)",
                   "EMPTY": "", "PATH": GUEST_PATH}
    assert environ == before


def test_guest_path_without_a_host_path():
    assert guest_environment({}, (), relative=False) == {"PATH": GUEST_PATH}


def test_gpu_variables_are_translated_host_indices():
    environ = {"SLURM_JOB_GPUS": "4,5", "SLURM_STEP_GPUS": "5", "CUDA_VISIBLE_DEVICES": "5",
               "GPU_DEVICE_ORDINAL": "5,4"}
    env = guest_environment(environ, (4, 5), relative=False)
    assert {k: env[k] for k in environ} == {"SLURM_JOB_GPUS": "0,1", "SLURM_STEP_GPUS": "1",
                                            "CUDA_VISIBLE_DEVICES": "1",
                                            "GPU_DEVICE_ORDINAL": "1,0"}


def test_gpu_variables_already_relative_stay():
    environ = {"SLURM_JOB_GPUS": "4,5", "CUDA_VISIBLE_DEVICES": "1",
               "GPU_DEVICE_ORDINAL": "0,1"}
    env = guest_environment(environ, (4, 5), relative=True)
    assert (env["SLURM_JOB_GPUS"], env["CUDA_VISIBLE_DEVICES"], env["GPU_DEVICE_ORDINAL"]) == (
        "0,1", "1", "0,1")


def test_gpu_uuids_and_empty_values_stay():
    environ = {"CUDA_VISIBLE_DEVICES": "GPU-1234,MIG-abcd", "SLURM_STEP_GPUS": ""}
    env = guest_environment(environ, (4, 5), relative=False)
    assert (env["CUDA_VISIBLE_DEVICES"], env["SLURM_STEP_GPUS"]) == ("GPU-1234,MIG-abcd", "")


def test_a_gpu_that_is_not_the_jobs_is_an_error():
    with pytest.raises(JobInputError) as e:
        guest_environment({"CUDA_VISIBLE_DEVICES": "7"}, (4, 5), relative=False)
    assert "CUDA_VISIBLE_DEVICES" in str(e.value)


# -- the working directory --------------------------------------------------------------------
@pytest.mark.parametrize(("cwd", "want"), [
    ("/w/run", "/w/run"),
    ("/w/run/", "/w/run"),
    ("/w/run/a/b", "/w/run/a/b"),
    ("/w/run/a/../b", "/w/run/b"),
    ("/w/run/./a//b/", "/w/run/a/b"),
    ("/w/runx", None),             # a sibling with the share's name as a prefix
    ("/w/runx/a", None),
    ("/w/run/../runx", None),
    ("/w", None),
    ("/", None),
    ("/elsewhere/w/run", None),
])
def test_guest_cwd(cwd, want):
    assert guest_cwd(cwd, ["/w/run"]) == want


def test_guest_cwd_shares_with_a_trailing_slash_and_several():
    assert guest_cwd("/w/run/a", ["/w/run/"]) == "/w/run/a"
    assert guest_cwd("/w/runx", ["/w/run/"]) is None
    assert guest_cwd("/scratch/j/x", ["/home/u", "/scratch/j"]) == "/scratch/j/x"
    assert guest_cwd("/home/u", []) is None
    assert guest_cwd("/anything", ["/"]) == "/anything"


# -- the script --------------------------------------------------------------------------------
READ_BACK = b'. "$REQ"; printf "%s\\0" "$PWD" "$#" "$@"; printf "%s\\0" "$A" "$B" "$EMPTY"'


def source(shell, req: Request, tmp_path: Path, home: Path | None = None) -> list[bytes]:
    f = tmp_path / "request.sh"
    f.write_bytes(req.script())
    env = {"REQ": str(f), "PATH": "/usr/bin:/bin"}
    if home is not None:
        env["HOME"] = str(home)
    return sh(shell, READ_BACK, env=env, cwd="/").split(b"\0")[:-1]


@pytest.mark.parametrize("shell", SHELLS, ids=SHELL_IDS)
def test_script_gives_argv_env_and_cwd_back(shell, tmp_path):
    work = tmp_path / "a dir 'with' $(quotes)\nand newline"
    work.mkdir()
    (work / "glob-target").touch()
    argv = ("python3", *HOSTILE)
    env = {"A": "x 'y' \"z\" $(no)\n`no`", "B": os.fsdecode(b"\xff\xfe"), "EMPTY": ""}
    got = source(shell, Request(argv=argv, env=env, cwd=str(work)), tmp_path)
    assert got == [os.fsencode(str(work)), str(len(argv)).encode(),
                   *(os.fsencode(a) for a in argv), os.fsencode(env["A"]), b"\xff\xfe", b""]
    assert sorted(p.name for p in work.iterdir()) == ["glob-target"]


@pytest.mark.parametrize("shell", SHELLS, ids=SHELL_IDS)
def test_script_without_cwd_goes_home_else_root(shell, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    req = Request(argv=("true",), env={}, cwd=None)
    assert source(shell, req, tmp_path, home=home)[0] == str(home).encode()
    assert source(shell, req, tmp_path, home=tmp_path / "absent")[0] == b"/"


@pytest.mark.parametrize("shell", SHELLS, ids=SHELL_IDS)
def test_script_with_an_unreachable_cwd_exits_125(shell, tmp_path):
    f = tmp_path / "request.sh"
    f.write_bytes(Request(argv=("x",), env={}, cwd=str(tmp_path / "gone")).script())
    p = subprocess.run([*shell, "-c", '. "$REQ"; echo reached'], capture_output=True,
                       env={"REQ": str(f), "PATH": "/usr/bin:/bin"})
    assert (p.returncode, p.stdout) == (125, b"")
    assert f"dgxvm run: {tmp_path / 'gone'} is not reachable in the VM".encode() in p.stderr


@pytest.mark.parametrize("shell", SHELLS, ids=SHELL_IDS)
def test_script_with_no_argv_sets_none(shell, tmp_path):
    got = source(shell, Request(argv=(), env={}, cwd=str(tmp_path)), tmp_path)
    assert got[:2] == [str(tmp_path).encode(), b"0"]


@pytest.mark.parametrize("shell", SHELLS, ids=SHELL_IDS)
def test_script_of_a_real_environment(shell, tmp_path):
    """guest_environment's output is always exportable (every name a shell identifier)."""
    environ = {**os.environ, "BASH_FUNC_x%%": "() { :; }", "A-B": "1", "A": "kept",
               "B": "also"}
    req = Request(argv=("true",), env=guest_environment(environ, (), relative=False),
                  cwd=str(tmp_path))
    assert source(shell, req, tmp_path)[0] == str(tmp_path).encode()


def test_line_is_one_base64_line_of_the_script():
    req = Request(argv=("a",) * 100, env={f"V{i}": "x" * 50 for i in range(50)}, cwd="/w")
    line = req.line()
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert base64.b64decode(line, validate=False) == req.script()
    assert base64.b64decode(line[:-1], validate=True) == req.script()
