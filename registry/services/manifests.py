"""Manifest rules: parse and validate what is pushed, check what it refers to,
tags, referrers and the catalog."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Sequence

from registry.config import Config
from registry.digest import DEFAULT_ALGORITHM, Digest, digest_bytes, parse_digest
from registry.errors import RegistryError
from registry.meta.base import BadReferences, Manifest, MetaStore, Ref
from registry.reference import is_tag
from registry.services.blobs import Blobs
from registry.services.layout import Layout
from registry.storage.base import NotFound

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
IMAGE_TYPES = {OCI_MANIFEST, DOCKER_MANIFEST}
INDEX_TYPES = {OCI_INDEX, DOCKER_LIST}
KNOWN_TYPES = IMAGE_TYPES | INDEX_TYPES
# Layers that live elsewhere (Windows base layers); their blobs are never pushed.
FOREIGN_LAYERS = ("application/vnd.docker.image.rootfs.foreign.", "application/vnd.oci.image.layer.nondistributable.")


def _invalid(detail: str) -> RegistryError:
    return RegistryError("MANIFEST_INVALID", detail)


def _storable(text: str) -> bool:
    """JSON can spell a lone surrogate or a NUL; no metadata store can keep either as text."""
    if "\x00" in text:
        return False
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _descriptor(obj: Any, where: str) -> tuple[str, Digest, int]:
    if not isinstance(obj, dict):
        raise _invalid(f"{where}: a descriptor must be an object")
    media_type, size = obj.get("mediaType"), obj.get("size")
    if not isinstance(media_type, str) or not media_type:
        raise _invalid(f"{where}: mediaType missing")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise _invalid(f"{where}: size must be a non-negative integer")
    try:
        digest = parse_digest(obj.get("digest") if isinstance(obj.get("digest"), str) else None)
    except RegistryError as exc:
        raise _invalid(f"{where}: {exc.detail}") from None
    return media_type, digest, size


@dataclass
class Pushed:
    digest: Digest
    subject: str | None


def parse(body: bytes, content_type: str | None) -> Manifest:
    """Validate a pushed manifest; the digest is filled in by the caller."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: absurdly deep nesting
        raise _invalid("the manifest is not valid JSON") from None
    if not isinstance(doc, dict):
        raise _invalid("the manifest must be a JSON object")
    field_type = doc.get("mediaType")
    if field_type is not None and not isinstance(field_type, str):
        raise _invalid("mediaType must be a string")
    ctype = (content_type or "").split(";")[0].strip().lower() or None
    if ctype in ("application/json", "application/octet-stream", "text/plain"):
        ctype = None
    if field_type and ctype and field_type != ctype:
        raise _invalid(f"Content-Type {ctype} does not match the manifest's mediaType {field_type}")
    media_type = field_type or ctype
    if media_type is None:
        raise _invalid("no media type: set mediaType in the manifest or the Content-Type header")
    if media_type not in KNOWN_TYPES:
        raise _invalid(f"unsupported manifest media type {media_type[:200]}")
    if doc.get("schemaVersion") != 2:
        raise _invalid("schemaVersion must be 2")
    refs: list[Ref] = []
    artifact_type = doc.get("artifactType")
    if artifact_type is not None and not isinstance(artifact_type, str):
        raise _invalid("artifactType must be a string")
    if media_type in IMAGE_TYPES:
        cfg_type, cfg_digest, cfg_size = _descriptor(doc.get("config"), "config")
        refs.append(Ref(str(cfg_digest), "blob", cfg_size))
        layers = doc.get("layers", [] if media_type == OCI_MANIFEST else None)
        if not isinstance(layers, list):
            raise _invalid("layers must be a list")
        for i, layer in enumerate(layers):
            l_type, l_digest, l_size = _descriptor(layer, f"layers[{i}]")
            if l_type.startswith(FOREIGN_LAYERS) and layer.get("urls"):
                continue
            refs.append(Ref(str(l_digest), "blob", l_size))
        artifact_type = artifact_type or cfg_type
    else:
        children = doc.get("manifests")
        if not isinstance(children, list):
            raise _invalid("manifests must be a list")
        for i, child in enumerate(children):
            _, c_digest, c_size = _descriptor(child, f"manifests[{i}]")
            refs.append(Ref(str(c_digest), "manifest", c_size))
    subject = None
    if "subject" in doc and doc["subject"] is not None:
        _, s_digest, _ = _descriptor(doc["subject"], "subject")
        subject = str(s_digest)
    annotations = doc.get("annotations")
    if annotations is not None and (not isinstance(annotations, dict)
                                    or not all(isinstance(v, str) for v in annotations.values())):
        raise _invalid("annotations must map strings to strings")
    if artifact_type is not None and not _storable(artifact_type):
        raise _invalid("artifactType is not valid Unicode text")
    # One row per distinct reference: a layer may be listed twice.
    unique = list({(r.digest, r.kind): r for r in refs}.values())
    return Manifest(digest="", media_type=media_type, size=len(body), payload=body, subject=subject,
                    artifact_type=artifact_type, annotations=annotations or None, refs=unique)


def check_reference(reference: str) -> str:
    """A tag or a digest; anything else is malformed."""
    if ":" in reference:
        return str(parse_digest(reference))
    if not is_tag(reference):
        raise RegistryError("MANIFEST_INVALID", f"invalid tag {reference[:200]!r}")
    return reference


class Manifests:
    def __init__(self, cfg: Config, meta: MetaStore, blobs: Blobs, layout: Layout):
        self.cfg = cfg
        self.meta = meta
        self.blobs = blobs
        self.layout = layout

    async def put(self, repo: str, reference: str, content_type: str | None, body: bytes,
                  extra_tags: Sequence[str] = ()) -> Pushed:
        """Push by tag, or by digest with optional ``?tag=`` query tags."""
        m = parse(body, content_type)
        for t in extra_tags:
            if not is_tag(t):
                raise RegistryError("MANIFEST_INVALID", f"invalid tag {t[:200]!r}")
        if ":" in reference:
            want = parse_digest(reference)
            digest = digest_bytes(body, want.algorithm)
            if digest != want:
                raise RegistryError("DIGEST_INVALID", f"the manifest's {want.algorithm} digest is {digest}")
            tags = list(extra_tags)
        else:
            if not is_tag(reference):
                raise RegistryError("MANIFEST_INVALID", f"invalid tag {reference[:200]!r}")
            digest, tags = digest_bytes(body, DEFAULT_ALGORITHM), [reference, *extra_tags]
        m.digest = str(digest)
        await self.layout.ensure_repo(repo)
        await self.blobs.storage.write(f"{repo}/{digest.path}", body)
        try:
            await self.meta.manifest_put(repo, m, tags, self.blobs.review_after())
        except BadReferences as exc:
            await self.blobs.remove_content(repo, digest)  # the file written above, unless a row holds it
            if exc.missing:
                raise RegistryError("MANIFEST_BLOB_UNKNOWN", {"digests": exc.missing}) from None
            raise RegistryError("MANIFEST_INVALID", {"sizes": exc.wrong_size}) from None
        try:  # GC may have set aside the file of an earlier copy of this manifest meanwhile
            await self.blobs.storage.stat(f"{repo}/{digest.path}")
        except NotFound:
            await self.blobs.storage.write(f"{repo}/{digest.path}", body)
        await self.layout.sync(repo)
        return Pushed(digest, m.subject)

    async def get(self, repo: str, reference: str) -> Manifest:
        reference = check_reference(reference)
        m = await self.meta.manifest_get(repo, reference)
        if m is None:
            raise RegistryError("MANIFEST_UNKNOWN", {"reference": reference})
        if ":" in reference:  # by digest: a client may be about to push an index or referrer naming it
            if not await self.blobs.postpone(repo, "manifest", m.digest, m.review_after):
                raise RegistryError("MANIFEST_UNKNOWN", {"reference": reference})  # GC took it meanwhile
        return m

    async def delete(self, repo: str, reference: str) -> None:
        reference = check_reference(reference)
        if ":" in reference:
            if not await self.meta.manifest_delete(repo, reference, self.blobs.review_after()):
                raise RegistryError("MANIFEST_UNKNOWN", {"reference": reference})
            await self.blobs.remove_content(repo, parse_digest(reference))
        elif not await self.meta.tag_delete(repo, reference, self.blobs.review_after()):
            raise RegistryError("MANIFEST_UNKNOWN", {"reference": reference})
        await self.layout.sync(repo)

    async def tags(self, repo: str, n: int | None, last: str | None) -> list[str]:
        tags = await self.meta.tags(repo, n, last)
        if tags is None:
            raise RegistryError("NAME_UNKNOWN", {"name": repo})
        return tags

    async def referrers(self, repo: str, subject: Digest, artifact_type: str | None) -> list[dict[str, Any]]:
        out = []
        for m in await self.meta.referrers(repo, str(subject), artifact_type):
            desc: dict[str, Any] = {"mediaType": m.media_type, "digest": m.digest, "size": m.size}
            if m.artifact_type:
                desc["artifactType"] = m.artifact_type
            if m.annotations:
                desc["annotations"] = m.annotations
            out.append(desc)
        return out
