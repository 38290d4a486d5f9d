"""`make run` installs what running needs only, and leaves `git status` clean (issue 22, item 7)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, free_port

pytestmark = pytest.mark.slow


def _copy_of_the_checkout(dest: Path) -> Path:
    """The tracked files of this checkout in a fresh git repository (as a new clone would be)."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True).stdout
    for name in files.decode().split("\0"):
        if name and (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "init", "-q"], cwd=dest, check=True)
    subprocess.run([*git, "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "clone"], cwd=dest, check=True)
    return dest


def test_make_run_installs_no_test_extras(tmp_path: Path) -> None:
    checkout = _copy_of_the_checkout(tmp_path / "checkout")
    plan = subprocess.run(["make", "-n", "run", f"VENV={tmp_path / 'fresh-venv'}"], cwd=checkout, check=True,
                          capture_output=True, text=True).stdout
    installs = [line for line in plan.splitlines() if "pip install" in line and "--upgrade pip" not in line]
    assert installs, plan
    assert all("[test]" not in line for line in installs), installs
    assert any("-e clients/python" in line and line.rstrip().endswith("-e .") for line in installs), installs
    # make test brings the test extras on top.
    plan = subprocess.run(["make", "-n", "test", f"VENV={tmp_path / 'fresh-venv'}"], cwd=checkout, check=True,
                          capture_output=True, text=True).stdout
    assert any('".[test]"' in line for line in plan.splitlines() if "pip install" in line), plan


def test_make_run_leaves_git_status_clean(tmp_path: Path) -> None:
    checkout = _copy_of_the_checkout(tmp_path / "checkout")
    venv = Path(sys.prefix)  # this suite's virtualenv: it has everything make run would install
    stamp = venv / ".installed-run"
    stamp.touch()
    port = free_port()
    log = tmp_path / "run.log"
    proc = subprocess.Popen(["make", "run", f"VENV={venv}", "-o", str(stamp)], cwd=checkout,
                            env={**os.environ, "LTS_SERVER__PORT": str(port)}, stdout=log.open("wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while "listening on" not in log.read_text(errors="replace"):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")
            time.sleep(0.1)
        # The demo license files were imported into the demo's state folder.
        assert (checkout / "var" / "demo" / "lts-server.sqlite3").exists()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=checkout, check=True,
                            capture_output=True, text=True).stdout
    assert status == "", status
