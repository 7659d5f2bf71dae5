"""Bytes through the registry process vs through the store, for large pulls (issue 4).

A measurement to run by hand (issue 4) against a running
registry on S3 and the S3 server's process, e.g. a moto server, with a byte-counting TCP
relay in front of the store (every byte to or from the store, the registry's and the
clients' after a redirect, goes through it):

    moto_server -H 127.0.0.1 -p 5900 &
    python bench/s3_redirect_bench.py relay --listen 5901 --upstream 5900 --counters /tmp/relay.json &
    registry serve --config s3.json &          # storageDriver.regionendpoint: http://127.0.0.1:5901
    python bench/s3_redirect_bench.py --url http://127.0.0.1:5000 --registry-pid $REGISTRY_PID \\
        --store-pid $MOTO_PID --store-counters /tmp/relay.json --size 256M --readers 4

It pushes one blob, then has ``--readers`` clients GET it at once (following redirects, the
first checking its sha256), and prints the bytes each process sent and received over TCP
(``ss -ti`` counters of the sockets on the registry's and the store's ports, sampled before
and after, with every connection still open) and the CPU time each used. With ``redirect``
off every byte goes store -> registry -> client; with it on, the registry answers a 307 and
the bytes go store -> client.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import re
import subprocess
import time
from urllib.parse import urlsplit

import aiohttp


def size_arg(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].upper() in units else int(text)


def cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def sockets(port: int) -> dict[tuple[str, str], tuple[int, int]]:
    """(local, peer) -> (bytes sent, bytes received) of every TCP socket whose local port is ``port``."""
    out = subprocess.run(["ss", "-tinH", f"( sport = :{port} )"], capture_output=True, text=True).stdout
    found: dict[tuple[str, str], tuple[int, int]] = {}
    key = None
    for line in out.splitlines():
        if not line.startswith((" ", "\t")):
            parts = line.split()
            key = (parts[3], parts[4])
            continue
        sent, received = re.search(r"bytes_sent:(\d+)", line), re.search(r"bytes_received:(\d+)", line)
        if key is not None:
            found[key] = (int(sent.group(1)) if sent else 0, int(received.group(1)) if received else 0)
    return found


def moved(before: dict[tuple[str, str], tuple[int, int]], after: dict[tuple[str, str], tuple[int, int]]
          ) -> tuple[int, int]:
    sent = sum(s - before.get(k, (0, 0))[0] for k, (s, _) in after.items())
    received = sum(r - before.get(k, (0, 0))[1] for k, (_, r) in after.items())
    return sent, received


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--registry-pid", type=int, required=True)
    p.add_argument("--store-pid", type=int, required=True)
    p.add_argument("--store-counters", required=True, help="the counters file of the relay in front of the store")
    p.add_argument("--size", type=size_arg, default=256 << 20)
    p.add_argument("--readers", type=int, default=4)
    p.add_argument("--repo", default=f"bench/redirect-{int(time.time())}")
    args = p.parse_args()
    data = os.urandom(args.size)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    timeout = aiohttp.ClientTimeout(total=None)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        async with http.post(f"{args.url}/v2/{args.repo}/blobs/uploads/?digest={digest}", data=data) as r:
            assert r.status == 201, await r.text()
        async with http.get(f"{args.url}/v2/{args.repo}/blobs/{digest}", allow_redirects=False) as r:
            mode = f"redirect ({r.status} to the store)" if r.status == 307 else f"streamed ({r.status})"

        async def read(check: bool) -> int:
            h, n = hashlib.sha256() if check else None, 0
            async with http.get(f"{args.url}/v2/{args.repo}/blobs/{digest}") as r:
                assert r.status == 200, r.status
                async for chunk in r.content.iter_any():
                    n += len(chunk)
                    if h:
                        h.update(chunk)
            assert n == args.size
            if h:
                assert "sha256:" + h.hexdigest() == digest
            return n
        port = urlsplit(args.url).port or 80
        await asyncio.sleep(0.5)  # the relay's counters file is rewritten every 0.1s
        before = (sockets(port), cpu(args.registry_pid), relay_counters(args.store_counters), cpu(args.store_pid))
        t0 = time.monotonic()
        total = sum(await asyncio.gather(*(read(i == 0) for i in range(args.readers))))
        took = time.monotonic() - t0
        reg_after = sockets(port)  # the clients' connections to the registry still open
        await asyncio.sleep(0.5)
        after = (reg_after, cpu(args.registry_pid), relay_counters(args.store_counters), cpu(args.store_pid))
    mib = 1 << 20
    print(f"pull of {args.readers} x {args.size // mib} MiB, {mode}: {total / took / 1e6:.0f} MB/s "
          f"({took:.2f}s)")
    print("| | sent (MiB) | received (MiB) | CPU (s) |")
    print("|---|---|---|---|")
    sent, received = moved(before[0], after[0])
    print(f"| registry, to/from clients (port {port}) | {sent / mib:,.1f} ({sent:,} bytes) | "
          f"{received / mib:,.1f} ({received:,} bytes) | {after[1] - before[1]:.2f} |")
    print(f"| store, to/from anyone (relay) | {(after[2]['down'] - before[2]['down']) / mib:,.1f} | "
          f"{(after[2]['up'] - before[2]['up']) / mib:,.1f} | {after[3] - before[3]:.2f} |")
    print(f"| clients, blob bytes received | | {total / mib:,.1f} | |")


def relay_counters(path: str) -> dict[str, int]:
    import json
    with open(path) as f:
        return json.load(f)  # type: ignore[no-any-return]


async def relay(listen: int, upstream: int, counters: str) -> None:
    """A TCP relay counting bytes: "up" toward the store, "down" from it."""
    import json
    totals = {"up": 0, "down": 0}

    async def pump(r: asyncio.StreamReader, w: asyncio.StreamWriter, way: str) -> None:
        try:
            while data := await r.read(1 << 18):
                totals[way] += len(data)
                w.write(data)
                await w.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            w.close()

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            ur, uw = await asyncio.open_connection("127.0.0.1", upstream)
        except OSError:
            w.close()
            return
        await asyncio.gather(pump(r, uw, "up"), pump(ur, w, "down"))
    server = await asyncio.start_server(handle, "127.0.0.1", listen)
    async with server:
        while True:
            tmp = counters + ".tmp"
            with open(tmp, "w") as f:
                json.dump(totals, f)
            os.replace(tmp, counters)
            await asyncio.sleep(0.1)


if __name__ == "__main__":
    import sys
    if sys.argv[1:2] == ["relay"]:
        rp = argparse.ArgumentParser()
        rp.add_argument("relay")
        rp.add_argument("--listen", type=int, required=True)
        rp.add_argument("--upstream", type=int, required=True)
        rp.add_argument("--counters", required=True)
        ra = rp.parse_args()
        asyncio.run(relay(ra.listen, ra.upstream, ra.counters))
    else:
        asyncio.run(main())
