"""Signing authorizations on the loop or on a thread, and the CPUs that decide which (lts_server/cpus.py)."""

from __future__ import annotations

import asyncio
import base64
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from lts_server import cpus, signer
from lts_server.signer import BatchSigner


@pytest.mark.parametrize("threaded", [False, True])
async def test_every_request_of_a_batch_gets_the_signature_of_its_own_data(threaded: bool) -> None:
    key = Ed25519PrivateKey.generate()
    signing = BatchSigner(key, threaded)
    data = [f"authorization {i}".encode() for i in range(50)]
    signatures = await asyncio.gather(*(signing.sign(d) for d in data))
    for d, s in zip(data, signatures):
        key.public_key().verify(base64.b64decode(s), d)  # raises InvalidSignature on a mix-up
    assert len(set(signatures)) == 50


@pytest.mark.parametrize("threaded", [False, True])
async def test_a_failed_signature_fails_its_batch_instead_of_leaving_it_waiting(threaded: bool) -> None:
    class Broken:
        def sign(self, data: bytes) -> bytes:
            raise ValueError("no key")

    signing = BatchSigner(Broken(), threaded)  # type: ignore[arg-type]
    results = await asyncio.wait_for(asyncio.gather(signing.sign(b"a"), signing.sign(b"b"),
                                                    return_exceptions=True), 5)
    assert [type(r) for r in results] == [ValueError, ValueError]


def _tree(tmp_path: Path, cgroup: str, files: dict[str, str]) -> tuple[Path, Path]:
    proc, root = tmp_path / "proc", tmp_path / "cgroup"
    proc.mkdir(parents=True)
    (proc / "cgroup").write_text(cgroup)
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return proc, root


def test_a_v1_quota_of_a_quarter_core_is_a_quarter_cpu(tmp_path: Path) -> None:
    proc, root = _tree(tmp_path, "4:memory:/x\n1:cpu,cpuacct:/bench/node\n0::/\n", {
        "cpu,cpuacct/cpu.cfs_quota_us": "-1", "cpu,cpuacct/cpu.cfs_period_us": "100000",
        "cpu,cpuacct/bench/node/cpu.cfs_quota_us": "25000", "cpu,cpuacct/bench/node/cpu.cfs_period_us": "100000"})
    assert cpus.available(proc, root) == 0.25


def test_a_v2_parent_quota_caps_a_child_without_one(tmp_path: Path) -> None:
    proc, root = _tree(tmp_path, "0::/system.slice/lts.service\n", {
        "cpu.max": "max 100000", "system.slice/cpu.max": "150000 100000",
        "system.slice/lts.service/cpu.max": "max 100000"})
    assert cpus.available(proc, root) == 1.5


def test_in_a_container_the_hosts_path_finds_the_containers_own_nested_group(tmp_path: Path) -> None:
    # cgroup v1 without a namespace: /proc says the host's path, /sys/fs/cgroup/cpu is the container's group.
    proc, root = _tree(tmp_path, "3:cpu,cpuacct:/docker/abc/system.slice/lts.service\n", {
        "cpu,cpuacct/cpu.cfs_quota_us": "200000", "cpu,cpuacct/cpu.cfs_period_us": "100000",
        "cpu,cpuacct/system.slice/lts.service/cpu.cfs_quota_us": "50000",
        "cpu,cpuacct/system.slice/lts.service/cpu.cfs_period_us": "100000"})
    assert cpus.available(proc, root) == min(0.5, len(os.sched_getaffinity(0)))
    proc2, root2 = _tree(tmp_path / "flat", "3:cpu,cpuacct:/docker/abc\n", {
        "cpu,cpuacct/cpu.cfs_quota_us": "150000", "cpu,cpuacct/cpu.cfs_period_us": "100000"})
    assert cpus.available(proc2, root2) == min(1.5, len(os.sched_getaffinity(0)))


def test_no_quota_or_unreadable_cgroups_leave_the_affinity(tmp_path: Path) -> None:
    affinity = float(len(os.sched_getaffinity(0)))
    proc, root = _tree(tmp_path, "0::/a\n", {"a/cpu.max": "max 100000"})
    assert cpus.available(proc, root) == affinity
    odd, root3 = _tree(tmp_path / "odd", "\nnot a cgroup line\n0::/z\n", {"z/cpu.max": "5000 0"})
    assert cpus.available(odd, root3) == affinity
    proc2, root2 = _tree(tmp_path / "b", "0::/gone\n", {})
    assert cpus.available(proc2, root2) == affinity
    assert cpus.available(tmp_path / "no-proc", root2) == affinity


@pytest.mark.parametrize(("available", "workers", "store", "expected"), [
    (2.0, 1, "sqlite", False),       # this machine: the loop signs
    (0.25, 1, "postgresql", False),  # a capped node
    (4.0, 1, "sqlite", True),
    (8.0, 2, "sqlite", True),        # two fronts and the writer: 2.7 CPUs each
    (6.0, 2, "sqlite", False),       # 2.0 each
    (6.0, 2, "postgresql", True),    # two nodes' processes, no writer
])
def test_the_thread_is_used_only_with_more_than_two_cpus_per_process(
        monkeypatch: pytest.MonkeyPatch, available: float, workers: int, store: str, expected: bool) -> None:
    monkeypatch.setattr(cpus, "available", lambda: available)
    assert signer.use_thread(workers, store) is expected
