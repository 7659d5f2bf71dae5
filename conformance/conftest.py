"""Real-client conformance: the registry runs as a real process (``python -m registry serve``)
on a free loopback port, and clients nobody here wrote (skopeo, podman, buildah, the oras
Python SDK) talk to it."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import pytest

from conformance._util import SALT, Response, http, kill_group, require_binary, run

REPO_ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0


@dataclass
class Server:
    host: str            # "127.0.0.1:PORT", the registry part of an image reference
    port: int
    root: Path
    log: Path
    proc: subprocess.Popen = field(repr=False)

    @property
    def base(self) -> str:
        return f"http://{self.host}"

    def ref(self, repo: str, tag: str | None = None, digest: str | None = None) -> str:
        """``docker://127.0.0.1:PORT/repo:tag`` (or ``@digest``), as containers/image tools want it."""
        return f"docker://{self.host}/{repo}" + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")

    def http(self, method: str, path: str, body: bytes | None = None,
             headers: Mapping[str, str] | None = None) -> Response:
        return http(self.base, method, path, body, headers)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def _read_port(log: Path, proc: subprocess.Popen) -> int:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("registry: serving "):
                # registry: serving http://127.0.0.1:PORT from DIR
                url = line.split()[2]
                return int(url.rsplit(":", 1)[1].rstrip("/"))
        if proc.poll() is not None:
            raise RuntimeError(f"registry exited with status {proc.returncode} before listening:\n"
                               f"{log.read_text(errors='replace')}")
        time.sleep(0.05)
    raise RuntimeError(f"registry did not report listening within {START_TIMEOUT}s:\n"
                       f"{log.read_text(errors='replace')}")


@contextlib.contextmanager
def running_server(root: Path, log: Path, config: Path | None = None) -> Iterator[Server]:
    """``python -m registry serve`` on a free loopback port; stopped with SIGTERM (a hang past
    STOP_TIMEOUT fails), then its whole process group is killed whatever happened."""
    # The server reads REGISTRY_* as config overrides; do not let the caller's environment
    # (REGISTRY_AUTH_FILE from containers tools, say) change or break it.
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
    env["PYTHONUNBUFFERED"] = "1"
    cmd = [sys.executable, "-m", "registry", "serve"]
    cmd += ["--config", str(config)] if config else ["--root", str(root), "--port", "0", "--address", "127.0.0.1"]
    proc = None
    try:
        with open(log, "wb") as logf:
            proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=logf,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        port = _read_port(log, proc)
        srv = Server(host=f"127.0.0.1:{port}", port=port, root=root, log=log, proc=proc)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                if srv.http("GET", "/v2/").status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"GET /v2/ did not answer 200 within {START_TIMEOUT}s:\n{srv.log_text()}")
            time.sleep(0.05)
        yield srv
        # Graceful stop first (SIGTERM), so a shutdown that hangs is noticed.
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"registry did not stop within {STOP_TIMEOUT}s of SIGTERM")
        text = srv.log_text()
        if os.environ.get("CONFORMANCE_SERVER_LOG"):  # keep the server's log for a look afterwards
            with open(os.environ["CONFORMANCE_SERVER_LOG"], "a") as keep:
                keep.write(text)
        assert "unhandled error" not in text and "Traceback" not in text, \
            f"the server logged an unexpected error:\n{text[-20000:]}"
    finally:
        if proc is not None:
            kill_group(proc)  # whatever is left of the group, workers included
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:  # pragma: no cover
                pass


@pytest.fixture(scope="session")
def server() -> Iterator[Server]:
    base = Path(tempfile.mkdtemp(prefix="registry-conformance-"))
    try:
        with running_server(base / "data", base / "server.log") as srv:
            yield srv
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A scratch directory removed at the end of the test (tmp_path would keep the last runs)."""
    d = Path(tempfile.mkdtemp(prefix="conformance-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@dataclass
class ClientEnv:
    """An isolated configuration for containers/image tools: no credentials, a permissive
    signature policy, our registry marked insecure, temp files under our own dir."""
    home: Path
    env: dict[str, str]
    policy: Path


@pytest.fixture(scope="session")
def client_env(server: Server) -> Iterator[ClientEnv]:
    home = Path(tempfile.mkdtemp(prefix="conformance-clients-"))
    try:
        conf = home / ".config" / "containers"
        conf.mkdir(parents=True)
        policy = conf / "policy.json"
        policy.write_text(json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))
        registries = conf / "registries.conf"
        registries.write_text(f'unqualified-search-registries = []\n\n[[registry]]\nlocation = "{server.host}"\n'
                              f'insecure = true\n')
        auth = home / "auth.json"
        auth.write_text(json.dumps({"auths": {}}))
        tmp = home / "tmp"
        tmp.mkdir()
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("REGISTRY_", "CONTAINERS_", "DOCKER_")) and "proxy" not in k.lower()}
        env.update(HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"), TMPDIR=str(tmp),
                   REGISTRY_AUTH_FILE=str(auth), CONTAINERS_REGISTRIES_CONF=str(registries),
                   NO_PROXY="127.0.0.1", no_proxy="127.0.0.1")
        yield ClientEnv(home=home, env=env, policy=policy)
    finally:
        shutil.rmtree(home, ignore_errors=True)


class Skopeo:
    def __init__(self, ce: ClientEnv):
        self.binary = require_binary("skopeo")
        self.ce = ce

    def __call__(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return run([self.binary, "--policy", str(self.ce.policy), "--tmpdir", self.ce.env["TMPDIR"], *args],
                   env=self.ce.env, check=check, timeout=timeout)

    def copy(self, src: str, dst: str, *extra: str, check: bool = True,
             timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return self("copy", "--retry-times", "0", "--src-tls-verify=false", "--dest-tls-verify=false",
                    *extra, src, dst, check=check, timeout=timeout)

    def inspect_raw(self, ref: str) -> bytes:
        # text mode would be lossy only for invalid UTF-8, which a JSON manifest is not
        return self("inspect", "--tls-verify=false", "--raw", ref).stdout.encode()


@pytest.fixture
def skopeo(client_env: ClientEnv) -> Skopeo:
    return Skopeo(client_env)


def pytest_report_header(config: Any) -> str:
    return f"conformance: content seed CONFORMANCE_SEED={SALT}"


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: Any) -> None:
    """Skip reasons of the conformance tests are always shown, even without ``-rs``; after a
    failure, the content seed that replays the run."""
    failed = [r for key in ("failed", "error") for r in terminalreporter.stats.get(key, [])
              if "conformance" in getattr(r, "nodeid", "")]
    if failed:
        terminalreporter.line(f"conformance: rerun with CONFORMANCE_SEED={SALT} for the same content")
    if "s" in getattr(terminalreporter, "reportchars", ""):
        return
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if "conformance" in r.nodeid]
    if not skipped:
        return
    terminalreporter.section("conformance tests skipped")
    for r in skipped:
        reason = r.longrepr[2] if isinstance(r.longrepr, tuple) else str(r.longrepr)
        terminalreporter.line(f"SKIPPED {r.nodeid}: {reason}")
