"""Routing and key naming: rendezvous placement over shards, and one hash slot per group.

Pure tests (no Redis): placement is checked on 10,000 names for balance and
for minimal movement when a shard is added; key names are checked against
redis-py's own slot function, the one Redis Cluster uses.
"""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.crc import key_slot

from ratequota.engine.keys import KeySpace, escape_tag
from ratequota.engine.routing import Rendezvous, shard_score
from ratequota.errors import ConfigError, InvalidRequest

SHARDS = [f"redis://shard-{i}.quota.internal:6379/0" for i in range(7)]
NAMES = [f"group-{i}" for i in range(10_000)]

# Names that stress the tag: braces, colons, spaces, '%' and '#' (the escape
# characters), any unicode letter, and up to 1,000 characters.
names = st.text(
    alphabet=st.one_of(
        st.sampled_from(list("{}:% #\t|")),
        st.characters(exclude_categories=["Cs"]),  # no lone surrogates: not valid UTF-8
    ),
    min_size=1,
    max_size=1000,
)


def test_seven_shards_are_balanced() -> None:
    """Every one of 7 shards holds within ±10% of the mean of 10,000 groups."""
    ring = Rendezvous(SHARDS)
    counts = Counter(ring.shard(name) for name in NAMES)
    mean = len(NAMES) / len(SHARDS)
    assert set(counts) == set(SHARDS)
    for shard, count in counts.items():
        assert 0.9 * mean <= count <= 1.1 * mean, (shard, count, mean)


def test_adding_an_eighth_shard_moves_about_an_eighth_and_only_onto_it() -> None:
    """Adding a shard moves between 0.8/8 and 1.2/8 of the groups, all of them onto the new one."""
    before = Rendezvous(SHARDS)
    new = "redis://shard-7.quota.internal:6379/0"
    after = Rendezvous([*SHARDS, new])
    moved = [n for n in NAMES if before.shard(n) != after.shard(n)]
    assert 0.8 / 8 * len(NAMES) <= len(moved) <= 1.2 / 8 * len(NAMES)
    assert {after.shard(n) for n in moved} == {new}


def test_placement_ignores_the_order_of_the_shard_list() -> None:
    """Pods listing the same shards in another order place every group identically."""
    a, b = Rendezvous(SHARDS), Rendezvous(list(reversed(SHARDS)))
    assert all(a.shard(n) == b.shard(n) for n in NAMES[:2000])


def test_scores_are_pinned_across_versions() -> None:
    """The hash is part of the deployment contract: a change would move groups between shards.

    These values were computed once; blake2b is stable across Python versions
    and processes (unlike ``hash()``, which is salted per process).
    """
    assert shard_score("shard-a", "group-1") == 1871111185503624928
    assert shard_score("ab", "c") != shard_score("a", "bc")
    pinned = {name: Rendezvous(SHARDS).index(name) for name in ("g", "acme", "{x}", "é" * 10)}
    assert pinned == PINNED_PLACEMENT


PINNED_PLACEMENT = {"g": 1, "acme": 4, "{x}": 5, "é" * 10: 1}


def test_bad_shard_lists_are_refused() -> None:
    """No shards, empty ids or duplicate ids are configuration errors naming the field."""
    with pytest.raises(ConfigError, match="shards"):
        Rendezvous([])
    with pytest.raises(ConfigError, match="shards"):
        Rendezvous(["a", ""])
    with pytest.raises(ConfigError, match="distinct"):
        Rendezvous(["a", "a"])


def test_catalog_routes_like_any_other_name() -> None:
    """The catalog's route is a fixed name, so every pod finds the catalog on the same shard."""
    route = KeySpace().catalog_route
    assert Rendezvous(SHARDS).shard(route) == Rendezvous(list(reversed(SHARDS))).shard(route)


def _slot_of_every_key(keyspace: KeySpace, name: str) -> set[int]:
    return {key_slot(k.encode("utf-8")) for k in keyspace.group(name).all}


@given(name=names)
def test_every_key_of_a_group_shares_one_escaped_tag_and_slot(name: str) -> None:
    """Any name yields keys with exactly one brace pair, all hashing to one cluster slot."""
    keyspace = KeySpace(prefix="rq")
    tag = escape_tag(name)
    assert "{" not in tag
    assert "}" not in tag
    for key in keyspace.group(name).all:
        assert key.count("{") == 1
        assert key.count("}") == 1
        assert key[key.index("{") + 1 : key.index("}")] == tag
    assert len(_slot_of_every_key(keyspace, name)) == 1
    assert _slot_of_every_key(keyspace, name) == {key_slot(tag.encode("utf-8"))}


@given(a=names, b=names)
def test_distinct_names_never_share_keys(a: str, b: str) -> None:
    """The escape is injective: two different names have disjoint key sets, none the catalog."""
    keyspace = KeySpace()
    keys_a, keys_b = set(keyspace.group(a).all), set(keyspace.group(b).all)
    assert keyspace.catalog not in keys_a | keys_b
    if a != b:
        assert not keys_a & keys_b
        assert escape_tag(a) != escape_tag(b)
    else:
        assert keys_a == keys_b


@pytest.mark.parametrize(
    ("a", "b"),
    [("a{b}", "a%7Bb%7D"), ("%", "%25"), ("#catalog", "%23catalog"), ("x:y", "x%3Ay")],
)
def test_names_that_look_like_escapes_stay_distinct(a: str, b: str) -> None:
    """Names spelled like another name's escape never collide with it."""
    assert KeySpace().group(a).policy != KeySpace().group(b).policy


@pytest.mark.parametrize("bad", ["", None, 3])
def test_empty_or_non_string_names_are_refused(bad: object) -> None:
    """An empty (or non-string) group name is refused before any key is built."""
    with pytest.raises(InvalidRequest):
        KeySpace().group(bad)  # type: ignore[arg-type]
