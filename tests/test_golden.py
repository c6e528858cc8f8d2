"""Golden tests: what old and new releases share during a rolling update must not drift.

During a rolling update old and new pods run side by side on the same keys,
so three things are pinned by checked-in files in ``tests/golden/``:

- the key layout (``KeySpace`` output for sample names and prefixes),
- every script's header (its KEYS and ARGV, independent of the SHA),
- every script's reply, run on fakeredis with a pinned clock and fixed ids.

A deliberate change updates the files (``RATEQUOTA_UPDATE_GOLDEN=1 pytest
tests/test_golden.py``) and so shows up in review; it must come with a
schema bump (see docs/deployment.md). Also here: a client meeting state of a
newer schema refuses with ``SchemaMismatch`` and writes nothing, and every
argument encoder of ``ratequota.engine.protocol`` matches the header it calls.
"""

from __future__ import annotations

import ast
import inspect
import json
import os
from pathlib import Path
from typing import Any

import attrs
import fakeredis
import pytest

from ratequota.clients.backends import embedded_backend
from ratequota.clients.sync import QuotaClient
from ratequota.decision import LeaseInfo
from ratequota.engine import protocol, replies
from ratequota.engine.keys import SCHEMA_VERSION, KeySpace
from ratequota.engine.ops import ScriptCall
from ratequota.engine.scripts import SCRIPT_NAMES, load_scripts, parse_header, script
from ratequota.errors import RateQuotaError, SchemaMismatch
from ratequota.policy import GroupPolicy, MeterPolicy, Policy, TenantMeter, TenantPolicy
from ratequota.testing import ManualClock
from tests.redis_state import dump_keys

GOLDEN = Path(__file__).resolve().parent / "golden"
UPDATE = os.environ.get("RATEQUOTA_UPDATE_GOLDEN") == "1"
NOW = 1_800_000_000_000

SAMPLE_NAMES = ["g", "acme-prod", "{braces}", "a:b c", "100%", "#catalog", "ünïcödé", "x" * 40]


def _plain(value: Any) -> Any:
    """A reply as JSON: bytes to text, lists recursively."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _compare(name: str, actual: Any) -> None:
    """Compare with ``tests/golden/<name>.json`` (or rewrite it when updating)."""
    path = GOLDEN / f"{name}.json"
    if isinstance(actual, list):  # one entry per line keeps review diffs readable
        rows = [json.dumps(e, ensure_ascii=False, sort_keys=True) for e in actual]
        text = "[\n" + ",\n".join(rows) + "\n]\n"
    else:
        text = json.dumps(actual, indent=1, ensure_ascii=False, sort_keys=True) + "\n"
    if UPDATE:
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(text, encoding="utf-8")
    expected = json.loads(path.read_text(encoding="utf-8"))
    assert json.loads(text) == expected, (
        f"{path.name} changed: old and new pods would disagree during a rolling update. "
        "If deliberate, bump SCHEMA_VERSION and regenerate with RATEQUOTA_UPDATE_GOLDEN=1."
    )


def test_key_layout_is_pinned() -> None:
    """Key names for sample groups, two prefixes, and the catalog, exactly as released."""
    layout: dict[str, Any] = {"schema": SCHEMA_VERSION}
    for prefix in ("rq", "svc:quota"):
        keyspace = KeySpace(prefix=prefix)
        layout[prefix] = {
            "catalog": keyspace.catalog,
            "catalog_route": keyspace.catalog_route,
            "groups": {name: keyspace.group(name).all for name in SAMPLE_NAMES},
        }
    _compare("keys", layout)


def test_script_headers_are_pinned() -> None:
    """KEYS and ARGV of every script header: the SHA-independent contract of each script."""
    headers = {}
    for name, spec in load_scripts().items():
        headers[name] = {
            "keys": list(spec.keys),
            "argv": list(spec.argv),
            "variadic": spec.variadic,
        }
    _compare("headers", headers)


# -- replies --------------------------------------------------------------------------

POLICY = GroupPolicy(
    "g",
    capacity=8,
    tenants=[TenantPolicy("a", guarantee=4, borrow_limit=2), TenantPolicy("b", guarantee=4)],
    max_lease_ttl=60.0,
)


def _run(conn: Any, call: ScriptCall) -> Any:
    return _plain(conn.evalsha(call.script.sha, len(call.keys), *call.keys, *call.args))


def _reply_scenario(conn: Any) -> list[dict[str, Any]]:
    """Every script and every reply shape, at pinned times with fixed ids, on an empty ``conn``."""
    for spec in load_scripts().values():
        conn.script_load(spec.source)
    ks = KeySpace()
    steps: list[dict[str, Any]] = []

    def step(label: str, call: ScriptCall) -> None:
        steps.append({"step": label, "script": call.script.name, "reply": _run(conn, call)})

    def acquire(tenant: str, units: int, lease: str, now: int, **kw: Any) -> ScriptCall:
        options: dict[str, Any] = {"wait": False, "pending_ms": 2000, "purge": 64, "now_ms": now}
        options.update(kw)
        group = options.pop("group", "g")
        ttl = options.pop("ttl_ms", 30_000)
        return protocol.acquire_call(ks, group, tenant, units, lease, ttl, **options)

    step("publish", protocol.apply_policy_call(ks, POLICY))
    step("publish unchanged", protocol.apply_policy_call(ks, POLICY))
    step("admit", acquire("a", 3, "lease-1", NOW))
    step("replay", acquire("a", 3, "lease-1", NOW + 1))
    step("tenant limit", acquire("a", 4, "lease-2", NOW + 2))
    step("too large", acquire("a", 7, "lease-3", NOW + 3))
    step("unknown tenant", acquire("stranger", 1, "lease-4", NOW + 4))
    step("bad ttl", acquire("a", 1, "lease-5", NOW + 5, ttl_ms=10**9))
    step("no policy", acquire("a", 1, "lease-6", NOW + 6, group="nowhere"))
    step("admit b", acquire("b", 4, "lease-7", NOW + 7))
    step("group full, waiting", acquire("a", 2, "lease-8", NOW + 8, wait=True))
    step("id mismatch", acquire("a", 2, "lease-1", NOW + 8))
    lease_1 = LeaseInfo("lease-1", "a", "g", 3, NOW * 1000, (NOW + 30_000) / 1000)
    lease_7 = LeaseInfo("lease-7", "b", "g", 4, (NOW + 7) * 1000, (NOW + 30_007) / 1000)

    def renew(lease: LeaseInfo, now: int, ttl: int = 30_000) -> ScriptCall:
        return protocol.renew_call(ks, lease, ttl, purge=64, now_ms=now)

    def release(lease: LeaseInfo, now: int, purge: int = 64) -> ScriptCall:
        return protocol.release_call(
            ks,
            lease.group,
            lease.id,
            tenant=lease.tenant,
            token=lease.token,
            purge=purge,
            now_ms=now,
        )

    step("renew", renew(lease_1, NOW + 9))
    step("renew clamped", renew(lease_1, NOW + 9, ttl=90_000))
    step("renew fenced", renew(attrs.evolve(lease_1, token=lease_1.token + 1), NOW + 9))
    step("snapshot", protocol.snapshot_call(ks, "g", tenants=["a", "b", "c"], now_ms=NOW + 10))
    step("release fenced", release(attrs.evolve(lease_1, tenant="b"), NOW + 11))
    step("release", release(lease_1, NOW + 11))
    step("release again", release(lease_1, NOW + 12))
    late = NOW + 7 + 30_000 + 1
    step("release expired", release(lease_7, late, purge=0))
    step("renew lost", renew(lease_7, late))
    step("snapshot later", protocol.snapshot_call(ks, "g", now_ms=late + 1))
    requests = [("a", 1, "lease-9", 30_000, False), ("b", 9, "lease-10", 30_000, True)]
    requests += [("a", 1, "lease-9", 30_000, False), ("stranger", 1, "lease-11", 30_000, False)]
    many = protocol.acquire_many_call(ks, "g", requests, pending_ms=2000, purge=64, now_ms=late + 2)
    step("acquire many", many)
    token_9 = (late + 2) * 1000
    named = [("lease-9", "a", token_9), ("lease-9", "a", token_9), ("lease-11", "stranger", 0)]
    named += [("lease-8", "a", 0)]
    step("release many", protocol.release_many_call(ks, "g", named, purge=64, now_ms=late + 3))
    # The group's state is lost while lease-12 is live: new work waits, the holder re-asserts.
    step("admit before loss", acquire("a", 2, "lease-12", late + 4))
    lease_12 = LeaseInfo("lease-12", "a", "g", 2, (late + 4) * 1000, (late + 30_004) / 1000)
    group = ks.group("g")
    conn.delete(group.demand, group.exp, group.info, group.queue)
    step("snapshot lost", protocol.snapshot_call(ks, "g", now_ms=late + 5))
    step("recovering", acquire("b", 1, "lease-13", late + 6))
    step("renew reasserted", renew(lease_12, late + 7))
    step("snapshot recovering", protocol.snapshot_call(ks, "g", now_ms=late + 8))
    step("admit after recovery", acquire("b", 1, "lease-14", late + 30_005))
    # Rate meters (docs/rates.md): decided with the lease, settled after.
    step("publish metered", protocol.apply_policy_call(ks, METERED))
    tokens = {"tokens": 30}
    step("metered admit", acquire("a", 1, "lease-15", NOW, group="m", meters=tokens))
    step("metered refusal", acquire("a", 1, "lease-16", NOW + 1, group="m", meters=tokens))
    step("bad meter", acquire("a", 1, "lease-17", NOW + 1, group="m", meters={"watts": 1}))
    lease_15 = LeaseInfo("lease-15", "a", "m", 1, NOW * 1000, (NOW + 30_000) / 1000)
    step("settle", protocol.settle_call(ks, lease_15, {"tokens": 20}, now_ms=NOW + 2))
    step("settle replay", protocol.settle_call(ks, lease_15, {"tokens": 20}, now_ms=NOW + 3))
    forged = attrs.evolve(lease_15, token=1)
    step("settle mismatch", protocol.settle_call(ks, forged, {"tokens": 5}, now_ms=NOW + 3))
    step("metered release", release(lease_15, NOW + 4))
    step("settle closed", protocol.settle_call(ks, lease_15, {"tokens": 5}, now_ms=NOW + 5))
    return steps


METERED = GroupPolicy(
    "m",
    capacity=4,
    tenants=[
        TenantPolicy("a", guarantee=2, meters=(TenantMeter("tokens", rate=10, ceil=40),)),
        TenantPolicy("b", guarantee=2),
    ],
    meters=(MeterPolicy("tokens", rate=50, burst=40),),
    max_lease_ttl=60.0,
)


def test_script_replies_are_pinned() -> None:
    """Each script's reply to a fixed scenario on fakeredis equals the checked-in one."""
    steps = _reply_scenario(fakeredis.FakeRedis(server=fakeredis.FakeServer()))
    assert {s["script"] for s in steps} == set(SCRIPT_NAMES)
    _compare("replies", steps)


@pytest.mark.real_redis
def test_real_redis_gives_the_pinned_replies(real_redis: Any) -> None:
    """The same scenario on a real redis-server gives the same replies as on fakeredis."""
    conn = real_redis.client()
    try:
        steps = _reply_scenario(conn)
    finally:
        conn.close()
    golden = json.loads((GOLDEN / "replies.json").read_text(encoding="utf-8"))
    assert steps == golden


def test_pinned_replies_still_decode() -> None:
    """The decoders of this release understand every pinned reply (an older script's output)."""
    golden = json.loads((GOLDEN / "replies.json").read_text(encoding="utf-8"))
    decoders: dict[str, Any] = {
        "acquire": lambda r: replies.decode_acquire(
            r, group="g", tenant="a", units=1, lease_id="x"
        ),
        "release": replies.decode_release,
        "renew": lambda r: replies.decode_renew(r, group="g"),
        "snapshot": lambda r: replies.decode_snapshot(r, group="g"),
        "apply_policy": lambda r: replies.decode_apply_policy("g", r),
        # A list of acquire replies, one per request.
        "acquire_many": lambda r: [
            replies.decode_acquire(x, group="g", tenant="a", units=1, lease_id="x") for x in r
        ],
        "release_many": lambda r: [replies.decode_release(x) for x in r],
        "settle": lambda r: replies.decode_settle(r, group="g"),
    }
    for entry in golden:
        decode = decoders[entry["script"]]
        if entry["reply"][0] == -1:  # error replies decode into ratequota errors
            with pytest.raises(RateQuotaError):
                decode(entry["reply"])
        else:
            decode(entry["reply"])


# -- newer schema ---------------------------------------------------------------------


def _dump(conn: Any) -> dict[bytes, Any]:
    """Every key's type and value: proof that nothing was written."""
    return dump_keys(conn)


def _ttls(conn: Any) -> dict[bytes, int]:
    """Every key's remaining TTL in ms (-1: none); a write would have raised one."""
    return {key: conn.pttl(key) for key in conn.keys("*")}


def test_newer_schema_state_is_refused_and_never_corrupted() -> None:
    """State of a newer schema: every operation raises ``SchemaMismatch`` and writes nothing."""
    server = fakeredis.FakeServer()
    clock = ManualClock(NOW)
    quota = QuotaClient(backend=embedded_backend(server=server), clock=clock)
    quota.apply_policy(Policy([POLICY]))
    lease = quota.try_acquire("a", 2).lease
    assert lease is not None
    conn = fakeredis.FakeRedis(server=server)
    conn.hset(KeySpace().group("g").policy, "schema", SCHEMA_VERSION + 1)
    before, ttls = _dump(conn), _ttls(conn)

    with pytest.raises(SchemaMismatch, match="upgrade"):
        quota.try_acquire("a", 1)
    with pytest.raises(SchemaMismatch):
        quota.renew(lease)
    with pytest.raises(SchemaMismatch):
        quota.snapshot("g")
    with pytest.raises(SchemaMismatch):
        quota.apply_policy(Policy([POLICY.__class__("g", capacity=9, tenants=POLICY.tenants)]))
    assert _dump(conn) == before
    # No expiry was refreshed either (a refresh would raise the remaining TTL).
    assert all(ttl <= ttls[key] for key, ttl in _ttls(conn).items())


def test_newer_schema_catalog_is_refused() -> None:
    """A catalog published by a newer schema is refused when a client reads it."""
    server = fakeredis.FakeServer()
    quota = QuotaClient(backend=embedded_backend(server=server))
    quota.apply_policy(Policy([POLICY]))
    conn = fakeredis.FakeRedis(server=server)
    key = KeySpace().catalog
    document = json.loads(conn.get(key) or "{}")
    document["schema"] = SCHEMA_VERSION + 1
    conn.set(key, json.dumps(document))
    with pytest.raises(SchemaMismatch):
        quota.load_policy()
    assert json.loads(conn.get(key) or "{}")["schema"] == SCHEMA_VERSION + 1


# -- headers against call sites ---------------------------------------------------------


def test_every_header_parses_and_declares_the_group_keys() -> None:
    """Every lua/*.lua entry script has a header and takes exactly the group's keys (apply_policy
    too, since it rebuilds the fair state, plus the previous layout's keys it tombstones)."""
    from ratequota.engine import scripts

    folder = Path(inspect.getfile(scripts)).resolve().parents[2] / "lua"
    files = sorted(p.stem for p in folder.glob("*.lua") if not p.stem.startswith("_"))
    assert files == sorted(SCRIPT_NAMES)
    group_keys = len(KeySpace().group("g").all)
    for name in SCRIPT_NAMES:
        keys, argv, _ = parse_header(name, (folder / f"{name}.lua").read_text(encoding="utf-8"))
        assert argv, name
        # apply_policy also takes the previous layout's keys (tombstone, migration); the
        # scripts that end, refuse or settle leases the usage ledger's two hours; those that
        # decide or settle rate meters their contention sets.
        contention = len(KeySpace().group("g").contention)
        extra = len(KeySpace().previous_layout("g")) + contention if name == "apply_policy" else 0
        if name in ("release", "release_many", "renew"):
            extra = 2
        if name in ("acquire", "acquire_many", "settle"):
            extra = 2 + contention
        assert len(keys) == group_keys + extra, name


#: One sample call of every encoder in ratequota.engine.protocol.
ENCODERS: dict[str, Any] = {
    "apply_policy_call": lambda ks: protocol.apply_policy_call(ks, POLICY),
    "acquire_call": lambda ks: protocol.acquire_call(
        ks, "g", "a", 1, "id", 1000, wait=True, pending_ms=2000, purge=8, now_ms=NOW
    ),
    "release_call": lambda ks: protocol.release_call(ks, "g", "id", tenant="a", token=1, purge=8),
    "renew_call": lambda ks: protocol.renew_call(
        ks, LeaseInfo("id", "a", "g", 1, 1, NOW / 1000), 1000, purge=8, now_ms=NOW
    ),
    "snapshot_call": lambda ks: protocol.snapshot_call(ks, "g", tenants=["a", "b"]),
    "settle_call": lambda ks: protocol.settle_call(
        ks, LeaseInfo("id", "a", "g", 1, 1, NOW / 1000), {"tokens": 5}, now_ms=NOW
    ),
    "release_many_call": lambda ks: protocol.release_many_call(
        ks, "g", [("a", "t", 1), ("b", "t", 2)], purge=8
    ),
    "acquire_many_call": lambda ks: protocol.acquire_many_call(
        ks,
        "g",
        [("a", 1, "id", 1000, True), ("b", 2, "id2", 1000, False)],
        pending_ms=2000,
        purge=8,
    ),
}


def test_every_encoder_matches_its_script_header() -> None:
    """Each ``*_call`` encoder builds calls that ``ScriptSpec.check_call`` accepts.

    The list of encoders is read from the module, so a new encoder without a
    sample here fails this test.
    """
    encoders = {
        n
        for n, f in vars(protocol).items()
        if n.endswith("_call") and not n.startswith("_") and callable(f)
    }
    assert encoders == set(ENCODERS)
    for keyspace in (KeySpace(), KeySpace(prefix="other")):
        for make in ENCODERS.values():
            call = make(keyspace)
            call.script.check_call(len(call.keys), len(call.args))
            # The meters' contention sets are passed only by calls that name meters.
            assert len(call.keys) in (len(call.script.keys), call.script.required_keys)


def test_every_call_site_in_protocol_names_a_real_script() -> None:
    """Every ``_call("<script>", ...)`` in protocol.py names a script with a parsed header."""
    tree = ast.parse(Path(protocol.__file__).read_text(encoding="utf-8"))
    named = {
        node.args[0].value
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "_call"
        and node.args
        and isinstance(node.args[0], ast.Constant)
    }
    assert named == set(SCRIPT_NAMES)
    for name in named:
        assert script(str(name)).argv


def test_check_call_rejects_a_mismatch() -> None:
    """The header check is not vacuous: a wrong key or argument count is caught."""
    spec = script("release")
    with pytest.raises(AssertionError):
        spec.check_call(len(spec.keys) - 1, len(spec.argv))
    with pytest.raises(AssertionError):
        spec.check_call(len(spec.keys), len(spec.argv) + 1)
