"""Typed, frozen configuration: file (JSON or YAML) + REGISTRY_* environment overrides.

The structure and names follow zot's config file where the feature exists there
(``storage.rootDirectory``, ``storage.gcDelay``, ``http.address``...), so an
operator can start from an existing file. Every key is checked: an unknown key,
or a value of the wrong type, stops start-up with a message naming the key.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, get_args, get_origin, get_type_hints

ENV_PREFIX = "REGISTRY_"
# REGISTRY_* variables that belong to other programs (containers/image's clients
# read REGISTRY_AUTH_FILE): never ours, so never an error. Any other unknown
# REGISTRY_* variable is an error, like an unknown key in the file.
FOREIGN_ENV = frozenset({"REGISTRY_AUTH_FILE"})


class ConfigError(Exception):
    """A bad configuration value; the message names the key."""


class Duration(float):
    """Seconds, written in config as ``90s``, ``30m``, ``1h30m``, ``2d`` or a number of seconds."""

    _PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
    _UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}

    @classmethod
    def parse(cls, value: Any) -> "Duration":
        if isinstance(value, bool):
            raise ValueError("a duration such as 90s, 30m or 1h30m")
        if isinstance(value, (int, float)):
            return cls(value)
        text = str(value).strip().lower()
        if re.fullmatch(r"\d+(\.\d+)?", text):
            return cls(float(text))
        pos, total = 0, 0.0
        for m in cls._PART.finditer(text):
            if m.start() != pos:
                break
            total += float(m.group(1)) * cls._UNITS[m.group(2)]
            pos = m.end()
        if pos != len(text) or not text:
            raise ValueError("a duration such as 90s, 30m or 1h30m")
        return cls(total)


class Size(int):
    """Bytes, written as a number or with a unit: ``4MiB``, ``100MB``, ``1G``."""

    _UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1000, "kib": 1 << 10, "m": 1 << 20, "mb": 1000**2,
              "mib": 1 << 20, "g": 1 << 30, "gb": 1000**3, "gib": 1 << 30, "t": 1 << 40, "tb": 1000**4,
              "tib": 1 << 40}

    @classmethod
    def parse(cls, value: Any) -> "Size":
        if isinstance(value, bool):
            raise ValueError("a size such as 4096, 64MiB or 1GB")
        if isinstance(value, int):
            return cls(value)
        m = re.fullmatch(r"\s*(\d+)\s*([a-z]*)\s*", str(value).lower())
        if not m or m.group(2) not in cls._UNITS:
            raise ValueError("a size such as 4096, 64MiB or 1GB")
        return cls(int(m.group(1)) * cls._UNITS[m.group(2)])


def key(name: str, **kw: Any) -> Any:
    """A dataclass field whose config-file key is ``name`` (zot's camelCase)."""
    return field(metadata={"key": name}, **kw)


@dataclass(frozen=True)
class TLSConfig:
    cert: str = key("cert", default="")
    key: str = key("key", default="")


@dataclass(frozen=True)
class HTTPConfig:
    address: str = key("address", default="127.0.0.1")
    port: int = key("port", default=5000)
    tls: TLSConfig = key("tls", default_factory=TLSConfig)
    # Our own: worker processes sharing the port with SO_REUSEPORT.
    workers: int = key("workers", default=1)
    # Our own: on SIGTERM, how long in-flight requests may take to finish before they are cancelled.
    shutdown_timeout: Duration = key("shutdownTimeout", default=Duration(30))
    # Our own: whole blobs over 64 KiB go out with sendfile (least server CPU per byte: clients
    # on other hosts, many pulls at once) instead of 1 MiB copies (what measured faster for a
    # client on the same host: api/blobs.py).
    sendfile: bool = key("sendfile", default=False)


@dataclass(frozen=True)
class StorageDriverConfig:
    """``storage.storageDriver``: zot passes this map to distribution's s3 driver, so the keys are
    that driver's (name, region, bucket, regionendpoint, rootdirectory, accesskey, secretkey,
    forcepathstyle, secure, skipverify, encrypt, keyid, storageclass, chunksize). The camelCase
    keys after them are this registry's own. An empty ``name`` keeps the blobs on the filesystem."""
    name: str = key("name", default="")
    region: str = key("region", default="")
    bucket: str = key("bucket", default="")
    regionendpoint: str = key("regionendpoint", default="")  # endpoint URL of an S3-compatible store
    rootdirectory: str = key("rootdirectory", default="")  # key prefix inside the bucket
    # Both empty: botocore's default chain (environment, AWS_PROFILE, web identity/IRSA, instance role).
    accesskey: str = key("accesskey", default="")
    secretkey: str = key("secretkey", default="")
    forcepathstyle: bool = key("forcepathstyle", default=False)
    secure: bool = key("secure", default=True)  # https when regionendpoint names no scheme
    skipverify: bool = key("skipverify", default=False)  # do not verify the endpoint's TLS certificate
    encrypt: bool = key("encrypt", default=False)  # server-side encryption: AES256, or aws:kms with keyid
    keyid: str = key("keyid", default="")
    storageclass: str = key("storageclass", default="STANDARD")  # NONE: send no storage class
    chunksize: Size = key("chunksize", default=Size(16 << 20))  # multipart part size (5MiB minimum)
    # Our own.
    part_concurrency: int = key("partConcurrency", default=4)  # parts of one upload in flight at once
    connect_timeout: Duration = key("connectTimeout", default=Duration(10))
    read_timeout: Duration = key("readTimeout", default=Duration(60))
    max_pool_connections: int = key("maxPoolConnections", default=32)
    max_attempts: int = key("maxAttempts", default=5)  # per request, with backoff (botocore standard mode)
    redirect: bool = key("redirect", default=False)  # GET of a blob answers 307 to a presigned URL
    redirect_expiry: Duration = key("redirectExpiry", default=Duration(1200))
    spool_directory: str = key("spoolDirectory", default="")  # default <rootDirectory>/_spool
    cache_directory: str = key("cacheDirectory", default="")  # local read cache of hot blobs
    cache_size: Size = key("cacheSize", default=Size(0))  # bytes; 0 turns the cache off


@dataclass(frozen=True)
class SubPathConfig:
    """One entry of zot's ``storage.subPaths``: repositories under this name prefix live elsewhere."""
    root_directory: str = key("rootDirectory", default="")
    dedupe: bool = key("dedupe", default=True)
    commit: bool = key("commit", default=True)
    storage_driver: StorageDriverConfig = key("storageDriver", default_factory=StorageDriverConfig)


@dataclass(frozen=True)
class StorageConfig:
    root_directory: str = key("rootDirectory", default="./data")
    dedupe: bool = key("dedupe", default=True)
    # Durable by default: data and directory entries are fsynced before a push is acknowledged.
    commit: bool = key("commit", default=True)
    gc: bool = key("gc", default=True)
    gc_delay: Duration = key("gcDelay", default=Duration(3600))
    gc_interval: Duration = key("gcInterval", default=Duration(86400))
    # Our own: untagged manifests nothing refers to are collected after gcDelay; false keeps them.
    gc_delete_untagged: bool = key("gcDeleteUntagged", default=True)
    # Our own: read/copy pacing of the background dedupe walk (after dedupe is turned on or off); 0 = unpaced.
    dedupe_bytes_per_second: Size = key("dedupeBytesPerSecond", default=Size(0))
    # zot's spelling: a remote store for the blobs (see StorageDriverConfig), and repository-name
    # prefixes kept on other roots or drivers ({"/team-a": {"rootDirectory": ...}}).
    storage_driver: "StorageDriverConfig" = key("storageDriver", default_factory=lambda: StorageDriverConfig())
    sub_paths: "dict[str, SubPathConfig]" = key("subPaths", default_factory=dict)


@dataclass(frozen=True)
class PostgresConfig:
    """A PostgreSQL server for the metadata (``meta.driver: postgres``): a DSN, or its parts."""
    dsn: str = key("dsn", default="")
    host: str = key("host", default="127.0.0.1")
    port: int = key("port", default=5432)
    user: str = key("user", default="postgres")
    password: str = key("password", default="")
    database: str = key("database", default="registry")
    sslmode: str = key("sslmode", default="prefer")
    schema: str = key("schema", default="public")
    pool_size: int = key("poolSize", default=10)
    connect_timeout: Duration = key("connectTimeout", default=Duration(10))
    # A statement unanswered this long fails (503) and its connection is replaced: a server that
    # stops answering without closing the connection must not hang requests. 0: no limit.
    query_timeout: Duration = key("queryTimeout", default=Duration(60))
    # Shown in pg_stat_activity: lets an operator (or a test) tell these connections apart.
    application_name: str = key("applicationName", default="registry")

    def where(self) -> str:
        """host:port/database for messages: never the password."""
        if self.dsn:
            from urllib.parse import urlsplit
            u = urlsplit(self.dsn)
            return f"{u.hostname or 'localhost'}:{u.port or 5432}{u.path or ''}"
        return f"{self.host}:{self.port}/{self.database}"


@dataclass(frozen=True)
class MetaConfig:
    """Our own: where the metadata lives. ``sqlite`` keeps it inside the root directory;
    ``postgres`` is shared by replicas; ``memory`` keeps nothing (tests, throwaway runs)."""
    driver: str = key("driver", default="sqlite")
    path: str = key("path", default="")  # sqlite file; default <rootDirectory>/_registry/meta.sqlite
    postgres: PostgresConfig = key("postgres", default_factory=PostgresConfig)


@dataclass(frozen=True)
class UploadsConfig:
    """Our own: upload sessions and size limits."""
    ttl: Duration = key("ttl", default=Duration(86400))
    max_manifest_size: Size = key("maxManifestSize", default=Size(4 << 20))


@dataclass(frozen=True)
class LogConfig:
    level: str = key("level", default="info")
    # Our own: json (one object per line), text, or auto (text on a terminal, JSON otherwise).
    format: str = key("format", default="auto")


@dataclass(frozen=True)
class PrometheusConfig:
    """zot's spelling of the metrics path: ``extensions.metrics.prometheus.path``."""
    path: str = key("path", default="")


@dataclass(frozen=True)
class MetricsConfig:
    enable: bool = key("enable", default=True)
    path: str = key("path", default="/metrics")
    prometheus: PrometheusConfig = key("prometheus", default_factory=PrometheusConfig)
    # Our own: a per-repository label on a few series, for at most maxRepositories names
    # (the rest are counted under "_other"). Off by default: repository names are unbounded.
    repository_labels: bool = key("repositoryLabels", default=False)
    max_repositories: int = key("maxRepositories", default=100)

    @property
    def effective_path(self) -> str:
        return self.prometheus.path or self.path


@dataclass(frozen=True)
class ScrubConfig:
    enable: bool = key("enable", default=True)
    interval: Duration = key("interval", default=Duration(86400))
    # Our own: read pacing, so a scrub never starves pushes and pulls of disk bandwidth; 0 = unpaced.
    bytes_per_second: Size = key("bytesPerSecond", default=Size(0))


@dataclass(frozen=True)
class ExtensionsConfig:
    metrics: MetricsConfig = key("metrics", default_factory=MetricsConfig)
    scrub: ScrubConfig = key("scrub", default_factory=ScrubConfig)


@dataclass(frozen=True)
class Config:
    dist_spec_version: str = key("distSpecVersion", default="1.1.1")
    http: HTTPConfig = key("http", default_factory=HTTPConfig)
    storage: StorageConfig = key("storage", default_factory=StorageConfig)
    meta: MetaConfig = key("meta", default_factory=MetaConfig)
    uploads: UploadsConfig = key("uploads", default_factory=UploadsConfig)
    log: LogConfig = key("log", default_factory=LogConfig)
    extensions: ExtensionsConfig = key("extensions", default_factory=ExtensionsConfig)

    @property
    def root(self) -> Path:
        return Path(self.storage.root_directory)

    def replace(self, **sections: Any) -> "Config":
        """Copy with fields changed: ``cfg.replace(storage={"commit": False})``."""
        return _build(Config, _merge(to_dict(self), _keyed(Config, sections)), "")


_LEVELS = {"debug", "info", "warning", "warn", "error", "critical"}


def _validate(cfg: Config) -> None:
    if cfg.meta.driver not in ("sqlite", "postgres", "memory"):
        raise ConfigError(f"meta.driver: {cfg.meta.driver!r} is not a known metadata store "
                          "(expected sqlite, postgres or memory)")
    pg = cfg.meta.postgres
    if pg.sslmode not in ("disable", "allow", "prefer", "require", "verify-ca", "verify-full"):
        raise ConfigError(f"meta.postgres.sslmode: {pg.sslmode!r} (expected disable, allow, prefer, require, "
                          "verify-ca or verify-full)")
    if pg.pool_size < 1:
        raise ConfigError(f"meta.postgres.poolSize: {pg.pool_size} (expected 1 or more)")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,62}", pg.schema):
        raise ConfigError(f"meta.postgres.schema: {pg.schema!r} (expected a plain SQL identifier)")
    if pg.dsn and not pg.dsn.startswith(("postgres://", "postgresql://")):
        raise ConfigError("meta.postgres.dsn: expected a postgresql:// URL")
    if not 0 <= cfg.http.port <= 65535:
        raise ConfigError(f"http.port: {cfg.http.port} is not a TCP port (expected 0-65535)")
    if cfg.http.workers < 1:
        raise ConfigError(f"http.workers: {cfg.http.workers} (expected 1 or more)")
    if cfg.log.level.lower() not in _LEVELS:
        raise ConfigError(f"log.level: {cfg.log.level!r} (expected one of {', '.join(sorted(_LEVELS))})")
    if not cfg.storage.root_directory:
        raise ConfigError("storage.rootDirectory: '' is empty (expected a directory path)")
    if cfg.uploads.max_manifest_size < 4 << 20:
        raise ConfigError(f"uploads.maxManifestSize: {int(cfg.uploads.max_manifest_size)} bytes is too small "
                          "(expected at least 4MiB, the spec's minimum)")
    if bool(cfg.http.tls.cert) != bool(cfg.http.tls.key):
        raise ConfigError(f"http.tls: cert {cfg.http.tls.cert!r} and key {cfg.http.tls.key!r} "
                          "(expected both or neither)")
    _validate_ops(cfg)
    _validate_storage_drivers(cfg)


_LOG_FORMATS = ("json", "text", "auto")
_RESERVED_PATHS = ("/healthz", "/readyz")


def _validate_ops(cfg: Config) -> None:
    """Logs, shutdown, metrics and scrub settings (issue 8)."""
    if cfg.log.format.lower() not in _LOG_FORMATS:
        raise ConfigError(f"log.format: {cfg.log.format!r} (expected one of {', '.join(_LOG_FORMATS)})")
    if cfg.http.shutdown_timeout < 0:
        raise ConfigError(f"http.shutdownTimeout: {float(cfg.http.shutdown_timeout)} (expected 0s or more)")
    m = cfg.extensions.metrics
    for name, path in (("path", m.path), ("prometheus.path", m.prometheus.path)):
        if name == "prometheus.path" and not path:
            continue
        if not re.fullmatch(r"/[A-Za-z0-9._~/-]*", path) or path == "/" or path.startswith("/v2") \
                or path in _RESERVED_PATHS:
            raise ConfigError(f"extensions.metrics.{name}: {path!r} (expected a URL path such as /metrics, "
                              "outside /v2 and other than /healthz and /readyz)")
    if m.max_repositories < 1:
        raise ConfigError(f"extensions.metrics.maxRepositories: {m.max_repositories} (expected 1 or more)")
    if cfg.storage.dedupe_bytes_per_second < 0:
        raise ConfigError(f"storage.dedupeBytesPerSecond: {int(cfg.storage.dedupe_bytes_per_second)} "
                          "(expected a rate such as 50MiB, or 0 for unpaced)")
    s = cfg.extensions.scrub
    if s.interval <= 0:
        raise ConfigError(f"extensions.scrub.interval: {float(s.interval)} (expected a duration above 0s)")
    if s.bytes_per_second < 0:
        raise ConfigError(f"extensions.scrub.bytesPerSecond: {int(s.bytes_per_second)} "
                          "(expected a rate such as 50MiB, or 0 for unpaced)")


_DRIVERS = ("", "filesystem", "s3")
MIN_PART_SIZE = 5 << 20  # S3's minimum size of a multipart part (all but the last)


def _validate_driver(d: StorageDriverConfig, where: str) -> None:
    """storage.storageDriver and each subPaths entry's storageDriver (issue 4)."""
    if d.name.lower() not in _DRIVERS:
        raise ConfigError(f"{where}.name: {d.name!r} (expected s3, or empty for the filesystem)")
    if d.name.lower() != "s3":
        return
    for name, value in (("bucket", d.bucket), ("region", d.region)):
        if not value:
            raise ConfigError(f"{where}.{name}: missing (required by the s3 driver)")
    if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", d.bucket):
        raise ConfigError(f"{where}.bucket: {d.bucket!r} is not a bucket name (expected 3-63 of a-z 0-9 . -)")
    if d.regionendpoint and not re.fullmatch(r"(https?://)?[A-Za-z0-9.\-\[\]:]+(/.*)?", d.regionendpoint):
        raise ConfigError(f"{where}.regionendpoint: {d.regionendpoint!r} (expected a URL such as "
                          "https://s3.example.com or http://127.0.0.1:9000)")
    if d.rootdirectory.strip("/") != d.rootdirectory.strip("/").strip() or ".." in d.rootdirectory.split("/"):
        raise ConfigError(f"{where}.rootdirectory: {d.rootdirectory!r} (expected a key prefix such as registry/v1)")
    if bool(d.accesskey) != bool(d.secretkey):
        raise ConfigError(f"{where}.accesskey/secretkey: set both, or neither for botocore's default credential "
                          "chain")
    if d.keyid and not d.encrypt:
        raise ConfigError(f"{where}.keyid: set but encrypt is false (expected encrypt: true for aws:kms)")
    if d.chunksize < MIN_PART_SIZE:
        raise ConfigError(f"{where}.chunksize: {int(d.chunksize)} bytes is below S3's multipart minimum "
                          f"(expected at least 5MiB)")
    if d.chunksize > 5 << 30:
        raise ConfigError(f"{where}.chunksize: {int(d.chunksize)} bytes is above S3's part maximum (5GiB)")
    for name, n in (("partConcurrency", d.part_concurrency), ("maxPoolConnections", d.max_pool_connections),
                    ("maxAttempts", d.max_attempts)):
        if n < 1:
            raise ConfigError(f"{where}.{name}: {n} (expected 1 or more)")
    for name, t in (("connectTimeout", d.connect_timeout), ("readTimeout", d.read_timeout),
                    ("redirectExpiry", d.redirect_expiry)):
        if t <= 0:
            raise ConfigError(f"{where}.{name}: {float(t)} (expected a duration above 0s)")
    if d.redirect_expiry > 7 * 86400:
        raise ConfigError(f"{where}.redirectExpiry: {float(d.redirect_expiry)}s (presigned URLs last at most 7d)")
    if d.cache_size < 0 or (d.cache_size and not d.cache_directory):
        raise ConfigError(f"{where}.cacheSize: {int(d.cache_size)} (expected 0, or a size with cacheDirectory set)")


def _validate_storage_drivers(cfg: Config) -> None:
    _validate_driver(cfg.storage.storage_driver, "storage.storageDriver")
    for prefix, sub in cfg.storage.sub_paths.items():
        where = f"storage.subPaths.{prefix}"
        name = prefix.strip("/")
        if not prefix.startswith("/") or not re.fullmatch(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
                                                          r"(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*", name):
            raise ConfigError(f"{where}: expected a repository name prefix such as /team-a")
        _validate_driver(sub.storage_driver, f"{where}.storageDriver")
        if sub.storage_driver.name.lower() != "s3" and not sub.root_directory:
            raise ConfigError(f"{where}.rootDirectory: missing (a filesystem subpath needs its own directory)")


def _keyed(cls: type, values: Mapping[str, Any]) -> dict[str, Any]:
    """Translate python field names in ``values`` to config keys (for replace())."""
    out: dict[str, Any] = {}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = get_type_hints(cls)
    for name, value in values.items():
        f = fields[name]
        sub = hints[name]
        out[f.metadata["key"]] = _keyed(sub, value) if dataclasses.is_dataclass(sub) and isinstance(value, Mapping) else value
    return out


def to_dict(obj: Any) -> dict[str, Any]:
    """The config as a file would spell it (camelCase keys)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        out[f.metadata["key"]] = to_dict(value) if dataclasses.is_dataclass(value) else (
            float(value) if isinstance(value, Duration) else int(value) if isinstance(value, Size) else
            {k: to_dict(v) for k, v in value.items()} if isinstance(value, dict) else value)
    return out


SECRET_KEYS = frozenset({"password", "secret", "secretkey", "secret-key", "secret_key", "token", "dsn"})
MASK = "***"


def masked(data: Any) -> Any:
    """A copy of a config mapping (as ``to_dict`` spells it) with every secret shown as ``***``:
    any key named password, secret, secretKey, secret-key, token or dsn, at any depth.
    An empty value stays empty, so "not set" is still visible."""
    if isinstance(data, Mapping):
        return {k: (MASK if str(k).lower() in SECRET_KEYS and v not in ("", None) else masked(v))
                for k, v in data.items()}
    if isinstance(data, list):
        return [masked(v) for v in data]
    return data


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


def _convert(tp: Any, value: Any, path: str) -> Any:
    if get_origin(tp) is dict:  # a map of named sections (storage.subPaths)
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: {value!r} is not valid (expected a mapping)")
        return {str(k): _build(get_args(tp)[1], {} if v is None else v, f"{path}.{k}") for k, v in value.items()}
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                return value.lower() in ("true", "1", "yes", "on")
            raise ValueError("true or false")
        if tp is int:
            if isinstance(value, bool) or not re.fullmatch(r"-?\d+", str(value).strip()):
                raise ValueError("a whole number")
            return int(value)
        if tp is str:
            if isinstance(value, (dict, list)):
                raise ValueError("a string")
            return str(value)
        if tp in (Duration, Size):
            return tp.parse(value)
    except ValueError as exc:
        raise ConfigError(f"{path}: {value!r} is not valid (expected {exc})") from None
    raise ConfigError(f"{path}: unsupported type")  # pragma: no cover - a bug in the schema


def _build(cls: type, data: Mapping[str, Any], prefix: str) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix or 'config'}: {data!r} is not valid (expected a mapping of keys, "
                          f"got {type(data).__name__})")
    hints = get_type_hints(cls)
    by_key = {f.metadata["key"]: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(by_key))
    if unknown:
        where = f" in {prefix}" if prefix else ""
        raise ConfigError(f"{prefix + '.' if prefix else ''}{unknown[0]}: unknown key{where} "
                          f"(known: {', '.join(sorted(by_key))})")
    kwargs = {}
    for k, f in by_key.items():
        if k not in data:
            continue
        path = f"{prefix}.{k}" if prefix else k
        tp = hints[f.name]
        kwargs[f.name] = (_build(tp, {} if data[k] is None else data[k], path) if dataclasses.is_dataclass(tp)
                          else _convert(tp, data[k], path))
    return cls(**kwargs)


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """REGISTRY_STORAGE_GCDELAY=2h -> {"storage": {"gcDelay": "2h"}}; keys match case-insensitively."""
    out: dict[str, Any] = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or name in FOREIGN_ENV:
            continue
        parts = name[len(ENV_PREFIX):].lower().split("_")
        cls: Any = Config
        node, path = out, []
        for i, part in enumerate(parts):
            by_lower = {f.metadata["key"].lower(): f for f in dataclasses.fields(cls)}
            f = by_lower.get(part)
            if f is None:
                raise ConfigError(f"{name}: no config key {'.'.join(path + [part])!r} "
                                  f"(known here: {', '.join(sorted(x.metadata['key'] for x in by_lower.values()))})")
            path.append(f.metadata["key"])
            tp = get_type_hints(cls)[f.name]
            if dataclasses.is_dataclass(tp):
                if i == len(parts) - 1:
                    raise ConfigError(f"{name}: {'.'.join(path)} is a section, not a value")
                node = node.setdefault(f.metadata["key"], {})
                cls = tp
            else:
                if i != len(parts) - 1:
                    raise ConfigError(f"{name}: {'.'.join(path)} is a value, not a section")
                node[f.metadata["key"]] = value
    return out


def read_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"config file {str(p)!r}: {exc.strerror}") from None
    try:
        if p.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml  # YAML is a superset of JSON: it reads both
            data = yaml.safe_load(text)
    except Exception as exc:  # parse errors of either format
        raise ConfigError(f"config file {str(p)!r} does not parse: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r}: expected a mapping at the top level")
    return data


def load(path: str | os.PathLike[str] | None = None, *, environ: Mapping[str, str] | None = None,
         overrides: Mapping[str, Any] | None = None) -> Config:
    """File, then REGISTRY_* environment, then command-line overrides (config keys)."""
    data = read_file(path) if path else {}
    data = _merge(data, _env_overrides(os.environ if environ is None else environ))
    if overrides:
        data = _merge(data, overrides)
    cfg = _build(Config, data, "")
    _validate(cfg)
    return cfg
