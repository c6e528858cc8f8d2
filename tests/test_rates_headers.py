"""HTTP headers rendered from meter decisions: IETF RateLimit fields, OpenAI-style, Retry-After."""

from __future__ import annotations

import pytest

from ratequota.policy import GroupPolicy, MeterPolicy, TenantMeter, TenantPolicy
from ratequota.ratelimit_headers import (
    MeterView,
    go_duration,
    headers,
    meter_view,
    openai_headers,
    ratelimit,
    ratelimit_policy,
    retry_after,
)
from ratequota.settlement import MeterBook

REQUESTS = MeterPolicy("requests", rate=10, burst=10)
TOKENS = MeterPolicy("tokens", rate=6_000, burst=6_000, per="minute")
SHARES = {
    "requests": TenantMeter("requests", rate=5, ceil=8),
    "tokens": TenantMeter("tokens", rate=3_000),
}
POLICY = GroupPolicy(
    "g",
    capacity=1,
    tenants=(TenantPolicy("a", meters=tuple(SHARES.values())),),
    meters=(REQUESTS, TOKENS),
)


def views_after(asks: list[tuple[int, int]], now: int) -> list[MeterView]:
    """Ask (requests, tokens) pairs at ``now``; the views of the last decision of each meter."""
    books = {name: MeterBook.for_policy(POLICY, name) for name in ("requests", "tokens")}
    views = []
    last = {}
    for requests, tokens in asks:
        last["requests"] = books["requests"].ask("a", requests, now)
        last["tokens"] = books["tokens"].ask("a", tokens, now)
    for spec in (REQUESTS, TOKENS):
        views.append(meter_view(spec, SHARES[spec.name], last[spec.name]))
    return views


def test_admitted_decisions_render_both_families() -> None:
    """After one request of 1,000 tokens: limits are the ceils, remaining what is left now."""
    views = views_after([(1, 1_000)], now=0)
    out = headers(views)
    assert out["RateLimit-Policy"] == '"requests";q=8;w=1, "tokens";q=6000;w=60'
    # requests: the guaranteed bucket holds 5 - 1 = 4 and the group bucket 9, of which 5 are
    # reserved for the guarantees: 4 now. The ceiling bucket (8 - 1) is full again in 1/8 s.
    # tokens: the same with 3,000 - 1,000 guaranteed and 5,000 - 3,000 borrowable; the ceiling
    # bucket (6,000 - 1,000) refills at 6,000/min, so in 10 s.
    assert out["RateLimit"] == '"requests";r=4;t=1, "tokens";r=2000;t=10'
    assert out["x-ratelimit-limit-requests"] == "480"
    assert out["x-ratelimit-remaining-requests"] == "4"
    assert out["x-ratelimit-reset-requests"] == "125ms"
    assert out["x-ratelimit-limit-tokens"] == "6000"
    assert out["x-ratelimit-remaining-tokens"] == "2000"
    assert out["x-ratelimit-reset-tokens"] == "10s"
    assert "Retry-After" not in out


def test_a_refusal_carries_retry_after_from_the_bucket() -> None:
    """Five requests spend the guarantee and leave the group at its reserve; the sixth is refused
    until the group bucket refills one request at 10/s: 100 ms, so Retry-After 1 s."""
    views = views_after([(1, 1)] * 6, now=0)
    assert views[0].refused and views[0].retry_ms == 100
    out = headers(views)
    assert out["Retry-After"] == "1"
    assert out["x-ratelimit-remaining-requests"] == "0"


def test_retry_after_takes_the_longest_wait_and_none_for_never() -> None:
    """All refusing meters must pass, so the longest wait wins; a too-large refusal gives none."""
    a = MeterView("requests", 10, 1, 0, 100, retry_ms=1_500, refused=True)
    b = MeterView("tokens", 100, 60, 0, 100, retry_ms=61_001, refused=True)
    assert retry_after([a, b]) == "62"
    never = MeterView("tokens", 100, 60, 0, 100, retry_ms=None, refused=True)
    assert retry_after([a, never]) is None
    assert retry_after([MeterView("requests", 10, 1, 3, 0)]) is None
    assert retry_after([MeterView("requests", 10, 1, 0, 0, retry_ms=1, refused=True)]) == "1"


@pytest.mark.parametrize(
    ("ms", "text"),
    [
        (0, "0ms"),
        (20, "20ms"),
        (999, "999ms"),
        (1_000, "1s"),
        (1_500, "1.5s"),
        (6_000, "6s"),
        (60_000, "1m0s"),
        (360_000, "6m0s"),
        (90_250, "1m30.25s"),
        (3_600_000, "1h0m0s"),
        (-5, "0ms"),
    ],
)
def test_go_durations(ms: int, text: str) -> None:
    """Reset durations print like Go's time.Duration, as OpenAI's headers do."""
    assert go_duration(ms) == text


def test_fields_are_structured_field_lists() -> None:
    """Each meter is one list member: a quoted name and integer parameters; empty without meters."""
    views = [MeterView("tokens", 90_000, 60, 12, 2_300)]
    assert ratelimit_policy(views) == '"tokens";q=90000;w=60'
    assert ratelimit(views) == '"tokens";r=12;t=3'
    assert openai_headers(views)["x-ratelimit-limit-tokens"] == "90000"
    assert headers([]) == {}


def test_a_decision_renders_its_meters_and_retry_after() -> None:
    """``decision_headers`` renders what the acquire script answered: limit, remaining and reset
    per meter, and Retry-After from the longest refusing meter (or the lease's own hint)."""
    from ratequota.decision import Decision, MeterResult
    from ratequota.ratelimit_headers import decision_headers

    tokens = MeterResult("tokens", 500, True, "admitted", None, 1200, 4.5, 6000, 60, "borrow")
    requests = MeterResult("requests", 1, False, "ceil", 2.2, 0, 3.0, 10, 1)
    base = Decision(False, "meter", "a", "g", 1, 0, 1.0, 0, 4, 2.2, meters=(tokens, requests))
    out = decision_headers(base)
    assert out["RateLimit-Policy"] == '"tokens";q=6000;w=60, "requests";q=10;w=1'
    assert out["RateLimit"] == '"tokens";r=1200;t=5, "requests";r=0;t=3'
    assert out["x-ratelimit-limit-requests"] == "600"
    assert out["x-ratelimit-reset-tokens"] == "4.5s"
    assert out["Retry-After"] == "3"
    lease_only = Decision(False, "tenant_limit", "a", "g", 1, 2, 2.0, 4, 4, 0.3)
    assert decision_headers(lease_only) == {"Retry-After": "1"}
    never = Decision(False, "too_large", "a", "g", 9, 0, 1.0, 0, 4, 0.0)
    assert decision_headers(never) == {}
