"""Every benchmark script runs to its end with tiny parameters and prints the figures it exists to print.

Nothing else runs the benches, and they rot silently: bench/handshake/writer.py hung once the writer
checked asks against the HTTP body's schema (7d3a676), bench/handshake/micro.py failed with a TypeError
once sql.roll_up took the log order first (8e9a3b4), and bench/disk.py deleted nothing on PostgreSQL
from then on. Each test runs one bench as its own process from the repository root, as its docstring
says to, and checks that it exits 0 and that its figures parse and are positive (not their values:
these are smoke tests, not measurements).

PostgreSQL: the benches that use it start their own throwaway server (tests/pg.py); as everywhere in
this suite it is required, and without it they fail. wrk (Debian package `wrk`): without it on PATH,
the tests of the benches that drive HTTP with it skip, and fail under CI=true (conftest.unavailable).

Left out: bench/devices.py and bench/devices_io.py. Even at --devices 1000 and 1-second rounds,
devices.py takes ~20 s on two cores (its 10,000-device comparison state, four daemon starts and five
wrk rounds are fixed), and devices_io.py needs the states a devices.py --keep run built; this file
keeps to ~90 s. What devices.py builds is checked against what the daemon writes by
tests/test_bench_devices.py. Also bench/pgproxy.py, which run.py starts only with --latency-ms (two
more targets: +15 s); bench/handshake/bare.py runs in the run.py test, as its baseline target.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest

from tests import pg
from tests.conftest import ROOT, unavailable

pytestmark = pytest.mark.slow

NUMBER = r"([\d,]+(?:\.\d+)?)"


def run_bench(script: str, *args: str, timeout: float = 120) -> str:
    """Run bench/`script` with `args` from the repository root; its standard output, once it exited 0.

    It runs in a session of its own, so a bench that hangs is stopped with the daemons it started; a PostgreSQL
    server it started and left (pg_ctl starts it in a session of its own) is stopped after it."""
    servers_before = pg.folders()
    proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / script), *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)  # run.py cleans up on SIGTERM (its PostgreSQL server too)
            try:
                out, err = proc.communicate(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                out, err = proc.communicate()
            pytest.fail(f"bench/{script} did not finish in {timeout:.0f} s:\n{out}\n{err}")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever it started and left behind
        for folder in pg.folders() - servers_before:
            pg.stop_folder(folder)
    assert proc.returncode == 0, f"bench/{script} exited {proc.returncode}:\n{out}\n{err}"
    return out


def figures(pattern: str, text: str, matches: int | None = None) -> list[tuple[float, ...]]:
    """The numbers `pattern`'s groups capture, per match (thousands separators allowed); every one positive."""
    found = [tuple(float(g.replace(",", "")) for g in m.groups()) for m in re.finditer(pattern, text, re.M)]
    assert found, f"nothing matches {pattern!r} in:\n{text}"
    if matches is not None:
        assert len(found) == matches, f"{len(found)} matches of {pattern!r}, not {matches}, in:\n{text}"
    assert all(n > 0 for numbers in found for n in numbers), f"a figure of {pattern!r} is not positive:\n{text}"
    return found


def need_wrk() -> None:
    if shutil.which("wrk") is None:
        unavailable("wrk is not on PATH (apt-get install wrk)")


def test_writer() -> None:
    out = run_bench("handshake/writer.py", "--grants", "1000", "--rounds", "1")
    for mode in ("new", "refresh"):
        figures(rf"^\s+{mode}\s+writer\s+{NUMBER} us/grant\s+{NUMBER} grants/s", out, matches=1)


def test_micro() -> None:
    out = run_bench("handshake/micro.py")
    figures(rf"^routing: middleware stack {NUMBER} us, device-first path {NUMBER} us", out, matches=1)
    figures(rf"^duplicate-key check of a handshake body: {NUMBER} us", out, matches=1)
    figures(rf"^sqlite [a-z ]+: write_batch {NUMBER} us per grant \(batches of 16\); rollups {NUMBER} us", out,
            matches=3)
    # The chain's cost is a difference, which noise can make negative: the two sides are the figures.
    figures(rf"^sqlite [a-z ]+: write_batch {NUMBER} us per grant unchained, {NUMBER} chained", out, matches=3)
    figures(rf"^trust: the chain links a grant's two events in {NUMBER} us", out, matches=1)
    figures(rf"^Ed25519 sign: {NUMBER} us; two threads sign {NUMBER}x as fast as one", out, matches=1)


def test_pg_commit() -> None:
    out = run_bench("handshake/pg_commit.py", "--commits", "20", "--sizes", "1,4")
    figures(rf"^wake-ups, CPU per round trip of one byte: two threads \(each sleeps\) {NUMBER} us, one thread "
            rf"\(never sleeps\) {NUMBER} us$", out, matches=1)
    figures(rf"^one SELECT 1 round trip \(asyncpg\): {NUMBER} us of CPU$", out, matches=1)
    figures(rf"^the writer thread's hop, a coroutine that does nothing: {NUMBER} us of CPU$", out, matches=1)
    figures(rf"^  g=\s*\d+: event loop\s+{NUMBER}, writer thread\s+{NUMBER}, both\s+{NUMBER} \(\s*{NUMBER} per grant\)$",
            out, matches=2)
    assert re.search(r"^  fit: -?[\d.]+ us per commit \+ -?[\d.]+ us per grant$", out, re.M), out
    # What it measures is the one-statement path: 5 rounds x 20 commits x 2 sizes, none the general way.
    assert "batches by path: {'one_statement': 200}" in out, out


def test_decide() -> None:
    out = run_bench("handshake/decide.py", ".")
    figures(rf"^\. granted: decide {NUMBER} us$", out, matches=1)
    figures(rf"^\. refused: decide {NUMBER} us message {NUMBER} us$", out, matches=1)


def test_handshake_run() -> None:
    need_wrk()
    out = run_bench("handshake/run.py", "--stores", "sqlite,postgresql", "--workers", "1", "--nodes", "2",
                    "--per-node", "--modes", "new", "--rounds", "1", "--duration", "1", "--connections", "8",
                    timeout=240)
    assert "wrk -c8 per node -d1s" in out, out
    # target, req/s, ratio, p50 ms, p99 ms, non-2xx, daemon us, (round)
    for target in ("bare", "sqlite w=1", "pg w=1", "pg nodes=2"):
        figures(rf"^  {target}\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}\s+\d+\s+{NUMBER}\s+{NUMBER}\s", out,
                matches=1)
    for target in ("pg w=1 new", "pg nodes=2 new"):
        # The server's WAL per grant while the target ran: records, full-page images, bytes; checkpoints.
        (records, size), = figures(rf"^    {target}\s+(\d+\.\d)\s+\d+\.\d\d\s+(\d+)\s+\d+$", out, matches=1)
        assert records >= 1 and size >= 100, out  # a grant writes rows: its event, seat and authorization
        # PostgreSQL's CPU per grant by process: the nodes' connections (the rest may round to 0).
        figures(rf"^    {target}\s+(\d+)(?:\s+\d+){{3}}$", out, matches=1)
    for target in ("sqlite w=1", "pg w=1", "pg nodes=2"):
        (seats, events, answers), = figures(
            rf"^  {target}: durable: {NUMBER} seats and {NUMBER} granted-handshake events committed;"
            rf" {NUMBER} granted answers counted in the rounds", out, matches=1)
        assert seats == events >= answers, out  # every granted answer was committed, with its event


def test_cluster() -> None:
    out = run_bench("cluster.py", "--nodes", "2", "--rounds", "1", "--duration", "1", "--concurrency", "8")
    figures(rf"^  110 seats filled in {NUMBER} ms: {NUMBER} grants/s; the first 110 grants on an item with room:"
            rf" {NUMBER} ms", out, matches=1)
    figures(rf"^  answered {NUMBER} req/s over the round", out, matches=1)
    (answers, seats, counter, events), = figures(
        rf"^  round 1: granted answers {NUMBER}, seats {NUMBER}, counter {NUMBER}, granted events {NUMBER}"
        r" \(exact\)", out, matches=1)
    assert answers == seats == counter == events == 110, out


def test_churn() -> None:
    out = run_bench("churn.py", "--duration", "1", "--claimers", "2")
    figures(rf"^1 s of churn, 2 claimers \+ 1 admin releaser: {NUMBER} requests", out, matches=1)
    for what in ("admin releases on FULL", "claims on 216998-FULL", "claims on 216998-OTHER"):
        figures(rf"^  {what}\s+200: {NUMBER}", out, matches=1)
    assert "  5xx answers: 0\n" in out, out
    (held, counter), = figures(rf"^  FULL-1 after the run: {NUMBER} seats held, counter {NUMBER} \(limit 55\)", out)
    assert held == counter <= 55, out


def test_seat_queue() -> None:
    lines = [json.loads(line) for line in run_bench("seat_queue.py", "--waiters", "500").splitlines()]
    memory, http, idle = lines
    assert memory["waiters"] == 500 and memory["queue_bytes_per_waiter"] > 0, memory
    assert http["answers"] == {"200": 20, "503": 480} and http["exit_code"] == 0, http
    for key in ("rss_base_mb", "bytes_per_waiter_http", "join_seconds", "free_to_grant_ms_median"):
        assert http[key] > 0, (key, http)
    assert idle["bytes_per_idle_connection"] > 0, idle


def test_disk() -> None:
    # Day 1 deletes the events past --retain-days in bulk, day 2 archives them: both paths, on both stores.
    out = run_bench("disk.py", "--devices", "10", "--days", "3", "--retain-days", "1", "--archive-every", "2",
                    "--stores", "sqlite,postgresql")
    figures(rf"^time: writing events \d+ s, folding {NUMBER} handshakes \d+ s \({NUMBER} us each\)", out, matches=2)
    figures(rf"^  live event log: {NUMBER} bytes a device-day", out, matches=2)
    figures(rf"^  archives: {NUMBER} bytes a device-day \({NUMBER} bytes an event, measured on {NUMBER} events", out,
            matches=2)
    figures(rf"^for 1,000,000 devices, a year: live database {NUMBER} [MG]B", out, matches=2)
    results = {r["name"]: r for r in (json.loads(line) for line in out.splitlines() if line.startswith("{"))}
    assert set(results) == {"sqlite", "postgresql"}, out
    for r in results.values():
        # 10 devices x 24 handshakes x 2 events a day: day 1 deletes day 0's, day 2 archives day 1's (the whole day:
        # a batch's events share one time), day 2's stay.
        assert r["dropped"] == r["archived"] == r["rows"]["events"] == 480 and r["archive_bytes"] > 0, r


def test_stats_query() -> None:
    out = run_bench("stats_query.py", "--events", "2000", "--queries", "2")
    figures(rf"^rollups built from {NUMBER} events", out, matches=1)
    for median, p95, _granted in figures(rf"^  [a-z0-9, ]+ buckets over \d+ days?\s+median\s+{NUMBER} ms\s+"
                                         rf"p95\s+{NUMBER} ms\s+\(all-time granted {NUMBER}\)", out, matches=4):
        assert p95 >= median, out


def test_alert_check() -> None:
    # 100 items to a license file: a count that is not a multiple is refused before anything starts.
    refused = subprocess.run([sys.executable, str(ROOT / "bench" / "alert_check.py"), "--items", "50"], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "--items must be a positive multiple of 100" in refused.stderr, refused
    out = run_bench("alert_check.py", "--items", "200", "--codes", "20", "--checks", "2")
    assert "\n200 items, 20 codes\n" in out, out
    figures(rf"^pure rules: {NUMBER} conditions met; median {NUMBER} ms", out, matches=1)
    figures(rf"^first full check: {NUMBER} new conditions in one notification: {NUMBER} ms", out, matches=1)
    figures(rf"^steady full check \(nothing new\), 2 runs: median {NUMBER} ms, max {NUMBER} ms", out, matches=1)


def test_import_files() -> None:
    out = run_bench("import_files.py", "--files", "5", "--runs", "1")
    figures(rf"^cold start, 5 files: median [\d.]+ s \({NUMBER} files/s", out, matches=1)
    figures(rf"^live directory, 5 files dropped: median {NUMBER} files/s", out, matches=1)


def test_input_checks() -> None:
    out = run_bench("input_checks.py")
    figures(rf"^[^:]+: {NUMBER} bytes, check_json_text {NUMBER} us without the checks, {NUMBER} us with them", out,
            matches=4)
    figures(rf"^2 KB nested 990 deep: refused in {NUMBER} us", out, matches=1)
