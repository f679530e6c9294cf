"""The provisioner's config.yaml: push policy and limits, read, checked and passed to the server."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest
import yaml

from tinkops.errors import ConfigError
from tinkops.home import ProvisionerConfig, init_home
from tinkops.limits import MIB, ServerLimits
from tinkops.prereceive import HookSettings
from tinkops.provisioner import Provisioner


@pytest.fixture
def home(tmp_path: Path) -> Path:
    home = tmp_path / "provisioner"
    init_home(home, include_requests=False, generate_agent_keys=False, port=0)
    return home


def edit_config(home: Path, **changes: object) -> None:
    path = home / "config.yaml"
    data = yaml.safe_load(path.read_text())
    data.update(changes)
    path.write_text(yaml.safe_dump(data))


def test_init_writes_secure_defaults(home: Path) -> None:
    written = yaml.safe_load((home / "config.yaml").read_text())
    config = ProvisionerConfig.load(home)

    assert written["allow_force_push_main"] is False
    assert written["limits"] == ServerLimits().to_mapping()
    assert config.allow_force_push_main is False
    assert config.limits == ServerLimits()
    assert config.audit_log_path == home / "audit.log"


def test_settings_round_trip(home: Path) -> None:
    config = ProvisionerConfig.load(home)
    config.allow_force_push_main = True
    config.limits = ServerLimits(max_pack_size=2 * MIB, max_connection_time=90.5)
    config.save()

    loaded = ProvisionerConfig.load(home)

    assert loaded.allow_force_push_main is True
    assert loaded.limits == ServerLimits(max_pack_size=2 * MIB, max_connection_time=90.5)


def test_partial_limits_keep_defaults(home: Path) -> None:
    edit_config(home, limits={"idle_timeout": 30})

    limits = ProvisionerConfig.load(home).limits

    assert limits.idle_timeout == 30.0
    assert limits.max_pack_size == ServerLimits().max_pack_size


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"allow_force_push_mian": True}, "unknown keys allow_force_push_mian"),
        ({"allow_force_push_main": "yes please"}, "expected true or false"),
        ({"limits": {"max_pack_sise": 10}}, "unknown limits max_pack_sise"),
        ({"limits": {"max_pack_size": 0}}, "limits.max_pack_size is 0"),
        ({"limits": {"max_connections": -1}}, "limits.max_connections is -1"),
        ({"limits": {"max_connections": 2.5}}, "expected a positive whole number"),
        ({"limits": {"idle_timeout": "forever"}}, "limits.idle_timeout is 'forever'"),
        ({"limits": {"login_timeout": True}}, "limits.login_timeout is True"),
        ({"limits": ["max_connections"]}, "config.yaml"),
    ],
)
def test_invalid_settings_rejected(home: Path, changes: dict[str, object], message: str) -> None:
    edit_config(home, **changes)

    with pytest.raises(ConfigError, match=re.escape(message)):
        ProvisionerConfig.load(home)


def test_provisioner_passes_settings_to_server(home: Path) -> None:
    edit_config(home, allow_force_push_main=True, limits={"max_pack_size": 5 * MIB})
    config = ProvisionerConfig.load(home)

    provisioner = Provisioner(config)

    assert provisioner.server.limits.max_pack_size == 5 * MIB
    assert provisioner.server.hook_settings == HookSettings(
        main_branch="main", allow_force_push_main=True, audit_log=home / "audit.log"
    )


def test_port_in_use_is_one_clear_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        init_home(tmp_path / "home", port=port)
        provisioner = Provisioner(ProvisionerConfig.load(tmp_path / "home"))
        with pytest.raises(ConfigError) as caught:
            provisioner.start()
    assert f"cannot listen on 127.0.0.1:{port}" in str(caught.value)
    assert "choose another port with --port" in str(caught.value)
