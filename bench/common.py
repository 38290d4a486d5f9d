"""Helpers shared by the benchmarks: a vendor key, license files, a config, statistics."""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import time
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


def license_file(key: Ed25519PrivateKey, license_id: str, items: list[dict[str, Any]], org: str = "216998",
                 **bound: str) -> bytes:
    """A signed license file; `bound` (server_uuid, server_key) binds it to a server's identity key."""
    spec = {"license_id": license_id, "organization_id": org, "items": items, **bound}
    payload = payload_from_spec(spec, NOW)
    if payload.server_key is not None:
        payload = licensefile.make_binding(payload, key)
    return licensefile.sign(licensefile.encode_payload(payload), key)


def bound_to(state_dir: Path) -> dict[str, str]:
    """The identity a daemon with this state folder will have (made now), as license spec keys."""
    from lts_server import identity

    ident = identity.load_or_create(state_dir)
    return {"server_uuid": ident.server_uuid, "server_key": ident.public_key_b64}


def device_item(item_id: str, quantity: int, product: str = "barcode-reader") -> dict[str, Any]:
    return {"item_id": item_id, "product": product, "deployment_type": "browser", "license_type": "per-device",
            "period": "yearly", "quantity": quantity, "starts_at": NOW - timedelta(days=1),
            "expires_at": NOW + timedelta(days=365)}


def write_config(folder: Path, pub: Path, port: int, watch: bool = False, url: str | None = None,
                 workers: int = 1) -> Path:
    """A daemon's config in `folder`; with `url`, a node of the PostgreSQL cluster at that URL."""
    (folder / "import").mkdir(parents=True, exist_ok=True)
    path = folder / "config.toml"
    postgres = f'backend = "postgresql"\nurl = "{url}"\n' if url else ""
    path.write_text(
        f'[server]\nhost = "127.0.0.1"\nport = {port}\nworkers = {workers}\n'
        f'[storage]\nstate_dir = "{folder / "state"}"\n{postgres}'
        f'[import]\ndirectory = "{folder / "import"}"\nrescan_seconds = 3600\nwatch = {str(watch).lower()}\nsettle_ms = 0\n'
        f'[vendor]\npublic_keys = ["{pub}"]\nallow_unbound = true\n'
        f'[log]\nlevel = "warning"\nformat = "json"\n'
        f'[metrics]\npublic = true\n'  # loopback only: the benches read the store's counters
    )
    return path


def median(values: list[float]) -> float:
    return statistics.median(values)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit("server did not start")


TICK_US = 1_000_000 / os.sysconf("SC_CLK_TCK")


def cpu_us(roots: list[int]) -> float:
    """CPU time (user + system, microseconds) of the processes `roots` and all their descendants.

    A descendant that exited and was waited for is counted in its parent's
    cutime/cstime, so those are added too (PostgreSQL's backends are children
    of the postmaster).
    """
    parent: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            text = Path(entry.path, "stat").read_text()
        except OSError:  # exited while we looked
            continue
        fields = text[text.rindex(")") + 2:].split()
        pid = int(entry.name)
        parent[pid] = int(fields[1])
        ticks[pid] = sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
    children: dict[int, list[int]] = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    total, todo, seen = 0, [p for p in roots if p in ticks], set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        total += ticks[pid]
        todo.extend(children.get(pid, []))
    return total * TICK_US
