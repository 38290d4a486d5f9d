"""Configuration: every class of error is one precise line and exit status 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lts_server import config

ROOT = Path(__file__).resolve().parent.parent
MINIMAL = '[storage]\nstate_dir = "state"\n[import]\ndirectory = "in"\n'


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_defaults_and_relative_paths(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, MINIMAL), environ={})
    assert (cfg.server.host, cfg.server.port) == ("127.0.0.1", 48080)
    assert cfg.state_dir == tmp_path / "state"
    assert cfg.database_path == tmp_path / "state" / "lts-server.sqlite3"
    assert cfg.import_dir == tmp_path / "in"
    assert cfg.vendor.allow_unbound is False
    assert cfg.vendor.public_keys == []


@pytest.mark.parametrize(
    "text, expected",
    [
        (MINIMAL + "[server]\nport = 'x'\n", "key 'server.port': expected `int`, got `str`"),
        (MINIMAL + "[server]\nport = 70000\n", "key 'server.port': expected `int` <= 65535"),
        (MINIMAL + "[server]\nprot = 1\n", "key 'server.prot': unknown key"),
        (MINIMAL + "[extra]\nx = 1\n", "key 'extra': unknown key"),
        ('[import]\ndirectory = "in"\n', "key 'storage': required key is missing"),
        ('[storage]\n[import]\ndirectory = "in"\n', "key 'storage.state_dir': required key is missing"),
        (MINIMAL + "[vendor]\npublic_keys = ['a', 3]\n", "key 'vendor.public_keys[1]': expected `str`, got `int`"),
        (MINIMAL + "[vendor]\nallow_unbound = 'yes'\n", "key 'vendor.allow_unbound': expected `bool`, got `str`"),
        (MINIMAL + "[server]\ntls_cert = 'c.pem'\n", "key 'server.tls_cert': tls_cert and tls_key must be set together"),
        (MINIMAL + "[vendor]\npublic_keys = ['missing.pub']\n", "key 'vendor.public_keys[0]': cannot read"),
        (MINIMAL + "[log]\nlevel = 'loud'\n", "key 'log.level': invalid enum value 'loud'; expected one of 'debug', 'info'"),
        (MINIMAL + "[cluster]\nlease_ms = 100\n", "key 'cluster.lease_ms': expected `int` >= 400"),
        (MINIMAL + "[cluster]\nlease_seats = -1\n", "key 'cluster.lease_seats': expected `int` >= 0"),
        ("[storage\n", "not valid TOML"),
    ],
)
def test_errors_name_file_key_and_expectation(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(config.ConfigError) as err:
        config.load(path, environ={})
    message = str(err.value)
    assert message.startswith(str(path))
    assert expected in message
    assert "\n" not in message


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match="cannot read the config file"):
        config.load(tmp_path / "nope.toml", environ={})


def test_environment_overrides_typed_values(tmp_path: Path) -> None:
    env = {"LTS_SERVER__PORT": "9000", "LTS_VENDOR__ALLOW_UNBOUND": "true", "LTS_SERVER__HOST": "0.0.0.0",
           "UNRELATED": "1"}
    cfg = config.load(write(tmp_path, MINIMAL), environ=env)
    assert cfg.server.port == 9000
    assert cfg.server.host == "0.0.0.0"
    assert cfg.vendor.allow_unbound is True


def test_environment_can_supply_a_required_key(tmp_path: Path) -> None:
    path = write(tmp_path, '[import]\ndirectory = "in"\n')
    cfg = config.load(path, environ={"LTS_STORAGE__STATE_DIR": str(tmp_path / "s")})
    assert cfg.state_dir == tmp_path / "s"


def test_environment_errors_name_the_variable(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError) as err:
        config.load(write(tmp_path, MINIMAL), environ={"LTS_SERVER__PORT": "many"})
    assert "key 'server.port' (set by LTS_SERVER__PORT): expected `int`, got `str`" in str(err.value)
    with pytest.raises(config.ConfigError, match="key 'server.nope' .*unknown key"):
        config.load(write(tmp_path, MINIMAL), environ={"LTS_SERVER__NOPE": "1"})
    # A value of the right type that the checks after decoding refuse names its variable too.
    with pytest.raises(config.ConfigError) as err:
        config.load(write(tmp_path, MINIMAL), environ={"LTS_STATS__HOURLY_DAYS": "30"})
    assert "key 'stats.hourly_days' (set by LTS_STATS__HOURLY_DAYS): 30 days is too short" in str(err.value)
    with pytest.raises(config.ConfigError) as err:
        config.load(write(tmp_path, MINIMAL), environ={"LTS_SERVER__TRUSTED_PROXIES": '["x"]'})
    assert "key 'server.trusted_proxies[0]' (set by LTS_SERVER__TRUSTED_PROXIES): expected an IP" in str(err.value)
    with pytest.raises(config.ConfigError) as err:
        config.load(write(tmp_path, MINIMAL + "\n[stats]\nhourly_days = 30\n"), environ={})
    assert "key 'stats.hourly_days': 30 days" in str(err.value) and "set by" not in str(err.value)


def test_shipped_configs_are_valid() -> None:
    demo = config.load(ROOT / "config" / "demo.toml", environ={})
    assert demo.vendor.allow_unbound is True
    assert all(p.exists() for p in demo.public_key_paths)
    prod = config.load(ROOT / "config" / "lts-server.toml", environ={})
    assert prod.vendor.allow_unbound is False
    assert prod.vendor.public_keys == []


@pytest.mark.parametrize("text", [MINIMAL + "[server]\nport = -1\n", "[storage\n", "[import]\ndirectory='x'\n"])
def test_daemon_exits_2_with_one_line(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    proc = subprocess.run([sys.executable, "-m", "lts_server", "--config", str(path)],
                          capture_output=True, text=True, timeout=30, env={**os.environ})
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0], proc.stderr


def test_daemon_missing_default_config_exits_2(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "lts_server", "--config", str(tmp_path / "absent.toml")],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "cannot read the config file" in proc.stderr


def test_a_public_key_file_that_is_not_a_key_exits_2(tmp_path: Path) -> None:
    (tmp_path / "bad.pub").write_text("not a key")
    path = write(tmp_path, MINIMAL + "[vendor]\npublic_keys = ['bad.pub']\n")
    proc = subprocess.run([sys.executable, "-m", "lts_server", "--config", str(path), "--check-config"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "key 'vendor.public_keys[0]': expected an Ed25519 public key" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_nested_tables_are_overridden_with_one_more_double_underscore(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[storage]\nstate_dir = "s"\n[import]\ndirectory = "i"\n[alerts.smtp]\nhost = "a"\n')
    cfg = config.load(path, environ={"LTS_ALERTS__SMTP__HOST": "mail.example.com", "LTS_ALERTS__SMTP__PORT": "587",
                                     "LTS_ALERTS__SMTP__STARTTLS": "true", "LTS_ALERTS__CHECK_SECONDS": "60"})
    assert (cfg.alerts.smtp.host, cfg.alerts.smtp.port, cfg.alerts.smtp.starttls) == ("mail.example.com", 587, True)
    assert cfg.alerts.check_seconds == 60
    with pytest.raises(config.ConfigError, match=r"key 'alerts.smtp.port' \(set by LTS_ALERTS__SMTP__PORT\)"):
        config.load(path, environ={"LTS_ALERTS__SMTP__PORT": "many"})
    with pytest.raises(config.ConfigError, match="choose starttls or tls, not both"):
        config.load(path, environ={"LTS_ALERTS__SMTP__STARTTLS": "true", "LTS_ALERTS__SMTP__TLS": "true"})
    with pytest.raises(config.ConfigError, match="alerts.check_seconds"):
        config.load(path, environ={"LTS_ALERTS__CHECK_SECONDS": "3600"})
