"""ltsctl: the admin CLI over the admin API, for operators (tables) and scripts (--json).

The token from `ltsctl login` is kept per server in ~/.config/lts-server/tokens.json (0600).
Every failure prints one clear line and exits non-zero (1: the server refused or failed;
2: usage or local problem; 3: not logged in, or the login was refused).
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import stat
import sys
import urllib.parse
from pathlib import Path
from typing import Any

import aiohttp

from lts_server.web.stats import usage_text

DEFAULT_SERVER = os.environ.get("LTS_SERVER_URL", "http://127.0.0.1:48080")
EXIT_FAILED, EXIT_USAGE, EXIT_AUTH = 1, 2, 3


class CtlError(Exception):
    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


def config_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "lts-server"


def load_tokens() -> dict[str, str]:
    try:
        return json.loads((config_dir() / "tokens.json").read_text())
    except (OSError, ValueError):
        return {}


def save_tokens(servers: list[str], token: str | None) -> None:
    """Keep (or, with None, forget) the token for each of the servers."""
    tokens = load_tokens()
    for server in servers:
        if token is None:
            tokens.pop(server, None)
        else:
            tokens[server] = token
    folder = config_dir()
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = folder / "tokens.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(tokens, f)
    os.chmod(path, 0o600)


class Api:
    """The admin API of one server, or of a cluster's nodes tried in order: a node that cannot be reached
    passes the call to the next (tokens live in the cluster's database, so one is valid on every node)."""

    def __init__(self, servers: list[str], session: aiohttp.ClientSession, tokens: dict[str, str]) -> None:
        self.servers = [s.rstrip("/") for s in servers]
        self.session = session
        self.token = next((tokens[s] for s in self.servers if s in tokens), None)

    @property
    def server(self) -> str:
        return self.servers[0]

    async def call(self, method: str, path: str, body: Any = None, data: bytes | None = None,
                   headers: dict[str, str] | None = None, raw: bool = False, auth: bool = True,
                   timeout: aiohttp.ClientTimeout | None = None) -> Any:
        h = dict(headers or {})
        if auth:
            if not self.token:
                raise CtlError(f"not logged in to {self.server}: run `ltsctl --server {self.server} login`", EXIT_AUTH)
            h["Authorization"] = f"Bearer {self.token}"
        unreachable = []
        for server in list(self.servers):
            try:
                async with self.session.request(method, server + path, json=body, data=data, headers=h,
                                                **({"timeout": timeout} if timeout else {})) as resp:
                    payload = await resp.read()
            except aiohttp.ClientConnectionError as e:
                unreachable.append(f"{server}: {e}")
                continue  # the next node, if any, serves the same cluster
            except aiohttp.ClientError as e:
                raise CtlError(f"cannot reach {server}: {e}") from None
            if unreachable:  # later calls go to the node that answered first
                self.servers.remove(server)
                self.servers.insert(0, server)
            if resp.status >= 400:
                try:
                    error = json.loads(payload)["error"]
                    message = error.get("message", "")
                except (ValueError, KeyError, TypeError):
                    message = payload[:200].decode(errors="replace")
                code = EXIT_AUTH if resp.status == 401 else EXIT_FAILED
                raise CtlError(f"{method} {path}: HTTP {resp.status}: {message}", code)
            return payload if raw else json.loads(payload)
        raise CtlError("cannot reach " + "; ".join(unreachable))


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    if not rows:
        return "(none)"
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ",".join(str(v) for v in value) or "-"
    if isinstance(value, dict):  # nested ones (a code's itemLimits) too, never as a Python repr
        return " ".join(f"{k}=({_cell(v)})" if isinstance(v, dict) else f"{k}={'-' if v is None else v}"
                        for k, v in value.items()) or "-"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _csv(value: str | None) -> list[str] | None:
    if value is None:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


def item_limits(args: argparse.Namespace, current: dict[str, dict[str, int]] | None = None
                ) -> dict[str, dict[str, int]] | None:
    """--reserve ITEM=N and --max-seats ITEM=N as the API's itemLimits, changed on top of the code's `current`
    ones (so an edit changes only the limits it names; N = none removes one); None when neither is given."""
    if not args.reserve and not args.max_seats and not getattr(args, "no_limits", False):
        return None
    limits = {item_id: {k: v for k, v in limit.items() if k in ("reservedSeats", "maxSeats") and v is not None}
              for item_id, limit in (current or {}).items()}
    for flag, key, values in (("--reserve", "reservedSeats", args.reserve), ("--max-seats", "maxSeats", args.max_seats)):
        for value in values or []:
            item_id, _, number = value.partition("=")
            if item_id and number.lower() == "none":
                limits.get(item_id, {}).pop(key, None)
                continue
            if not item_id or not number.isdigit():
                raise CtlError(f"{flag} {value}: expected ITEM=NUMBER (or ITEM=none to remove it), e.g. "
                               f"{flag} 100028117-1=10", EXIT_USAGE)
            limits.setdefault(item_id, {})[key] = int(number)
    # No reservation and no cap is no limit: the item leaves the code's list.
    return {item_id: limit for item_id, limit in limits.items() if limit.get("reservedSeats") or "maxSeats" in limit}


def borrow_days(value: str | None) -> int | None | str:
    """--borrow-max-days: a number of days, or `none` for the items' own limit."""
    if value is None:
        return "keep"
    if value.lower() == "none":
        return None
    if not value.isdigit():
        raise CtlError(f"--borrow-max-days {value}: expected 0-365 or none", EXIT_USAGE)
    return int(value)


def server_url(value: str) -> str:
    """The server's base URL; `host:port` without a scheme means http://host:port."""
    value = value.strip().rstrip("/")
    if "://" not in value:
        value = f"http://{value}"
    scheme = value.split("://", 1)[0].lower()
    if scheme not in ("http", "https"):
        raise CtlError(f"--server {value}: expected an http:// or https:// URL such as http://127.0.0.1:48080",
                       EXIT_USAGE)
    return value


def read_secret(what: str, file: str | None, prompt: bool, env: str | None = None) -> str | None:
    """A password from a file ('-' = standard input), an environment variable or a prompt on the terminal."""
    if file is not None:
        try:
            text = sys.stdin.read() if file == "-" else Path(file).read_text()
        except OSError as e:
            raise CtlError(f"{file}: cannot read the {what}: {e.strerror}", EXIT_USAGE) from None
        return text.rstrip("\r\n")
    if env and os.environ.get(env):
        return os.environ[env]
    if not prompt:
        return None
    if not sys.stdin.isatty():
        hint = f"set ${env}, " if env else ""
        raise CtlError(f"no {what}: {hint}give a file with --password-file, or run on a terminal to be asked",
                       EXIT_USAGE)
    try:
        return getpass.getpass(f"{what}: ")
    except EOFError:
        raise CtlError(f"no {what} was typed", EXIT_USAGE) from None


def new_password(what: str, file: str | None, env: str | None = None) -> str:
    """A new password: from a file or the environment as for read_secret; typed on a terminal, asked twice
    and refused when the two differ (a typo would otherwise lock the admin out)."""
    if file is not None or (env and os.environ.get(env)) or not sys.stdin.isatty():
        password = read_secret(what, file, True, env)
        assert password is not None
        return password
    try:
        first = getpass.getpass(f"new {what}: ")
        second = getpass.getpass(f"new {what} again: ")
    except EOFError:
        raise CtlError(f"no {what} was typed", EXIT_USAGE) from None
    if first != second:
        raise CtlError(f"the two {what}s differ; nothing was set. Run the command again", EXIT_USAGE)
    return first


def write_export(data: bytes, output: str | None) -> None:
    """An export, owner-only (0600): to --output, or to standard output - which, redirected to a file
    (`> events.csv`), is made owner-only too, whatever the umask made of it."""
    if output is not None:
        fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return
    out = sys.stdout.fileno()
    info = os.fstat(out)
    if stat.S_ISREG(info.st_mode) and info.st_uid == os.getuid():
        os.fchmod(out, 0o600)
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


def session_password(args: argparse.Namespace) -> str | None:
    """The session password of codes create/edit: --password, --password-file or --prompt-password."""
    if args.password is not None:
        return args.password
    return read_secret("session password", args.password_file, args.prompt_password)


def confirm(question: str) -> bool:
    if not sys.stdin.isatty():
        return False
    try:
        return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")
    except EOFError:
        return False


def _page_size(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= 10_000:
        raise argparse.ArgumentTypeError(f"{text!r}: a whole number from 1 to 10,000")
    return int(text)


async def _seats(api: Api, item_id: str, borrowed: bool, page_size: int) -> tuple[list[dict[str, Any]], int]:
    """Every seat of the item, page after page (an item may hold millions), and the count the last page gave."""
    seats: dict[str, dict[str, Any]] = {}  # by device: a seat released meanwhile shifts the pages by one
    offset: int | None = 0
    total = 0
    path = f"/api/v1/admin/items/{urllib.parse.quote(item_id, safe='')}/devices"
    while offset is not None:
        page = await api.call("GET", f"{path}?limit={page_size}&offset={offset}")
        seats.update((d["clientUuid"], d) for d in page["devices"] if d["borrowed"] or not borrowed)
        offset, total = page["next"], page["total"]
    return list(seats.values()), total


async def _alerts(api: Api, args: argparse.Namespace) -> tuple[Any, str]:
    base = "/api/v1/admin/alerts"
    action = args.action
    if action == "show":
        out = await api.call("GET", base)
        on = [k for k, v in out["conditions"].items() if v]
        smtp = out["smtp"]
        mail = (f"{smtp['host']}:{smtp['port']} from {smtp['from']}" if smtp["configured"]
                else "not configured ([alerts.smtp] host)")
        return out, "\n".join([
            f"recipients   {out['recipients'] or '(none)'}",
            f"webhooks     {', '.join(h['url'] for h in out['webhooks']) or '(none)'}",
            f"conditions   {', '.join(on) or '(none)'}",
            f"smtp         {mail}",
            f"checks       every {out['checkSeconds']:g} s; failures over {out['failureWindow']['minutes']} min, "
            f"from {out['failureWindow']['minRequests']} requests"])
    if action == "recipients":
        if args.addresses is None:
            out = await api.call("GET", f"{base}/recipients")
        else:
            out = await api.call("PUT", f"{base}/recipients", {"recipients": args.addresses})
        return out, "\n".join(out["addresses"]) or "(none)"
    if action == "webhooks":
        if args.webhook_action == "add":
            body = {"url": args.url, **({"secret": args.secret} if args.secret else {})}
            out = await api.call("POST", f"{base}/webhooks", body)
            return out, f"webhook {out['id']} {out['url']}\nsecret {out['secret']}  (shown once: give it to the receiver)"
        if args.webhook_action == "remove":
            out = await api.call("DELETE", f"{base}/webhooks/{args.id}")
            return out, f"removed webhook {args.id}"
        out = (await api.call("GET", f"{base}/webhooks"))["webhooks"]
        return out, table(out, ["id", "url", "createdAt"])
    if action == "conditions":
        changes = {k: True for k in _csv(args.on) or []} | {k: False for k in _csv(args.off) or []}
        if changes:
            out = (await api.call("PUT", f"{base}/conditions", changes))["conditions"]
        else:
            out = (await api.call("GET", f"{base}/conditions"))["conditions"]
        return out, "\n".join(f"{k:10} {'on' if v else 'off'}" for k, v in out.items())
    if action == "test":
        out = await api.call("POST", f"{base}/test")
        return out, f"test notification {out['alertId']} queued for " + (
            ", ".join(d["target"] for d in out["deliveries"]) or "nobody: add recipients or webhooks first")
    if action == "check":
        out = await api.call("POST", f"{base}/check")
        return out, (f"alert {out['alertId']}: " + ", ".join(out["new"])) if out["new"] else "nothing new"
    if action == "retry":
        out = await api.call("POST", f"{base}/retry")
        return out, f"{out['pending']} pending deliveries are being tried now"
    if action == "open":
        out = (await api.call("GET", f"{base}/open"))["alerts"]
        return out, table(out, ["kind", "subject", "label", "since", "message"])
    out = await api.call("GET", f"{base}/history?limit={args.limit}")
    rows = [{"id": a["id"], "createdAt": a["createdAt"], "type": a["type"], "subject": a["subject"],
             "deliveries": " ".join(f"{d['target']}={d['state']}" for d in a["deliveries"]) or "-"}
            for a in out["alerts"]]
    return out, table(rows, ["id", "createdAt", "type", "subject", "deliveries"])


def server_urls(values: list[str] | None) -> list[str]:
    """--server, repeated or comma-separated (else $LTS_SERVER_URL, the same way), as base URLs."""
    raw = values or [DEFAULT_SERVER]
    urls = [server_url(v) for value in raw for v in value.split(",") if v.strip()]
    if not urls:
        raise CtlError("--server: give at least one URL such as http://127.0.0.1:48080", EXIT_USAGE)
    return list(dict.fromkeys(urls))


async def _usage_export(api: Api, args: argparse.Namespace) -> tuple[Any, str]:
    """Stream a usage statement into --out: a temp file (0600) renamed once its signed last line is in."""
    query = urllib.parse.urlencode([(k, v) for k, v in (
        ("since", args.since), ("until", args.until), ("statement", args.statement)) if v])
    out = Path(args.out)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.partial")
    if not api.token:
        raise CtlError(f"not logged in to {api.server}: run `ltsctl --server {api.server} login`", EXIT_AUTH)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    except OSError as e:
        raise CtlError(f"--out {out}: {e.strerror}", EXIT_USAGE) from None
    last = b""
    try:
        with os.fdopen(fd, "wb") as f:
            async with api.session.get(f"{api.server}/api/v1/usage/export?{query}",
                                       headers={"Authorization": f"Bearer {api.token}"},
                                       timeout=aiohttp.ClientTimeout(total=None, sock_read=3600)) as resp:
                if resp.status >= 400:
                    payload = await resp.read()
                    try:
                        message = json.loads(payload)["error"]["message"]
                    except (ValueError, KeyError, TypeError):
                        message = payload[:200].decode(errors="replace")
                    raise CtlError(f"GET /api/v1/usage/export: HTTP {resp.status}: {message}",
                                   EXIT_AUTH if resp.status == 401 else EXIT_FAILED)
                async for chunk in resp.content.iter_chunked(1 << 16):
                    f.write(chunk)
                    last = (last + chunk)[-(1 << 16):]
            f.flush()
            os.fsync(f.fileno())
        lines = last.rstrip(b"\n").rsplit(b"\n", 1)
        if not last.endswith(b"\n") or not lines[-1].startswith(b"S "):
            raise CtlError("the server ended the statement before its signed summary (see the server log); "
                           f"nothing written to {out}")
        tmp.replace(out)
    except aiohttp.ClientError as e:
        raise CtlError(f"cannot reach {api.server}: {e}") from None
    finally:
        tmp.unlink(missing_ok=True)
    summary = json.loads(lines[-1].split(b" ", 2)[2])
    return ({"out": str(out), **{k: summary[k] for k in ("statementId", "since", "until", "events", "items")}},
            f"{out}: usage statement {summary['statementId']}, {summary['events']:,} events, "
            f"{summary['since'] or 'the start'} to {summary['until']}")


async def run(args: argparse.Namespace) -> int:
    servers = server_urls(args.server)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=args.timeout)) as session:
        api = Api(servers, session, load_tokens())
        server = api.server
        out: Any = None
        cmd = args.command
        if cmd in ("login", "setup"):
            setup = cmd == "setup" or args.setup
            if setup:
                password = new_password("admin password", args.password_file, "LTS_ADMIN_PASSWORD")
                await api.call("POST", "/api/v1/admin/setup", {"password": password}, auth=False)
            else:
                password = read_secret("admin password", args.password_file, True, "LTS_ADMIN_PASSWORD") or ""
            result = await api.call("POST", "/api/v1/admin/login", {"password": password}, auth=False)
            # One token for the whole cluster: kept for every node named and every node the server lists.
            listed = (await api.call("GET", "/api/v1/servers", auth=False))["servers"]
            nodes = list(dict.fromkeys([*api.servers, *(s.rstrip("/") for s in listed if "://" in s)]))
            save_tokens(nodes, result["token"])
            out = {"loggedIn": True, "expiresAt": result["expiresAt"], "servers": nodes}
            text = f"logged in to {', '.join(nodes)} until {result['expiresAt']}"
        elif cmd == "logout":
            await api.call("POST", "/api/v1/admin/logout")
            save_tokens([s for s, t in load_tokens().items() if t == api.token], None)
            out, text = {"loggedOut": True}, f"logged out of {server}"
        elif cmd == "identity":
            out = await api.call("GET", "/api/v1/server", auth=False)
            out = {"serverUuid": out["serverUuid"], "keyId": out["keyId"], "identityKey": out["publicKey"]}
            text = "\n".join([
                f"server UUID    {out['serverUuid']}", f"identity key   {out['identityKey']}",
                f"key id         {out['keyId']}", "",
                "Send both with your license request; the vendor's spec takes them as:",
                f'  server_uuid = "{out["serverUuid"]}"', f'  server_key = "{out["identityKey"]}"'])
        elif cmd == "clock":
            if args.action == "accept":
                out = await api.call("POST", "/api/v1/admin/clock/accept")
                text = (f"accepted the clock ({out['now']}), {out['acceptedBehindSeconds']:,} s behind the records; "
                        f"time-limited items are judged no earlier than {out['floor']}")
            else:
                out = await api.call("GET", "/api/v1/admin/clock")
                text = "\n".join([
                    f"clock           {out['now']}", f"latest recorded {out['latestRecorded'] or '-'}",
                    f"floor           {out['floor'] or '-'}",
                    f"state           " + (f"BEHIND by {out['behindSeconds']:,} s: nothing is granted (error 160); "
                                           "fix the clock or `ltsctl clock accept`" if out["behind"] else "ok"),
                    f"accepted        {out['acceptedAt'] or 'never'}"])
        elif cmd == "usage":
            if args.action == "export":
                out, text = await _usage_export(api, args)
            else:
                out = (await api.call("GET", "/api/v1/admin/usage/statements"))["statements"]
                text = table(out, ["statementId", "createdAt", "since", "until", "sha256"])
        elif cmd == "status":
            out = await api.call("GET", "/api/v1/admin/status")
            d = out["importDirectory"]
            text = "\n".join([
                f"server UUID   {out['serverUuid']}", f"version       {out['version']}",
                f"uptime        {out['uptimeSeconds']:,} s", f"database      {out['databaseBytes']:,} bytes",
                f"import dir    {d['path']} ({d.get('files', '?')} files, {d['rejected']} rejected)",
                f"counts        {_cell(out['counts'])}", f"servers       {', '.join(out['servers'])}"])
        elif cmd == "licenses":
            if args.action == "list":
                out = (await api.call("GET", "/api/v1/admin/licenses"))["licenses"]
                text = table(out, ["licenseId", "alias", "organizationId", "revision", "items", "updatedAt"])
            elif args.action == "show":
                out = await api.call("GET", f"/api/v1/admin/licenses/{args.id}")
                text = "\n".join(f"{k:18} {_cell(v)}" for k, v in out.items() if k != "fileText")
            else:
                try:
                    data = Path(args.file).read_bytes()
                except OSError as e:
                    raise CtlError(f"{args.file}: {e.strerror}", EXIT_USAGE) from None
                out = await api.call("POST", f"/api/v1/admin/licenses?name={Path(args.file).name}", data=data,
                                     headers={"Content-Type": "application/octet-stream"})
                text = f"{args.file}: {out['state']} (license {out.get('licenseId')})"
        elif cmd == "items":
            if args.action == "list":
                out = (await api.call("GET", "/api/v1/admin/items"))["items"]
                rows = [{**i, "usage": usage_text(i)} for i in out]
                text = table(rows, ["itemId", "state", "product", "deploymentType", "licenseType", "usage",
                                    "expiresAt", "stateDetail"])
            else:
                out = await api.call("POST", f"/api/v1/admin/items/{args.id}/{args.action}")
                text = f"item {args.id}: {'revoked' if out['revoked'] else 'active'}"
        elif cmd == "codes":
            base = "/api/v1/admin/handshake-codes"
            if args.action == "list":
                out = (await api.call("GET", base))["codes"]
                text = table(out, ["name", "default", "items", "customOrder", "passwordSet", "requestsToday"])
            elif args.action == "show":
                out = await api.call("GET", f"{base}/{args.name}")
                text = "\n".join(f"{k:16} {_cell(v)}" for k, v in out.items())
            elif args.action == "create":
                body = {"organizationId": args.organization, "custom": args.custom,
                        "items": _csv(args.items) or [], "domains": _csv(args.domains) or [],
                        "appIds": _csv(args.app_ids) or [], "processNames": _csv(args.process_names) or []}
                if (days := borrow_days(args.borrow_max_days)) != "keep":
                    body["borrowMaxDays"] = days
                if (limits := item_limits(args)) is not None:
                    body["itemLimits"] = limits
                password = session_password(args)
                if password:
                    body["sessionPassword"] = password
                out = await api.call("POST", base, body)
                text = f"created {out['name']}"
            elif args.action == "edit":
                current = None
                if (args.reserve or args.max_seats) and not args.no_limits:
                    current = (await api.call("GET", f"{base}/{args.name}"))["itemLimits"]
                body = {k: v for k, v in {
                    "custom": args.custom, "items": _csv(args.items), "domains": _csv(args.domains),
                    "appIds": _csv(args.app_ids), "processNames": _csv(args.process_names),
                    "sessionPassword": "" if args.no_password else session_password(args),
                    "itemLimits": item_limits(args, current)}.items() if v is not None}
                if (days := borrow_days(args.borrow_max_days)) != "keep":
                    body["borrowMaxDays"] = days
                out = await api.call("PATCH", f"{base}/{args.name}", body)
                text = f"saved {out['name']}"
            elif args.action == "delete":
                code = await api.call("GET", f"{base}/{args.name}")
                query = ""
                if code["default"]:
                    question = (f"{args.name} is the default code of license {code['sourceLicenseId']}: devices that "
                                f"send only organization {code['organizationId']} use it. Delete it?")
                    if not (args.confirm_default or confirm(question)):
                        raise CtlError(f"{args.name} is a default code: not deleted. Give --confirm-default to delete "
                                       f"it; `ltsctl codes restore-default {code['sourceLicenseId']}` brings it back")
                    query = "?confirm=default"
                out = await api.call("DELETE", f"{base}/{args.name}{query}")
                text = f"deleted {args.name}" + (
                    f" (restore with: ltsctl codes restore-default {code['sourceLicenseId']})" if query else "")
            elif args.action == "restore-default":
                out = await api.call("POST", f"/api/v1/admin/licenses/{args.license}/default-code")
                text = f"restored {out['name']} with items {', '.join(out['items'])}"
            else:
                if args.default:
                    out = await api.call("DELETE", f"{base}/{args.name}/usage-order")
                else:
                    if not args.items:
                        raise CtlError("codes order: give the items in order, or --default", EXIT_USAGE)
                    out = await api.call("PUT", f"{base}/{args.name}/usage-order", {"items": args.items})
                text = f"{args.name} usage order: {', '.join(out['items'])}" + (
                    " (custom)" if out["customOrder"] else " (default)")
        elif cmd == "imports" and args.action == "dismiss":
            if not args.name:
                raise CtlError("imports dismiss: give the rejected file's NAME (its path or file name, as "
                               "`ltsctl imports --rejected` lists it)", EXIT_USAGE)
            out = await api.call("POST", "/api/v1/admin/imports/dismiss", {"name": args.name})
            text = f"dismissed the rejection of {out['path']} ({out['reason']}); a changed file is tried again"
        elif cmd == "imports":
            out = (await api.call("GET", "/api/v1/admin/imports"))["files"]
            if args.rejected:
                out = [f for f in out if f["state"] == "rejected"]
            text = table(out, ["path", "state", "licenseId", "revision", "seenAt", "reason"])
        elif cmd == "devices" and args.action == "binding":
            out = await api.call("GET", f"/api/v1/admin/devices/{urllib.parse.quote(args.client, safe='')}/binding")
            text = "\n".join(f"{k:12} {_cell(v)}" for k, v in out.items())
        elif cmd == "devices" and args.action == "reset-binding":
            out = await api.call("DELETE", f"/api/v1/admin/devices/{urllib.parse.quote(args.client, safe='')}/binding")
            text = f"reset the fingerprint binding of {args.client}: its next grant binds it again"
        elif cmd == "devices" and args.action == "clones":
            out = (await api.call("GET", f"/api/v1/admin/devices/clones?days={args.days}"))["clones"]
            text = table(out, ["clientUuid", "lastCloneAt", "clones", "boundAt"])
        elif cmd == "devices":
            if args.action == "list":
                out, total = await _seats(api, args.item, args.borrowed, args.page)
                text = table(out, ["clientUuid", "code", "grantedAt", "refreshedAt", "expiresAt", "borrowedUntil"])
                if not args.borrowed and len(out) != total:  # seats came or went while it read the pages
                    text += f"\n{len(out):,} listed; the item counts {total:,} seats now"
            elif args.action == "holders":
                out = await api.call("GET", f"/api/v1/admin/items/{args.item}/holders?limit={args.limit}")
                text = table(out["holders"], ["clientUuid", "kind", "since", "lastSeen", "code", "expiresAt",
                                              "borrowedUntil"]) + (
                    f"\n{len(out['holders'])} of {out['total']:,} shown" if out["next"] is not None else "")
            else:
                out = await api.call("DELETE", f"/api/v1/admin/items/{args.item}/holders/{args.client}")
                text = f"released {args.client} from {args.item}" + (
                    f"; note: {out['warning']}" if out.get("warning") else "")
        elif cmd == "stats":
            query = urllib.parse.urlencode({"bucket": args.bucket, **({"from": args.since} if args.since else {})})
            out = await api.call("GET", f"/api/v1/admin/stats/codes/{args.code}?{query}")
            s = out["summary"]
            text = "\n".join([
                f"{args.code}: all granted {s['all']['granted']:,} refused {s['all']['refused']:,} "
                f"units {s['all']['units']:,} devices {s['all']['devices']:,}",
                f"today: granted {s['today']['granted']:,} refused {s['today']['refused']:,}",
                table([b for b in out["series"] if b["granted"] or b["refused"] or b["units"]],
                      ["start", "granted", "refused", "units", "devices"])])
        elif cmd == "alerts":
            out, text = await _alerts(api, args)
        elif cmd == "events" and args.action == "archive":
            # A large backlog takes minutes: no total deadline, only one for each read.
            out = await api.call("POST", "/api/v1/admin/events/archive", {"before": args.before},
                                 timeout=aiohttp.ClientTimeout(total=None, sock_read=3600))
            text = "\n".join([
                f"archived {out['events']:,} events into {len(out['files'])} file(s) in {out['folder']}"
                + (f"; finished {out['resumed']} interrupted archive(s) ({out['resumedEvents']:,} events)"
                   if out["resumed"] else ""),
                table(out["files"], ["path", "firstSeq", "lastSeq", "events", "bytes"]) if out["files"] else ""]).rstrip()
        elif cmd == "events" and args.action == "archives":
            out = (await api.call("GET", "/api/v1/admin/events/archives"))["archives"]
            text = table(out, ["id", "createdAt", "before", "events", "bytes", "done", "path"])
        elif cmd == "events":
            # urlencode: a '+' in a time zone offset must not arrive as a space.
            params = urllib.parse.urlencode([(k, v) for k, v in (
                ("from", args.since), ("to", args.until), ("code", args.code), ("item", args.item),
                ("type", args.type)) if v])
            headers = {"Accept": "text/csv"} if args.format == "csv" else {}
            data = await api.call("GET", f"/api/v1/admin/events?{params}", headers=headers, raw=True)
            write_export(data, args.output)
            return 0
        else:
            raise CtlError(f"unknown command {cmd}", EXIT_USAGE)
    print(json.dumps(out, indent=2) if args.json else text)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ltsctl", description="Administer an lts-server over its admin API.",
        epilog="Exit status: 0 ok, 1 the server refused or failed, 2 usage, 3 not logged in or login refused.")
    p.add_argument("--server", action="append", metavar="URL",
                   help="the server's URL; http:// is assumed without a scheme (default: "
                        f"{DEFAULT_SERVER}, or $LTS_SERVER_URL). Repeat it (or separate URLs with commas) "
                        "for the nodes of a cluster: the first that answers serves; `login` logs in once for all")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per request (default: %(default)s)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    login = sub.add_parser("login", help="log in as admin",
                           description="Log in as admin; the password comes from --password-file, "
                                       "$LTS_ADMIN_PASSWORD or a prompt on the terminal.")
    login.add_argument("--setup", action="store_true", help="set the first admin password (12+ characters), "
                                                            "then log in")
    setup = sub.add_parser("setup", help="set the first admin password (12+ characters), then log in",
                           description="Set the first admin password of a new server, then log in. On a terminal "
                                       "the password is asked twice; a mismatch sets nothing.")
    for c in (login, setup):
        c.add_argument("--password-file", metavar="FILE", help="read the admin password from FILE ('-': stdin)")
    sub.add_parser("logout", help="end this token")
    sub.add_parser("status", help="server UUID, version, uptime, database, import folder")
    sub.add_parser("identity", help="the server UUID and identity public key to send with a license request",
                   description="Print the server UUID and its identity public key (base64 raw Ed25519): the vendor "
                               "binds license files to both (server_uuid, server_key), so devices holding only the "
                               "vendor's key can verify this server's authorizations. No login needed.")
    clock = sub.add_parser("clock", help="the server's clock against its records; accept a clock set back")
    clock.add_argument("action", nargs="?", choices=["show", "accept"], default="show",
                       help="show (default); accept: serve again with the clock as it is (an event; time-limited "
                            "items are still judged no earlier than the latest time recorded)")
    usage = sub.add_parser("usage", help="usage statements for the vendor").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    exp = usage.add_parser("export", help="write the next usage statement (signed, for lts-license verify-usage)",
                           description="Write the next usage statement: every usage chain's events since the last "
                                       "statement (the first: since --since), up to --until (default now), and "
                                       "the totals per item, signed by the server's identity key. The file is "
                                       "written only once complete (mode 0600).")
    exp.add_argument("--since", help="ISO date-time with zone; the first statement starts here (later ones start "
                                     "where the previous ended)")
    exp.add_argument("--until", help="ISO date-time with zone, not in the future (default: now)")
    exp.add_argument("--out", required=True, help="the statement file to write")
    exp.add_argument("--statement", type=int, help="write statement ID again, byte for byte, instead")
    usage.add_parser("statements", help="statements exported so far")
    lic = sub.add_parser("licenses", help="imported licenses").add_subparsers(dest="action", required=True,
                                                                              metavar="ACTION")
    lic.add_parser("list", help="every imported license")
    lic.add_parser("show", help="one license, with its items").add_argument("id", help="license id")
    lic.add_parser("import", help="upload a license file").add_argument("file", help="the .lic file")
    imports = sub.add_parser("imports", help="every file the server has seen: imported, unchanged or rejected "
                                             "and why")
    imports.add_argument("action", nargs="?", choices=["list", "dismiss"], default="list",
                         help="list (the default), or dismiss NAME: end a rejection that needs no fix (it stops "
                              "alerting; the same bytes are not tried again, a changed file is)")
    imports.add_argument("name", nargs="?", help="with dismiss: the rejected file's path or file name")
    imports.add_argument("--rejected", action="store_true", help="only the rejected files")
    items = sub.add_parser("items", help="license items").add_subparsers(dest="action", required=True,
                                                                         metavar="ACTION")
    items.add_parser("list", help="items with their live use")
    items.add_parser("revoke", help="refuse the item at the next handshake (error 113)").add_argument(
        "id", help="item id")
    items.add_parser("restore", help="undo a revoke").add_argument("id", help="item id")
    codes = sub.add_parser("codes", help="handshake codes").add_subparsers(dest="action", required=True,
                                                                           metavar="ACTION")
    codes.add_parser("list", help="every handshake code")
    codes.add_parser("show", help="one handshake code").add_argument("name", help="e.g. 216998-vehicleCode")
    create = codes.add_parser("create", help="add a handshake code")
    create.add_argument("organization", help="organization id (the fixed first part of the name)")
    create.add_argument("custom", help="the custom part: 1-64 of A-Z a-z 0-9 . _ -")
    edit = codes.add_parser("edit", help="change a handshake code (only what you give)")
    edit.add_argument("name", help="e.g. 216998-vehicleCode")
    edit.add_argument("--custom", help="rename (not for default codes)")
    edit.add_argument("--no-password", action="store_true", help="remove the session password")
    edit.add_argument("--no-limits", action="store_true", help="remove every seat limit (--reserve, --max-seats); "
                                                               "with them, the code keeps only those given")
    for c in (create, edit):
        c.add_argument("--items", help="comma-separated item ids")
        c.add_argument("--domains", help="comma-separated domains, e.g. *.example.com")
        c.add_argument("--app-ids", help="comma-separated mobile app ids")
        c.add_argument("--process-names", help="comma-separated process names")
        secret = c.add_mutually_exclusive_group()
        secret.add_argument("--password", help="session password (visible to other users of this machine in the "
                                               "process list: prefer --password-file or --prompt-password)")
        secret.add_argument("--password-file", metavar="FILE", help="read the session password from FILE "
                                                                     "('-': stdin)")
        secret.add_argument("--prompt-password", action="store_true", help="ask for the session password")
        c.add_argument("--borrow-max-days", metavar="DAYS",
                       help="lower the items' borrowing limit for this code: 0-365 (0: no borrowing), or none "
                            "for the items' own")
        c.add_argument("--reserve", action="append", metavar="ITEM=N",
                       help="seats of ITEM only this code may take (repeatable; edit changes only the items "
                            "named, ITEM=none removes the reservation)")
        c.add_argument("--max-seats", action="append", metavar="ITEM=N",
                       help="the most seats of ITEM this code holds (repeatable; ITEM=none removes the cap)")
    delete = codes.add_parser("delete", help="delete a handshake code (its statistics stay)")
    delete.add_argument("name", help="e.g. 216998-vehicleCode")
    delete.add_argument("--confirm-default", action="store_true",
                        help="delete even a default code (asked on a terminal otherwise)")
    codes.add_parser("restore-default", help="bring back a license's deleted default code").add_argument(
        "license", help="license id")
    order = codes.add_parser("order", help="set the usage order, or --default")
    order.add_argument("name", help="e.g. 216998-vehicleCode")
    order.add_argument("items", nargs="*", help="the code's items, first used first")
    order.add_argument("--default", action="store_true", help="back to the default order")
    dev = sub.add_parser("devices", help="devices holding seats").add_subparsers(dest="action", required=True,
                                                                                metavar="ACTION")
    dev_list = dev.add_parser("list", help="devices holding a seat of an item, with the code and a borrow's end")
    dev_list.add_argument("item", help="item id (every seat of it, read a page at a time)")
    dev_list.add_argument("--borrowed", action="store_true", help="only borrowed seats (offline devices)")
    dev_list.add_argument("--page", type=_page_size, default=10_000, metavar="N",
                          help="seats per request, 1 to 10,000 (default: %(default)s)")
    holders = dev.add_parser("holders", help="who holds an item: device, since, last seen, code, borrowed until "
                                             "(concurrent items too)")
    holders.add_argument("item", help="item id")
    holders.add_argument("--limit", type=int, default=1000, help="at most this many (default: %(default)s)")
    rel = dev.add_parser("release", help="free a device's seat or end its hold on a concurrent item (its "
                                         "authorizations on the item end; a borrowed seat's device keeps working "
                                         "offline until its borrowedUntil)")
    rel.add_argument("item", help="item id")
    rel.add_argument("client", help="the device's clientUuid")
    dev.add_parser("binding", help="the fingerprint binding of a device (clone detection)").add_argument(
        "client", help="the device's clientUuid")
    dev.add_parser("reset-binding", help="forget a device's fingerprint (a replaced machine): its next grant "
                                         "binds it again").add_argument("client", help="the device's clientUuid")
    clones = dev.add_parser("clones", help="devices refused as clones (error 151) lately")
    clones.add_argument("--days", type=int, default=30, help="over the last DAYS days (default: %(default)s)")
    stats = sub.add_parser("stats", help="statistics of a handshake code")
    stats.add_argument("code", help="e.g. 216998-vehicleCode (also a deleted one)")
    stats.add_argument("--bucket", default="1d", choices=["3m", "2h", "1d", "1mo"],
                       help="bucket size (default: 1d; 1mo: calendar months)")
    stats.add_argument("--since", help="ISO date-time with zone, e.g. 2026-11-01T00:00:00Z")
    al = sub.add_parser("alerts", help="usage alerts: recipients, webhooks, conditions, history").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    al.add_parser("show", help="recipients, webhooks, conditions and SMTP at a glance")
    rcpt = al.add_parser("recipients", help="show, or set with ADDRESSES separated by semicolons")
    rcpt.add_argument("addresses", nargs="?", help="e.g. 'ops@example.com; lead@example.com' ('' removes all)")
    hooks = al.add_parser("webhooks", help="webhooks that get each alert as signed JSON").add_subparsers(
        dest="webhook_action", required=True, metavar="ACTION")
    hooks.add_parser("list", help="every webhook")
    add = hooks.add_parser("add", help="add a webhook; prints its signing secret once")
    add.add_argument("url", help="http:// or https:// URL that receives the alerts")
    add.add_argument("--secret", help="signing secret (16+ characters); made up when not given")
    hooks.add_parser("remove", help="remove a webhook").add_argument("id", help="the webhook's id (webhooks list)")
    cond = al.add_parser("conditions", help="show, or switch with --on/--off")
    cond.add_argument("--on", help="comma-separated: seats,units,overuse,failures,expiry,import")
    cond.add_argument("--off", help="comma-separated kinds to switch off")
    al.add_parser("test", help="send a test notification to every recipient and webhook")
    al.add_parser("check", help="check the conditions now")
    al.add_parser("retry", help="try every pending delivery now, not after its backoff (e.g. once SMTP works); "
                                "alerts older than [alerts] max_age go out as one summary")
    al.add_parser("open", help="conditions met at the last check")
    hist = al.add_parser("history", help="sent alerts with the state of each delivery")
    hist.add_argument("--limit", type=int, default=20, help="at most this many alerts (default: %(default)s)")
    ev = sub.add_parser("events", help="usage events").add_subparsers(dest="action", required=True,
                                                                      metavar="ACTION")
    export = ev.add_parser("export", help="write events to stdout (NDJSON or CSV)")
    export.add_argument("--format", choices=["ndjson", "csv"], default="ndjson", help="default: ndjson")
    export.add_argument("--since", help="events at or after this ISO date-time")
    export.add_argument("--until", help="events before this ISO date-time")
    export.add_argument("--code", help="only this handshake code")
    export.add_argument("--item", help="only this item")
    export.add_argument("--type", help="only this event type, e.g. handshake (see docs/api.md)")
    export.add_argument("--output", metavar="FILE", help="write to FILE (owner-only, 0600) instead of standard "
                                                         "output; a redirected standard output is made 0600 too")
    archive = ev.add_parser("archive", help="move device events before a date into compressed files on the server",
                            description="Move device events (handshakes, seat changes, usage records) stamped "
                                        "before --before, and already counted in the statistics, out of the "
                                        "database into gzip'd NDJSON files in the server's [events] archive_dir.")
    archive.add_argument("--before", required=True, help="ISO date-time with zone, at least an hour ago, "
                                                         "e.g. 2026-10-01T00:00:00Z")
    ev.add_parser("archives", help="archive files written so far")
    _json_anywhere(p)
    return p


def _json_anywhere(p: argparse.ArgumentParser) -> None:
    """`--json` after the command too (`ltsctl identity --json`), not only before it. SUPPRESS keeps a
    subcommand from resetting a `--json` given before it."""
    for action in p._subparsers._group_actions if p._subparsers else ():
        for child in getattr(action, "choices", {}).values():
            if "--json" not in child._option_string_actions:
                child.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                                   help="print JSON for scripts")
            _json_anywhere(child)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return asyncio.run(run(args))
    except CtlError as e:
        print(f"ltsctl: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        return 130
    except OSError as e:  # e.g. the token file cannot be written: one line, not a traceback
        print(f"ltsctl: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
