"""Run ../shared/bench/ocibench.py against our server on SQLite and on PostgreSQL,
alternating, and print medians side by side with the ratio PostgreSQL / SQLite.

    python bench/meta_compare.py [--rounds 3] [--dsn postgresql://127.0.0.1/test]
                                 [--scenario manifests,head] [--pin] [-- extra ocibench args]

Each round starts a fresh server per store (a new data directory, a new
PostgreSQL schema, dropped afterwards) with the durable ``commit`` on, and
waits for it to answer before measuring. ``--pin`` puts the server (and the
PostgreSQL backends it talks to, when local) on core 1 and the load on core 0.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
OCIBENCH = HERE.parent.parent / "shared" / "bench" / "ocibench.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/v2/", timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"server at {url} did not answer within {timeout}s")


async def _schema(dsn: str, sql: str) -> None:
    import asyncpg
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def run_one(store: str, args: argparse.Namespace, extra: list[str]) -> dict[str, float]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    with tempfile.TemporaryDirectory(prefix=f"metabench-{store}-") as root:
        env = dict(os.environ, REGISTRY_LOG_LEVEL="warning", REGISTRY_STORAGE_GCINTERVAL="0",
                   REGISTRY_EXTENSIONS_SCRUB_ENABLE="false")
        if store == "postgres":
            env.update(REGISTRY_META_DRIVER="postgres", REGISTRY_META_POSTGRES_DSN=args.dsn,
                       REGISTRY_META_POSTGRES_SCHEMA=schema)
        cmd = [sys.executable, "-m", "registry", "serve", "--root", root, "--port", str(port)]
        if args.pin:
            cmd = ["taskset", "-c", "1", *cmd]
        proc = subprocess.Popen(cmd, env=env)
        try:
            wait_ready(url, proc)
            if args.pin and store == "postgres":
                pin_backends(args.dsn, schema)
            out = Path(root) / "result.json"
            bench = [sys.executable, str(OCIBENCH), "--url", url, "--scenario", args.scenario, "--json", str(out),
                     "--server-pid", str(proc.pid), *extra]
            if args.pin:
                bench = ["taskset", "-c", "0", *bench]
            subprocess.run(bench, check=True, stdout=subprocess.DEVNULL if args.quiet else None)
            results = json.loads(out.read_text())
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if store == "postgres":
                asyncio.run(_schema(args.dsn, f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    if results["errors"]:
        raise SystemExit(f"{store}: ocibench saw {results['errors']} errors; the figures do not count")
    return {name: float(m["value"]) for name, m in results["median"].items()}


def pin_backends(dsn: str, schema: str) -> None:
    """Put the PostgreSQL backends of this database (the only server using it meanwhile) on the server's core."""
    async def pids() -> list[int]:
        import asyncpg
        conn = await asyncpg.connect(dsn)
        try:
            return [r[0] for r in await conn.fetch(
                "SELECT pid FROM pg_stat_activity WHERE pid <> pg_backend_pid() AND datname = current_database()")]
        finally:
            await conn.close()
    for pid in asyncio.run(pids()):
        subprocess.run(["taskset", "-p", "-c", "1", str(pid)], stdout=subprocess.DEVNULL, check=False)


def main() -> None:
    argv = sys.argv[1:]
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dsn", default=os.environ.get("REGISTRY_TEST_PG_DSN", "postgresql://127.0.0.1:5432/test"))
    p.add_argument("--scenario", default="push-small,pull-small,manifests,head,mixed")
    p.add_argument("--pin", action="store_true")
    p.add_argument("--quiet", action="store_true", help="hide ocibench's own tables")
    p.add_argument("--json", help="write every round's figures here")
    args = p.parse_args(argv)
    rounds: dict[str, list[dict[str, float]]] = {"sqlite": [], "postgres": []}
    for i in range(args.rounds):
        for store in ("sqlite", "postgres") if i % 2 == 0 else ("postgres", "sqlite"):
            print(f"# round {i + 1}/{args.rounds}: {store}", file=sys.stderr, flush=True)
            rounds[store].append(run_one(store, args, extra))
    names = list(dict.fromkeys(n for r in rounds["sqlite"] for n in r))
    print("\n| scenario | SQLite | PostgreSQL | PG/SQLite |\n|---|---|---|---|")
    for n in names:
        s = statistics.median(r[n] for r in rounds["sqlite"] if n in r)
        g = statistics.median(r[n] for r in rounds["postgres"] if n in r)
        print(f"| {n} | {s:.1f} | {g:.1f} | {100 * g / s:.0f}% |")
    if args.json:
        Path(args.json).write_text(json.dumps(rounds, indent=2))


if __name__ == "__main__":
    main()
