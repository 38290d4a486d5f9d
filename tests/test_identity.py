"""Server identity: created once, stable across restarts, private files private."""

from __future__ import annotations

import base64
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from lts_server import identity
from tests.conftest import Running, Vendor, write_config


def test_a_state_folder_others_may_enter_keeps_its_mode_and_is_warned_of(tmp_path: Path,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    identity.load_or_create(tmp_path / "made")
    assert stat.S_IMODE((tmp_path / "made").stat().st_mode) == 0o700
    assert "identity.state_dir_open" not in caplog.text
    (tmp_path / "open").mkdir()
    (tmp_path / "open").chmod(0o755)
    identity.load_or_create(tmp_path / "open")
    assert stat.S_IMODE((tmp_path / "open").stat().st_mode) == 0o755
    assert "identity.state_dir_open" in caplog.text


def test_created_once_and_stable(tmp_path: Path) -> None:
    first = identity.load_or_create(tmp_path / "state")
    second = identity.load_or_create(tmp_path / "state")
    assert first.server_uuid == second.server_uuid
    assert first.key_id == second.key_id
    assert first.secret == second.secret
    for name in (identity.KEY_FILE, identity.SECRET_FILE):
        mode = stat.S_IMODE((tmp_path / "state" / name).stat().st_mode)
        assert mode == 0o600, f"{name} has mode {oct(mode)}"


def test_print_uuid_matches_the_server(tmp_path: Path, vendor: Vendor) -> None:
    cfg = write_config(tmp_path, vendor)
    out = [
        subprocess.run([sys.executable, "-m", "lts_server", "--config", str(cfg), "--print-uuid"],
                       capture_output=True, text=True, timeout=30, check=True).stdout.strip()
        for _ in range(2)
    ]
    assert out[0] == out[1]
    assert out[0] == identity.load_or_create(tmp_path / "state").server_uuid


async def test_server_endpoint_publishes_the_signing_key(running: Running) -> None:
    async with running.session.get(f"{running.url}/api/v1/server") as resp:
        assert resp.status == 200
        info = await resp.json()
    ident = running.server.services.identity  # from the state folder (SQLite) or the cluster's database
    assert info["serverUuid"] == ident.server_uuid
    assert info["keyId"] == ident.key_id
    raw = base64.b64decode(info["publicKey"])
    assert len(raw) == 32
    key = Ed25519PublicKey.from_public_bytes(raw)
    key.verify(ident.signing_key.sign(b"x"), b"x")
    assert info["version"]


async def test_server_list_names_this_server_for_self(running: Running) -> None:
    async with running.session.get(f"{running.url}/api/v1/servers") as resp:
        assert (await resp.json()) == {"servers": [running.url]}
