"""How many CPUs this process can run on: its affinity, capped by its cgroup's CPU quota.

A container or a systemd unit with CPUQuota= gives a process less than the machine's cores; what is worth
running on a thread of its own (the signer) depends on what it really gets.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def available(proc: Path = Path("/proc/self"), cgroups: Path = Path("/sys/fs/cgroup")) -> float:
    """The CPUs this process may use: its affinity, or fewer where a cgroup quota (v1 cpu.cfs_quota_us,
    v2 cpu.max; of its group or any group above it) allows less. Unreadable cgroup files count as no quota."""
    cpus = float(len(os.sched_getaffinity(0)))
    try:
        lines = (proc / "cgroup").read_text().splitlines()
    except OSError:
        return cpus
    for line in lines:
        if line.count(":") < 2:  # not a cgroup line (some sandboxes' /proc): no quota from it
            continue
        number, controllers, path = line.split(":", 2)
        if number == "0" and not controllers:  # v2: the one hierarchy
            cpus = min(cpus, _quota(cgroups, path, _v2))
        elif "cpu" in controllers.split(","):
            root = next((cgroups / name for name in ("cpu", "cpu,cpuacct", "cpuacct,cpu")
                         if (cgroups / name / "cpu.cfs_quota_us").exists()), None)
            if root is not None:
                cpus = min(cpus, _quota(root, path, _v1))
    return cpus


def _quota(root: Path, path: str, read: Callable[[Path], float]) -> float:
    """The smallest quota of the group at `path` under `root` and of its ancestors (inf: none).

    Inside a container without a cgroup namespace the path is the host's (/docker/<id>/system.slice/x)
    while `root` is the container's own group: the group is the longest tail of the path found under
    `root` (system.slice/x), else `root` itself."""
    least = float("inf")
    parts = [p for p in path.split("/") if p and p != ".."]
    tails = (root.joinpath(*parts[i:]) for i in range(len(parts)))
    group = next((g for g in tails if g.is_dir()), root)
    while True:
        try:
            least = min(least, read(group))
        except (OSError, ValueError, ZeroDivisionError):
            pass
        if group == root:
            return least
        group = group.parent


def _v1(group: Path) -> float:
    quota = int((group / "cpu.cfs_quota_us").read_text())
    period = int((group / "cpu.cfs_period_us").read_text())
    return quota / period if quota > 0 and period > 0 else float("inf")


def _v2(group: Path) -> float:
    quota, period = (group / "cpu.max").read_text().split()
    return float("inf") if quota == "max" else int(quota) / int(period)

