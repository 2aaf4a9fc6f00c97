"""The network firewall's pure parts: the allow-list syntax, the nft rules rendered from the
config, the network XML the hook reads; and the hook itself, run for
real with nft inside a throw-away network namespace (``unshare -n``), never the host's."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from slurm_dgxvm import config as config_mod
from slurm_dgxvm.errors import ConfigError
from slurm_dgxvm.netfilter import (HostService, network_info, parse_service, removal, ruleset)

# The dgxvm of this checkout as a shell command: a venv's entry point, or, under Debian's
# /usr/bin/python3 (CI's unit run, on Debian's python3-* packages), the module itself: the
# /usr/bin/dgxvm beside that interpreter is an installed package, not this checkout.
REPO = Path(__file__).resolve().parents[2]
DGXVM = (shlex.quote(str(Path(sys.executable).with_name("dgxvm"))) if sys.prefix != sys.base_prefix
         else f"PYTHONPATH={shlex.quote(str(REPO))} {shlex.quote(sys.executable)} "
              f"-m slurm_dgxvm.cli.main")


@pytest.mark.parametrize("text, want", [
    ("tcp/5000", HostService("tcp", 5000, 5000)),
    ("udp/53", HostService("udp", 53, 53)),
    ("udp/7000-7010", HostService("udp", 7000, 7010)),
    ("10.0.0.5:tcp/3128", HostService("tcp", 3128, 3128, "10.0.0.5")),
    ("192.168.1.1:udp/1-65535", HostService("udp", 1, 65535, "192.168.1.1")),
])
def test_allowed_services_parse(text, want):
    assert parse_service(text) == want
    assert str(parse_service(text)) == text


@pytest.mark.parametrize("text, says", [
    ("5000", "is not a service"),
    ("tcp:5000", "is not a service"),
    ("TCP/5000", "is not a service"),
    ("icmp/1", "protocol 'icmp'"),
    ("sctp/5000", "protocol 'sctp'"),
    ("tcp/0", "ports are 1-65535"),
    ("tcp/65536", "ports are 1-65535"),
    ("tcp/5010-5000", "is empty"),
    ("tcp/50-", "is not a service"),
    ("tcp/5000 ", "is not a service"),
    (" tcp/5000", "is not a service"),
    ("tcp/5000;drop", "is not a service"),
    ('tcp/5000"', "is not a service"),
    ("registry.site:tcp/5000", "is not an IPv4 address"),
    ("10.0.0.256:tcp/5000", "is not an IPv4 address"),
    ("[::1]:tcp/80", "is not a service"),
    ("0.0.0.0:tcp/80", "cannot be a host service's address"),
    ("127.0.0.1:tcp/80", "cannot be a host service's address"),
    ("224.0.0.1:udp/5353", "cannot be a host service's address"),
    ("", "is not a service"),
    ("tcp/5000\ntcp/22", "is not a service"),
])
def test_bad_services_are_refused_naming_the_value(text, says):
    with pytest.raises(ValueError, match=says) as exc:
        parse_service(text)
    assert repr(text) in str(exc.value)


def test_the_config_refuses_bad_or_repeated_entries_and_keeps_good_ones():
    cfg = config_mod.from_dict({"libvirt": {"allow_host_services": ["tcp/5000",
                                                                    "10.0.0.5:tcp/3128"]}})
    assert cfg.libvirt.allow_host_services == ("tcp/5000", "10.0.0.5:tcp/3128")
    assert cfg.host_services == (HostService("tcp", 5000, 5000),
                                 HostService("tcp", 3128, 3128, "10.0.0.5"))
    assert config_mod.Config().host_services == ()
    for value, says in ((["tcp/5000", "tcp/5000"], "lists 'tcp/5000' twice"),
                        (["tcp/x"], "libvirt.allow_host_services: 'tcp/x' is not a service"),
                        ("tcp/5000", "must be a list of strings"),
                        ([5000], "must be a list of strings")):
        with pytest.raises(ConfigError, match=says):
            config_mod.from_dict({"libvirt": {"allow_host_services": value}})
    with pytest.raises(ConfigError, match="libvirt.network: network name 'a b'"):
        config_mod.from_dict({"libvirt": {"network": "a b"}})


def test_the_rules_drop_host_services_and_guest_to_guest_and_allow_only_the_list():
    text = ruleset("dgxvm", "virbr1", "10.213.0.1",
                   (parse_service("tcp/5000"), parse_service("10.0.0.5:udp/7000-7010")))
    lines = [line.strip() for line in text.splitlines()]
    # replaced as a whole, in one transaction: never merged with an older table of that name
    assert lines[2:5] == ["add table inet dgxvm-dgxvm", "delete table inet dgxvm-dgxvm",
                          "table inet dgxvm-dgxvm {"]
    i = lines.index("chain input {")
    assert lines[i + 1:i + 10] == [
        "type filter hook input priority filter; policy accept;",
        'iifname "virbr1" ct state established,related accept',
        'iifname "virbr1" ip daddr { 255.255.255.255, 10.213.0.1 } udp dport 67 accept '
        'comment "DHCP"',
        'iifname "virbr1" ip daddr 10.213.0.1 udp dport 53 accept comment "DNS"',
        'iifname "virbr1" ip daddr 10.213.0.1 tcp dport 53 accept comment "DNS"',
        'iifname "virbr1" ip daddr 10.213.0.1 tcp dport 5000 accept comment '
        '"allow_host_services tcp/5000"',
        'iifname "virbr1" ip daddr 10.0.0.5 udp dport 7000-7010 accept comment '
        '"allow_host_services 10.0.0.5:udp/7000-7010"',
        'iifname "virbr1" drop comment "every other host service"',
        "}"]
    assert 'iifname "virbr1" oifname "virbr1" drop comment "guest to guest through the gateway"' \
        in lines
    # nothing else is accepted from the bridge, and nothing of another interface is touched
    accepts = [line for line in lines if line.endswith("accept") or " accept " in line]
    assert len(accepts) == 6 and all(a.startswith('iifname "virbr1" ') for a in accepts)
    assert removal("dgxvm") == "add table inet dgxvm-dgxvm\ndelete table inet dgxvm-dgxvm\n"


@pytest.mark.parametrize("bad", [dict(bridge='br0" accept'), dict(bridge="a-very-long-bridge0"),
                                 dict(gateway="fe80::1"), dict(network="a;b")])
def test_the_rules_refuse_what_is_not_a_name_or_an_address(bad):
    args = {"network": "dgxvm", "bridge": "virbr1", "gateway": "10.213.0.1", **bad}
    with pytest.raises(ValueError):
        ruleset(**args)


HOOK_XML = """<hookData>
  <network>
    <name>dgxvm</name>
    <uuid>2f0b1f80-8e39-4f44-9a71-39a1c1f0b7a1</uuid>
    <forward mode='nat'/>
    <bridge name='virbr7' stp='on' delay='0'/>
    <port isolated='yes'/>
    <mac address='52:54:00:aa:bb:cc'/>
    <ip address='10.213.0.1' netmask='255.255.255.0'>
      <dhcp><range start='10.213.0.128' end='10.213.0.254'/></dhcp>
    </ip>
  </network>
</hookData>
"""


def test_the_hook_reads_bridge_and_gateway_from_libvirts_xml():
    info = network_info(HOOK_XML)
    assert (info.name, info.bridge, info.gateway) == ("dgxvm", "virbr7", "10.213.0.1")
    assert info.uuid == "2f0b1f80-8e39-4f44-9a71-39a1c1f0b7a1"
    for bad in ("<hookData/>", "not xml", "<network><name>x</name></network>"):
        with pytest.raises(ValueError):
            network_info(bad)


def _unshare_ok() -> bool:
    return (os.geteuid() == 0 and shutil.which("unshare") is not None
            and shutil.which("nft") is not None
            and subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0)


@pytest.mark.skipif(not _unshare_ok(), reason="needs root, unshare -n and nft")
def test_the_hook_applies_and_removes_the_table_for_real(tmp_path):
    """`dgxvm hook network` as libvirtd runs it, inside a new network namespace with a bridge of
    that name: nft accepts the rules; the marker appears; `stopped end` removes both; another
    network is left alone; a hook that cannot apply its rules fails (libvirt then keeps the
    network down)."""
    state = tmp_path / "state"
    cfg = tmp_path / "dgxvm.toml"
    cfg.write_text(f'[host]\nstate_dir = "{state}"\n\n[libvirt]\nnetwork = "dgxvm"\n'
                   f'allow_host_services = ["tcp/5000", "10.0.0.5:udp/7000-7010"]\n')
    xml = tmp_path / "net.xml"
    xml.write_text(HOOK_XML)
    marker = tmp_path / "run" / "networks" / "dgxvm.firewall.json"
    script = f"""
set -e
export DGXVM_CONFIG={cfg} DGXVM_RUN_DIR={tmp_path / "run"}
ip link add virbr7 type bridge
{DGXVM} hook network other started begin - < {xml}
! nft list table inet dgxvm-other 2>/dev/null
{DGXVM} hook network dgxvm start begin - < /dev/null
{DGXVM} hook network dgxvm started begin - < {xml}
nft list table inet dgxvm-dgxvm
test -s {marker}
echo ---
{DGXVM} hook network dgxvm started begin - < {xml}
nft list tables
echo ---
{DGXVM} hook network dgxvm stopped end - < /dev/null
! nft list table inet dgxvm-dgxvm 2>/dev/null
test ! -e {marker}
{DGXVM} hook network dgxvm stopped end - < /dev/null
echo done
"""
    r = subprocess.run(["unshare", "-n", "sh", "-c", script], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    listed, tables, tail = r.stdout.split("---\n")
    assert 'iifname "virbr7" ip daddr 10.213.0.1 tcp dport 5000 accept' in listed
    assert 'iifname "virbr7" ip daddr 10.0.0.5 udp dport 7000-7010 accept' in listed
    assert 'iifname "virbr7" oifname "virbr7" drop' in listed
    assert tables.split() == ["table", "inet", "dgxvm-dgxvm"]   # applied twice: one table
    assert tail.strip() == "done"
    assert "firewall inet dgxvm-dgxvm on virbr7" in r.stderr
    assert "removed" in r.stderr

    # nft refusing (no such bridge is fine for nft; an unusable binary is not): the hook fails
    bad = tmp_path / "bin"
    bad.mkdir()
    (bad / "nft").write_text("#!/bin/sh\necho 'nft: broken' >&2\nexit 1\n")
    (bad / "nft").chmod(0o755)
    r = subprocess.run(["unshare", "-n", "sh", "-c",
                        f"PATH={bad}:$PATH DGXVM_CONFIG={cfg} DGXVM_RUN_DIR={tmp_path / 'run'} "
                        f"{DGXVM} hook network dgxvm "
                        f"started begin - < {xml}"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "network dgxvm: firewall: nft -f - exited 1: nft: broken" in r.stderr
    assert not marker.exists()
