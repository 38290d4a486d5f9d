"""ltsctl: the admin CLI (see the admin API issue); for now it reports the server's identity."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

import aiohttp


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ltsctl", description="Administer an lts-server over its API.")
    p.add_argument("--server", default="http://127.0.0.1:48080", help="the server's URL (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("status", help="the server's UUID, version and key id")
    args = p.parse_args(argv)
    try:
        info = asyncio.run(_get(f"{args.server.rstrip('/')}/api/v1/server"))
    except (aiohttp.ClientError, OSError) as e:
        print(f"ltsctl: cannot reach {args.server}: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            print(f"{key:12} {value}")
    return 0


async def _get(url: str) -> dict:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        async with session.get(url) as resp:
            resp.raise_for_status()
            return await resp.json()
