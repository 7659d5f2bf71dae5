"""The OCI error table: every error a client can see is a RegistryError.

Services raise ``RegistryError(code, detail)``; one middleware (api/middleware.py)
renders the spec's ``{"errors": [{"code", "message", "detail"}]}`` body.
"""
from __future__ import annotations

import json

# code -> (HTTP status, message) from the distribution spec's error table.
ERRORS: dict[str, tuple[int, str]] = {
    "BLOB_UNKNOWN": (404, "blob unknown to registry"),
    "BLOB_UPLOAD_INVALID": (400, "blob upload invalid"),
    "BLOB_UPLOAD_UNKNOWN": (404, "blob upload unknown to registry"),
    "DIGEST_INVALID": (400, "provided digest did not match uploaded content"),
    "MANIFEST_BLOB_UNKNOWN": (404, "manifest references a manifest or blob unknown to registry"),
    "MANIFEST_INVALID": (400, "manifest invalid"),
    "MANIFEST_UNKNOWN": (404, "manifest unknown to registry"),
    "NAME_INVALID": (400, "invalid repository name"),
    "NAME_UNKNOWN": (404, "repository name not known to registry"),
    "SIZE_INVALID": (400, "provided length did not match content length"),
    "UNAUTHORIZED": (401, "authentication required"),
    "DENIED": (403, "requested access to the resource is denied"),
    "UNSUPPORTED": (405, "the operation is unsupported"),
    "TOOMANYREQUESTS": (429, "too many requests"),
    # Not in the spec's table, but the shape is the same for clients.
    "RANGE_INVALID": (416, "requested range not satisfiable"),
    "UNAVAILABLE": (503, "service unavailable"),
    "UNKNOWN": (500, "unknown error"),
}


class RegistryError(Exception):
    """An error with an OCI error code; ``status`` overrides the table's default."""

    def __init__(self, code: str, detail: object = None, *, status: int | None = None,
                 headers: dict[str, str] | None = None):
        if code not in ERRORS:
            raise ValueError(f"unknown OCI error code {code!r}")
        default_status, self.message = ERRORS[code]
        self.code = code
        self.detail = detail
        self.status = status or default_status
        self.headers = headers or {}
        super().__init__(f"{code}: {detail}" if detail is not None else code)

    def body(self) -> bytes:
        err: dict[str, object] = {"code": self.code, "message": self.message}
        if self.detail is not None:
            err["detail"] = self.detail
        return json.dumps({"errors": [err]}).encode()
