"""``Router``: the policy a client routes by, read, refreshed, restored and published.

The routing catalog (``ratequota.clients.catalog``) maps each tenant to its
group. A client refreshes it every ``catalog_ttl`` in the background, one
refresh at a time (single flight); writes it back when Redis lost it; restores
a group's lost policy from it; and publishes a new policy through it. Shadow
mode is read from the same policy. ``QuotaCore`` builds the lease flows on top.

The only mutable state is the catalog, replaced whole by a single assignment
under a lock that is never held across I/O.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Generator
from typing import Any

import attrs

from ratequota.clients.catalog import (
    HEADER_BYTES,
    Catalog,
    CatalogDocument,
    CatalogHeader,
    catalog_document,
    header_of,
    parse_document,
    parse_header,
    policy_digest,
)
from ratequota.clients.requests import validate_tenant
from ratequota.clients.settings import Settings
from ratequota.clock import Clock
from ratequota.engine.keys import KeySpace
from ratequota.engine.ops import Command, Compute, Flow, Spawn
from ratequota.engine.protocol import apply_policy_call
from ratequota.engine.replies import decode_apply_policy
from ratequota.errors import (
    BackendUnavailable,
    InvalidType,
    RateQuotaError,
    UnknownTenant,
)
from ratequota.policy import Policy

__all__ = ["Router", "parse_catalog"]

#: Seconds after which a catalog refresh that never reported back stops blocking others.
_REFRESH_BACKSTOP = 60.0


class Router:
    """The catalog held, its refresh flows, routing, shadow mode and publishing."""

    def __init__(self, settings: Settings, clock: Clock) -> None:
        self.settings = settings
        self.clock = clock
        self.keyspace = KeySpace(prefix=self.settings.prefix)
        self._catalog = Catalog.empty()
        # Single flight for catalog refreshes: (token, started) of the refresh in flight.
        # The lock guards this marker only; it is never held across I/O.
        self._refreshing: tuple[object, float] | None = None
        self._refresh_lock = threading.Lock()
        self._refresh_idle = threading.Event()
        self._refresh_idle.set()
        #: The error of the last background refresh that failed (None after a success).
        self.catalog_error: RateQuotaError | None = None
        #: Catalog reads and parses performed (for tests, benchmarks and operators).
        self.catalog_reads = 0
        self.catalog_parses = 0
        #: Shadow mode of the policy last read, indexed (replaced whole, by one assignment).
        self._shadow = _ShadowIndex.of(None)

    # -- routing -------------------------------------------------------------

    @property
    def policy(self) -> Policy | None:
        """The policy this client last read or published, if any."""
        return self._catalog.policy

    def set_policy(self, policy: Policy | None) -> None:
        """Route by ``policy`` from now on (after publishing or reading it)."""
        catalog = Catalog.of(policy, self.clock.monotonic())
        with self._refresh_lock:
            self._catalog = catalog

    def _read_catalog(self) -> Flow[Policy | None]:
        """Re-read the catalog now (explicitly asked for): the policy to route by.

        A missing catalog key never replaces the policy this pod knows: it
        means the data was lost, not that the policy was withdrawn (an
        operator withdraws groups by publishing a policy without them). See
        ``ratequota.clients.catalog``.
        """
        yield from self._refresh()
        return self._catalog.policy

    def _refresh(self) -> Flow[None]:
        """Bring the catalog up to date, reading as little as possible.

        First only the document's header (``GETRANGE``): the same digest as the
        one held means nothing changed, and nothing is fetched, parsed or
        validated. A missing key keeps the held policy and writes it back
        (``SET NX``, marked restored). Only a new publication is fetched whole
        and parsed, once.
        """
        key, route = self.keyspace.catalog, self.keyspace.catalog_route
        held = self._catalog
        self.catalog_reads += 1
        head = yield Command(route, ("GETRANGE", key, 0, HEADER_BYTES - 1))
        now = self.clock.monotonic()
        if not head:  # the key is missing (a document is never empty)
            restore = held.document()
            if restore is not None:
                # NX: never over a catalog an operator (or another pod) has just written.
                yield Command(route, ("SET", key, restore, "NX"))
            self._settle(held, held.touched(now))
            return
        header = parse_header(head)
        if header is not None and not held.adopts(header):
            self._settle(held, held.touched(now))  # an older publication restored: keep ours
            return
        if header is not None and held.header is not None and header.digest == held.header.digest:
            self._settle(held, held.touched(now, header))  # the same content: nothing to parse
            return
        raw = yield Command(route, ("GET", key))
        document = yield from self._parse(raw, held)
        if document is None:  # deleted between the two reads: as missing
            self._settle(held, held.touched(now))
        elif held.adopts(document.header):
            self._settle(held, Catalog.of(document.policy, now, document.header))
        else:
            self._settle(held, held.touched(now))

    def _settle(self, held: Catalog, new: Catalog) -> None:
        """Replace ``held`` by ``new``, unless the catalog changed meanwhile (this client
        published a policy during the refresh): the newer one stays."""
        with self._refresh_lock:  # guards the swap only, never I/O
            if self._catalog is held:
                self._catalog = new

    def _parse(self, raw: object, held: Catalog) -> Flow[CatalogDocument | None]:
        """Parse a fetched document, reusing the held policy when the content is the same.

        Parsing validates every tenant (seconds for 100,000 of them), so it is
        a ``Compute`` op: off the async client's event loop.
        """
        if raw is None:
            return None
        header = header_of(raw)
        same = held.header is not None and header.digest == held.header.digest
        if same and held.policy is not None:
            return CatalogDocument(held.policy, header)
        self.catalog_parses += 1
        document: CatalogDocument | None = yield Compute(lambda: parse_document(raw))
        return document

    def _claim_refresh(self) -> object | None:
        """A token if this caller may refresh the catalog now (no refresh in flight), else None.

        A refresh runs to its end (each of its round trips is bounded, and the
        parse is CPU only), so the marker is only a backstop against one that
        never reported back (its thread or task died): after a minute plus a
        few socket timeouts another caller may refresh.
        """
        now = self.clock.monotonic()
        bound = _REFRESH_BACKSTOP + 4 * self.settings.socket_timeout
        with self._refresh_lock:
            current = self._refreshing
            if current is not None and now - current[1] < bound:
                return None
            token = object()
            self._refreshing = (token, now)
            self._refresh_idle.clear()
            return token

    def _end_refresh(self, token: object) -> None:
        with self._refresh_lock:
            if self._refreshing is not None and self._refreshing[0] is token:
                self._refreshing = None
                self._refresh_idle.set()

    def _background_refresh(self, token: object) -> Generator[Any, Any, None]:
        """The refresh a stale catalog triggers, run beside the requests (``Spawn``).

        Errors stay here: the catalog held is still served, ``catalog_error``
        says what went wrong, and the next due refresh tries again.
        """
        try:
            yield from self._refresh()
            self.catalog_error = None
        except RateQuotaError as exc:
            self.catalog_error = exc
        finally:
            self._end_refresh(token)

    def wait_refreshed(self, timeout: float) -> bool:
        """Block until no catalog refresh is in flight (at most ``timeout`` s); for tests."""
        return self._refresh_idle.wait(timeout)

    def routed(self, tenant: str) -> str | None:
        """``tenant``'s group when the held catalog answers it without I/O, else None.

        The hot path of ``group_of``: a fresh catalog (no refresh due) that
        routes the tenant, or has a default group. Anything else (stale,
        empty, unknown tenant) is ``group_of``'s.
        """
        catalog = self._catalog
        if self.clock.monotonic() - catalog.loaded_at > self.settings.catalog_ttl:
            return None
        routed = catalog.routes.get(tenant)
        if routed is None and catalog.policy is not None:
            return catalog.policy.default_group
        return routed

    def group_of(self, tenant: str, group: str | None, *, refresh: bool = False) -> Flow[str]:
        """The group charged for ``tenant``: explicit, routed by the catalog, or the default.

        The catalog is refreshed every ``catalog_ttl`` in the background, one
        refresh at a time per client (single flight): every caller, the one
        that found it stale included, routes by the catalog already held
        instead of waiting. Only a client that holds no policy yet, or a caller
        told to (``refresh``, after the script disagreed with the route),
        reads it in line.
        """
        if group is not None:
            return validate_tenant(group, "group")
        catalog = self._catalog
        stale = self.clock.monotonic() - catalog.loaded_at > self.settings.catalog_ttl
        fresh = refresh or (stale and catalog.policy is None)  # read in line by this call
        if fresh:
            try:
                yield from self._refresh()
            except BackendUnavailable:
                # The catalog's shard is down: route by the last catalog read, so the
                # groups on the other shards keep working (the next call tries again).
                if catalog.policy is None:
                    raise
        elif stale:
            token = self._claim_refresh()
            if token is not None:
                yield Spawn(self._background_refresh(token))
        catalog = self._catalog
        routed = catalog.routes.get(tenant)
        if routed is None and catalog.policy is not None:
            routed = catalog.policy.default_group
        if routed is None:
            raise UnknownTenant(
                tenant,
                published=catalog.policy is not None,
                catalog_ttl=None if fresh else self.settings.catalog_ttl,
            )
        return routed

    def _restore_policy(self, group: str) -> Flow[bool]:
        """Republish ``group``'s policy after Redis lost it; False when it was removed on purpose.

        The published catalog is the authority: if it lists the group, its
        policy is written again (the same content, so every pod restoring it at
        once writes the same thing). If the catalog is gone too, the whole
        Redis lost its data: the catalog refresh writes back the policy this
        pod knows (``SET NX``) and the group is restored from it. A catalog
        that exists but does not list the group means the group was dropped:
        nothing is restored.

        Leases granted before the loss may still be running, and Redis lost
        the record of them: the restored policy opens the group's recovery
        window (one ``max_lease_ttl``, the longest any of them can still
        live), during which holders re-assert their leases by renewing and
        new work is refused (docs/failure-modes.md).
        """
        yield from self._refresh()
        source = self._catalog.policy
        group_policy = None if source is None else source.group(group)
        if group_policy is None:
            return False
        recover_ms = round(group_policy.max_lease_ttl * 1000)
        reply = yield apply_policy_call(
            self.keyspace, group_policy, recover_ms=recover_ms, now_ms=self.clock.redis_ms()
        )
        decode_apply_policy(group, reply)
        return True

    def _recheck_shadow(self) -> Flow[None]:
        """Re-read a stale policy that has shadow mode somewhere, for calls naming their group.

        Routing re-reads the policy every ``catalog_ttl``, but a call that
        names its group skips routing: without this, a pod that saw a group in
        shadow mode would keep admitting above its limits after the operator
        turned enforcement back on. A policy without shadow mode costs
        nothing here (a pod that never saw shadow mode enforces, the safe side).
        """
        catalog = self._catalog
        stale = self.clock.monotonic() - catalog.loaded_at > self.settings.catalog_ttl
        if stale and self._shadow_index().any:
            with contextlib.suppress(BackendUnavailable):  # keep the last policy read
                yield from self._read_catalog()

    def _shadow_index(self) -> _ShadowIndex:
        policy = self._catalog.policy
        index = self._shadow
        if index.policy is not policy:
            index = self._shadow = _ShadowIndex.of(policy)
        return index

    def in_shadow(self, group: str, tenant: str) -> bool:
        """Is ``tenant`` of ``group`` in shadow mode, by the policy this client last read?

        Shadow mode is set per group or per tenant in the policy: the decision
        runs in full, but a would-be refusal for the tenant's limit or the
        group's capacity admits (``Decision.shadow_refused``). A pod picks up
        a change with its routing, within ``catalog_ttl``.
        """
        index = self._shadow
        if index.policy is not self._catalog.policy:
            index = self._shadow_index()
        if not index.any:
            return False
        if group in index.groups or (group, tenant) in index.tenants:
            return True
        # A tenant the group does not list is its default tenant.
        return group in index.defaults and self._catalog.routes.get(tenant) != group

    # -- policy ----------------------------------------------------------------

    def apply_policy(self, policy: Policy, *, migrate: bool = False) -> Flow[dict[str, int]]:
        """Publish every group's policy, then the routing catalog; returns versions.

        Each group switches atomically (one script). Groups dropped from the
        policy lose their policy hash, so their tenants are refused from then on.
        ``migrate``: take groups over from the previous release's key layout.
        """
        if not isinstance(policy, Policy):
            raise InvalidType("policy", f"must be a Policy, got {type(policy).__name__}")
        previous = yield from self._read_catalog()
        held = self._catalog.header
        # Epochs order publications: after the one read, and not before the wall clock,
        # so a publication after a data loss still outranks what pods restore.
        epoch = max(0 if held is None else held.epoch + 1, self._wall_ms())
        header = CatalogHeader(epoch, policy_digest(policy))
        versions: dict[str, int] = {}
        for group in policy.groups:
            reply = yield apply_policy_call(self.keyspace, group, migrate=migrate)
            versions[group.name] = decode_apply_policy(group.name, reply)
        if previous is not None:
            for old in previous.groups:
                if policy.group(old.name) is None:
                    yield Command(old.name, ("DEL", self.keyspace.group(old.name).policy))
        document = catalog_document(policy, epoch=header.epoch, digest=header.digest)
        yield Command(self.keyspace.catalog_route, ("SET", self.keyspace.catalog, document))
        published = Catalog.of(policy, self.clock.monotonic(), header)
        with self._refresh_lock:  # a background refresh finishing now must not undo this
            self._catalog = published
        return versions

    def load_policy(self) -> Flow[Policy | None]:
        """Re-read the published policy now (and route by it); the held one if Redis lost it."""
        return (yield from self._read_catalog())

    def _wall_ms(self) -> int:
        """Epoch milliseconds: the clock's pinned Redis time, else this machine's wall clock."""
        pinned = self.clock.redis_ms()
        return round(time.time() * 1000) if pinned is None else pinned


@attrs.frozen
class _ShadowIndex:
    """Where ``policy`` has shadow mode: whole groups, (group, tenant) pairs, default tenants."""

    policy: Policy | None
    groups: frozenset[str]
    tenants: frozenset[tuple[str, str]]
    defaults: frozenset[str]
    #: True when some group, tenant or default tenant is in shadow mode (read on every call).
    any: bool = attrs.field(init=False)

    @any.default
    def _any(self) -> bool:
        return bool(self.groups or self.tenants or self.defaults)

    @classmethod
    def of(cls, policy: Policy | None) -> _ShadowIndex:
        groups = () if policy is None else policy.groups
        return cls(
            policy,
            frozenset(g.name for g in groups if g.shadow),
            frozenset((g.name, t.name) for g in groups for t in g.tenants if t.shadow),
            frozenset(g.name for g in groups if g.default_tenant.shadow),
        )


def parse_catalog(raw: object) -> Policy | None:
    """The policy held by the catalog key's value (None if the key is missing)."""
    document = parse_document(raw)
    return None if document is None else document.policy
