"""lts-license: the vendor's tool to make keys and issue, verify and show license files."""

from __future__ import annotations

import argparse
import json
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
    known = {"license_id", "alias", "organization_id", "server_uuid", "server_key", "revision", "status",
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
    found = licensefile.problems(payload, signed=False)
    if found:
        raise SpecError("; ".join(f"{_snake(p)}: {w}" for p, w in found))
    return payload


def cmd_keygen(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if not out.is_dir():  # it will hold the private key: the owner's only
        out.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(out, 0o700)
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
    if payload.server_key is not None:
        payload = licensefile.make_binding(payload, key)
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
    if lic.server_key:
        print(f"  server key   {lic.server_key} (devices verify authorizations up to your key)")
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


# What `lts-license init` writes: every key of a spec, commented, with one item of each common kind.
SPEC_TEMPLATE = """\
# A license spec for `lts-license issue SPEC --key vendor.key --out LICENSE.lic`.
# Keys are snake_case; dates are TOML dates or date-times (UTC when no zone is given).
# Format reference: docs/license-file-format.md.

# One purchase: 1-64 of A-Z a-z 0-9 . _ -, starting with a letter or digit.
license_id = "{license_id}"
# The licensee: A-Z a-z 0-9 . _ (no hyphen). Handshake codes are named <organization_id>-<custom>.
organization_id = "{organization_id}"
# Bind the file to one server: the UUID that `lts-server --print-uuid` prints on the licensee's server.
# Without it the file is unbound and imports only where [vendor] allow_unbound = true.
# server_uuid = "00000000-0000-0000-0000-000000000000"
# And to its identity key (what `ltsctl identity` prints), so devices that hold only your public key can
# verify that server's authorizations offline. Needs server_uuid.
# server_key = "base64 of the raw 32-byte Ed25519 public key"
# A renewal re-issues the same license_id with a higher revision (default 1).
revision = 1
# New or Activated (default Activated): only Activated files import.
# status = "Activated"
# license_text_version = "2.0"
# Default: now. The alias defaults to DM_<license_id>_Date<YYYYMMDD of issued_at>.
# issued_at = {today}T00:00:00Z
# alias = "DM_{license_id}_Date{today_compact}"

# One [[items]] table per license item (1 to 1000).
[[items]]
# Unique across every license the server imports.
item_id = "{license_id}-1"
product = "barcode-reader"
# browser, mobile, desktop, server or embedded.
deployment_type = "browser"
# per-device, per-server, per-domain, per-scan, per-page, per-concurrent-device, per-concurrent-instance.
license_type = "per-device"
# Seats (per-device, per-server), units (per-scan, per-page), devices or instances at once (concurrent).
quantity = 10
# per-device and per-server only: how long a seat lasts: yearly, quarterly, monthly or daily.
period = "yearly"
# Optional: the item serves only requests that name this edition.
# edition = "pro"
# Optional (per-device, per-server, per-concurrent-device): a device may borrow a seat offline for at
# most this many days (1-365); absent: no borrowing.
# borrow_max_days = 14
# Optional: the client versions the item serves, a PEP 440 range; others get error 107.
# versions = ">=3.0,<5"
starts_at = {today}
expires_at = {next_year}

# A per-domain item: every site under the domain, without a seat count.
# [[items]]
# item_id = "{license_id}-2"
# product = "barcode-reader"
# deployment_type = "browser"
# license_type = "per-domain"
# domain = "*.example.com"
# quantity = 1
# starts_at = {today}
# expires_at = {next_year}
"""


def cmd_init(args: argparse.Namespace) -> int:
    out = Path(args.spec)
    if out.exists() and not args.force:
        print(f"lts-license: {out} exists; pass --force to replace it", file=sys.stderr)
        return EXIT_USAGE
    today = utcnow().date()
    text = SPEC_TEMPLATE.format(license_id=args.license_id, organization_id=args.organization_id,
                                today=today.isoformat(), today_compact=today.strftime("%Y%m%d"),
                                next_year=today.replace(year=today.year + 1, day=min(today.day, 28)).isoformat())
    try:
        out.write_text(text, encoding="utf-8")
    except OSError as e:
        print(f"lts-license: {out}: {e.strerror}", file=sys.stderr)
        return EXIT_USAGE
    print(f"{out}: a commented spec; edit it, then: lts-license issue {out} --key vendor.key --out "
          f"{args.license_id}.lic")
    return 0


def _examples(*lines: str) -> str:
    return "example:\n" + "\n".join(f"  {line}" for line in lines)



def key_store(args: argparse.Namespace) -> list[Path]:
    """The folders of trusted vendor public keys (*.pub): --keys, else $LTS_LICENSE_KEYS, else
    ~/.config/lts-license/keys."""
    if args.keys:
        return [Path(k) for k in args.keys]
    if os.environ.get("LTS_LICENSE_KEYS"):
        return [Path(p) for p in os.environ["LTS_LICENSE_KEYS"].split(os.pathsep) if p]
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return [Path(base) / "lts-license" / "keys"]


def cmd_verify_usage(args: argparse.Namespace) -> int:
    """Check a usage statement against the license file it reports on (and the previous statement)."""
    from lts_server import statements  # the server's store modules: only this command needs them

    try:
        license_data = Path(args.license).read_bytes()
        if args.vendor_key:
            trusted = licensefile.load_trusted([Path(p) for p in args.vendor_key])
        else:
            folders = key_store(args)
            trusted = licensefile.load_trusted(sorted(p for f in folders if f.is_dir() for p in f.glob("*.pub")))
        data = Path(args.file).read_bytes()
        previous_data = Path(args.previous).read_bytes() if args.previous else None
    except (OSError, ValueError) as e:
        print(f"lts-license: {getattr(e, 'filename', None) or ''}{': ' if getattr(e, 'filename', None) else ''}"
              f"{getattr(e, 'strerror', None) or e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        verified = licensefile.verify(license_data, trusted)
    except licensefile.LicenseFileError as e:
        where = "" if args.vendor_key else f" (key store: {', '.join(str(f) for f in key_store(args))}; or give " \
                                           "--vendor-key)"
        print(f"lts-license: --license {args.license}: {e}{where if e.kind == 'unknown-key' else ''}", file=sys.stderr)
        return EXIT_USAGE
    lic = verified.license
    if lic.server_key is None or lic.server_uuid is None:
        print(f"lts-license: --license {args.license}: license {lic.license_id} has no serverKey: a usage statement "
              "can be checked only against a file bound to the server's identity key (issue it with server_key)",
              file=sys.stderr)
        return EXIT_USAGE
    key = licensefile.raw_public_key(lic.server_key)
    previous = None
    try:
        if previous_data is not None:
            try:
                previous = statements.verify(previous_data, lic.server_uuid, key)
            except statements.Broken as e:
                print(f"BROKEN {args.previous} (the previous statement): {e}")
                return EXIT_INVALID
        checked = statements.verify(data, lic.server_uuid, key, previous)
    except statements.Broken as e:
        print(f"BROKEN {args.file}: {e}")
        return EXIT_INVALID
    summary = checked.summary
    if args.json:
        print(json.dumps({"valid": True, **{k: summary[k] for k in (
            "statementId", "serverUuid", "since", "until", "events", "chains", "items", "codes")}}, indent=2))
        return 0
    chains = ", ".join(f"{c['chain']}:{c['start']['seq']}-{c['end']['seq']}" for c in summary["chains"])
    print(f"VALID {args.file}: statement {summary['statementId']} of server {summary['serverUuid']}, "
          f"{summary['since'] or 'the start'} to {summary['until']}, {summary['events']:,} events (chains {chains})"
          + (f", continues statement {previous.summary['statementId']}" if previous else
             ("" if summary.get("previous") is None else
              f"; give --previous to check that it continues statement {summary['previous']['statementId']}")))
    print(statements.totals_table(summary, (i.item_id for i in lic.items)))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lts-license", description="Issue and check signed lts-server license files.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_examples("lts-license keygen --out vendor/                  # once: vendor.key (secret), vendor.pub",
                         "lts-license init 100028117.toml                    # a commented spec to fill in",
                         "lts-license issue 100028117.toml --key vendor/vendor.key --out 100028117.lic",
                         "lts-license verify 100028117.lic --public-key vendor/vendor.pub",
                         "lts-license show 100028117.lic"))
    sub = p.add_subparsers(dest="command", required=True)

    def command(name: str, help_text: str, *example: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".",
                              epilog=_examples(*example), formatter_class=argparse.RawDescriptionHelpFormatter)

    n = command("init", "write a commented license spec template to fill in",
                "lts-license init 100028117.toml --license-id 100028117 --organization-id 216998")
    n.add_argument("spec", help="the TOML file to write, e.g. 100028117.toml")
    n.add_argument("--license-id", default="100000001", help="the license id to put in (default: %(default)s)")
    n.add_argument("--organization-id", default="216998", help="the licensee (default: %(default)s)")
    n.add_argument("--force", action="store_true", help="replace an existing file")
    n.set_defaults(run=cmd_init)
    k = command("keygen", "make a vendor key pair",
                "lts-license keygen --out vendor/   # prints the key id; give vendor.pub to licensees")
    k.add_argument("--out", required=True, help="folder for vendor.key and vendor.pub")
    k.add_argument("--force", action="store_true", help="replace an existing key")
    k.set_defaults(run=cmd_keygen)
    i = command("issue", "sign a TOML spec into a license file",
                "lts-license issue 100028117.toml --key vendor/vendor.key --out 100028117.lic",
                "(lts-license init writes a commented spec)")
    i.add_argument("spec", help="the TOML spec (see lts-license init)")
    i.add_argument("--key", required=True, help="the vendor's private key (vendor.key)")
    i.add_argument("--out", required=True, help="the .lic file to write")
    i.set_defaults(run=cmd_issue)
    v = command("verify", "check a license file's signature and content",
                "lts-license verify 100028117.lic --public-key vendor/vendor.pub   # exit 0 VALID, 1 INVALID")
    v.add_argument("file", help="the .lic file")
    v.add_argument("--public-key", required=True, action="append", help="a trusted vendor.pub (repeatable)")
    v.set_defaults(run=cmd_verify)
    s = command("show", "print a readable summary",
                "lts-license show 100028117.lic --public-key vendor/vendor.pub")
    s.add_argument("file", help="the .lic file")
    s.add_argument("--public-key", action="append", help="verify against this vendor.pub (repeatable)")
    s.set_defaults(run=cmd_show)
    u = sub.add_parser("verify-usage", help="check a licensee's usage statement against its license file",
                       description="Check a usage statement (ltsctl usage export): the server's signature, that the "
                                   "server is the one the license binds, that every usage chain has no gap, edit or "
                                   "reorder (and continues --previous), and print the totals per item. Exit 0 "
                                   "valid, 1 broken (the first event where it breaks is named), 2 usage.")
    u.add_argument("file", help="the statement")
    u.add_argument("--license", required=True, help="the license file the statement reports on (with serverKey)")
    u.add_argument("--vendor-key", action="append", help="the vendor.pub that signed the license (repeatable); "
                                                         "default: the key store")
    u.add_argument("--keys", action="append", help="a key store folder of *.pub files (repeatable; default "
                                                   "$LTS_LICENSE_KEYS or ~/.config/lts-license/keys)")
    u.add_argument("--previous", help="the statement before this one: this one must continue it")
    u.add_argument("--json", action="store_true", help="print the totals as JSON")
    u.set_defaults(run=cmd_verify_usage)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
