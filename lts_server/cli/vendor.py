"""lts-license: the vendor's tool to make keys and issue, verify and show license files."""

from __future__ import annotations

import argparse
import os
import sys
import tomllib
from datetime import UTC, datetime, time
from pathlib import Path
from typing import Any

import msgspec
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from lts_server import licensefile
from lts_server.core.times import iso, utcnow
from lts_server.identity import key_id

EXIT_INVALID = 1
EXIT_USAGE = 2


class SpecError(Exception):
    pass


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.capitalize() for part in rest)


def _snake(path: str) -> str:
    return "".join("_" + c.lower() if c.isupper() else c for c in path)


def _moment(value: Any) -> Any:
    """TOML dates become midnight UTC; local datetimes are read as UTC."""
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if hasattr(value, "year") and not isinstance(value, datetime):
        return datetime.combine(value, time(0), UTC)
    return value


def payload_from_spec(spec: dict[str, Any], now: datetime) -> licensefile.Payload:
    known = {"license_id", "alias", "organization_id", "server_uuid", "revision", "status",
             "license_text_version", "issued_at", "items"}
    item_keys = {"item_id", "product", "edition", "deployment_type", "license_type", "quantity",
                 "period", "domain", "starts_at", "expires_at", "borrow_max_days", "versions"}
    for key in spec:
        if key not in known:
            raise SpecError(f"{key}: unknown key")
    items = spec.get("items")
    if not isinstance(items, list) or not items:
        raise SpecError("items: at least one [[items]] table is required")
    raw_items = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise SpecError(f"items[{i}]: expected a table")
        for key in item:
            if key not in item_keys:
                raise SpecError(f"items[{i}].{key}: unknown key")
        raw_items.append({_camel(k): _moment(v) for k, v in item.items()})
    issued = _moment(spec.get("issued_at", now))
    raw: dict[str, Any] = {_camel(k): _moment(v) for k, v in spec.items() if k != "items"}
    raw["items"] = raw_items
    raw.setdefault("format", licensefile.FORMAT_VERSION)
    raw.setdefault("revision", 1)
    raw.setdefault("status", "Activated")
    raw.setdefault("licenseTextVersion", "2.0")
    raw["issuedAt"] = issued
    if "licenseId" in raw and "alias" not in raw and isinstance(raw["licenseId"], str):
        raw["alias"] = licensefile.default_alias(raw["licenseId"], issued)
    try:
        payload = msgspec.convert(raw, licensefile.Payload, strict=True)
    except msgspec.ValidationError as e:
        msg, _, where = str(e).partition(" - at `$")
        where = _snake(where.rstrip("`").lstrip("."))
        if msg.startswith("Object missing required field"):
            field = _snake(msg.split("`")[1])
            where = f"{where}.{field}" if where else field
            msg = "required"
        raise SpecError(f"{where}: {msg}" if where else msg) from None
    found = licensefile.problems(payload)
    if found:
        raise SpecError("; ".join(f"{_snake(p)}: {w}" for p, w in found))
    return payload


def cmd_keygen(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    key_path, pub_path = out / "vendor.key", out / "vendor.pub"
    if key_path.exists() and not args.force:
        print(f"lts-license: {key_path} exists; pass --force to replace it", file=sys.stderr)
        return EXIT_USAGE
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    os.chmod(key_path, 0o600)
    pub_path.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    print(key_id(key.public_key()))
    return 0


def cmd_issue(args: argparse.Namespace) -> int:
    try:
        spec = tomllib.loads(Path(args.spec).read_text(encoding="utf-8"))
    except OSError as e:
        print(f"lts-license: {args.spec}: {e.strerror}", file=sys.stderr)
        return EXIT_USAGE
    except tomllib.TOMLDecodeError as e:
        print(f"lts-license: {args.spec}: not valid TOML: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        payload = payload_from_spec(spec, utcnow().replace(microsecond=0))
    except SpecError as e:
        print(f"lts-license: {args.spec}: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        key = licensefile.load_private_key(Path(args.key))
    except (OSError, ValueError) as e:
        print(f"lts-license: --key: {e}", file=sys.stderr)
        return EXIT_USAGE
    data = licensefile.sign(licensefile.encode_payload(payload), key)
    out = Path(args.out)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(out)  # a watcher never sees a half-written file under the final name
    print(f"{out}: license {payload.license_id} revision {payload.revision}, {len(payload.items)} item(s)")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    try:
        data = Path(args.file).read_bytes()
        trusted = licensefile.load_trusted([Path(p) for p in args.public_key])
    except (OSError, ValueError) as e:
        print(f"lts-license: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        verified = licensefile.verify(data, trusted)
    except licensefile.LicenseFileError as e:
        print(f"INVALID {args.file}: {e}")
        return EXIT_INVALID
    lic = verified.license
    print(f"VALID {args.file}: license {lic.license_id} revision {lic.revision}, key id {verified.key_id}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    try:
        data = Path(args.file).read_bytes()
        trusted = licensefile.load_trusted([Path(p) for p in args.public_key or []])
    except (OSError, ValueError) as e:
        print(f"lts-license: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        verified = licensefile.verify(data, trusted)
        lic, status = verified.license, f"VERIFIED with key {verified.key_id}"
    except licensefile.LicenseFileError as e:
        status = f"NOT VERIFIED ({e})"
        try:
            payload = msgspec.json.decode(data.partition(b"\n\n")[2], type=licensefile.Payload)
            lic = licensefile.to_license(payload)
        except (msgspec.DecodeError, msgspec.ValidationError):
            print(f"{args.file}: {status}; the content cannot be read")
            return EXIT_INVALID
    print(f"{args.file}: {status}")
    print(f"  license      {lic.license_id} (alias {lic.alias}), revision {lic.revision}, {lic.status}")
    print(f"  organization {lic.organization_id}, license text {lic.license_text_version}")
    print(f"  bound to     {lic.server_uuid or 'no server (unbound)'}")
    print(f"  issued       {iso(lic.issued_at)}")
    for item in lic.items:
        extra = ", ".join(
            x for x in (item.edition and f"edition {item.edition}", item.period and item.period.value,
                        item.domain and f"domain {item.domain}",
                        item.borrow_max_days and f"borrow up to {item.borrow_max_days} days",
                        item.versions and f"versions {item.versions}") if x
        )
        print(
            f"  item {item.item_id}: {item.product} {item.deployment_type.value} {item.license_type.value}"
            f" x{item.quantity}{' (' + extra + ')' if extra else ''}, {iso(item.starts_at)} .. {iso(item.expires_at)}"
        )
    return 0 if status.startswith("VERIFIED") else EXIT_INVALID


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lts-license", description="Issue and check signed lts-server license files.")
    sub = p.add_subparsers(dest="command", required=True)
    k = sub.add_parser("keygen", help="make a vendor key pair")
    k.add_argument("--out", required=True, help="folder for vendor.key and vendor.pub")
    k.add_argument("--force", action="store_true", help="replace an existing key")
    k.set_defaults(run=cmd_keygen)
    i = sub.add_parser("issue", help="sign a TOML spec into a license file")
    i.add_argument("spec")
    i.add_argument("--key", required=True, help="the vendor's private key (vendor.key)")
    i.add_argument("--out", required=True, help="the .lic file to write")
    i.set_defaults(run=cmd_issue)
    v = sub.add_parser("verify", help="check a license file's signature and content")
    v.add_argument("file")
    v.add_argument("--public-key", required=True, action="append", help="a trusted vendor.pub (repeatable)")
    v.set_defaults(run=cmd_verify)
    s = sub.add_parser("show", help="print a readable summary")
    s.add_argument("file")
    s.add_argument("--public-key", action="append", help="verify against this vendor.pub (repeatable)")
    s.set_defaults(run=cmd_show)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
