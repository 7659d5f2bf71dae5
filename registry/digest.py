"""Digests: parse, verify, and the hashers for every supported algorithm."""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Protocol

import blake3

from registry.errors import RegistryError


class Hasher(Protocol):
    def update(self, data: bytes | bytearray | memoryview, /) -> object: ...
    def hexdigest(self) -> str: ...


# algorithm -> (hasher factory, encoded length); the spec's grammar is
# algorithm ":" encoded, with registered algorithms checked strictly.
ALGORITHMS: dict[str, tuple[object, int]] = {
    "sha256": (hashlib.sha256, 64),
    "sha512": (hashlib.sha512, 128),
    "blake3": (lambda: blake3.blake3(max_threads=1), 64),
}
_HEX = re.compile(r"[a-f0-9]+")
DEFAULT_ALGORITHM = "sha256"


@dataclass(frozen=True, slots=True)
class Digest:
    algorithm: str
    hex: str

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"

    @property
    def path(self) -> str:
        """The blob's path inside an OCI layout: blobs/<alg>/<hex>."""
        return f"blobs/{self.algorithm}/{self.hex}"


def parse_digest(text: str | None) -> Digest:
    """Parse ``alg:hex``; anything malformed or unsupported is DIGEST_INVALID."""
    if not text:
        raise RegistryError("DIGEST_INVALID", "digest missing")
    alg, sep, enc = text.partition(":")
    if not sep:
        raise RegistryError("DIGEST_INVALID", f"malformed digest {text[:200]!r}")
    spec = ALGORITHMS.get(alg)
    if spec is None:
        raise RegistryError("DIGEST_INVALID", f"unsupported digest algorithm {alg[:50]!r}")
    if len(enc) != spec[1] or not _HEX.fullmatch(enc):
        raise RegistryError("DIGEST_INVALID", f"malformed {alg} digest {text[:200]!r}")
    return Digest(alg, enc)


def is_digest(text: str) -> bool:
    return ":" in text


def new_hasher(algorithm: str = DEFAULT_ALGORITHM) -> Hasher:
    return ALGORITHMS[algorithm][0]()  # type: ignore[operator]


def digest_bytes(data: bytes, algorithm: str = DEFAULT_ALGORITHM) -> Digest:
    h = new_hasher(algorithm)
    h.update(data)
    return Digest(algorithm, h.hexdigest())
