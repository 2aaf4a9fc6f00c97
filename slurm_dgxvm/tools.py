"""The one way slurm-dgxvm runs an external tool (qemu-img, ssh-keygen, xorriso, fmpm, nft,
scontrol ...).

:func:`run_tool` bounds the run by a time-out, never inherits stdin, runs in the C locale (so
what a tool says can be parsed and quoted), and turns each way a tool can fail into the
caller's own error with one line of reason: not installed, not executable, no answer in time,
a non-zero exit with the tail of what it said. :func:`tail` is the one way tool output is cut
to fit a one-line error.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from collections.abc import Callable, Sequence

TAIL_CHARS = 600


def tail(text: str | bytes | None, limit: int = TAIL_CHARS) -> str:
    """The end of ``text`` as one line (whitespace runs become one space), at most ``limit``
    characters, with an ellipsis where it was cut."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    text = " ".join((text or "").split())
    return text if len(text) <= limit else "…" + text[-limit:]


def output_tail(result: subprocess.CompletedProcess, limit: int = TAIL_CHARS) -> str:
    """:func:`tail` of what a finished tool said on stderr and stdout (stderr first), or
    ``"no output"`` when it said nothing: what every error about a tool's run quotes."""
    said = "\n".join(s for s in (result.stderr, result.stdout) if s and s.strip())
    return tail(said, limit) or "no output"


def run_tool(argv: Sequence[str], *, timeout: float, error: Callable[[str], Exception],
             what: str | None = None, hint: str = "", timeout_hint: str = "", check: bool = True,
             input: str | None = None, env: dict[str, str] | None = None,
             limit: int = TAIL_CHARS, stdout: int | None = None) -> subprocess.CompletedProcess:
    """Run ``argv`` and return its CompletedProcess (text stdout and stderr).

    ``stdout``: a file descriptor the tool's stdout goes to as it writes it (a terminal the user
    watches), instead of being captured (the result's ``stdout`` is then None); stderr is
    captured all the same, so errors quote it.

    ``what`` names the run in messages (default: the command line). Raises ``error(reason)``
    when the program is missing (``"<prog> not found<hint>"``), not executable, does not finish
    within ``timeout`` seconds (it is killed; ``timeout_hint`` says what to look at), or, with
    ``check``, exits non-zero
    (``"<what> failed (exit N): <tail of its output>"``). With ``check=False`` the caller reads
    the exit status itself.
    """
    argv = [os.fspath(a) for a in argv]
    what = what or shlex.join(argv)
    run_env = {**(os.environ if env is None else env), "LC_ALL": "C"}
    try:
        result = subprocess.run(argv, stdout=subprocess.PIPE if stdout is None else stdout,
                                stderr=subprocess.PIPE, text=True, timeout=timeout, input=input,
                                stdin=subprocess.DEVNULL if input is None else None,
                                env=run_env)
    except FileNotFoundError:
        raise error(f"{argv[0]} not found{hint}") from None
    except PermissionError:
        raise error(f"{argv[0]} is not executable") from None
    except subprocess.TimeoutExpired:
        raise error(f"{what} did not finish in {timeout:g}s{timeout_hint}") from None
    if check and result.returncode != 0:
        raise error(f"{what} failed (exit {result.returncode}): "
                    f"{output_tail(result, limit)}")
    return result


__all__ = ["TAIL_CHARS", "output_tail", "run_tool", "tail"]
