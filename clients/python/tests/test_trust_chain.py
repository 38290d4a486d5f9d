"""What the client refuses: keys it does not trust, answers for something it did not ask, stale or
replayed cache entries. Each refusal writes nothing to the cache."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fakeserver import REQUEST, FakeServer, kid, raw_b64, start  # noqa: F401 - start is a fixture

from lts_client import (
    BadBinding,
    BadSignature,
    LtsClient,
    NotRequested,
    OutsideValidity,
    ServerUnavailable,
    Trust,
    UntrustedKey,
)

VENDOR = Ed25519PrivateKey.generate()
VENDOR_KEYS = {kid(VENDOR): raw_b64(VENDOR)}


def files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


async def test_pinned_to_server_a_an_answer_from_server_b_is_refused_and_nothing_is_cached(
        start: Any, tmp_path: Path) -> None:
    a = await start()
    b = await start()  # another machine answering on the server's address, with a key of its own
    cache = tmp_path / "cache"
    async with LtsClient([b.url], cache_dir=cache, public_keys={a.key_id: a.public_b64}) as client:
        with pytest.raises(UntrustedKey):
            await client.handshake(**REQUEST)
    assert files(cache) == []
    assert len(b.calls) == 1  # it asked B for a handshake, and never for B's key


async def test_with_vendor_keys_a_server_the_vendor_did_not_license_is_refused(start: Any, tmp_path: Path) -> None:
    licensed = await start(FakeServer(vendor=VENDOR))
    self_made = await start(FakeServer(vendor=Ed25519PrivateKey.generate()))  # binds itself with its own "vendor" key
    unbound = await start(FakeServer())
    cache = tmp_path / "cache"
    for rogue in (self_made, unbound):
        async with LtsClient([rogue.url], cache_dir=cache, vendor_keys=VENDOR_KEYS) as client:
            with pytest.raises(UntrustedKey):
                await client.handshake(**REQUEST)
    assert files(cache) == []
    async with LtsClient([licensed.url], cache_dir=cache, vendor_keys=VENDOR_KEYS) as client:
        auth = await client.handshake(**REQUEST)
    assert auth.trust is Trust.VENDOR
    assert auth.binding is not None and auth.binding.key_id == kid(VENDOR)
    assert "keys.json" not in files(cache)  # nothing learned: the chain is checked every time


async def test_a_binding_naming_another_server_key_is_refused(start: Any) -> None:
    """A forger copies a licensed server's binding but signs with its own key."""
    licensed = FakeServer(vendor=VENDOR)
    forger = await start(FakeServer(vendor=VENDOR, key=Ed25519PrivateKey.generate()))
    forger.statement = licensed.statement  # type: ignore[method-assign]
    async with LtsClient([forger.url], vendor_keys=VENDOR_KEYS) as client:
        with pytest.raises(UntrustedKey):
            await client.handshake(**REQUEST)


@pytest.mark.parametrize(("field", "value"), [
    ("clientUuid", "another-device"), ("product", "another-product"), ("deploymentType", "browser"),
    ("handshakeCode", "216998-other"), ("organizationId", "777"), ("serverUuid", "11111111-2222-3333-4444-555555555555"),
])
async def test_an_authorization_for_something_else_is_refused(start: Any, tmp_path: Path, field: str,
                                                              value: str) -> None:
    fake = await start(FakeServer(alter={field: value}))
    cache = tmp_path / "cache"
    request = {**REQUEST, "organization_id": "216998"}
    async with LtsClient([fake.url], cache_dir=cache, public_keys={fake.key_id: fake.public_b64},
                         server_uuids=[fake.server_uuid]) as client:
        with pytest.raises(NotRequested) as refused:
            await client.handshake(**request)
    assert refused.value.field == field
    assert files(cache) == []


@pytest.mark.parametrize(("field", "value"), [
    ("serverUuid", "11111111-2222-3333-4444-555555555555"), ("licenseId", "L9"), ("itemId", "L1-9"),
    ("licenseType", "per-scan"), ("expiresAt", "2999-01-01T00:00:00Z"), ("bindingSha256", "00" * 32),
])
async def test_with_vendor_trust_an_authorization_outside_its_binding_is_refused(start: Any, field: str,
                                                                                 value: str) -> None:
    fake = await start(FakeServer(vendor=VENDOR, alter={field: value}))
    async with LtsClient([fake.url], vendor_keys=VENDOR_KEYS) as client:
        with pytest.raises(BadBinding):
            await client.handshake(**REQUEST)


async def test_an_expired_answer_is_refused(start: Any, tmp_path: Path) -> None:
    now = datetime.now(UTC)
    fake = await start(FakeServer(clock=lambda: now - timedelta(hours=3)))  # signed long ago, replayed
    cache = tmp_path / "cache"
    async with LtsClient([fake.url], cache_dir=cache, public_keys={fake.key_id: fake.public_b64}) as client:
        with pytest.raises(OutsideValidity):
            await client.handshake(**REQUEST, now=now)
    assert files(cache) == []


async def test_a_device_clock_far_ahead_is_told_so(start: Any, tmp_path: Path) -> None:
    fake = await start()
    cache = tmp_path / "cache"
    async with LtsClient([fake.url], cache_dir=cache, public_keys={fake.key_id: fake.public_b64}) as client:
        with pytest.raises(OutsideValidity, match="clock"):
            await client.handshake(**REQUEST, now=datetime(2099, 1, 1, tzinfo=UTC))
    assert files(cache) == []


async def test_the_cache_serves_only_the_same_request_and_password(start: Any, tmp_path: Path) -> None:
    fake = await start(FakeServer(lifetime=timedelta(days=30)))
    cache = tmp_path / "cache"
    keys = {fake.key_id: fake.public_b64}
    async with LtsClient([fake.url], cache_dir=cache, public_keys=keys) as client:
        first = await client.handshake(**REQUEST, session_password="right")
    assert "right" not in "".join(p.read_text(errors="replace") for p in cache.iterdir())
    async with LtsClient(["http://127.0.0.1:9"], cache_dir=cache, public_keys=keys, timeout=1) as offline:
        assert (await offline.handshake(**REQUEST, session_password="right")).raw == first.raw
        for other in ({"session_password": "wrong"}, {}, {"session_password": "right", "edition": "pro"},
                      {"session_password": "right", "client_uuid": "dev-2"}):
            with pytest.raises(ServerUnavailable):
                await offline.handshake(**{**REQUEST, **other})


async def test_a_cache_entry_copied_to_another_request_is_refused(start: Any, tmp_path: Path) -> None:
    fake = await start(FakeServer(lifetime=timedelta(days=30)))
    cache = tmp_path / "cache"
    keys = {fake.key_id: fake.public_b64}
    async with LtsClient([fake.url], cache_dir=cache, public_keys=keys) as client:
        await client.handshake(**REQUEST)
        entry = next(cache.glob("auth-*"))
        other = client._cache_file({"clientUuid": "dev-2", "product": "barcode-reader", "deploymentType": "desktop",
                                    "handshakeCode": "216998-L1", **({"deviceFingerprint": client.fingerprint}
                                                                      if client.fingerprint else {})})
    assert other is not None
    other.write_bytes(entry.read_bytes())
    async with LtsClient(["http://127.0.0.1:9"], cache_dir=cache, public_keys=keys, timeout=1) as offline:
        with pytest.raises(ServerUnavailable):
            await offline.handshake(**{**REQUEST, "client_uuid": "dev-2"})


async def test_a_device_clock_set_back_ignores_the_cache_and_asks_the_server(start: Any, tmp_path: Path) -> None:
    now = datetime.now(UTC)
    fake = await start(FakeServer(lifetime=timedelta(days=30), clock=lambda: now))
    cache = tmp_path / "cache"
    keys = {fake.key_id: fake.public_b64}
    async with LtsClient([fake.url], cache_dir=cache, public_keys=keys) as client:
        first = await client.handshake(**REQUEST, now=now)
        assert client.newest_server_time is not None
    async with LtsClient([fake.url], cache_dir=cache, public_keys=keys) as client:
        assert client.newest_server_time == first.issued_at  # kept in the cache across restarts
        # Within the tolerance the cache serves; 10 minutes back it is ignored and the server asked again.
        assert (await client.handshake(**REQUEST, now=now - timedelta(minutes=4))).raw == first.raw
        assert len(fake.calls) == 1
        await client.handshake(**REQUEST, now=now - timedelta(minutes=10))
        assert len(fake.calls) == 2
    async with LtsClient(["http://127.0.0.1:9"], cache_dir=cache, public_keys=keys, timeout=1) as offline:
        with pytest.raises(ServerUnavailable, match="clock"):
            await offline.handshake(**REQUEST, now=now - timedelta(days=1))


async def test_an_edited_cache_file_is_worthless(start: Any, tmp_path: Path) -> None:
    fake = await start(FakeServer(lifetime=timedelta(days=30)))
    cache = tmp_path / "cache"
    keys = {fake.key_id: fake.public_b64}
    async with LtsClient([fake.url], cache_dir=cache, public_keys=keys) as client:
        await client.handshake(**REQUEST)
    entry = next(cache.glob("auth-*"))
    import base64
    import json
    data = json.loads(entry.read_text())
    answer = base64.b64decode(data["answer"]).replace(b"desktop", b"Desktop", 1)
    data["answer"] = base64.b64encode(answer).decode()
    entry.write_text(json.dumps(data))
    async with LtsClient(["http://127.0.0.1:9"], cache_dir=cache, public_keys=keys, timeout=1) as offline:
        with pytest.raises(ServerUnavailable):
            await offline.handshake(**REQUEST)
        with pytest.raises(BadSignature):  # the same bytes checked directly say why
            from lts_client import verify_answer
            from lts_client.trust import keyring
            verify_answer(answer, request={}, now=datetime.now(UTC), pinned_keys=keyring(keys, "k"))
