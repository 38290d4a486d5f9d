"""Configuration: one TOML file, every key overridable by `LTS_<SECTION>__<KEY>`.

msgspec validates the typed structure and names the failing field, so a bad
config is one precise line instead of a traceback.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal, get_args, get_origin

import msgspec

from lts_server.core.usage import MARKS_DAYS

DEFAULT_PATH = Path("/etc/lts-server/lts-server.toml")
ENV_PREFIX = "LTS_"

# 0 asks the OS for a free port (used by the tests).
Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
Positive = Annotated[float, msgspec.Meta(gt=0)]


class _Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class ServerSection(_Section):
    host: str = "127.0.0.1"
    port: Port = 48080
    tls_cert: str | None = None
    tls_key: str | None = None
    # Seconds a stopping server lets in-flight requests finish.
    shutdown_timeout: Positive = 10.0
    # The server list handed to clients: main first, then standby.
    # "self" stands for this server.
    servers: list[str] = msgspec.field(default_factory=lambda: ["self"])
    # Makes this server a standby: while the main server at this URL answers
    # /healthz, device requests here get 503 with error 100.
    standby_of: str | None = None
    standby_check_seconds: Positive = 5.0
    # Slow or idle clients: seconds to send a request head, to send its body once the head is
    # in, and between two requests on a keep-alive connection. Past them the connection is closed.
    header_timeout: Positive = 10.0
    body_timeout: Positive = 30.0
    idle_timeout: Positive = 30.0
    # Open connections at most (lowered to fit the file descriptor limit). At the cap a new
    # connection replaces the longest-waiting idle one, or gets 503 when none is idle.
    max_connections: Annotated[int, msgspec.Meta(ge=1)] = 4096
    # Reverse proxies (addresses or networks) whose X-Forwarded-For names the real client, which the
    # login throttle then keys on. Empty: the header is ignored, the peer address is the client.
    trusted_proxies: list[str] = msgspec.field(default_factory=list)
    # Processes serving the port together (SO_REUSEPORT): on PostgreSQL each a node of the cluster; on
    # SQLite front processes in front of one writer process (lts_server/writer.py).
    workers: Annotated[int, msgspec.Meta(ge=1, le=256)] = 1


class StorageSection(_Section):
    state_dir: str
    # "sqlite": one node, the database file in state_dir (or `database`).
    # "postgresql": any number of nodes on the database at `url`.
    backend: Literal["sqlite", "postgresql"] = "sqlite"
    database: str | None = None
    # libpq URL, postgresql://user@host:port/dbname; the password may come from
    # PGPASSWORD or ~/.pgpass instead of the URL.
    url: str | None = None
    # A file whose first line is the database password (e.g. a systemd credential: the unit sets
    # LTS_STORAGE__PASSWORD_FILE=%d/db-password); unset: PGPASSWORD or ~/.pgpass, as libpq does.
    password_file: str | None = None
    # How often a node reads what the other nodes of a PostgreSQL cluster changed.
    follow_ms: Annotated[int, msgspec.Meta(ge=10, le=60_000)] = 200
    # How long start-up keeps trying to reach PostgreSQL before it gives up (exit 1).
    connect_seconds: Annotated[float, msgspec.Meta(ge=0, le=3600)] = 15.0
    # How long a write waits for a lock held by another process before it
    # fails with a clear error instead of hanging.
    busy_timeout_ms: Annotated[int, msgspec.Meta(ge=0, le=600_000)] = 5000
    # Devices whose seats and authorizations stay in memory (the most recently
    # used); the others are read from the database when they ask (lts_server/devices.py).
    device_cache: Annotated[int, msgspec.Meta(ge=1000, le=100_000_000)] = 100_000


class ClusterSection(_Section):
    """Nodes of a PostgreSQL cluster (ignored on SQLite)."""

    # A node's registration lasts lease_ms / 2 and is renewed every lease_ms / 4; the seats leased to a
    # node that died without stopping (kill -9, power loss) are back on their items within lease_ms.
    lease_ms: Annotated[int, msgspec.Meta(ge=400, le=600_000)] = 5000
    # Most seats a node leases from a hot item at once (lts_server/leases.py); 0: no leases, every claim
    # goes through the item's row.
    lease_seats: Annotated[int, msgspec.Meta(ge=0, le=100_000)] = 64


class ImportSection(_Section):
    directory: str
    rescan_seconds: Positive = 60.0
    watch: bool = True
    # A file is verified only once it has been unchanged this long, or was renamed into place after its
    # last write: a file still being copied raises no false rejection.
    settle_ms: Annotated[int, msgspec.Meta(ge=0, le=600_000)] = 2000


class VendorSection(_Section):
    public_keys: list[str] = msgspec.field(default_factory=list)
    allow_unbound: bool = False


class AdminSection(_Section):
    # Serve the admin API (and portal) on their own address; unset = the
    # server's listener. With a separate listener, admin paths answer 404 on
    # the device listener.
    host: str | None = None
    port: Port | None = None
    token_ttl_hours: Annotated[float, msgspec.Meta(gt=0, le=24 * 30)] = 12.0


class SmtpSection(_Section):
    # Unset: e-mail deliveries wait in the outbox (and say why) until a host is configured.
    host: str | None = None
    port: Port = 25
    # STARTTLS after connecting (usually port 587), or TLS from the first byte (usually 465).
    starttls: bool = False
    tls: bool = False
    username: str | None = None
    # The SMTP password is read from this file (first line), never from the config itself.
    password_file: str | None = None
    from_: str = msgspec.field(name="from", default="lts-server@localhost")
    timeout_seconds: Positive = 30.0
    # PEM file of the CA(s) that sign the SMTP server's certificate, when it is
    # not one the system trusts (an intranet CA); unset: the system's.
    ca_file: str | None = None


class AlertsSection(_Section):
    # The reference checks every 10 minutes; a check also runs at once after
    # an import and after a usage report that takes a unit quota past a level.
    check_seconds: Annotated[float, msgspec.Meta(gt=0, le=600)] = 600.0
    # Failed authorizations per code are judged over this window, and only
    # once the code had this many requests in it (1 failure of 1 is no alarm).
    failure_window_minutes: Annotated[int, msgspec.Meta(ge=3, le=1440)] = 60
    failure_min_requests: Annotated[int, msgspec.Meta(ge=1)] = 20
    # Prefix of the links in notifications, e.g. "https://lts.example.com/dls";
    # unset, links are paths such as /portal/stats/item/X.
    portal_url: str | None = None
    # How often the outbox is looked at, the longest wait between two tries
    # of a delivery, and when a delivery is given up (shown as failed).
    deliver_seconds: Positive = 5.0
    retry_max_seconds: Positive = 600.0
    give_up_hours: Positive = 72.0
    # Alerts still undelivered this long after they were raised (SMTP was not set up, a receiver was down)
    # go to each receiver as one summary instead of one message each: "24h", "90m", "2d", "3600s", or a
    # number of hours.
    max_age: float | str = "24h"
    smtp: SmtpSection = msgspec.field(default_factory=SmtpSection)


class MetricsSection(_Section):
    enabled: bool = True
    # With [admin] port set, /metrics is served on the admin listener only, open
    # to whoever reaches that listener. Otherwise it needs a bearer token: the
    # one in token_file (for Prometheus' bearer_token_file) or an admin token;
    # public = true serves it to anyone instead.
    public: bool = False
    token_file: str | None = None


class EventsSection(_Section):
    # Device events (handshakes, seat changes, usage records) older than this many days are moved
    # out of the database into compressed files in archive_dir; 0 keeps them in the database forever.
    # Statistics are kept in the rollups and stay exact.
    retain_days: Annotated[int, msgspec.Meta(ge=0, le=36_500)] = 0
    # Where the archive files go; unset: <state_dir>/archive.
    archive_dir: str | None = None


class ClockSection(_Section):
    # Seconds the clock may read before the latest time the server has recorded: past that it grants
    # nothing (error 160) until the clock catches up or the admin accepts it (`ltsctl clock accept`).
    tolerance: Annotated[float, msgspec.Meta(ge=1, le=86_400)] = 300.0


class AuthorizationsSection(_Section):
    # refreshBy = issuedAt + this (never past expiresAt): an online device asks the server again then,
    # so a released seat or a revoked item reaches it within this time.
    refresh_minutes: Annotated[float, msgspec.Meta(gt=0, le=525_600)] = 60.0
    # The longest an authorization lasts, so the longest a released device may run offline on it;
    # 0: as long as its license type allows (per-device and per-server: the period; per-domain: a day;
    # per-scan, per-page and the concurrent types: an hour). Never past the item's expiry and grace.
    max_offline_hours: Annotated[float, msgspec.Meta(ge=0, le=24 * 366)] = 0.0


class StatsSection(_Section):
    # Retention tiers of the statistics: 3-minute and 2-hour buckets are kept this many days, daily buckets
    # daily_days; monthly and all-time ones for good. 0 keeps that tier for good. At least 31 (a usage
    # record may come 30 days late), and daily_days at least hourly_days.
    hourly_days: Annotated[int, msgspec.Meta(ge=0, le=36_500)] = 90
    daily_days: Annotated[int, msgspec.Meta(ge=0, le=36_500)] = 730


class QueueSection(_Section):
    # The longest a handshake may wait for a seat (its waitSeconds); more is refused with 400.
    max_wait_s: Annotated[int, msgspec.Meta(ge=1, le=3600)] = 300
    # Requests waiting per item at most; beyond it the refusal (120) comes at once.
    max_waiting: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 10_000


class LogSection(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "text"] = "auto"


class Config(_Section):
    storage: StorageSection
    import_: ImportSection = msgspec.field(name="import")
    server: ServerSection = msgspec.field(default_factory=ServerSection)
    vendor: VendorSection = msgspec.field(default_factory=VendorSection)
    admin: AdminSection = msgspec.field(default_factory=AdminSection)
    alerts: AlertsSection = msgspec.field(default_factory=AlertsSection)
    metrics: MetricsSection = msgspec.field(default_factory=MetricsSection)
    events: EventsSection = msgspec.field(default_factory=EventsSection)
    clock: ClockSection = msgspec.field(default_factory=ClockSection)
    authorizations: AuthorizationsSection = msgspec.field(default_factory=AuthorizationsSection)
    stats: StatsSection = msgspec.field(default_factory=StatsSection)
    queue: QueueSection = msgspec.field(default_factory=QueueSection)
    cluster: ClusterSection = msgspec.field(default_factory=ClusterSection)
    log: LogSection = msgspec.field(default_factory=LogSection)
    # Where the file was read from; relative paths in it are taken from its folder.
    source: str = ""

    @property
    def base_dir(self) -> Path:
        return Path(self.source).resolve().parent if self.source else Path.cwd()

    def path(self, value: str) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else (self.base_dir / p).resolve()

    @property
    def state_dir(self) -> Path:
        return self.path(self.storage.state_dir)

    @property
    def database_path(self) -> Path:
        if self.storage.database:
            return self.path(self.storage.database)
        return self.state_dir / "lts-server.sqlite3"

    @property
    def archive_dir(self) -> Path:
        return self.path(self.events.archive_dir) if self.events.archive_dir else self.state_dir / "archive"

    @property
    def import_dir(self) -> Path:
        return self.path(self.import_.directory)

    def database_password(self) -> str | None:
        """The PostgreSQL password from storage.password_file (checked readable at load), else None."""
        if not self.storage.password_file:
            return None
        lines = self.path(self.storage.password_file).read_text(encoding="utf-8").splitlines()
        return lines[0] if lines else ""

    @property
    def public_key_paths(self) -> list[Path]:
        return [self.path(p) for p in self.vendor.public_keys]


class ConfigError(Exception):
    """A configuration problem, phrased as the one line an operator reads."""


def load(path: Path | str = DEFAULT_PATH, environ: Mapping[str, str] | None = None) -> Config:
    path = Path(path)
    environ = os.environ if environ is None else environ
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: the config file is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    if "source" in raw:
        raise ConfigError(f"{path}: key 'source': unknown key")
    overridden = _apply_env(raw, environ, path)
    raw["source"] = str(path)
    try:
        config = msgspec.convert(raw, Config)
    except msgspec.ValidationError as e:
        raise ConfigError(_describe(path, str(e), overridden)) from None
    try:
        _check(config, path)
    except ConfigError as e:  # say which environment variable set the key, as for a type error
        raise ConfigError(_name_source(str(e), path, overridden)) from None
    return config


def _apply_env(raw: dict, environ: Mapping[str, str], path: Path) -> dict[str, str]:
    """Merge LTS_<SECTION>__<KEY> variables into the raw table; returns key -> variable name.

    A nested table takes one more `__` per level: LTS_ALERTS__SMTP__HOST sets [alerts.smtp] host.
    """
    overridden: dict[str, str] = {}
    for name, value in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        parts = name[len(ENV_PREFIX) :].lower().split("__")
        if not all(parts):
            raise ConfigError(f"{name}: expected LTS_<SECTION>__<KEY> (or LTS_<SECTION>__<TABLE>__<KEY>)")
        table = raw
        for depth, part in enumerate(parts[:-1]):
            table = table.setdefault(part, {})
            if not isinstance(table, dict):
                raise ConfigError(f"{path}: key '{'.'.join(parts[: depth + 1])}': expected a table")
        table[parts[-1]] = _env_value(value)
        overridden[".".join(parts)] = name
    return overridden


def _env_value(text: str) -> object:
    """Read a variable as a TOML value when it is one (9000, true, ["a"]), else as a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


_KEY_PART = re.compile(r"\.(\w+)|\[(\d+)\]")
_AT = re.compile(r"^(?P<msg>.*?)(?: - at `\$(?P<where>[^`]*)`)?$", re.S)


def _describe(path: Path, message: str, overridden: dict[str, str]) -> str:
    m = _AT.match(message)
    assert m is not None
    msg, where = m.group("msg"), m.group("where") or ""
    key = "".join(f".{name}" if name else f"[{index}]" for name, index in _KEY_PART.findall(where))
    key = key.lstrip(".")
    if msg.startswith("Object missing required field"):
        field = msg.split("`")[1]
        key = f"{key}.{field}" if key else field
        msg = "required key is missing"
    elif msg.startswith("Object contains unknown field"):
        field = msg.split("`")[1]
        key = f"{key}.{field}" if key else field
        msg = "unknown key"
    elif msg.startswith("Invalid enum value"):
        choices = _choices(key)
        if choices:
            msg = f"{msg}; expected one of {', '.join(repr(c) for c in choices)}"
    source = f" (set by {overridden[key]})" if key in overridden else ""
    return f"{path}: key '{key or '<top>'}'{source}: {msg[0].lower()}{msg[1:]}"


def _name_source(message: str, path: Path, overridden: dict[str, str]) -> str:
    """`message` ("PATH: key 'a.b': ...") with the variable that set a.b, if one did."""
    head = f"{path}: key '"
    key = message[len(head):].partition("'")[0] if message.startswith(head) else ""
    if key.partition("[")[0] not in overridden:
        return message
    return message.replace(f"{head}{key}'", f"{head}{key}' (set by {overridden[key.partition('[')[0]]})", 1)


def _choices(key: str) -> tuple[str, ...]:
    """The allowed values of a Literal-typed key such as 'log.level'."""
    section, _, name = key.partition(".")
    fields = {f.encode_name: f for f in msgspec.structs.fields(Config)}
    if section not in fields:
        return ()
    section_type = fields[section].type
    for f in msgspec.structs.fields(section_type):
        if f.encode_name == name and get_origin(f.type) is Literal:
            return get_args(f.type)
    return ()


def _check(config: Config, path: Path) -> None:
    server = config.server
    for i, proxy in enumerate(server.trusted_proxies):
        try:
            ipaddress.ip_network(proxy, strict=False)
        except ValueError:
            raise ConfigError(f"{path}: key 'server.trusted_proxies[{i}]': expected an IP address or network "
                              f"such as 127.0.0.1 or 10.0.0.0/8, got {proxy!r}") from None
    storage = config.storage
    if storage.backend == "postgresql":
        if not storage.url:
            raise ConfigError(f"{path}: key 'storage.url': required with backend = \"postgresql\" "
                              "(postgresql://user@host:port/dbname)")
        problem = url_problem(storage.url)
        if problem:
            raise ConfigError(f"{path}: key 'storage.url': {problem}")
        if storage.password_file and not os.access(config.path(storage.password_file), os.R_OK):
            raise ConfigError(f"{path}: key 'storage.password_file': cannot read "
                              f"{config.path(storage.password_file)} (with systemd: LoadCredential= in the unit)")
    if server.workers > 1 and server.port == 0:
        raise ConfigError(f"{path}: key 'server.port': several workers share one port; name it (not 0)")
    if bool(server.tls_cert) != bool(server.tls_key):
        raise ConfigError(f"{path}: key 'server.tls_cert': tls_cert and tls_key must be set together")
    for key in ("tls_cert", "tls_key"):
        value = getattr(server, key)
        if value and not os.access(config.path(value), os.R_OK):
            raise ConfigError(f"{path}: key 'server.{key}': cannot read {config.path(value)}")
    try:
        duration_seconds(config.alerts.max_age)
    except ValueError as e:
        raise ConfigError(f"{path}: key 'alerts.max_age': {e}") from None
    smtp = config.alerts.smtp
    if smtp.starttls and smtp.tls:
        raise ConfigError(f"{path}: key 'alerts.smtp.starttls': choose starttls or tls, not both")
    if smtp.password_file and not os.access(config.path(smtp.password_file), os.R_OK):
        raise ConfigError(f"{path}: key 'alerts.smtp.password_file': cannot read {config.path(smtp.password_file)}")
    if smtp.username and not smtp.password_file:
        raise ConfigError(f"{path}: key 'alerts.smtp.username': set alerts.smtp.password_file too")
    if smtp.ca_file and not os.access(config.path(smtp.ca_file), os.R_OK):
        raise ConfigError(f"{path}: key 'alerts.smtp.ca_file': cannot read {config.path(smtp.ca_file)}")
    token_file = config.metrics.token_file
    if token_file and not os.access(config.path(token_file), os.R_OK):
        raise ConfigError(f"{path}: key 'metrics.token_file': cannot read {config.path(token_file)}")
    stats = config.stats
    for key in ("hourly_days", "daily_days"):
        days = getattr(stats, key)
        if 0 < days < MARKS_DAYS:
            raise ConfigError(f"{path}: key 'stats.{key}': {days} days is too short: a usage record may come 30 "
                              f"days late, so keep at least {MARKS_DAYS} (or 0: for good)")
    if stats.daily_days and not 0 < stats.hourly_days <= stats.daily_days:
        raise ConfigError(f"{path}: key 'stats.daily_days': daily buckets must be kept at least as long as the "
                          f"3-minute and 2-hour ones (stats.hourly_days = {stats.hourly_days}; 0 is for good: "
                          f"to keep everything for good, set both to 0)")
    for i, key_path in enumerate(config.public_key_paths):
        if not os.access(key_path, os.R_OK):
            raise ConfigError(f"{path}: key 'vendor.public_keys[{i}]': cannot read {key_path}")


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration_seconds(value: float | str) -> float:
    """'24h', '90m', '2d', '3600s' (or a number of hours) in seconds."""
    if isinstance(value, (int, float)):
        hours = float(value)
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*", value)
        if not m:
            raise ValueError(f"expected a duration such as \"24h\", \"90m\", \"2d\" or a number of hours, "
                             f"got {value!r}")
        hours = float(m.group(1)) * _UNITS[m.group(2)] / 3600
    if hours <= 0:
        raise ValueError(f"expected a duration above zero, got {value!r}")
    return hours * 3600


def url_problem(url: str) -> str | None:
    """What is wrong with a PostgreSQL URL, or None."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        return f"expected a postgresql:// URL, not {parts.scheme or 'no scheme'}:// "
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        return "the port in the URL is not a number"
    if not parts.path.strip("/") and "dbname=" not in parts.query:
        return "the URL names no database (postgresql://user@host:port/dbname)"
    return None
