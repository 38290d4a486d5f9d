"""The fixed vectors of docs/authorization-format.md, run through the client's verifier (lts_client.trust):
one answer verifies, the others fail for the reason they name."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

import lts_client
from lts_client.trust import keyring, verify_answer

VECTORS = Path(__file__).resolve().parent / "vectors"
NAMES = sorted(p.stem for p in VECTORS.glob("*.json") if p.stem != "keys")


def test_there_are_a_valid_vector_and_at_least_five_that_must_not_verify() -> None:
    outcomes = [json.loads((VECTORS / f"{n}.json").read_text())["valid"] for n in NAMES]
    assert outcomes.count(True) >= 1 and outcomes.count(False) >= 5
    assert {"valid", "wrong-vendor", "wrong-server-uuid", "forged-server-key", "altered-field", "expired"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_the_clients_verifier_over_each_vector(name: str) -> None:
    vector = json.loads((VECTORS / f"{name}.json").read_text())
    now = datetime.fromisoformat(vector["now"].replace("Z", "+00:00"))

    def check() -> lts_client.trust.Verified:
        return verify_answer(vector["answer"].encode(), request=vector["request"], now=now,
                             vendor_keys=keyring(vector["vendorKeys"], "vendor"))

    if vector["valid"]:
        assert check().trust is lts_client.Trust.VENDOR
    else:
        with pytest.raises(lts_client.BadSignature) as refused:
            check()
        assert type(refused.value).__name__ == vector["error"], str(refused.value)


def test_the_vectors_are_what_the_generator_writes(tmp_path: Path) -> None:
    """Regenerating changes nothing: the files are the documented bytes, not hand-edited."""
    before = {p.name: p.read_bytes() for p in VECTORS.glob("*.json")}
    subprocess.run([sys.executable, str(VECTORS / "make_vectors.py")], check=True, timeout=60)
    assert {p.name: p.read_bytes() for p in VECTORS.glob("*.json")} == before
