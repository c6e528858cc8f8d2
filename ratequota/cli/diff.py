"""What publishing a policy would change: groups and tenants added, changed and removed.

Pure: compares two ``Policy`` values through their ``to_dict()`` form (which
omits defaults), so a field is "changed" exactly when the published document
would change. ``policy apply`` prints this before publishing and refuses to
remove groups unless told to (``--prune``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import attrs

from ratequota.cli.output import plural
from ratequota.policy import Policy

__all__ = ["Change", "GroupDiff", "PolicyDiff", "TenantDiff", "diff_policies"]

Status = Literal["added", "removed", "changed", "unchanged"]

#: Shown for a field that is absent, i.e. at its default.
DEFAULT = "(default)"


@attrs.frozen
class Change:
    """One field of a group or tenant, before and after (``None``: at its default)."""

    field: str
    old: Any
    new: Any

    def describe(self) -> str:
        """``capacity 8 -> 10``."""
        return f"{self.field} {_show(self.old)} -> {_show(self.new)}"


@attrs.frozen
class TenantDiff:
    """A tenant added, removed or changed (unchanged tenants are not listed)."""

    name: str
    status: Status
    changes: tuple[Change, ...] = ()
    fields: Mapping[str, Any] = attrs.field(factory=dict)

    def describe(self) -> str:
        """One line for the operator."""
        if self.status == "changed":
            detail = ", ".join(c.describe() for c in self.changes)
            return f"tenant {self.name!r}: changed: {detail}"
        summary = _fields(self.fields) if self.status == "added" else ""
        return f"tenant {self.name!r}: {self.status}" + (f" ({summary})" if summary else "")


@attrs.frozen
class GroupDiff:
    """One group: its status, changed group fields, and its tenants that differ."""

    name: str
    status: Status
    tenant_count: int
    changes: tuple[Change, ...] = ()
    tenants: tuple[TenantDiff, ...] = ()
    capacity: int = 0

    def lines(self) -> list[str]:
        """The group's line, then one indented line per tenant that differs."""
        if self.status in ("added", "removed"):
            what = f"capacity {self.capacity}, {plural(self.tenant_count, 'tenant')}"
            return [f"group {self.name!r}: {self.status} ({what})"]
        head = f"group {self.name!r}: {self.status}"
        if self.changes:
            head += ": " + ", ".join(c.describe() for c in self.changes)
        return [head] + [f"  {t.describe()}" for t in self.tenants]


@attrs.frozen
class PolicyDiff:
    """Every group of either policy, in the new policy's order, then the removed ones."""

    groups: tuple[GroupDiff, ...]
    default_group: Change | None = None
    published: bool = True

    def of(self, status: Status) -> list[GroupDiff]:
        """The groups with ``status``."""
        return [g for g in self.groups if g.status == status]

    @property
    def changed(self) -> bool:
        """Whether publishing would change anything at all."""
        return self.default_group is not None or any(g.status != "unchanged" for g in self.groups)

    def summary(self) -> str:
        """``groups: 1 added, 1 changed, 0 removed, 2 unchanged``."""
        counts = {s: len(self.of(s)) for s in ("added", "changed", "removed", "unchanged")}
        return "groups: " + ", ".join(f"{n} {status}" for status, n in counts.items())

    def lines(self) -> list[str]:
        """The diff as the operator reads it: one line per group, tenants indented."""
        out = [] if self.published else ["nothing is published yet: every group is new"]
        for group in self.groups:
            out += group.lines()
        if self.default_group is not None:
            out.append(self.default_group.describe())
        out.append(self.summary())
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: per group its status, changes and tenants."""
        return {
            "published_before": self.published,
            "groups": [
                {
                    "name": g.name,
                    "status": g.status,
                    "tenants": g.tenant_count,
                    "changes": [attrs.asdict(c) for c in g.changes],
                    "tenant_changes": [
                        {
                            "name": t.name,
                            "status": t.status,
                            "changes": [attrs.asdict(c) for c in t.changes],
                        }
                        for t in g.tenants
                    ],
                }
                for g in self.groups
            ],
            "default_group": None
            if self.default_group is None
            else attrs.asdict(self.default_group),
        }


def _show(value: Any) -> str:
    if value is None:
        return DEFAULT
    if isinstance(value, Mapping):
        return "{" + _fields(value) + "}"
    if isinstance(value, str):
        return repr(value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def _fields(data: Mapping[str, Any]) -> str:
    return ", ".join(f"{k} {_show(v)}" for k, v in data.items() if k != "name")


def _changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> tuple[Change, ...]:
    keys = [k for k in new if k != "tenants"] + [k for k in old if k not in new]
    return tuple(
        Change(k, old.get(k), new.get(k))
        for k in dict.fromkeys(keys)
        if k not in ("tenants", "name") and old.get(k) != new.get(k)
    )


def _tenant_diffs(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> tuple[TenantDiff, ...]:
    before = {t["name"]: t for t in old}
    after = {t["name"]: t for t in new}
    out: list[TenantDiff] = []
    for name, data in after.items():
        if name not in before:
            out.append(TenantDiff(name, "added", fields=data))
        else:
            changes = _changes(before[name], data)
            if changes:
                out.append(TenantDiff(name, "changed", changes))
    out += [TenantDiff(n, "removed", fields=d) for n, d in before.items() if n not in after]
    return tuple(out)


def diff_policies(published: Policy | None, new: Policy) -> PolicyDiff:
    """What publishing ``new`` over ``published`` (None: nothing published) changes."""
    old_doc = published.to_dict() if published is not None else {"groups": []}
    new_doc = new.to_dict()
    before = {g["name"]: g for g in old_doc["groups"]}
    groups: list[GroupDiff] = []
    for data in new_doc["groups"]:
        name, count = data["name"], len(data["tenants"])
        if name not in before:
            groups.append(GroupDiff(name, "added", count, capacity=data["capacity"]))
            continue
        changes = _changes(before[name], data)
        tenants = _tenant_diffs(before[name]["tenants"], data["tenants"])
        status: Status = "changed" if changes or tenants else "unchanged"
        groups.append(GroupDiff(name, status, count, changes, tenants, data["capacity"]))
    for name, data in before.items():
        if new.group(name) is None:
            groups.append(
                GroupDiff(name, "removed", len(data["tenants"]), capacity=data["capacity"])
            )
    old_default, new_default = old_doc.get("default_group"), new_doc.get("default_group")
    default = None
    if published is not None and old_default != new_default:
        default = Change("default_group", old_default, new_default)
    return PolicyDiff(tuple(groups), default, published is not None)
