"""schemathesis over our own OpenAPI document, against a live daemon on each backend, with and without
an admin token.

Any 5xx, an undocumented status or content type, or an answer that does not match its schema
fails the suite: the document is what clients read first, and fuzzed input must get a 4xx. So
does a line at error level or a traceback in the daemon's log. (The hand-written hostile corpus
is tests/test_hostile_corpus.py.)
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import checks

from lts_server.web.openapi import document
from tests.conftest import ADMIN_PASSWORD, Daemon, item, license_spec, make_vendor, start_daemon, stop_daemon, write_config

CHECKS = [checks.not_a_server_error, checks.status_code_conformance, checks.content_type_conformance,
          checks.response_schema_conformance]
# Operations that end the fuzzer's own session would turn the rest of the run into 401s.
ENDS_SESSION = {"/api/v1/admin/logout"}
# Per operation and run, the same cases each run; LTS_FUZZ_EXAMPLES=500 searches deeper, with random cases.
EXAMPLES = int(os.environ.get("LTS_FUZZ_EXAMPLES", "25"))
_addresses = itertools.count(1)


def _client() -> dict[str, str]:
    n = next(_addresses)
    return {"X-Forwarded-For": f"198.18.{n // 256 % 256}.{n % 256}"}


def _post(url: str, body: dict, token: str | None = None) -> dict:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    with urllib.request.urlopen(request, timeout=10) as resp:
        return json.loads(resp.read())


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def live(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, str]]:
    folder: Path = tmp_path_factory.mktemp("fuzz")
    storage: dict[str, object] = {"state_dir": str(folder / "state")}
    if request.param == "postgresql":
        url = asyncio.run(request.getfixturevalue("pg_server").new_database())
        storage.update(backend="postgresql", url=url, follow_ms=50)
    vendor = make_vendor(folder / "vendor")
    (folder / "import").mkdir()
    (folder / "import" / "a.lic").write_bytes(vendor.issue(license_spec("100028117", items=[
        item("100028117-1"), item("100028117-2", "per-scan", quantity=1000)])))
    # Each fuzzed request claims its own client address through the (trusted) local proxy header, so
    # that the login throttle's waits (up to 8 s an attempt) do not stretch the run to minutes.
    daemon = start_daemon(write_config(folder, vendor, log={"level": "warning", "format": "json"}, storage=storage,
                                       server={"host": "127.0.0.1", "port": 0, "trusted_proxies": ["127.0.0.1"]}),
                          folder)
    try:
        _post(f"{daemon.url}/api/v1/admin/setup", {"password": ADMIN_PASSWORD})
        token = _post(f"{daemon.url}/api/v1/admin/login", {"password": ADMIN_PASSWORD})["token"]
        yield daemon, token
    finally:
        assert stop_daemon(daemon) == 0
    # The fields, not the bare words: fuzzed values (an uploaded file's name) end up in log lines too.
    errors = [line for line in daemon.log().splitlines()
              if line.startswith("{") and (json.loads(line)["level"] in ("error", "critical") or
                                           "exception" in json.loads(line))]
    assert not errors, "\n".join(errors[:20])


# The document is static, so the schema is built at import (schemathesis' fixture-based loader
# does not work with pytest 9.2); the live server's URL is given per call.
schema = schemathesis.openapi.from_dict(document())
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize="LTS_FUZZ_EXAMPLES" not in os.environ,
                suppress_health_check=list(HealthCheck))


@schema.parametrize()
@FUZZ
def test_fuzzed_requests_without_a_token_get_documented_answers(case: schemathesis.Case,
                                                                 live: tuple[Daemon, str]) -> None:
    daemon, _ = live
    case.call_and_validate(base_url=daemon.url, headers=_client(), checks=CHECKS, timeout=10)


@schema.parametrize()
@FUZZ
def test_fuzzed_requests_with_an_admin_token_get_documented_answers(case: schemathesis.Case,
                                                                     live: tuple[Daemon, str]) -> None:
    daemon, token = live
    if case.path in ENDS_SESSION:
        return
    case.call_and_validate(base_url=daemon.url, headers={"Authorization": f"Bearer {token}", **_client()},
                           checks=CHECKS, timeout=10)
