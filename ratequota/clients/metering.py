"""Reserve, then settle: the client side of a lease's rate meters (docs/rates.md).

At admission a lease charges the meters the *estimate* its request named
(``tokens=...``); once the work ran, ``settle`` charges the difference with
the actual amount — a refund, or a debt the tenant repays before its next
admission. The settle script does it exactly once per lease and meter
(idempotent by lease id and fencing token), so a retried settlement never
charges twice; a lease that ended unsettled keeps its estimate.
"""

from __future__ import annotations

from collections.abc import Mapping

from ratequota.clients.requests import check_lease
from ratequota.clock import Clock
from ratequota.decision import LeaseInfo, MeterSettlement
from ratequota.engine.keys import KeySpace
from ratequota.engine.meterwire import check_amounts
from ratequota.engine.ops import Flow
from ratequota.engine.protocol import settle_call
from ratequota.engine.replies import decode_settle
from ratequota.errors import InvalidRequest

__all__ = ["settle_flow"]


def settle_flow(
    keyspace: KeySpace, clock: Clock, lease: LeaseInfo, actuals: Mapping[str, int]
) -> Flow[tuple[MeterSettlement, ...]]:
    """Settle ``lease`` at ``actuals`` (by meter name): one ``MeterSettlement`` per meter.

    Takes the client's key space and clock, not the client's core: ``QuotaCore.settle``
    and ``release`` hand them over, and this module needs nothing else of the core.

    Arguments are checked before Redis is touched. A synthetic lease (granted
    locally while Redis was unreachable) reserved nothing in Redis: every
    meter answers ``closed``. Outcomes other than ``settled`` charge nothing
    (see ``MeterSettlement``); none of them raises.
    """
    check_lease(lease)
    amounts = check_amounts(actuals)
    if not amounts:
        raise InvalidRequest("meters", "name at least one meter to settle, e.g. tokens=1234")
    if lease.synthetic:
        return tuple(MeterSettlement(name, "closed") for name in amounts)
    call = settle_call(keyspace, lease, amounts, now_ms=clock.redis_ms())
    reply = yield call
    return decode_settle(reply, group=lease.group)
