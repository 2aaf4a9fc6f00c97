"""tools.run_tool: every way a tool fails becomes the caller's error with one line of reason."""

from __future__ import annotations

import pytest

from slurm_dgxvm.tools import output_tail, run_tool, tail


class ToolFailed(Exception):
    pass


def run(argv, **kw):
    return run_tool(argv, timeout=kw.pop("timeout", 10), error=ToolFailed, **kw)


def test_success_returns_the_output_in_the_c_locale():
    r = run(["sh", "-c", 'echo "$LC_ALL"; echo oops >&2'])
    assert r.stdout == "C\n" and r.stderr == "oops\n" and r.returncode == 0


def test_stdin_is_never_inherited_and_input_is_passed():
    assert run(["cat"]).stdout == ""
    assert run(["cat"], input="hello").stdout == "hello"


def test_missing_tool_names_it_and_the_hint():
    with pytest.raises(ToolFailed, match=r"^/no/such/qemu-img not found; install qemu-utils$"):
        run(["/no/such/qemu-img", "info"], hint="; install qemu-utils")


def test_not_executable(tmp_path):
    f = tmp_path / "fmpm"
    f.write_text("#!/bin/sh\n")
    f.chmod(0o644)
    with pytest.raises(ToolFailed, match="is not executable"):
        run([str(f)])


def test_timeout_kills_and_names_the_run():
    with pytest.raises(ToolFailed, match=r"^sleeper did not finish in 0.3s$"):
        run(["sleep", "30"], timeout=0.3, what="sleeper")


def test_non_zero_exit_carries_the_tail_of_what_it_said():
    with pytest.raises(ToolFailed) as info:
        run(["sh", "-c", "echo out; echo 'bad\nthing' >&2; exit 4"])
    assert str(info.value) == "sh -c 'echo out; echo '\"'\"'bad\nthing'\"'\"' >&2; exit 4' " \
        "failed (exit 4): bad thing out"


def test_check_false_leaves_the_status_to_the_caller():
    assert run(["sh", "-c", "exit 3"], check=False).returncode == 3


def test_tail_is_one_line_and_bounded():
    assert tail("a\n  b\tc") == "a b c"
    assert tail(b"x" * 10 + b"yz", limit=3) == "…xyz"
    assert tail(None) == ""
    r = run(["sh", "-c", "echo 1234567890 >&2"], check=False)
    assert output_tail(r, limit=4) == "…7890"
    assert output_tail(run(["true"])) == "no output"      # what an error quotes of a silent tool


def test_a_silent_failure_says_so():
    with pytest.raises(ToolFailed, match=r"^false failed \(exit 1\): no output$"):
        run(["false"], what="false")


def test_stdout_may_go_straight_to_a_descriptor_while_stderr_is_still_captured(tmp_path):
    """What a pull on a terminal does: skopeo's bars go to the user, its errors to the error."""
    out = tmp_path / "out"
    with open(out, "w") as f:
        r = run(["sh", "-c", "echo shown; echo said >&2"], stdout=f.fileno())
        with pytest.raises(ToolFailed, match=r"failed \(exit 3\): bad$"):
            run(["sh", "-c", "echo shown too; echo bad >&2; exit 3"], stdout=f.fileno())
    assert r.stdout is None and r.stderr == "said\n"
    assert out.read_text() == "shown\nshown too\n"
