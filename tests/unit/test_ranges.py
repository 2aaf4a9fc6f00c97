"""Index lists (``0-3,8``): the syntax of Linux cpulists, SLURM_JOB_GPUS and our own flags."""

from __future__ import annotations

import pytest

from slurm_dgxvm.errors import BadInput, CpuListError, GpuListError
from slurm_dgxvm.ranges import format_index_list, parse_index_list


@pytest.mark.parametrize("text, expected", [
    ("0-3,8", (0, 1, 2, 3, 8)),
    ("5", (5,)),
    ("0-0", (0,)),
    ("10-11,0,3", (10, 11, 0, 3)),          # the order given is kept
    (" 0, 2 ", (0, 2)),                      # whitespace around items is tolerated
    ("0-23,48-71", tuple(range(24)) + tuple(range(48, 72))),
])
def test_parse_expands_ranges_in_the_order_given(text, expected):
    assert parse_index_list(text) == expected


@pytest.mark.parametrize("values, expected", [
    ((0, 1, 2, 3, 8), "0-3,8"),
    ((8, 3, 2, 1, 0), "0-3,8"),             # sorted
    ((1, 1, 2), "1-2"),                      # duplicates collapse
    ((7,), "7"),
    ((0, 2, 4), "0,2,4"),
    ((), ""),
])
def test_format_sorts_and_compresses_runs(values, expected):
    assert format_index_list(values) == expected


@pytest.mark.parametrize("values", [(0, 1, 2, 3, 8), (5,), (0, 2, 3, 4, 9, 10), tuple(range(96))])
def test_format_then_parse_round_trips(values):
    assert parse_index_list(format_index_list(values)) == tuple(sorted(values))


@pytest.mark.parametrize("text, names", [
    ("0-3,x", "'x'"),
    ("-1", "negative"),
    ("5-3", "'5-3'"),
    ("1,1", "1 is listed twice"),
    ("0-3,2", "2 is listed twice"),
    ("", "empty"),
    ("   ", "empty"),
    ("1,,2", "''"),
    ("0x3", "'0x3'"),
])
def test_bad_gpu_lists_raise_gpu_list_error_naming_the_value(text, names):
    with pytest.raises(GpuListError) as info:
        parse_index_list(text)
    err = info.value
    assert err.value == text
    assert repr(text) in str(err)
    assert names in str(err)
    assert isinstance(err, BadInput) and err.exit_code == 2


def test_cpu_lists_raise_cpu_list_error():
    with pytest.raises(CpuListError) as info:
        parse_index_list("0-3,y", what="CPU")
    assert "'0-3,y'" in str(info.value) and "'y'" in str(info.value)


def test_an_empty_list_is_allowed_when_asked():
    assert parse_index_list("", allow_empty=True) == ()
    assert parse_index_list("\n", what="CPU", allow_empty=True) == ()


def test_duplicates_are_merged_when_allowed():
    assert parse_index_list("0-3,2,1", allow_duplicates=True) == (0, 1, 2, 3)
