"""lts-license: keygen, issue, verify and show, with the exit codes scripts rely on."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import pytest

SPEC = """
license_id = "100028117"
organization_id = "216998"
server_uuid = "0feb6cf8-698d-47b4-8f64-dc3580f5a7a9"

[[items]]
item_id = "I1"
product = "barcode-reader"
deployment_type = "browser"
license_type = "per-device"
period = "yearly"
quantity = 50
starts_at = 2026-01-01T00:00:00Z
expires_at = 2099-01-01T00:00:00Z
"""


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lts_server.cli.vendor", *args], capture_output=True, text=True,
                          timeout=60)


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    out = cli("keygen", "--out", str(tmp_path / "keys"))
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.strip()) == 16
    return tmp_path / "keys"


def test_keygen_writes_a_private_key_only_its_owner_reads(keys: Path) -> None:
    assert stat.S_IMODE((keys / "vendor.key").stat().st_mode) == 0o600
    assert (keys / "vendor.pub").read_text().startswith("-----BEGIN PUBLIC KEY-----")
    again = cli("keygen", "--out", str(keys))
    assert again.returncode == 2 and "--force" in again.stderr


def test_issue_verify_show(tmp_path: Path, keys: Path) -> None:
    spec = tmp_path / "spec.toml"
    spec.write_text(SPEC)
    lic = tmp_path / "a.lic"
    out = cli("issue", str(spec), "--key", str(keys / "vendor.key"), "--out", str(lic))
    assert out.returncode == 0, out.stderr
    ok = cli("verify", str(lic), "--public-key", str(keys / "vendor.pub"))
    assert ok.returncode == 0 and ok.stdout.startswith("VALID")
    show = cli("show", str(lic), "--public-key", str(keys / "vendor.pub"))
    assert show.returncode == 0
    assert "VERIFIED" in show.stdout and "100028117" in show.stdout and "per-device" in show.stdout
    unverified = cli("show", str(lic))
    assert unverified.returncode == 1 and "NOT VERIFIED" in unverified.stdout and "I1" in unverified.stdout
    lic.write_bytes(lic.read_bytes().replace(b'"quantity": 50', b'"quantity": 500'))
    bad = cli("verify", str(lic), "--public-key", str(keys / "vendor.pub"))
    assert bad.returncode == 1 and "bad-signature" in bad.stdout


@pytest.mark.parametrize("change, field", [
    (lambda s: s.replace('license_id = "100028117"\n', ""), "license_id"),
    (lambda s: s.replace('"per-device"', '"per-seat"'), "items[0].license_type"),
    (lambda s: s.replace("expires_at = 2099-01-01T00:00:00Z", "expires_at = 2025-01-01T00:00:00Z"),
     "items[0].expires_at"),
    (lambda s: s + s[s.index("[[items]]"):], "items[1].item_id"),
    (lambda s: s.replace('period = "yearly"\n', ""), "items[0].period"),
    (lambda s: s.replace('"per-device"', '"per-domain"').replace('period = "yearly"\n', ""), "items[0].domain"),
    (lambda s: s.replace("quantity = 50", "quantity = 0"), "items[0].quantity"),
    (lambda s: s.replace('product = "barcode-reader"\n', ""), "items[0].product"),
    (lambda s: s.replace('server_uuid = "0feb6cf8', 'server_uuid = "nope'), "server_uuid"),
    (lambda s: s + "colour = 'red'\n", "colour"),
])
def test_bad_spec_exits_2_naming_the_field(tmp_path: Path, keys: Path, change, field: str) -> None:
    spec = tmp_path / "spec.toml"
    spec.write_text(change(SPEC))
    out = cli("issue", str(spec), "--key", str(keys / "vendor.key"), "--out", str(tmp_path / "x.lic"))
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"{field}:" in out.stderr, out.stderr
    assert not (tmp_path / "x.lic").exists()


def test_demo_files_verify_with_the_demo_key() -> None:
    root = Path(__file__).resolve().parent.parent
    files = sorted((root / "license_files").glob("*.lic"))
    assert len(files) >= 3
    for f in files:
        out = cli("verify", str(f), "--public-key", str(root / "license_files" / "demo-vendor" / "vendor.pub"))
        assert out.returncode == 0, out.stdout


SERVER_KEY = "8T+rnoEwMqyvt5cfrYRN/9Ympz/a+7Xk4N3XUkMDsPo="


def test_issue_binds_the_server_key_and_show_prints_it(tmp_path: Path, keys: Path) -> None:
    assert stat.S_IMODE(keys.stat().st_mode) == 0o700
    spec = tmp_path / "spec.toml"
    spec.write_text(SPEC.replace('server_uuid = ', f'server_key = "{SERVER_KEY}"\nserver_uuid = '))
    out = cli("issue", str(spec), "--key", str(keys / "vendor.key"), "--out", str(tmp_path / "a.lic"))
    assert out.returncode == 0, out.stderr
    text = (tmp_path / "a.lic").read_text()
    assert f'"serverKey": "{SERVER_KEY}"' in text and '"binding": ' in text and '"bindingSignature": ' in text
    assert cli("verify", str(tmp_path / "a.lic"), "--public-key", str(keys / "vendor.pub")).returncode == 0
    shown = cli("show", str(tmp_path / "a.lic"), "--public-key", str(keys / "vendor.pub")).stdout
    assert f"server key   {SERVER_KEY}" in shown


def test_a_server_key_needs_a_server_uuid(tmp_path: Path, keys: Path) -> None:
    spec = tmp_path / "spec.toml"
    spec.write_text(SPEC.replace('server_uuid = "0feb6cf8-698d-47b4-8f64-dc3580f5a7a9"', f'server_key = "{SERVER_KEY}"'))
    out = cli("issue", str(spec), "--key", str(keys / "vendor.key"), "--out", str(tmp_path / "a.lic"))
    assert out.returncode == 2 and "server_key: requires serverUuid" in out.stderr
    assert not (tmp_path / "a.lic").exists()


def test_verify_usage_finds_the_vendor_key_in_the_key_store(tmp_path: Path, keys: Path) -> None:
    spec = tmp_path / "spec.toml"
    spec.write_text(SPEC.replace('server_uuid = ', f'server_key = "{SERVER_KEY}"\nserver_uuid = '))
    cli("issue", str(spec), "--key", str(keys / "vendor.key"), "--out", str(tmp_path / "a.lic"))
    (tmp_path / "s.statement").write_text("not a statement\n")
    # The key store: found by the license file's Key-Id; the statement is then judged (and is broken).
    out = cli("verify-usage", str(tmp_path / "s.statement"), "--license", str(tmp_path / "a.lic"), "--keys", str(keys))
    assert out.returncode == 1 and "not a usage statement" in out.stdout
    empty = tmp_path / "empty"
    empty.mkdir()
    out = cli("verify-usage", str(tmp_path / "s.statement"), "--license", str(tmp_path / "a.lic"), "--keys", str(empty))
    assert out.returncode == 2 and "unknown-key" in out.stderr and str(empty) in out.stderr
    out = cli("verify-usage", str(tmp_path / "missing"), "--license", str(tmp_path / "a.lic"), "--keys", str(keys))
    assert out.returncode == 2
