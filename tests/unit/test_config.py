"""Configuration: defaults, strict TOML (unknown keys are errors), environment overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from slurm_dgxvm import config as config_mod
from slurm_dgxvm.config import Config, load
from slurm_dgxvm.errors import ConfigError
from slurm_dgxvm.placement import Policy


pytestmark = pytest.mark.usefixtures("clean_env")  # tests/unit/conftest.py


def write(tmp_path, text: str):
    path = tmp_path / "dgxvm.toml"
    path.write_text(text)
    return path


def test_no_file_at_the_default_location_means_all_defaults():
    cfg = load()
    assert cfg == Config()
    assert cfg.host.sysfs_root == "/" and cfg.host.state_dir == "/var/lib/dgxvm"
    assert cfg.host.machine == "" and cfg.host.module_ids == ()
    assert cfg.placement.alignment == "strict"
    assert cfg.placement.reserved_cores_per_node == 1
    assert cfg.hugepage_kib == 1048576
    assert cfg.ledger.lock_timeout_s == 30.0


def test_defaults_make_the_default_policy():
    assert Policy.from_config(load()) == Policy()


def test_an_empty_file_is_all_defaults_and_remembers_its_path(tmp_path):
    path = write(tmp_path, "")
    cfg = load(path)
    assert cfg.path == str(path)
    assert cfg.placement == Config().placement and cfg.host == Config().host


def test_a_full_file_is_read(tmp_path):
    path = write(tmp_path, """
[host]
sysfs_root = "/srv/sim"
state_dir = "/srv/state"
machine = "dgx-h100"
module_ids = [4, 2, 1, 3, 8, 6, 5, 7]

[placement]
alignment = "prefer"
reserved_cores_per_node = 2
reserved_memory_mib_per_node = 4096
hugepage_size = "none"
disk_gib_per_gpu = 100
min_disk_gib = 50

[ledger]
lock_timeout_s = 5
""")
    cfg = load(path)
    assert cfg.host.module_ids == (4, 2, 1, 3, 8, 6, 5, 7)
    assert cfg.host.machine == "dgx-h100"
    assert cfg.ledger.lock_timeout_s == 5.0 and isinstance(cfg.ledger.lock_timeout_s, float)
    assert cfg.hugepage_kib is None
    assert Policy.from_config(cfg) == Policy(alignment="prefer", reserved_cores_per_node=2,
                                             reserved_memory_mib_per_node=4096, hugepage_kib=None,
                                             disk_gib_per_gpu=100, min_disk_gib=50)


@pytest.mark.parametrize("text, names", [
    ("[nope]\nx = 1\n", "[nope]"),
    ("[host]\nbogus = 1\n", "host.bogus"),
    ("[placement]\nalign = \"strict\"\n", "placement.align"),
    ("[placement]\nreserved_cores_per_node = \"two\"\n", "placement.reserved_cores_per_node"),
    ("[placement]\nreserved_cores_per_node = true\n", "placement.reserved_cores_per_node"),
    ("[placement]\nreserved_cores_per_node = 1.5\n", "placement.reserved_cores_per_node"),
    ("[placement]\nreserved_cores_per_node = -1\n", "placement.reserved_cores_per_node"),
    ("[placement]\nalignment = \"loose\"\n", "'loose'"),
    ("[placement]\nhugepage_size = \"4K\"\n", "'4K'"),
    ("[host]\nmodule_ids = [1, \"a\"]\n", "host.module_ids"),
    ("[host]\nmodule_ids = 7\n", "host.module_ids"),
    ("[host]\nmodule_ids = [true, 2, 3, 4, 5, 6, 7, 8]\n", "host.module_ids"),
    ("[host]\nsysfs_root = 7\n", "host.sysfs_root"),
    ("[ledger]\nlock_timeout_s = 0\n", "ledger.lock_timeout_s"),
    ("[ledger]\nlock_timeout_s = \"soon\"\n", "ledger.lock_timeout_s"),
    ("[containers]\ncache_dir = \"var/cache\"\n", "containers.cache_dir"),
    ("[containers]\ncache_dir = \"/\"\n", "containers.cache_dir"),
    ("[containers]\ncache_dir = \"/a/../b\"\n", "containers.cache_dir"),
    ("[containers]\ninsecure_registries = \"r:5000\"\n", "containers.insecure_registries"),
    ("[containers]\ninsecure_registries = [\"http://r:5000\"]\n", "'http://r:5000'"),
    ("[containers]\ninsecure_registries = [\"r:5000/x\"]\n", "'r:5000/x'"),
    ("[containers]\ncache_max_gib = -1\n", "containers.cache_max_gib must be >= 0, not -1.0"),
    ("[containers]\ncache_max_gib = \"10G\"\n", "containers.cache_max_gib must be float, not '10G'"),
    ("[containers]\ncache_max_age_days = -0.5\n",
     "containers.cache_max_age_days must be >= 0, not -0.5"),
    ("[containers]\ncache_max_age_days = nan\n", "containers.cache_max_age_days nan is out of range"),
    ("[containers]\ncache_max_age_days = inf\n", "containers.cache_max_age_days inf is out of range"),
    ("[containers]\ncache_max_age_days = true\n", "containers.cache_max_age_days must be float"),
    ("[ib]\nbackend = \"sm\"\n", "ib.backend 'sm' is not one of none, ufm, opensm"),
    ("[ib]\nbackend = \"ufm\"\n", "ib.url '' must be the UFM server's"),
    ("[ib]\nbackend = \"ufm\"\nurl = \"https://ufm/ufmRest\"\n", "without a path"),
    ("[ib]\ntimeout_s = 0\n", "ib.timeout_s must be > 0"),
    ("[ib]\npkey_min = 0\n", "ib.pkey_min 0"),
    ("[ib]\npkey_max = 32767\n", "0x7fff is the default partition"),
    ("[ib]\npkey_min = 500\npkey_max = 400\n", "min <= max"),
    ("[ib]\ncredentials_file = \"ufm.cred\"\n", "ib.credentials_file 'ufm.cred' must be an absolute"),
    ("[partitions.gpu]\nib = \"sriov\"\n", "partitions.gpu.ib 'sriov' is not one of none, vf, port"),
    ("[partitions.gpu]\nwarm = [8, 0]\n", "partitions.gpu.warm: 0 is not a GPU count (1 to 64)"),
    ("[partitions.gpu]\nwarm_recent = 65\n", "partitions.gpu.warm_recent 65 is not 0 to 64"),
    ("[partitions.gpu]\nwarm_recent = -1\n", "partitions.gpu.warm_recent -1 is not 0 to 64"),
    ("[partitions.gpu]\nwarm = [8]\nib = \"vf\"\n", "partitions.gpu.warm: a partition with ib"),
    ("[partitions.gpu]\nwarm_recent = 4\nib = \"port\"\n",
     "partitions.gpu.warm_recent: a partition with ib = 'port' gets no warm VMs"),
    ("host = 3\n", "host must be a table"),
    ("[host\n", "not valid TOML"),
])
def test_bad_config_raises_config_error_naming_key_and_file(tmp_path, text, names):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load(path)
    assert info.value.path == str(path)
    assert str(path) in str(info.value)
    assert names in str(info.value)
    assert info.value.exit_code == 2


def test_the_containers_section_is_read(tmp_path):
    assert Config().containers.cache_dir == "/var/lib/dgxvm/containers"
    cfg = load(write(tmp_path, '[containers]\ncache_dir = "/srv/containers"\n'
                               'insecure_registries = ["registry.site:5000", "10.0.0.5:5000"]\n'
                               'cache_max_gib = 200\ncache_max_age_days = 7.5\n'))
    assert cfg.containers == config_mod.ContainersConfig(
        cache_dir="/srv/containers", insecure_registries=("registry.site:5000", "10.0.0.5:5000"),
        cache_max_gib=200.0, cache_max_age_days=7.5)
    assert Config().containers.cache_max_age_days == 0.0      # no limit unless set
    assert load(write(tmp_path, '[containers]\ncache_dir = ""\n')).containers.cache_dir == ""


def test_dgxvm_config_naming_a_missing_file_is_an_error(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere.toml"
    monkeypatch.setenv(config_mod.ENV_CONFIG, str(missing))
    with pytest.raises(ConfigError) as info:
        load()
    assert str(missing) in str(info.value) and "no such file" in str(info.value)


def test_an_explicit_path_to_a_missing_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError):
        load(tmp_path / "nowhere.toml")


def test_dgxvm_config_names_the_file_to_read(tmp_path, monkeypatch):
    path = write(tmp_path, "[placement]\nalignment = \"prefer\"\n")
    monkeypatch.setenv(config_mod.ENV_CONFIG, str(path))
    assert load().placement.alignment == "prefer"


def test_environment_overrides_sysfs_root_and_state_dir_of_the_file(tmp_path, monkeypatch):
    path = write(tmp_path, "[host]\nsysfs_root = \"/from/file\"\nstate_dir = \"/file/state\"\n")
    assert load(path).host.sysfs_root == "/from/file"
    monkeypatch.setenv(config_mod.ENV_SYSFS_ROOT, "/from/env")
    monkeypatch.setenv(config_mod.ENV_STATE_DIR, "/env/state")
    cfg = load(path)
    assert cfg.host.sysfs_root == "/from/env"
    assert cfg.host.state_dir == "/env/state"


def test_an_empty_environment_variable_does_not_override(tmp_path, monkeypatch):
    path = write(tmp_path, "[host]\nstate_dir = \"/file/state\"\n")
    monkeypatch.setenv(config_mod.ENV_STATE_DIR, "")
    assert load(path).host.state_dir == "/file/state"


def test_command_line_overrides_win_over_the_environment(monkeypatch):
    monkeypatch.setenv(config_mod.ENV_STATE_DIR, "/env/state")
    cfg = load().with_overrides(state_dir="/cli/state")
    assert cfg.host.state_dir == "/cli/state"


def test_example_config_documents_every_key_with_its_default():
    """etc/dgxvm.toml is what admins copy: it must load, hold every key, and show the defaults."""
    import dataclasses
    import re
    import tomllib
    text = (Path(__file__).resolve().parents[2] / "etc" / "dgxvm.toml").read_text()
    # the partition table is shown commented out; uncomment it to check it too
    text = text.replace("# [partitions.default]", "[partitions.default]")
    text = re.sub(r"^# (\w+ = )", r"\1", text, flags=re.M)
    data = tomllib.loads(text)
    cfg = config_mod.from_dict(data)
    for section, cls in config_mod._SECTIONS.items():
        assert set(data[section]) == {f.name for f in dataclasses.fields(cls)}, section
        assert getattr(cfg, section) == cls(), section
    assert set(data["partitions"]["default"]) == {
        f.name for f in dataclasses.fields(config_mod.PartitionConfig)}
    assert cfg.partitions["default"] == config_mod.PartitionConfig()


# -- [jobnet] --------------------------------------------------------------------------------------
def test_the_jobnet_section_is_read_with_its_nodes_table(tmp_path):
    cfg = load(write(tmp_path, '[jobnet]\nenabled = true\nunderlay_mtu = 9000\n'
                               'subnet = "10.99.0.0/24"\nmax_nodes = 200\nport = 8472\n'
                               '[jobnet.nodes]\ndgx01 = "192.168.50.11"\n'
                               'dgx02 = "192.168.50.12"\n'))
    j = cfg.jobnet
    assert j.enabled and j.underlay_mtu == 9000 and j.port == 8472 and j.max_nodes == 200
    assert j.nodes == {"dgx01": "192.168.50.11", "dgx02": "192.168.50.12"}
    assert j.subnet == "10.99.0.0/24"


@pytest.mark.parametrize("text, names", [
    ('[jobnet]\nnode = {}\n', ["jobnet.node", "unknown key"]),                     # typo
    ('[jobnet]\nnodes = ["dgx01"]\n', ["jobnet.nodes", "table"]),
    ('[jobnet.nodes]\ndgx01 = 7\n', ["jobnet.nodes", "table"]),
    ('[jobnet.nodes]\ndgx01 = "dgx01.site"\n', ["jobnet.nodes.dgx01", "not an IPv4"]),
    ('[jobnet.nodes]\ndgx01 = "fd00::1"\n', ["jobnet.nodes.dgx01", "not an IPv4"]),
    ('[jobnet.nodes]\ndgx01 = "127.0.0.1"\n', ["127.0.0.1", "cannot be"]),
    ('[jobnet.nodes]\ndgx01 = "224.0.0.5"\n', ["224.0.0.5", "cannot be"]),
    ('[jobnet.nodes]\ndgx01 = "10.0.0.1"\ndgx02 = "10.0.0.1"\n', ["same address", "10.0.0.1"]),
    ('[jobnet.nodes]\n"dgx 01" = "10.0.0.1"\n', ["'dgx 01'", "not a node name"]),
    ('[jobnet.nodes]\n"-x" = "10.0.0.1"\n', ["'-x'", "not a node name"]),
    ('[jobnet]\nunderlay_mtu = 1329\n', ["jobnet.underlay_mtu 1329", "1330-9216"]),
    ('[jobnet]\nunderlay_mtu = 9217\n', ["jobnet.underlay_mtu 9217"]),
    ('[jobnet]\nport = 0\n', ["jobnet.port 0"]),
    ('[jobnet]\nport = 65536\n', ["jobnet.port 65536"]),
    ('[jobnet]\nmax_nodes = 1\n', ["jobnet.max_nodes 1"]),
    ('[jobnet]\nsubnet = "10.64.0.1/16"\n', ["jobnet.subnet", "host bits"]),
    ('[jobnet]\nsubnet = "fd00::/64"\n', ["jobnet.subnet", "not an IPv4"]),
    ('[jobnet]\nsubnet = "10.0.0.0/24"\nmax_nodes = 246\n', ["too small", "max_nodes 246"]),
    ('[jobnet]\nenabled = "yes"\n', ["jobnet.enabled", "bool"]),
])
def test_bad_jobnet_config_is_refused_naming_the_key(tmp_path, text, names):
    with pytest.raises(ConfigError) as err:
        load(write(tmp_path, text))
    for name in names:
        assert name in str(err.value)


def test_a_subnet_holds_exactly_the_addresses_max_nodes_needs(tmp_path):
    # a /24 from .10 to .254: 245 nodes fit, the 246th would be the broadcast address
    cfg = load(write(tmp_path, '[jobnet]\nsubnet = "10.0.0.0/24"\nmax_nodes = 245\n'))
    assert cfg.jobnet.max_nodes == 245


def test_ib_modes_of_the_config_are_the_placements():
    from slurm_dgxvm.config import IB_MODES
    from slurm_dgxvm.placement import IB_MODES as PLACED
    assert IB_MODES == PLACED


def test_ib_defaults_change_nothing(tmp_path):
    cfg = load(write(tmp_path, "[partitions.gpu]\nimage = \"x\"\n"))
    assert cfg.partition("gpu").ib == "none" and cfg.ib.backend == "none"
    cfg = load(write(tmp_path, "[partitions.gpu]\nib = \"vf\"\n[ib]\nbackend = \"opensm\"\n"))
    assert cfg.partition("gpu").ib == "vf" and cfg.ib.backend == "opensm"
