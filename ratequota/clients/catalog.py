"""The published routing catalog: its document, its cheap header, and what a pod keeps (pure).

``apply_policy`` publishes the whole policy as one JSON document in the
catalog key; pods route tenants to groups with it and re-read it every
``catalog_ttl``. Two things make that re-read cheap and safe:

- **A header that identifies the publication.** The document starts with
  ``{"epoch": E, "digest": "…", "restored": false, "schema": N, …}``. ``digest`` is a hash
  of the policy's content, ``epoch`` orders publications. A refresh reads only
  the first ``HEADER_BYTES`` bytes (``GETRANGE``); when the digest is the one
  the pod already holds, nothing more is read and nothing is parsed or
  validated again. A 100,000-tenant catalog (6 MB) is fetched and validated
  once per change, not once per refresh.
- **Loss is not unpublication.** An operator unpublishes by applying a
  policy without the group (or an empty policy): the catalog key then
  *exists* and says so. A catalog key that is *missing* therefore means the
  data was lost (Redis restarted empty, evicted, flushed) or nothing was ever
  published; a pod that knows a policy keeps it and writes it back with
  ``SET NX``, marked ``"restored": true``. A restored document never rolls a
  pod back: it is adopted only when its epoch is not older than the pod's own
  (a pod that read a newer publication than the one that restored it keeps
  the newer one). A document written by ``apply_policy`` always wins.

Documents written before the header existed (no ``epoch``) parse as epoch 0,
keyed by a digest of their bytes, so mixed versions during a rolling update
still work (they are fetched whole on each refresh).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping

import attrs

from ratequota.engine.keys import SCHEMA_VERSION
from ratequota.errors import ConfigError, SchemaMismatch
from ratequota.policy import Policy

__all__ = [
    "HEADER_BYTES",
    "Catalog",
    "CatalogDocument",
    "CatalogHeader",
    "catalog_document",
    "header_of",
    "parse_document",
    "parse_header",
    "policy_digest",
]

#: Bytes a refresh reads first (``GETRANGE 0 HEADER_BYTES-1``): enough for the header.
HEADER_BYTES = 160

_HEADER = re.compile(
    rb'^\{"epoch": (\d{1,20}), "digest": "([0-9a-f]{32})", "restored": (true|false), '
    rb'"schema": (\d{1,9}),'
)


@attrs.frozen
class CatalogHeader:
    """Which publication a catalog document holds: its epoch, content digest, and origin."""

    epoch: int
    digest: str
    restored: bool = False


@attrs.frozen
class CatalogDocument:
    """A parsed catalog document: the policy and the header it was published under."""

    policy: Policy
    header: CatalogHeader


def policy_digest(policy: Policy) -> str:
    """A short, stable hash of a policy's content (equal policies, equal digests)."""
    canonical = json.dumps(policy.to_dict(), sort_keys=True, separators=(",", ":"))
    return hashlib.blake2b(canonical.encode("utf-8"), digest_size=16).hexdigest()


def catalog_document(
    policy: Policy, *, epoch: int = 0, digest: str | None = None, restored: bool = False
) -> str:
    """The catalog key's value for ``policy``, header first (read back by ``parse_document``)."""
    digest = policy_digest(policy) if digest is None else digest
    # Key order is the header's layout: json.dumps keeps insertion order.
    return json.dumps(
        {
            "epoch": epoch,
            "digest": digest,
            "restored": restored,
            "schema": SCHEMA_VERSION,
            "policy": policy.to_dict(),
        }
    )


def _bytes(raw: object) -> bytes:
    return raw if isinstance(raw, bytes) else str(raw).encode("utf-8")


def parse_header(raw: object) -> CatalogHeader | None:
    """The header at the start of a document (or of its first bytes); None if it has none.

    Raises ``SchemaMismatch`` for a document written by a newer key schema.
    """
    if raw is None:
        return None
    found = _HEADER.match(_bytes(raw))
    if found is None:
        return None
    epoch, digest, restored, schema = found.groups()
    if int(schema) > SCHEMA_VERSION:
        raise SchemaMismatch("(catalog)", int(schema), SCHEMA_VERSION)
    return CatalogHeader(int(epoch), digest.decode("ascii"), restored == b"true")


def parse_document(raw: object) -> CatalogDocument | None:
    """The whole document (None if the key is missing); a bad one raises a ``ratequota`` error."""
    if raw is None:
        return None
    data = _bytes(raw)
    try:
        document = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ConfigError("catalog", f"the published catalog is not valid JSON: {exc}") from None
    if not isinstance(document, Mapping) or not isinstance(document.get("policy"), Mapping):
        raise ConfigError("catalog", "the published catalog holds no policy table")
    schema = document.get("schema", 0)
    if isinstance(schema, bool) or not isinstance(schema, int):
        raise ConfigError("catalog.schema", f"must be an integer, got {schema!r}")
    if schema > SCHEMA_VERSION:
        raise SchemaMismatch("(catalog)", schema, SCHEMA_VERSION)
    try:
        policy = Policy.from_dict(document["policy"])
    except ConfigError as exc:  # name the catalog, keep the field
        raise ConfigError(f"catalog.{exc.field}", str(exc)[len(exc.field) + 2 :]) from None
    return CatalogDocument(policy, header_of(data))


def header_of(raw: object) -> CatalogHeader:
    """The header of a whole document; one written before headers existed is keyed by its bytes
    (epoch 0), so an unchanged old document is still recognised without parsing it."""
    data = _bytes(raw)
    header = parse_header(data)
    if header is None:
        header = CatalogHeader(0, hashlib.blake2b(data, digest_size=16).hexdigest())
    return header


@attrs.frozen
class Catalog:
    """What a pod routes by: the policy it last read or published, and where it came from.

    ``header`` is None when the pod knows no publication (or was handed a
    policy without one, ``QuotaCore.set_policy``). ``loaded_at`` is the
    pod's monotonic time of the last successful refresh (or -inf).
    """

    policy: Policy | None
    routes: Mapping[str, str]
    loaded_at: float
    header: CatalogHeader | None = None

    @classmethod
    def of(
        cls, policy: Policy | None, loaded_at: float, header: CatalogHeader | None = None
    ) -> Catalog:
        """The catalog of ``policy``, with its tenant -> group routes built once."""
        routes = (
            {} if policy is None else {t.name: g.name for g in policy.groups for t in g.tenants}
        )
        return cls(policy, routes, loaded_at, header)

    @classmethod
    def empty(cls) -> Catalog:
        """Nothing known yet: the first call reads the catalog."""
        return cls(None, {}, -math.inf, None)

    def touched(self, loaded_at: float, header: CatalogHeader | None = None) -> Catalog:
        """The same policy, confirmed current at ``loaded_at`` (no re-parse, no re-validation)."""
        return attrs.evolve(self, loaded_at=loaded_at, header=header or self.header)

    def adopts(self, header: CatalogHeader) -> bool:
        """Should a pod holding this catalog switch to the publication ``header`` names?

        Always, unless it is a restoration of an *older* publication than the
        one this pod holds (a pod that had not seen the latest apply wrote it
        back after a data loss): rolling back would undo an operator's change.
        """
        if self.header is None or not header.restored:
            return True
        return header.epoch >= self.header.epoch

    def document(self) -> str | None:
        """This pod's policy as a restoration document (same epoch and digest), if it has one."""
        if self.policy is None:
            return None
        header = self.header or CatalogHeader(0, policy_digest(self.policy))
        epoch, digest = header.epoch, header.digest
        return catalog_document(self.policy, epoch=epoch, digest=digest, restored=True)
