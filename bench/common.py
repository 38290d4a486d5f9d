"""Helpers shared by the benchmarks: a vendor key, license files, a config, statistics."""

from __future__ import annotations

import statistics
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from lts_server import licensefile  # noqa: E402
from lts_server.cli.vendor import payload_from_spec  # noqa: E402

NOW = datetime.now(UTC).replace(microsecond=0)


def vendor_key(folder: Path) -> tuple[Ed25519PrivateKey, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pub = folder / "vendor.pub"
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo))
    return key, pub


def license_file(key: Ed25519PrivateKey, license_id: str, items: list[dict[str, Any]], org: str = "216998") -> bytes:
    spec = {"license_id": license_id, "organization_id": org, "items": items}
    return licensefile.sign(licensefile.encode_payload(payload_from_spec(spec, NOW)), key)


def device_item(item_id: str, quantity: int, product: str = "barcode-reader") -> dict[str, Any]:
    return {"item_id": item_id, "product": product, "deployment_type": "browser", "license_type": "per-device",
            "period": "yearly", "quantity": quantity, "starts_at": NOW - timedelta(days=1),
            "expires_at": NOW + timedelta(days=365)}


def write_config(folder: Path, pub: Path, port: int, watch: bool = False) -> Path:
    (folder / "import").mkdir(parents=True, exist_ok=True)
    path = folder / "config.toml"
    path.write_text(
        f'[server]\nhost = "127.0.0.1"\nport = {port}\n'
        f'[storage]\nstate_dir = "{folder / "state"}"\n'
        f'[import]\ndirectory = "{folder / "import"}"\nrescan_seconds = 3600\nwatch = {str(watch).lower()}\n'
        f'[vendor]\npublic_keys = ["{pub}"]\nallow_unbound = true\n'
        f'[log]\nlevel = "warning"\nformat = "json"\n'
    )
    return path


def median(values: list[float]) -> float:
    return statistics.median(values)
