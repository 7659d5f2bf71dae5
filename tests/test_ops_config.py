"""Configuration (issue 8): every bad value stops start-up with a message naming the key,
the value and what was expected; check-config prints the effective config with secrets
masked; the example files in config/ are valid; REGISTRY_* variables reach the new keys."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from registry import cli
from registry.config import MASK, ConfigError, load, masked, to_dict

EXAMPLES = Path(__file__).resolve().parent.parent / "config"


def write(tmp_path: Path, doc: Any, name: str = "registry.yaml") -> Path:
    p = tmp_path / name
    p.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    return p


# (file content, the key the message must name, a piece of the bad value, a piece of what was expected)
BAD = [
    ({"storage": {"gcDealy": "2h"}}, "storage.gcDealy", "gcDealy", "unknown key"),
    ({"strage": {}}, "strage", "strage", "unknown key"),
    ({"extensions": {"metrics": {"enabled": True}}}, "extensions.metrics.enabled", "enabled", "unknown key"),
    ({"storage": {"gcDelay": "2 hours"}}, "storage.gcDelay", "2 hours", "duration"),
    ({"storage": {"gcInterval": True}}, "storage.gcInterval", "True", "duration"),
    ({"http": {"shutdownTimeout": "soon"}}, "http.shutdownTimeout", "soon", "duration"),
    ({"http": {"shutdownTimeout": -5}}, "http.shutdownTimeout", "-5", "0s or more"),
    ({"storage": {"dedupe": "maybe"}}, "storage.dedupe", "maybe", "true or false"),
    ({"extensions": {"metrics": {"enable": "sometimes"}}}, "extensions.metrics.enable", "sometimes",
     "true or false"),
    ({"http": {"port": 70000}}, "http.port", "70000", "0-65535"),
    ({"http": {"port": "http"}}, "http.port", "http", "whole number"),
    ({"http": {"port": 5000.5}}, "http.port", "5000.5", "whole number"),
    ({"http": 5000}, "http", "5000", "mapping"),
    ({"log": {"level": "verbose"}}, "log.level", "verbose", "debug"),
    ({"log": {"format": "xml"}}, "log.format", "xml", "json, text, auto"),
    ({"extensions": {"metrics": {"path": "metrics"}}}, "extensions.metrics.path", "metrics", "/metrics"),
    ({"extensions": {"metrics": {"path": "/v2/metrics"}}}, "extensions.metrics.path", "/v2/metrics", "outside /v2"),
    ({"extensions": {"metrics": {"prometheus": {"path": "/healthz"}}}}, "extensions.metrics.prometheus.path",
     "/healthz", "other than /healthz"),
    ({"extensions": {"metrics": {"maxRepositories": 0}}}, "extensions.metrics.maxRepositories", "0", "1 or more"),
    ({"extensions": {"metrics": {"maxRepositories": "many"}}}, "extensions.metrics.maxRepositories", "many",
     "whole number"),
    ({"extensions": {"scrub": {"interval": 0}}}, "extensions.scrub.interval", "0", "above 0s"),
    ({"extensions": {"scrub": {"bytesPerSecond": "fast"}}}, "extensions.scrub.bytesPerSecond", "fast", "size"),
    ({"extensions": {"scrub": {"bytesPerSecond": -1}}}, "extensions.scrub.bytesPerSecond", "-1", "rate"),
    ({"uploads": {"maxManifestSize": "1KiB"}}, "uploads.maxManifestSize", "1024", "at least 4MiB"),
    ({"storage": {"rootDirectory": ""}}, "storage.rootDirectory", "''", "directory"),
    ({"http": {"tls": {"cert": "/c.pem"}}}, "http.tls", "/c.pem", "both or neither"),
    ({"meta": {"driver": "mysql"}}, "meta.driver", "mysql", "sqlite"),
]


@pytest.mark.parametrize("doc,key,value,expected", BAD, ids=[b[1] + "=" + b[2] for b in BAD])
def test_bad_value_names_key_value_and_expectation(tmp_path, doc, key, value, expected):
    path = write(tmp_path, doc)
    with pytest.raises(ConfigError) as exc:
        load(path, environ={})
    msg = str(exc.value)
    assert msg.startswith(key + ":"), msg
    assert value in msg, msg
    assert expected in msg, msg


@pytest.mark.parametrize("doc,key,value,expected", BAD[:12:3], ids=[b[1] for b in BAD[:12:3]])
def test_check_config_exits_with_the_message(tmp_path, capsys, doc, key, value, expected):
    path = write(tmp_path, doc)
    with pytest.raises(SystemExit) as exc:
        cli.main(["check-config", str(path)])
    assert isinstance(exc.value.code, str), exc.value.code  # sys.exit(message): status 1
    assert exc.value.code.startswith(f"registry: configuration error: {key}:")
    assert value in exc.value.code and expected in exc.value.code


def test_serve_refuses_to_start_on_a_bad_value(tmp_path):
    """The real command line: exit status 1, the message on stderr, nothing served."""
    path = write(tmp_path, {"storage": {"gcDelay": "2 hours"}})
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("REGISTRY_")}
    p = subprocess.run([sys.executable, "-m", "registry", "serve", "--config", str(path), "--root",
                        str(tmp_path / "data"), "--port", "0"], capture_output=True, text=True, timeout=60, env=env)
    assert p.returncode == 1, p.stderr
    assert "storage.gcDelay: '2 hours' is not valid (expected a duration" in p.stderr
    assert "serving" not in p.stderr
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("name,value,key", [
    ("REGISTRY_HTTP_SHUTDOWNTIMEOUT", "soon", "http.shutdownTimeout"),
    ("REGISTRY_EXTENSIONS_METRICS_ENABLE", "perhaps", "extensions.metrics.enable"),
    ("REGISTRY_LOG_FORMAT", "xml", "log.format"),
])
def test_bad_environment_value_names_the_key(name, value, key):
    with pytest.raises(ConfigError) as exc:
        load(None, environ={name: value})
    assert key in str(exc.value) and value in str(exc.value)


def test_unknown_environment_key_is_an_error():
    with pytest.raises(ConfigError) as exc:
        load(None, environ={"REGISTRY_EXTENSIONS_METRICS_PATHH": "/m"})
    assert "REGISTRY_EXTENSIONS_METRICS_PATHH" in str(exc.value) and "pathh" in str(exc.value)


def test_new_keys_defaults_and_overrides():
    cfg = load(None, environ={})
    assert cfg.http.shutdown_timeout == 30
    assert cfg.log.format == "auto"
    m = cfg.extensions.metrics
    assert (m.enable, m.effective_path, m.repository_labels, m.max_repositories) == (True, "/metrics", False, 100)
    s = cfg.extensions.scrub
    assert (s.enable, s.interval, s.bytes_per_second) == (True, 86400, 0)

    cfg = load(None, environ={"REGISTRY_HTTP_SHUTDOWNTIMEOUT": "1m30s", "REGISTRY_LOG_FORMAT": "json",
                              "REGISTRY_EXTENSIONS_METRICS_REPOSITORYLABELS": "true",
                              "REGISTRY_EXTENSIONS_METRICS_MAXREPOSITORIES": "7",
                              "REGISTRY_EXTENSIONS_SCRUB_BYTESPERSECOND": "50MiB",
                              "REGISTRY_EXTENSIONS_SCRUB_INTERVAL": "12h"})
    assert cfg.http.shutdown_timeout == 90
    assert cfg.log.format == "json"
    assert cfg.extensions.metrics.repository_labels is True and cfg.extensions.metrics.max_repositories == 7
    assert cfg.extensions.scrub.bytes_per_second == 50 << 20 and cfg.extensions.scrub.interval == 12 * 3600


def test_zot_metrics_spelling_is_accepted(tmp_path):
    """zot writes extensions.metrics.prometheus.path; a zot file must start as it is."""
    path = write(tmp_path, {"extensions": {"metrics": {"enable": True, "prometheus": {"path": "/zot-metrics"}}}})
    assert load(path, environ={}).extensions.metrics.effective_path == "/zot-metrics"


def test_empty_sections_take_the_defaults(tmp_path):
    path = write(tmp_path, "extensions:\nlog:\n")
    cfg = load(path, environ={})
    assert cfg.extensions.metrics.enable and cfg.log.level == "info"


# -- secrets


def test_masked_hides_every_secret_name_at_any_depth():
    doc = {"password": "p1", "nested": {"secret": "s1", "secretKey": "s2", "secret-key": "s3", "Token": "t1",
                                       "dsn": "postgresql://u:pw@h/db", "list": [{"password": "p2"}],
                                       "user": "alice", "key": "/etc/tls.key"},
           "empty": {"password": ""}}
    out = masked(doc)
    flat = json.dumps(out)
    for secret in ("p1", "s1", "s2", "s3", "t1", "pw@h", "p2"):
        assert secret not in flat
    assert out["password"] == MASK
    n = out["nested"]
    assert n["secret"] == n["secretKey"] == n["secret-key"] == n["Token"] == n["dsn"] == MASK
    assert n["list"] == [{"password": MASK}]
    assert n["user"] == "alice" and n["key"] == "/etc/tls.key"  # a TLS key is a path, not a secret
    assert out["empty"]["password"] == ""  # "not set" stays visible
    assert doc["password"] == "p1"  # the input is untouched


def test_check_config_prints_effective_config_with_secrets_masked(tmp_path, capsys, monkeypatch):
    path = write(tmp_path, {"meta": {"driver": "postgres",
                                     "postgres": {"dsn": "postgresql://reg:dsn-secret@db:5432/registry",
                                                  "user": "reg"}},
                            "storage": {"gcDelay": "2h"}})
    monkeypatch.setenv("REGISTRY_META_POSTGRES_PASSWORD", "env-secret")
    cli.main(["check-config", str(path)])
    out = capsys.readouterr().out
    assert "dsn-secret" not in out and "env-secret" not in out
    doc = json.loads(out)
    assert doc["meta"]["postgres"]["dsn"] == MASK
    assert doc["meta"]["postgres"]["password"] == MASK
    assert doc["meta"]["postgres"]["user"] == "reg"
    assert doc["storage"]["gcDelay"] == 7200  # the effective value, in seconds
    assert doc["extensions"]["metrics"]["path"] == "/metrics"  # defaults are shown too
    # what is printed reads back as a config file (the masked secrets aside)
    doc["meta"]["postgres"].update(dsn="", password="")
    again = load(write(tmp_path, json.dumps(doc), "again.json"), environ={})
    assert to_dict(again) == doc


# -- the examples


@pytest.mark.parametrize("name", ["embedded.yaml", "s3-postgres.yaml", "replicas.yaml"])
def test_examples_pass_check_config(name, capsys, monkeypatch):
    for k in list(__import__("os").environ):
        if k.startswith("REGISTRY_"):
            monkeypatch.delenv(k)
    cli.main(["check-config", str(EXAMPLES / name)])
    doc = json.loads(capsys.readouterr().out)
    assert doc["distSpecVersion"] == "1.1.1"


def test_embedded_example_spells_out_the_defaults():
    assert load(EXAMPLES / "embedded.yaml", environ={}) == load(None, environ={})
