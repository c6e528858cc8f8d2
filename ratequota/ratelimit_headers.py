"""HTTP rate-limit headers from meter decisions: pure rendering, no I/O (docs/rates.md).

Two families are rendered from the same numbers:

* the IETF fields of draft-ietf-httpapi-ratelimit-headers: ``RateLimit-Policy``
  (each meter as a named policy with its quota ``q`` over a window ``w`` in
  seconds) and ``RateLimit`` (what ``r`` remains and in how many seconds
  ``t`` the quota is whole again), both Structured-Field lists;
* the OpenAI-style ``x-ratelimit-limit-{meter}``,
  ``x-ratelimit-remaining-{meter}`` and ``x-ratelimit-reset-{meter}`` (per
  minute, the reset as a Go-style duration such as ``"6m0s"`` or ``"20ms"``),
  which many LLM clients read to pace themselves;

plus ``Retry-After`` (whole seconds, rounded up) when a meter refused and its
bucket can name a time. The numbers are the tenant's: its ceil is the limit
(what it may reach), ``remaining`` what it could take now, ``reset`` when its
ceiling bucket is full again — all taken from ``ratequota.rates.decide``, as
the acquire script returns them in ``Decision.meters`` (``decision_headers``).
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs

from ratequota.decision import Decision, MeterResult
from ratequota.policy import MeterPolicy, TenantMeter
from ratequota.rates import MeterDecision

__all__ = [
    "MeterView",
    "decision_headers",
    "go_duration",
    "headers",
    "meter_headers",
    "meter_view",
    "openai_headers",
    "ratelimit",
    "ratelimit_policy",
    "result_view",
    "retry_after",
]


@attrs.frozen
class MeterView:
    """What the headers say about one meter for one tenant.

    ``limit`` tokens per ``window`` seconds (the tenant's ceil), ``remaining``
    tokens now, ``reset_ms`` until the ceiling bucket is full, ``retry_ms``
    until a refused request would pass (None: admitted, or never).
    """

    name: str
    limit: int
    window: int
    remaining: int
    reset_ms: int
    retry_ms: int | None = None
    refused: bool = False


def meter_view(spec: MeterPolicy, share: TenantMeter, decision: MeterDecision) -> MeterView:
    """The view of ``decision`` on ``spec`` for a tenant whose share is ``share``."""
    ceil = share.resolved(spec).ceil
    assert ceil is not None
    return MeterView(
        name=spec.name,
        limit=ceil,
        window=1 if spec.per == "second" else 60,
        remaining=decision.remaining,
        reset_ms=decision.reset_ms,
        retry_ms=decision.retry_ms,
        refused=not decision.admitted,
    )


def result_view(result: MeterResult) -> MeterView:
    """The view of one meter of a ``Decision`` (as the acquire script decided it)."""
    return MeterView(
        name=result.name,
        limit=result.limit,
        window=result.window,
        remaining=result.remaining,
        reset_ms=round(result.reset * 1000),
        retry_ms=None if result.retry_after is None else round(result.retry_after * 1000),
        refused=not result.admitted,
    )


def meter_headers(results: Iterable[MeterResult]) -> dict[str, str]:
    """The headers of some meters' results (an admitted lease's ``meters``, for instance)."""
    return headers(result_view(m) for m in results)


def decision_headers(decision: Decision) -> dict[str, str]:
    """Every header for a decision: its meters' fields, and ``Retry-After`` on any refusal.

    A refusal of the lease itself (the tenant's limit, the group's capacity)
    carries its own hint as ``Retry-After`` too; a request that can never
    pass (too large) gets none. Shadow-mode admissions render as admissions.
    """
    out = meter_headers(decision.meters)
    refused = not decision.admitted and not decision.never_fits
    if refused and "Retry-After" not in out and decision.retry_after > 0:
        out["Retry-After"] = str(max(1, _seconds(round(decision.retry_after * 1000))))
    return out


def _seconds(ms: int) -> int:
    return -(-max(0, ms) // 1000)


def ratelimit_policy(views: Iterable[MeterView]) -> str:
    """The ``RateLimit-Policy`` field: ``"tokens";q=1000;w=60, "requests";q=10;w=1``."""
    return ", ".join(f'"{v.name}";q={v.limit};w={v.window}' for v in views)


def ratelimit(views: Iterable[MeterView]) -> str:
    """The ``RateLimit`` field: ``"tokens";r=250;t=45`` per meter."""
    return ", ".join(f'"{v.name}";r={max(0, v.remaining)};t={_seconds(v.reset_ms)}' for v in views)


def go_duration(ms: int) -> str:
    """A duration as Go prints it, as OpenAI's reset headers carry: ``20ms``, ``1.5s``, ``6m0s``."""
    ms = max(0, ms)
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    seconds = f"{rest // 1000}.{rest % 1000:03d}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{seconds}s"
    if minutes:
        return f"{minutes}m{seconds}s"
    return f"{seconds}s"


def openai_headers(views: Iterable[MeterView]) -> dict[str, str]:
    """``x-ratelimit-{limit,remaining,reset}-{meter}``; the limit per minute, as OpenAI's."""
    out: dict[str, str] = {}
    for view in views:
        per_minute = view.limit * (60 // view.window)
        out[f"x-ratelimit-limit-{view.name}"] = str(per_minute)
        out[f"x-ratelimit-remaining-{view.name}"] = str(max(0, view.remaining))
        out[f"x-ratelimit-reset-{view.name}"] = go_duration(view.reset_ms)
    return out


def retry_after(views: Iterable[MeterView]) -> str | None:
    """``Retry-After`` in whole seconds (at least 1) when a meter refused with a known time.

    With several refusing meters the request passes only when all of them
    would, so the longest wait is the answer; a meter that can never pass
    (too large) gives no header at all.
    """
    waits = []
    for view in views:
        if view.refused:
            if view.retry_ms is None:
                return None
            waits.append(view.retry_ms)
    if not waits:
        return None
    return str(max(1, _seconds(max(waits))))


def headers(views: Iterable[MeterView]) -> dict[str, str]:
    """Every header at once: IETF fields, OpenAI-style headers, and Retry-After on refusal."""
    views = list(views)
    if not views:
        return {}
    out = {"RateLimit-Policy": ratelimit_policy(views), "RateLimit": ratelimit(views)}
    out.update(openai_headers(views))
    wait = retry_after(views)
    if wait is not None:
        out["Retry-After"] = wait
    return out
