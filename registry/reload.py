"""SIGHUP: re-read the config file and apply what can change while running.

Applied at once: ``log.level`` and ``log.format``. GC and scrub settings
(``storage.gc``, ``storage.gcDelay``, ``storage.gcInterval``,
``extensions.scrub.*``) go to the ``Tunables`` holder under the TUNABLES
AppKey, which the background jobs read on each run (and may subscribe to).
Everything else needs a restart: it is listed in the log and ignored.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

from registry import logs
from registry.config import Config, Duration, ScrubConfig, masked, to_dict

log = logging.getLogger("registry.reload")

# Keys (dotted, as in the file) applied while running; every other change needs a restart.
LOG_KEYS = ("log.level", "log.format")
TUNABLE_KEYS = ("storage.gc", "storage.gcDelay", "storage.gcInterval")
TUNABLE_PREFIXES = ("extensions.scrub.",)


@dataclass
class Tunables:
    """Settings the background jobs read at each run; SIGHUP replaces them."""
    gc: bool
    gc_delay: Duration
    gc_interval: Duration
    scrub: ScrubConfig
    generation: int = 0
    _listeners: list[Callable[["Tunables"], None]] = field(default_factory=list, repr=False)

    @classmethod
    def from_config(cls, cfg: Config) -> "Tunables":
        s = cfg.storage
        return cls(gc=s.gc, gc_delay=s.gc_delay, gc_interval=s.gc_interval, scrub=cfg.extensions.scrub)

    def subscribe(self, fn: Callable[["Tunables"], None]) -> Callable[[], None]:
        """Call ``fn`` after each change (a scheduler wakes up to pick a new interval);
        returns a function that unsubscribes."""
        self._listeners.append(fn)
        return lambda: self._listeners.remove(fn) if fn in self._listeners else None

    def update(self, cfg: Config) -> None:
        s = cfg.storage
        self.gc, self.gc_delay, self.gc_interval = s.gc, s.gc_delay, s.gc_interval
        self.scrub = cfg.extensions.scrub
        self.generation += 1
        for fn in list(self._listeners):
            try:
                fn(self)
            except Exception:  # one bad listener must not stop the others or the reload
                log.exception("a listener of the reloaded settings failed")


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, path + "."))
        else:
            out[path] = v
    return out


def changes(old: Config, new: Config) -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (old, new) for every value that differs, secrets masked."""
    a, b = _flatten(masked(to_dict(old))), _flatten(masked(to_dict(new)))
    raw_a, raw_b = _flatten(to_dict(old)), _flatten(to_dict(new))
    return {k: (a.get(k), b.get(k)) for k in sorted(set(raw_a) | set(raw_b)) if raw_a.get(k) != raw_b.get(k)}


@dataclass
class ReloadResult:
    applied: dict[str, tuple[Any, Any]]
    ignored: dict[str, tuple[Any, Any]]


def apply(old: Config, new: Config, tunables: Tunables | None) -> ReloadResult:
    """Apply the safe part of ``new`` over the running ``old`` config."""
    diff = changes(old, new)
    applied = {k: v for k, v in diff.items()
               if k in LOG_KEYS or k in TUNABLE_KEYS or k.startswith(TUNABLE_PREFIXES)}
    ignored = {k: v for k, v in diff.items() if k not in applied}
    if "log.level" in applied:
        logs.set_level(new.log.level)
    if "log.format" in applied:
        logs.set_format(new.log.format)
    if tunables is not None and any(k not in LOG_KEYS for k in applied):
        tunables.update(new)
    return ReloadResult(applied, ignored)


def describe(result: ReloadResult) -> str:
    def fmt(d: dict[str, tuple[Any, Any]]) -> str:
        return ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in d.items())
    parts = [f"applied {fmt(result.applied)}" if result.applied else "nothing to apply"]
    if result.ignored:
        parts.append(f"ignored (needs a restart) {fmt(result.ignored)}")
    return "; ".join(parts)


def effective(old: Config, new: Config, result: ReloadResult) -> Config:
    """The config now in force: the old one with the applied keys taken from the new one."""
    sections: dict[str, Any] = {}
    for k in result.applied:
        section, *rest = k.split(".")
        node = sections.setdefault(section, {})
        for part in rest[:-1]:
            node = node.setdefault(part, {})
        node[rest[-1]] = _lookup(to_dict(new), k)
    if not sections:
        return old
    from registry.config import _build, _merge
    return _build(Config, _merge(to_dict(old), sections), "")


def _lookup(d: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        d = d[part]
    return d
