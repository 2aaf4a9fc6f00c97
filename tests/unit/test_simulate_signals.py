"""The GPU health signals of a simulated tree (config space, reset, AER counters), read through
SysfsRoot's path shapes as a health module would read them on a real host."""

from __future__ import annotations

import struct

import pytest

from slurm_dgxvm.simulate import MACHINES, render
from slurm_dgxvm.simulate.signals import AER_CORRECTABLE_BUCKETS, AER_UNCORRECTABLE_BUCKETS
from slurm_dgxvm.topology.sysfs import (
    PCI_AER_CORRECTABLE, PCI_AER_FATAL, PCI_AER_NONFATAL, PCI_CONFIG, PCI_RESET, PCI_RESET_METHOD,
    SysfsRoot,
)


@pytest.fixture(scope="module", params=sorted(MACHINES))
def rendered(request, tmp_path_factory):
    key = request.param
    return key, SysfsRoot(render(key, tmp_path_factory.mktemp(key) / "root"))


def _config(root: SysfsRoot, bdf: str) -> bytes:
    return root.path(PCI_CONFIG, bdf=bdf).read_bytes()


def test_every_device_has_a_config_space_that_agrees_with_its_attributes(rendered):
    _, root = rendered
    for bdf in root.pci_addresses():
        cfg = _config(root, bdf)
        assert len(cfg) == 256
        vendor, device = struct.unpack_from("<HH", cfg, 0)
        assert f"0x{vendor:04x}" == root.pci_attr(bdf, "vendor")
        assert f"0x{device:04x}" == root.pci_attr(bdf, "device")
        assert f"0x{cfg[8]:02x}" == root.pci_attr(bdf, "revision")
        assert f"0x{int.from_bytes(cfg[9:12], 'little'):06x}" == root.pci_attr(bdf, "class")
        assert cfg[64:] == bytes(192)                  # past the header a non-root reader sees
        if cfg[0x0e] & 0x7f == 0:                      # endpoint: subsystem ids in the header
            sv, sd = struct.unpack_from("<HH", cfg, 0x2c)
            assert f"0x{sv:04x}" == root.pci_attr(bdf, "subsystem_vendor")
            assert f"0x{sd:04x}" == root.pci_attr(bdf, "subsystem_device")
        else:                                          # bridge: type 1 header, no subsystem there
            assert cfg[0x0e] & 0x7f == 1
            assert root.pci_attr(bdf, "class").startswith("0x0604")


def test_the_h100_config_space_matches_the_real_hexdump(tmp_path):
    # landontclipp.github.io/sysadmin/gpu: `10de 2330 ... 00a1 0302 ... 10de 16c1` (hexdump's u16s)
    root = SysfsRoot(render("dgx-h100", tmp_path / "r"))
    words = struct.unpack_from("<32H", _config(root, "0000:1b:00.0"))
    assert (words[0], words[1], words[4], words[5], words[22], words[23]) == (
        0x10de, 0x2330, 0x00a1, 0x0302, 0x10de, 0x16c1)


def test_functions_of_one_multi_function_device_say_so_in_the_header_type(tmp_path):
    root = SysfsRoot(render("dgx-a100", tmp_path / "r"))
    assert [_config(root, b)[0x0e] for b in ("0000:61:00.0", "0000:61:00.1")] == [0x80, 0x80]
    assert _config(root, "0000:07:00.0")[0x0e] == 0x00


def test_gpus_and_nvswitches_can_be_reset_and_say_how(rendered):
    _, root = rendered
    for bdf in root.pci_addresses():
        cls = root.pci_attr(bdf, "class")
        reset = root.path(PCI_RESET, bdf=bdf)
        if cls.startswith("0x03"):
            assert root.read(PCI_RESET_METHOD, bdf=bdf) == "flr bus"
        elif cls.startswith("0x0680"):
            assert root.read(PCI_RESET_METHOD, bdf=bdf) == "bus"
        else:
            assert not reset.exists() and not root.exists(PCI_RESET_METHOD, bdf=bdf)
            continue
        assert reset.is_file() and reset.stat().st_size == 0
        reset.write_text("1")                          # the reset: on the simulated tree it succeeds


@pytest.mark.parametrize("shape,buckets,total", [
    (PCI_AER_CORRECTABLE, AER_CORRECTABLE_BUCKETS, "TOTAL_ERR_COR"),
    (PCI_AER_NONFATAL, AER_UNCORRECTABLE_BUCKETS, "TOTAL_ERR_NONFATAL"),
    (PCI_AER_FATAL, AER_UNCORRECTABLE_BUCKETS, "TOTAL_ERR_FATAL"),
])
def test_aer_counters_read_in_the_kernels_format_all_zero(rendered, shape, buckets, total):
    _, root = rendered
    for bdf in root.pci_addresses():
        text = root.path(shape, bdf=bdf).read_text()
        assert text.endswith("\n")
        lines = [line.split(" ") for line in text.splitlines()]
        assert [name for name, _ in lines] == [*buckets, total]
        assert {count for _, count in lines} == {"0"}


def test_the_bucket_names_are_the_kernels():
    # drivers/pci/pcie/aer.c (5.15): the named bits of the correctable / uncorrectable status
    assert AER_CORRECTABLE_BUCKETS == ("RxErr", "BadTLP", "BadDLLP", "Rollover", "Timeout",
                                       "NonFatalErr", "CorrIntErr", "HeaderOF")
    assert len(AER_UNCORRECTABLE_BUCKETS) == 18
    assert {"SDES", "CmpltTO", "MalfTLP", "UncorrIntErr", "PoisonTLPBlocked"} <= set(
        AER_UNCORRECTABLE_BUCKETS)
