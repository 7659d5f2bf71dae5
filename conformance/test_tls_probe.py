"""A TLS client on the plain-HTTP port must get a quick failure, never a hang."""
from __future__ import annotations

import socket
import ssl
import time

import pytest

HANDSHAKE_TIMEOUT = 5.0
FAST = 2.0  # "well under" the timeout


def test_tls_handshake_fails_fast(server) -> None:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.port), timeout=HANDSHAKE_TIMEOUT) as sock:
        with pytest.raises(OSError) as failure:  # ssl.SSLError, ConnectionResetError, EOF... and TimeoutError
            with ctx.wrap_socket(sock, server_hostname="127.0.0.1"):
                pass
    elapsed = time.monotonic() - start
    assert not isinstance(failure.value, (TimeoutError, socket.timeout)), \
        f"the TLS handshake hung until the client's {HANDSHAKE_TIMEOUT}s timeout"
    assert elapsed < FAST, f"the TLS handshake took {elapsed:.2f}s to fail ({failure.value!r})"
    # The server is still answering plain HTTP afterwards.
    assert server.http("GET", "/v2/").status == 200


def test_skopeo_with_tls_verify_fails_fast(server, skopeo) -> None:
    """containers/image with TLS required against the plain-HTTP registry: a clear, quick error."""
    start = time.monotonic()
    r = skopeo("inspect", "--tls-verify=true", "--retry-times", "0", "--raw", server.ref("tls/none", "latest"),
               check=False, timeout=30)
    elapsed = time.monotonic() - start
    assert r.returncode != 0, r.stdout
    assert elapsed < 10, f"skopeo took {elapsed:.1f}s to fail: {r.stderr}"
    assert "server gave http response to https client" in r.stderr.lower(), r.stderr
