"""errors.py: every error slurm-dgxvm raises lives there, each with an exit code that README.md's
exit-code table and errors.py's docstring document; a quantity error is renamed at the edge."""

from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path

import pytest

import slurm_dgxvm
from slurm_dgxvm import errors
from slurm_dgxvm.errors import DgxvmError, NoFit, RequestError

README = Path(__file__).resolve().parents[2] / "README.md"


def _subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def readme_codes() -> dict[int, str]:
    """``{code: meaning}`` from the table under README.md's "### Exit codes"."""
    text = README.read_text()
    section = text.split("### Exit codes", 1)[1].split("\n#", 1)[0]
    rows = re.findall(r"^\| (\d+) \| ([^|]+) \|", section, re.MULTILINE)
    return {int(code): meaning.strip() for code, meaning in rows}


def docstring_codes() -> set[int]:
    doc = errors.__doc__.split("Exit codes", 1)[1]
    return {int(c) for c in re.findall(r"^    (\d)  \S", doc, re.MULTILINE)}


def test_the_readme_table_and_the_docstring_document_the_same_codes():
    table = readme_codes()
    assert set(table) == {0, 1, 2, 3, 4, 5, 6}
    assert docstring_codes() == set(table) - {0}
    constants = {v for k, v in vars(errors).items() if k.startswith("EXIT_")}
    assert constants == docstring_codes()


def test_every_error_exits_with_a_documented_code():
    documented = set(readme_codes()) & docstring_codes()
    classes = [DgxvmError, *_subclasses(DgxvmError)]
    assert len(classes) > 30
    for cls in classes:
        assert cls.exit_code in documented, f"{cls.__name__} exits {cls.exit_code}"


def test_host_tools_are_exit_3_and_the_table_says_so():
    meaning = readme_codes()[3]
    assert "cannot do what was asked" in meaning
    for cls in (errors.SeedError, errors.FabricError, errors.DiskError, errors.FirewallError,
                errors.SlurmCommandError):
        assert cls.exit_code == errors.EXIT_HOST == 3


def test_every_error_class_is_defined_in_errors_py():
    """No module keeps an error of its own (importing every module of the package finds them)."""
    for info in pkgutil.walk_packages(slurm_dgxvm.__path__, "slurm_dgxvm."):
        importlib.import_module(info.name)
    elsewhere = [f"{cls.__module__}.{cls.__name__}" for cls in _subclasses(DgxvmError)
                 if cls.__module__ != errors.__name__]
    assert elsewhere == []


# -- quantities: named by placement, renamed by the edge ------------------------------------------
def test_a_quantity_is_named_by_its_own_words_and_unit():
    assert str(RequestError(quantity="vcpus", value=5, reason="must be even")) == \
        "vcpus 5 must be even"
    assert str(RequestError(quantity="memory_mib", value=9999, reason="is too much")) == \
        "memory 9999 MiB is too much"
    assert str(RequestError(quantity="disk_gib", value=0, reason="x")) == "disk 0 GiB x"
    assert str(RequestError(quantity="gpu_index", value=3, reason="x")) == "gpu index 3 x"
    assert str(RequestError(reason="no quantity")) == "no quantity"


def test_naming_keeps_the_fields_and_the_exit_code():
    exc = NoFit(count=4, resource="gpus", quantity="gpu_index", value=4, where="block 4-7",
                reason="GPU(s) 4-7 are in use")
    assert str(exc) == "no fit for 4 GPU(s): block 4-7 (gpu index 4): GPU(s) 4-7 are in use"
    named = exc.naming(f"--gpu-index {exc.amount}")
    assert str(named) == "no fit for 4 GPU(s): block 4-7 (--gpu-index 4): GPU(s) 4-7 are in use"
    assert type(named) is NoFit and named.exit_code == 4
    assert (named.resource, named.quantity, named.value) == ("gpus", "gpu_index", 4)
    plain = RequestError(reason="17 GPUs asked")
    assert plain.naming("--anything") is plain
    given = RequestError("a message of its own", quantity="vcpus", value=5, reason="r")
    assert str(given) == "a message of its own" and given.subject == "vcpus 5"


@pytest.mark.parametrize("cls", [RequestError, NoFit])
def test_a_missing_field_falls_back_to_the_plain_template(cls):
    exc = cls(quantity="vcpus", value=5, reason="r", count=1)
    assert "r" in str(exc)


# -- how a failure is counted (dgxvm metrics' cause label) -----------------------------------------
@pytest.mark.parametrize("exc, cause", [
    (errors.JobRefused(reason="bad comment"), "bad_input"),
    (errors.FabricError(partition=3, reason="fmpm refused"), "host"),
    (NoFit(count=4, reason="fragmented"), "no_fit"),
    (errors.LedgerLockTimeout(path="/l", timeout=5), "state"),
    (errors.GuestTimeout(name="job-1", timeout=300, reason="no agent", tail=""), "vm"),
    (errors.Interrupted(signal="SIGTERM"), "interrupted"),
    (KeyboardInterrupt(), "interrupted"),
    (ZeroDivisionError("a bug"), "internal"),
])
def test_a_failure_is_counted_under_the_cause_of_its_exit_code(exc, cause):
    assert errors.cause_of(exc) == cause


def test_every_exit_code_but_success_has_a_cause():
    assert set(errors.CAUSES) == docstring_codes()
    assert len(set(errors.CAUSES.values())) == len(errors.CAUSES)
