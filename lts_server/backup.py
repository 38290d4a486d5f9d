"""`lts-server backup --to DIR`: a consistent copy of a SQLite deployment, owner-only.

DIR (created 0700) gets the database, copied with SQLite's online backup API while the daemon runs, and the
state folder's identity files (server UUID, signing key, secret); every file is written 0600 whatever the
umask, since together they let anyone sign authorizations as this server. On PostgreSQL the database holds
everything: `pg_dump` it (with `umask 077`, see the README).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from lts_server import identity
from lts_server.config import Config
from lts_server.migrate import snapshot

IDENTITY_FILES = (identity.UUID_FILE, identity.KEY_FILE, identity.SECRET_FILE)


def backup(cfg: Config, folder: Path) -> list[Path]:
    """Write the backup into folder; returns the files written."""
    if not cfg.database_path.exists():
        raise OSError(f"no database at {cfg.database_path}: nothing to back up")
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(folder, 0o700)
    written = [folder / cfg.database_path.name]
    snapshot(cfg.database_path, written[0])
    for name in IDENTITY_FILES:
        source = cfg.state_dir / name
        if source.exists():
            target = folder / name
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "wb") as out, source.open("rb") as src:
                shutil.copyfileobj(src, out)
            written.append(target)
    return written


def main(cfg: Config, to: str | None) -> int:
    if not to:
        print("lts-server backup: --to DIR is required (a folder for the database and the identity files)",
              file=sys.stderr)
        return 2
    if cfg.storage.backend == "postgresql":
        print("lts-server backup: this node's data is in PostgreSQL: back it up with "
              "(umask 077; pg_dump -Fc lts > lts-$(date +%F).dump), owner-only as it holds the signing key",
              file=sys.stderr)
        return 2
    try:
        files = backup(cfg, Path(to))
    except OSError as e:
        print(f"lts-server backup: {e.strerror or e}", file=sys.stderr)
        return 1
    for path in files:
        print(f"{path}  {path.stat().st_size:,} bytes (0600)")
    print("restore: stop the daemon, copy these files into the state folder (owner-only), start it")
    return 0
