"""The README's cluster recipe, run with the shipped files (issue 22, item 5).

From an empty machine: PostgreSQL with a password-protected role (scram-sha-256, so a wrong or missing
password fails), the password handed to each node as systemd would hand its credential
(LoadCredential= -> $CREDENTIALS_DIRECTORY, Environment= of systemd/lts-server@.service), two nodes from
config/cluster-node.toml (the second made by the documented sed), one ltsctl login for both, a node
stopped while ltsctl and devices carry on. systemd itself cannot run here: the unit is checked with
`systemd-analyze verify` and its settings are applied by hand; nginx is not installed here, so the
"one address" is exercised through the server list both nodes share.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests import pg
from tests.conftest import ADMIN_PASSWORD, ROOT, UNDER_CI, Daemon, Vendor, free_port, item, license_spec, \
    start_daemon, stop_daemon

pytestmark = pytest.mark.slow
DB_PASSWORD = "s3cret-of-the-lts-role"
SUPERUSER_PASSWORD = "postgres-superuser-password"


@pytest.fixture
def scram_postgres() -> Iterator[pg.PgServer]:
    """Step 1's database server: password authentication for every connection (no trust)."""
    binary = pg._bin()
    folder = Path(tempfile.mkdtemp(prefix="lts-pg-scram-"))  # reachable by the postgres user, unlike pytest's
    pwfile = folder / "pw"
    pwfile.write_text(SUPERUSER_PASSWORD + "\n")
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
        shutil.chown(pwfile, "postgres", "postgres")
    port = free_port()
    subprocess.run(pg._as_owner([str(binary / "initdb"), "-D", str(folder / "data"), "-U", "postgres",
                                 "--auth=scram-sha-256", f"--pwfile={pwfile}", "-E", "UTF8", "--no-sync"]),
                   check=True, capture_output=True)
    server = pg.PgServer(folder, port, binary)
    server.launch()
    yield server
    server.stop()


def _unit_settings(unit: str) -> tuple[str, list[tuple[str, str]], list[tuple[str, str]]]:
    """ExecStart, the Environment= pairs and the LoadCredential= pairs of a unit file."""
    exec_start = next(line.split("=", 1)[1] for line in unit.splitlines() if line.startswith("ExecStart="))
    env = [tuple(line.split("=", 1)[1].split("=", 1)) for line in unit.splitlines() if line.startswith("Environment=")]
    creds = [tuple(line.split("=", 1)[1].split(":", 1)) for line in unit.splitlines()
             if line.startswith("LoadCredential=")]
    return exec_start, env, creds  # type: ignore[return-value]


def _ctl(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "XDG_CONFIG_HOME": str(home), "LTS_ADMIN_PASSWORD": ADMIN_PASSWORD}
    env.pop("LTS_SERVER_URL", None)
    return subprocess.run([sys.executable, "-m", "lts_server.cli.ctl", *args], capture_output=True, text=True,
                          env=env, timeout=120)


async def _handshake(url: str, client: str) -> tuple[int, dict]:
    body = {"handshakeCode": "216998-C1", "clientUuid": client, "product": "barcode-reader",
            "deploymentType": "browser"}
    async with aiohttp.ClientSession() as s, s.post(f"{url}/api/v1/handshake", json=body) as resp:
        return resp.status, await resp.json()


def test_the_readme_recipe_two_nodes_on_postgresql(tmp_path: Path, vendor: Vendor,
                                                   scram_postgres: pg.PgServer) -> None:
    readme = (ROOT / "README.md").read_text()
    recipe = readme[readme.index("**Setting it up: from an empty machine"):readme.index("**Active-active")]
    for step in ("createuser --pwprompt lts", "createdb -O lts lts", "/etc/lts-server/db-password",
                 "cp config/cluster-node.toml /etc/lts-server/node1.toml", "s/^port = 48081$/port = 48082/",
                 "systemctl enable --now lts-server@node1 lts-server@node2",
                 "--server http://127.0.0.1:48081 --server http://127.0.0.1:48082 login --setup"):
        assert step in recipe, step
    etc, var = tmp_path / "etc" / "lts-server", tmp_path / "var" / "lib" / "lts-server"
    etc.mkdir(parents=True)

    # 1. The role with a password and its database, as createuser --pwprompt and createdb make them.
    admin_url = f"postgresql://postgres:{SUPERUSER_PASSWORD}@127.0.0.1:{scram_postgres.port}/postgres"

    async def create_role() -> None:
        import asyncpg

        conn = await asyncpg.connect(admin_url)
        try:
            await conn.execute(f"CREATE ROLE lts LOGIN PASSWORD '{DB_PASSWORD}'")
            await conn.execute("CREATE DATABASE lts OWNER lts")
        finally:
            await conn.close()

    asyncio.run(create_role())

    # 2. The files every node uses.
    shutil.copy(vendor.pub_path, etc / "vendor.pub")
    fd = os.open(etc / "db-password", os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, (DB_PASSWORD + "\n").encode())
    os.close(fd)

    # 3. One config per node, from the shipped example (its url's host set, as the recipe says).
    def here(text: str) -> str:
        return (text.replace("/etc/lts-server", str(etc)).replace("/var/lib/lts-server", str(var))
                .replace("127.0.0.1:5432", f"127.0.0.1:{scram_postgres.port}"))

    ports = free_port(), free_port()
    node1 = here((ROOT / "config" / "cluster-node.toml").read_text()).replace("port = 48081", f"port = {ports[0]}")
    (etc / "node1.toml").write_text(node1)
    # The documented sed, for this test's free ports.
    (etc / "node2.toml").write_text(re.sub(rf"^port = {ports[0]}$", f"port = {ports[1]}", node1, flags=re.M))
    parsed = tomllib.loads(node1)
    assert parsed["storage"]["backend"] == "postgresql" and "password_file" in parsed["storage"]
    assert "workers" in parsed["server"] and ":" not in parsed["storage"]["url"].split("@")[0].split("//")[1]
    check = subprocess.run([sys.executable, "-m", "lts_server", "--config", str(etc / "node1.toml"),
                            "--check-config"], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0 and "ok" in check.stdout, check.stderr

    # 4. The nodes, started as lts-server@node1 / @node2 would be.
    unit = (ROOT / "systemd" / "lts-server@.service").read_text()
    exec_start, environment, credentials = _unit_settings(unit)
    assert exec_start == "/opt/lts-server/bin/lts-server --config /etc/lts-server/%i.toml"
    assert "DynamicUser=yes" in unit and ("db-password", "/etc/lts-server/db-password") in credentials
    assert ".pgpass" not in unit.replace("No ~/.pgpass", "")
    if shutil.which("systemd-analyze") or UNDER_CI:
        (tmp_path / "lts-server@.service").write_text(
            unit.replace("/opt/lts-server/bin/lts-server", str(Path(sys.executable).parent / "lts-server")))
        (tmp_path / "lts-server@node1.service").symlink_to(tmp_path / "lts-server@.service")
        verify = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "lts-server@node1.service")],
                                capture_output=True, text=True, timeout=60)
        assert verify.returncode == 0, verify.stderr
    daemons: list[Daemon] = []

    def start(node: str, port: int) -> Daemon:
        creds = tmp_path / "credentials" / node  # $CREDENTIALS_DIRECTORY: systemd copies each credential in
        creds.mkdir(parents=True)
        for name, source in credentials:
            shutil.copy(here(source), creds / name)
        env = {key: here(value.replace("%i", node).replace("%d", str(creds))) for key, value in environment}
        env["CREDENTIALS_DIRECTORY"] = str(creds)
        config = Path(here(exec_start.split("--config ", 1)[1].replace("%i", node)))
        d = start_daemon(config, tmp_path, env=env, port=port)
        daemons.append(d)
        return d

    try:
        d1 = start("node1", ports[0])
        d2 = start("node2", ports[1])
        for d, node in ((d1, "node1"), (d2, "node2")):
            listening = next(json.loads(line) for line in d.log().splitlines()
                             if '"server.listening"' in line)
            assert listening["database"].startswith("postgresql://lts@") and DB_PASSWORD not in d.log()
            assert "sqlite" not in listening["database"]
            assert (var / node).is_dir()  # one state folder per node

        # 5. One login for the whole cluster; any node answers with the same token.
        home = tmp_path / "xdg"
        login = _ctl(home, "--server", d1.url, "--server", d2.url, "login", "--setup")
        assert login.returncode == 0, login.stderr
        tokens = json.loads((home / "lts-server" / "tokens.json").read_text())
        assert tokens[d1.url] == tokens[d2.url]
        uuids = set()
        for url in (d1.url, d2.url):
            status = _ctl(home, "--server", url, "--json", "status")
            assert status.returncode == 0, status.stderr
            uuids.add(json.loads(status.stdout)["serverUuid"])
        assert len(uuids) == 1  # one identity
        uuid = uuids.pop()
        lic = tmp_path / "c1.lic"
        lic.write_bytes(vendor.issue(license_spec("C1", server_uuid=uuid, items=[item("c1-1", quantity=5)])))
        imported = _ctl(home, "--server", f"{d1.url},{d2.url}", "licenses", "import", str(lic))
        assert imported.returncode == 0 and "imported" in imported.stdout, imported.stderr
        assert asyncio.run(_handshake(d1.url, "car-1"))[0] == 200
        deadline = time.monotonic() + 10  # the other node learns of it within follow_ms
        while (answer := asyncio.run(_handshake(d2.url, "car-2")))[0] != 200:
            assert time.monotonic() < deadline, answer
            time.sleep(0.2)

        # A node goes away: ltsctl and devices carry on through the other.
        assert stop_daemon(d1) == 0
        out = _ctl(home, "--server", f"{d1.url},{d2.url}", "--json", "status")
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["counts"]["seats"] == 2
        status, body = asyncio.run(_handshake(d2.url, "car-1"))  # its seat moved with it
        assert status == 200 and body["authorization"]["itemId"] == "c1-1"
        holders = _ctl(home, "--server", d2.url, "--json", "devices", "holders", "c1-1")
        assert sorted(h["clientUuid"] for h in json.loads(holders.stdout)["holders"]) == ["car-1", "car-2"]
    finally:
        for d in daemons:
            stop_daemon(d)

    # Without the credential the database refuses the node, and it says so.
    (tmp_path / "credentials" / "node2" / "db-password").write_text("wrong\n")
    env = {key: here(value.replace("%i", "node2").replace("%d", str(tmp_path / "credentials" / "node2")))
           for key, value in environment}
    env["LTS_SERVER__PORT"] = str(ports[1])
    refused = subprocess.run([sys.executable, "-m", "lts_server", "--config", str(etc / "node2.toml")],
                             capture_output=True, text=True, timeout=60, env={**os.environ, **env})
    assert refused.returncode == 1 and "password authentication failed" in refused.stderr
