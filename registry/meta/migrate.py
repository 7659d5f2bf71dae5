"""Versioned schema migrations: plain SQL files ``migrations/<driver>/NNNN_name.sql``."""
from __future__ import annotations

import re
from importlib import resources


class SchemaTooNew(Exception):
    pass


def migrations(driver: str) -> list[tuple[int, str, str]]:
    """(version, name, sql) in order."""
    out = []
    for entry in resources.files("registry.meta").joinpath("migrations", driver).iterdir():
        m = re.fullmatch(r"(\d{4})_(\w+)\.sql", entry.name)
        if m:
            out.append((int(m.group(1)), m.group(2), entry.read_text()))
    return sorted(out)


def latest(driver: str) -> int:
    return max(v for v, _, _ in migrations(driver))


def too_new_message(db_version: int, driver: str) -> str:
    return (f"the metadata database is at schema version {db_version}, newer than this registry "
            f"understands ({latest(driver)}); run a newer registry release, or restore a backup")


def statements(sql: str) -> list[str]:
    """Split a migration into statements (comments dropped; no ';' inside literals)."""
    text = "\n".join(line.split("--", 1)[0] for line in sql.splitlines())
    return [s.strip() for s in text.split(";") if s.strip()]
