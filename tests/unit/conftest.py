"""Fixtures shared by the unit tests (the ones every test gets are in tests/conftest.py)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from slurm_dgxvm import config as config_mod


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No DGXVM_* from the caller's shell, and no /etc/dgxvm/dgxvm.toml of this machine.
    Modules that read configuration use it for every test:
    ``pytestmark = pytest.mark.usefixtures("clean_env")``."""
    for name in (config_mod.ENV_CONFIG, config_mod.ENV_SYSFS_ROOT, config_mod.ENV_STATE_DIR):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(config_mod, "DEFAULT_CONFIG_PATH", str(tmp_path / "absent" / "dgxvm.toml"))


@pytest.fixture
def traversable_tmp():
    """A directory under /tmp that any uid can traverse (pytest's tmp_path is root's 0700):
    for tests that act as another user."""
    d = Path(tempfile.mkdtemp(prefix="dgxvm-test-", dir="/tmp"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)
