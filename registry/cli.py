"""registry serve | reindex | gc | scrub | dedupe | du | check-config | migrate"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from typing import Any

from registry import __version__
from registry.config import ENV_PREFIX, Config, ConfigError, load, masked, to_dict


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if getattr(args, "address", None):
        out.setdefault("http", {})["address"] = args.address
    if getattr(args, "port", None) is not None:
        out.setdefault("http", {})["port"] = args.port
    if getattr(args, "root", None):
        out.setdefault("storage", {})["rootDirectory"] = args.root
    return out


def _config(args: argparse.Namespace) -> Config:
    try:
        return load(args.config, overrides=_overrides(args))
    except ConfigError as exc:
        sys.exit(f"registry: configuration error: {exc}")


def _logging(cfg: Config) -> None:
    from registry.logs import setup_logging
    setup_logging(cfg.log.level, cfg.log.format)


def cmd_serve(args: argparse.Namespace) -> None:
    cfg = _config(args)
    _logging(cfg)
    from registry.server import serve
    from registry.meta.base import MetaError
    from registry.storage.base import StorageError
    from registry.meta.migrate import SchemaTooNew
    # SIGHUP re-reads the same file with the same environment and command-line overrides
    # (the environment as it was at start-up: nothing reads os.environ later).
    environ = {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIX)}

    def reload_config() -> Config:
        return load(args.config, environ=environ, overrides=_overrides(args))
    if cfg.http.workers > 1 and cfg.http.port == 0:
        sys.exit("registry: configuration error: http.workers: several workers need a fixed http.port, not 0")
    if cfg.http.workers > 1:  # migrate once, before the workers open the store together
        from registry.meta.factory import open_meta

        async def migrate_only() -> None:
            async with open_meta(cfg):
                pass
        try:
            asyncio.run(migrate_only())
        except (MetaError, SchemaTooNew) as exc:
            sys.exit(f"registry: metadata store ({cfg.meta.driver}): {exc}")
    children, worker = _fork_workers(cfg.http.workers)
    try:
        asyncio.run(serve(cfg, reload_config=reload_config, ready_message=worker == 0, background=worker == 0))
    except (MetaError, SchemaTooNew) as exc:
        sys.exit(f"registry: metadata store ({cfg.meta.driver}): {exc}")
    except StorageError as exc:  # S3 at start-up: bucket missing, credentials refused, endpoint unreachable
        sys.exit(f"registry: storage: {exc}")
    except OSError as exc:
        sys.exit(f"registry: cannot listen on {cfg.http.address}:{cfg.http.port}: {exc.strerror or exc}")
    except KeyboardInterrupt:
        pass
    finally:
        if worker:
            os._exit(0)
        _stop_workers(children)


def _fork_workers(n: int) -> tuple[list[int], int]:
    """Fork n-1 worker processes that share the listening port (SO_REUSEPORT);
    returns (their pids, this process's worker number: 0 for the parent). Only
    the parent runs background jobs (GC, scrub) and answers SIGHUP."""
    children = []
    for number in range(1, n):
        pid = os.fork()
        if pid == 0:
            return [], number
        children.append(pid)
    return children, 0


def _stop_workers(children: list[int]) -> None:
    for pid in children:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for pid in children:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass


async def _with_services(cfg: Config, fn):  # type: ignore[no-untyped-def]
    from registry.app import build_services
    from registry.meta.factory import open_meta
    from registry.storage.factory import storage_context
    async with open_meta(cfg) as meta, storage_context(cfg) as storage:
        return await fn(build_services(cfg, meta, storage))


def _run_with_services(cfg: Config, fn):  # type: ignore[no-untyped-def]
    """_with_services to completion; an unreachable or too new metadata store is a one-line error."""
    from registry.meta.base import MetaError
    from registry.meta.migrate import SchemaTooNew
    from registry.storage.base import StorageError
    try:
        return asyncio.run(_with_services(cfg, fn))
    except (MetaError, SchemaTooNew) as exc:
        sys.exit(f"registry: metadata store ({cfg.meta.driver}): {exc}")
    except StorageError as exc:
        sys.exit(f"registry: storage: {exc}")


def cmd_reindex(args: argparse.Namespace) -> None:
    cfg = _config(args)
    _logging(cfg)
    from registry.maintenance.reindex import reindex
    result = _run_with_services(cfg, lambda svc: reindex(svc, only_new=False))
    print(json.dumps({"repositories": result.repositories, "manifests": result.manifests, "tags": result.tags,
                      "blobs": result.blobs, "problems": result.problems}, indent=2))
    sys.exit(1 if result.problems else 0)


def cmd_gc(args: argparse.Namespace) -> None:
    cfg = _config(args)
    _logging(cfg)
    from registry.maintenance.gc import collect
    from registry.maintenance.repair import full_walk
    from registry.progress import Progress

    async def run(svc):  # type: ignore[no-untyped-def]
        bar = Progress("gc: reviewing")
        try:
            result = await collect(svc, delete_untagged=cfg.storage.gc_delete_untagged, upload_ttl=cfg.uploads.ttl,
                                   dry_run=args.dry_run, repo=args.repo, progress=bar)
        finally:
            bar.close()
        full = None
        if args.full:
            bar = Progress("gc: walking storage")
            try:
                full = await full_walk(svc, older_than=time.time() - cfg.storage.gc_delay, dry_run=args.dry_run,
                                       progress=bar)
            finally:
                bar.close()
        return result, full
    result, full = asyncio.run(_with_services(cfg, run))
    if args.json:
        out = result.as_dict()
        if full is not None:
            out["full"] = full
        print(json.dumps(out, indent=2))
        return
    verb = "would delete" if result.dry_run else "deleted"
    rows = [(d["kind"], d["repository"], d["digest"], d["size"]) for d in result.deleted]
    if rows:
        print(_table(("KIND", "REPOSITORY", "DIGEST", "BYTES"), rows))
    print(f"{verb}: {result.blobs_deleted} blobs, {result.manifests_deleted} manifests, "
          f"{result.uploads_deleted} uploads; {result.bytes_reclaimed} bytes reclaimed "
          f"(reviewed {result.reviewed} in {result.duration:.2f}s, {result.pending} still queued)")
    if result.trash_restored or result.trash_discarded:
        print(f"left set aside by an interrupted removal: {result.trash_restored} "
              f"{'would be ' if result.dry_run else ''}restored, {result.trash_discarded} "
              f"{'would be ' if result.dry_run else ''}discarded")
    if full is not None:
        print(f"full walk: {len(full['orphan_files_deleted'])} orphan files {verb}, "
              f"{len(full['rows_without_file'])} rows without a file (run registry reindex)")
        if full["layouts_not_imported"]:
            print(f"layouts not imported yet, left alone (run registry reindex): "
                  f"{', '.join(full['layouts_not_imported'])}")


def cmd_scrub(args: argparse.Namespace) -> None:
    cfg = _config(args)
    _logging(cfg)
    from registry.maintenance.scrub import report, scrub
    from registry.progress import Progress

    async def run(svc):  # type: ignore[no-untyped-def]
        result = None
        if not args.report:
            bar = Progress("scrub", unit=" checked")
            try:
                result = await scrub(svc, quick=args.quick, repo=args.repo,
                                     bytes_per_second=cfg.extensions.scrub.bytes_per_second, progress=bar)
            finally:
                bar.close()
        return result, await report(svc, args.repo)
    result, rows = asyncio.run(_with_services(cfg, run))
    affected = [r for r in rows if r["status"] != "ok"]
    if args.format == "json":
        out: dict[str, object] = {"scrubResult": rows, "affected": len(affected)}
        if result is not None:
            out["pass"] = {k: v for k, v in result.as_dict().items() if k != "damaged"}
            out["damaged"] = result.as_dict()["damaged"]
        print(json.dumps(out, indent=2))
    else:
        print(_table(("REPOSITORY", "TAG", "STATUS", "AFFECTED BLOB", "ERROR"),
                     [(r["repository"], r["tag"] or "(untagged)", r["status"], r["affected_blob"], r["error"])
                      for r in rows]))
        if result is not None:
            print(f"{'quick' if result.quick else 'deep'} scrub: {result.blobs} blobs ({result.bytes} bytes) and "
                  f"{result.manifests} manifests in {result.duration:.1f}s; {len(result.damaged)} damaged")
    sys.exit(1 if affected or (result is not None and result.damaged) else 0)


def _table(header: tuple[str, ...], rows: list[tuple[object, ...]]) -> str:
    cells = [tuple(str(c) for c in header)] + [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def cmd_migrate(args: argparse.Namespace) -> None:
    cfg = _config(args)
    _logging(cfg)

    async def version(svc):  # type: ignore[no-untyped-def]
        return await svc.meta.schema_version()
    print(f"metadata schema at version {_run_with_services(cfg, version)}")


def cmd_check_config(args: argparse.Namespace) -> None:
    cfg = _config(args)
    print(json.dumps(masked(to_dict(cfg)), indent=2))  # secrets (password, dsn, token...) as "***"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="registry", description="OCI Distribution v1.1 registry server")
    p.add_argument("--version", action="version", version=f"registry {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument("--config", "-c", help="config file (JSON or YAML); REGISTRY_* variables override it")
        sp.add_argument("--root", help="data directory (storage.rootDirectory, default ./data)")
        return sp

    s = with_config(sub.add_parser("serve", help="run the registry"))
    s.add_argument("--address", help="listen address (http.address, default 127.0.0.1)")
    s.add_argument("--port", type=int, help="listen port (http.port, default 5000; 0 picks a free one)")
    s.set_defaults(fn=cmd_serve)
    with_config(sub.add_parser("reindex", help="rebuild metadata from the OCI layouts on storage")).set_defaults(
        fn=cmd_reindex)
    g = with_config(sub.add_parser("gc", help="run one garbage-collection pass now"))
    g.add_argument("--dry-run", action="store_true", help="report what would be deleted; delete nothing")
    g.add_argument("--repo", help="only this repository")
    g.add_argument("--full", action="store_true", help="also walk storage for files no row accounts for (repair)")
    g.add_argument("--json", action="store_true", help="print the result as JSON")
    g.set_defaults(fn=cmd_gc)
    sc = with_config(sub.add_parser("scrub", help="rehash stored blobs and report what is damaged"))
    sc.add_argument("--repo", help="only this repository")
    sc.add_argument("--format", choices=("table", "json"), default="table")
    sc.add_argument("--report", action="store_true", help="print the last results without rehashing")
    sc.add_argument("--quick", action="store_true",
                    help="compare the xxh3 recorded at write time instead of rehashing with the digest's algorithm")
    sc.set_defaults(fn=cmd_scrub)
    with_config(sub.add_parser("migrate", help="apply metadata schema migrations")).set_defaults(fn=cmd_migrate)
    from registry.cli_dedupe import add_commands as add_dedupe_commands  # dedupe, du (issue 5)
    add_dedupe_commands(sub, with_config)
    c = sub.add_parser("check-config", help="validate a config file and print the effective config")
    c.add_argument("config", nargs="?", help="config file")
    c.set_defaults(fn=cmd_check_config)
    args = p.parse_args(argv)
    args.fn(args)
