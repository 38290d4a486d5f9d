"""The README's and docs/api.md's examples run as written against a live server, so they cannot rot.

Every fenced block tagged `sh` runs, in order, in one bash per document, with curl failing on
any 4xx/5xx answer; the address `make run` listens on is replaced by the test server's.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lts_server.errors import MESSAGES, sdk_code
from tests.conftest import ADMIN_PASSWORD, ROOT, start_daemon, stop_daemon

PREAMBLE = """set -euo pipefail
curl() { command curl --fail-with-body --silent --show-error "$@"; }
"""


def sh_blocks(text: str) -> list[str]:
    return re.findall(r"^```sh\n(.*?)^```", text, re.S | re.M)


def demo_config(folder: Path) -> Path:
    """config/demo.toml, with its state in the test's folder."""
    path = folder / "demo.toml"
    path.write_text(f"""[server]
host = "127.0.0.1"
port = 0
[storage]
state_dir = "{folder / 'state'}"
[import]
directory = "{ROOT / 'license_files'}"
watch = false
[vendor]
public_keys = ["{ROOT / 'license_files' / 'demo-vendor' / 'vendor.pub'}"]
allow_unbound = true
[log]
level = "warning"
format = "json"
""")
    return path


@pytest.mark.parametrize("doc", ["README.md", "docs/api.md"])
def test_the_documented_examples_run_as_written(doc: str, tmp_path: Path) -> None:
    blocks = sh_blocks((ROOT / doc).read_text())
    assert blocks, f"{doc} has no runnable examples"
    daemon = start_daemon(demo_config(tmp_path), tmp_path)
    try:
        script = PREAMBLE + "\n".join(blocks).replace("127.0.0.1:48080", daemon.url.removeprefix("http://"))
        (tmp_path / "license_files").symlink_to(ROOT / "license_files")
        env = {**os.environ, "LTS_ADMIN_PASSWORD": ADMIN_PASSWORD, "XDG_CONFIG_HOME": str(tmp_path / "xdg"),
               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
        env.pop("LTS_SERVER_URL", None)
        done = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, f"{doc}: an example failed\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
    finally:
        assert stop_daemon(daemon) == 0


def test_the_error_table_in_the_docs_lists_every_code() -> None:
    text = (ROOT / "docs" / "api.md").read_text()
    rows = {int(m.group(1)): int(m.group(2)) for m in re.finditer(r"^\| (\d{3}) \| (-\d+) \|", text, re.M)}
    assert rows == {int(code): sdk_code(code) for code in MESSAGES}
