"""registry dedupe | du (issue 5)."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable


def human(n: int | float) -> str:
    """Bytes for people: 1.5 GiB, 512 B."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(value) < 1024 or unit == "PiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


def cmd_dedupe(args: argparse.Namespace) -> None:
    from registry.cli import _config, _logging, _run_with_services
    from registry.maintenance.dedupe import walk
    from registry.progress import Progress
    cfg = _config(args)
    _logging(cfg)
    rate = args.bytes_per_second if args.bytes_per_second is not None else cfg.storage.dedupe_bytes_per_second

    async def run(svc: Any) -> Any:
        label = "dedupe" + (" --undo" if args.undo else "") + (" (dry run)" if args.dry_run else "")
        bar = Progress(label, unit=" digests")
        try:
            return await walk(svc, undo=args.undo, dry_run=args.dry_run, bytes_per_second=rate, progress=bar)
        finally:
            bar.close()
    result = _run_with_services(cfg, run)
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
    else:
        verb = ("would " if result.dry_run else "")
        if result.mode == "on":
            print(f"dedupe: {verb}{'link' if result.dry_run else 'linked'} {result.files} duplicate files, "
                  f"{verb}{'free' if result.dry_run else 'freed'} {result.bytes} bytes ({human(result.bytes)}); "
                  f"{result.digests} digests in {result.duration:.1f}s" + (" (resumed)" if result.resumed else ""))
        else:
            print(f"dedupe --undo: {verb}{'give' if result.dry_run else 'gave'} {result.files} files their own "
                  f"copy, {result.bytes} bytes ({human(result.bytes)}) more on disk; {result.digests} digests in "
                  f"{result.duration:.1f}s" + (" (resumed)" if result.resumed else ""))
        if not result.dry_run and result.resumed:
            print(f"whole walk, interrupted runs included: {result.total_files} files, {result.total_bytes} bytes")
        for p in result.problems:
            print(f"problem: {p['repository']}@{p['digest']}: {p['problem']}", file=sys.stderr)
        if cfg.storage.dedupe == args.undo and not result.dry_run:
            print(f"note: storage.dedupe is {'on' if cfg.storage.dedupe else 'off'} in the configuration: the "
                  "server walks the store back at its next start", file=sys.stderr)
    sys.exit(1 if result.problems else 0)


def cmd_du(args: argparse.Namespace) -> None:
    from registry.cli import _config, _logging, _run_with_services, _table
    from registry.maintenance.usage import measure
    cfg = _config(args)
    _logging(cfg)
    usage = _run_with_services(cfg, lambda svc: measure(svc, args.repo))
    if args.json:
        print(json.dumps(usage.as_dict(), indent=2))
        return
    size: Callable[[int], str] = (lambda n: str(n)) if args.bytes else human
    rows: list[tuple[object, ...]] = [(r.repository, size(r.logical_bytes), size(r.physical_bytes),
                                       size(r.exclusive_bytes), r.blobs, r.manifests)
                                      for r in usage.repositories]
    rows.append(("TOTAL", size(usage.logical_bytes), size(usage.physical_bytes), "",
                 sum(r.blobs for r in usage.repositories), sum(r.manifests for r in usage.repositories)))
    print(_table(("REPOSITORY", "LOGICAL", "PHYSICAL", "EXCLUSIVE", "BLOBS", "MANIFESTS"), rows))
    saved = usage.saved_bytes
    print(f"{usage.files} files on {usage.inodes} inodes; dedupe saves {size(saved)}"
          + (f" ({100 * saved / usage.logical_bytes:.0f}%)" if usage.logical_bytes else "")
          + (f"; {usage.missing} rows without a file (run registry reindex)" if usage.missing else ""))


def add_commands(sub: Any, with_config: Callable[[argparse.ArgumentParser], argparse.ArgumentParser]) -> None:
    d = with_config(sub.add_parser("dedupe", help="link duplicate blobs on disk now (or --undo: give every "
                                   "repository its own copy); resumes an interrupted walk"))
    d.add_argument("--dry-run", action="store_true", help="report what would be saved; change nothing")
    d.add_argument("--undo", action="store_true", help="break the links: every repository gets its own copy")
    d.add_argument("--bytes-per-second", type=int, default=None,
                   help="pace reads and copies (default storage.dedupeBytesPerSecond; 0 = unpaced)")
    d.add_argument("--json", action="store_true", help="print the result as JSON")
    d.set_defaults(fn=cmd_dedupe)
    u = with_config(sub.add_parser("du", help="storage usage: logical and physical bytes per repository"))
    u.add_argument("--repo", help="only this repository")
    u.add_argument("--json", action="store_true", help="print the figures as JSON")
    u.add_argument("--bytes", action="store_true", help="exact byte counts in the table")
    u.set_defaults(fn=cmd_du)
