"""http.workers: several processes share the port and behave as one registry."""
from __future__ import annotations

import hashlib
import os
import socket
import time
from pathlib import Path

from conformance._util import http
from conformance.conftest import running_server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(x) for x in text.split()]


def test_two_workers_serve_as_one_registry(tmp_path: Path) -> None:
    port = _free_port()
    cfg = tmp_path / "registry.yaml"
    cfg.write_text(f"http: {{address: 127.0.0.1, port: {port}, workers: 2}}\n"
                   f"storage: {{rootDirectory: {tmp_path / 'data'}, commit: false}}\n")
    with running_server(tmp_path / "data", tmp_path / "log", cfg) as srv:
        workers = _children(srv.proc.pid)
        assert len(workers) == 1, workers  # the parent serves too
        base = f"http://{srv.host}"
        # Every request on a new connection: the kernel spreads them over both processes.
        data = os.urandom(3 << 20)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        r = http(base, "POST", "/v2/w/app/blobs/uploads/")
        assert r.status == 202
        loc = r.headers["Location"]
        step = 1 << 20
        for off in range(0, len(data), step):
            r = http(base, "PATCH", loc, data[off:off + step],
                     {"Content-Range": f"{off}-{off + step - 1}", "Content-Type": "application/octet-stream"})
            assert r.status == 202, r.body
            loc = r.headers["Location"]
        r = http(base, "PUT", f"{loc}?digest={digest}")
        assert r.status == 201, r.body
        for _ in range(20):
            r = http(base, "GET", f"/v2/w/app/blobs/{digest}")
            assert r.status == 200 and r.body == data
        pid = srv.proc.pid
    # SIGTERM to the group stopped every worker; none is left behind.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(Path(f"/proc/{w}").exists() for w in workers):
        time.sleep(0.05)
    assert not any(Path(f"/proc/{w}").exists() and "zombie" not in Path(f"/proc/{w}/status").read_text()
                   for w in workers), pid


def test_workers_need_a_fixed_port(tmp_path: Path) -> None:
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
    env["REGISTRY_HTTP_WORKERS"] = "2"
    p = subprocess.run([sys.executable, "-m", "registry", "serve", "--root", str(tmp_path), "--port", "0"],
                       env=env, capture_output=True, text=True, timeout=30)
    assert p.returncode != 0 and "http.workers" in p.stderr
