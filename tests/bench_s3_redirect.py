"""Bytes through the registry process vs through the store, for large pulls (issue 4).

Not a test (pytest does not collect it): a measurement to run by hand against a running
registry on S3 and the S3 server's process, e.g. a moto server:

    moto_server -H 127.0.0.1 -p 5900 &
    registry serve --config s3.json &          # storageDriver.regionendpoint: http://127.0.0.1:5900
    python tests/bench_s3_redirect.py --url http://127.0.0.1:5000 \\
        --registry-pid $REGISTRY_PID --store-pid $MOTO_PID --size 256M --readers 4

It pushes one blob, then has ``--readers`` clients GET it at once (following redirects, the
first checking its sha256), and prints what each process read and wrote on its file
descriptors (/proc/PID/io rchar and wchar: sockets and files) and the CPU time it used.
With ``redirect`` off every byte goes store -> registry -> client; with it on, the registry
answers a 307 and the bytes go store -> client.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import time

import aiohttp


def size_arg(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].upper() in units else int(text)


def proc_io(pid: int) -> dict[str, float]:
    out: dict[str, float] = {}
    with open(f"/proc/{pid}/io") as f:
        for line in f:
            k, v = line.split(":")
            out[k] = int(v)
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    out["cpu"] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--registry-pid", type=int, required=True)
    p.add_argument("--store-pid", type=int, required=True)
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
        before = {name: proc_io(pid) for name, pid in (("registry", args.registry_pid), ("store", args.store_pid))}
        t0 = time.monotonic()
        total = sum(await asyncio.gather(*(read(i == 0) for i in range(args.readers))))
        took = time.monotonic() - t0
        after = {name: proc_io(pid) for name, pid in (("registry", args.registry_pid), ("store", args.store_pid))}
    mib = 1 << 20
    print(f"pull of {args.readers} x {args.size // mib} MiB, {mode}: {total / took / 1e6:.0f} MB/s "
          f"({took:.2f}s)")
    print("| process | read (MiB) | written (MiB) | CPU (s) |")
    print("|---|---|---|---|")
    for name in ("registry", "store"):
        a, b = before[name], after[name]
        print(f"| {name} | {(b['rchar'] - a['rchar']) / mib:,.1f} | {(b['wchar'] - a['wchar']) / mib:,.1f} | "
              f"{b['cpu'] - a['cpu']:.2f} |")
    print(f"| clients received | {total / mib:,.1f} | | |")


if __name__ == "__main__":
    asyncio.run(main())
