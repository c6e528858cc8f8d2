"""Operator commands: publish and read the policy, and look inside a live group.

``ratequota policy apply FILE`` validates a TOML policy file, prints what
publishing it changes (``ratequota.cli.diff``) and publishes it for every pod
(refusing an empty file, and refusing to drop groups without ``--prune``);
``ratequota policy show`` prints the published policy (as TOML
that ``policy apply`` accepts back, or JSON); ``ratequota inspect --group G``
prints one consistent snapshot of a group: per tenant what it holds, its fair
limit, its waiting demand and what it borrows, and the live leases.

Formatting is pure (``policy_to_toml``, ``render_snapshot``) and tested on
its own; the handlers only read files, call the client and print.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from ratequota.cli.backend import URL_VARIABLE, client_from_args, has_backend
from ratequota.cli.diff import PolicyDiff, diff_policies
from ratequota.cli.output import CommandError, add_json_option, number, plural, print_json
from ratequota.clients.explain import entitlements
from ratequota.decision import GroupSnapshot
from ratequota.errors import ConfigError
from ratequota.policy import GroupPolicy, Policy

if TYPE_CHECKING:
    SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]

__all__ = ["add_commands", "limits_of", "policy_to_toml", "render_snapshot", "snapshot_to_dict"]


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ConfigError("policy", f"cannot write {value!r} to TOML")
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a valid TOML basic string
    raise ConfigError("policy", f"cannot write {type(value).__name__} to TOML")


def _toml_table(data: Mapping[str, Any]) -> list[str]:
    lines = []
    for key, value in data.items():
        if isinstance(value, Mapping):
            inner = ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items())
            lines.append(f"{key} = {{ {inner} }}")
        elif value is not None:
            lines.append(f"{key} = {_toml_value(value)}")
    return lines


def policy_to_toml(policy: Policy) -> str:
    """The policy as a TOML document that ``Policy.from_toml`` reads back unchanged."""
    data = policy.to_dict()
    lines: list[str] = []
    if "default_group" in data:
        lines.append(f"default_group = {_toml_value(data['default_group'])}")
        lines.append("")
    for group in data["groups"]:
        lines.append("[[groups]]")
        lines += _toml_table({k: v for k, v in group.items() if k != "tenants"})
        for tenant in group["tenants"]:
            lines.append("")
            lines.append("[[groups.tenants]]")
            lines += _toml_table(tenant)
        lines.append("")
    return "\n".join(lines)


def limits_of(snap: GroupSnapshot, policy: GroupPolicy | None) -> dict[str, float]:
    """Each tenant's ``limit`` as every output shows it: the most it may hold now if it asks.

    Tenants the policy does not know (strangers of a group that admits them
    are known through its default tenant) keep the engine's fair limit.
    """
    limits = {name: t.limit for name, t in snap.tenants.items()}
    if policy is not None:
        known = [name for name in snap.tenants if policy.tenant(name) is not None]
        limits.update(entitlements(snap, policy, known))
    return limits


def snapshot_to_dict(snap: GroupSnapshot, policy: GroupPolicy | None = None) -> dict[str, Any]:
    """A snapshot as plain JSON-ready data (``limit`` as ``limits_of`` defines it)."""
    limits = limits_of(snap, policy)
    return {
        "group": snap.group,
        "now": snap.now,
        "capacity": snap.capacity,
        "used": snap.used,
        "policy_version": snap.policy_version,
        "tenants": {
            name: {
                "used": t.used,
                "limit": limits[name],
                "guarantee": t.guarantee,
                "pending": t.pending,
                "borrowed": t.borrowed,
                "fair_share": t.limit,
            }
            for name, t in snap.tenants.items()
        },
        "leases": [
            {
                "id": lease.id,
                "tenant": lease.tenant,
                "units": lease.units,
                "token": lease.token,
                "expires_at": lease.expires_at,
            }
            for lease in snap.leases
        ],
        "leases_truncated": snap.leases_truncated,
    }


def render_snapshot(
    snap: GroupSnapshot, policy: GroupPolicy | None = None, *, leases: bool = True
) -> str:
    """A snapshot as the table ``ratequota inspect`` prints."""
    limits = limits_of(snap, policy)
    count = len(snap.leases)
    held = f"{count}+ leases" if snap.leases_truncated else plural(count, "lease")
    out = [
        f"group {snap.group!r}: {snap.used} of {snap.capacity} units held ({held}), "
        f"policy version {snap.policy_version}",
        "",
    ]
    header = (
        f"{'tenant':20} {'used':>5} {'limit':>7} {'guarantee':>9} {'pending':>7} {'borrowed':>8}"
    )
    out += [header, "-" * len(header)]
    for name in sorted(snap.tenants):
        t = snap.tenants[name]
        out.append(
            f"{name:20} {t.used:5d} {number(limits[name]):>7} {t.guarantee:9d} {t.pending:7d} "
            f"{t.borrowed:8d}"
        )
    if leases and snap.leases:
        out += ["", f"{'lease':34} {'tenant':20} {'units':>5} {'token':>7} {'expires in':>10}"]
        for lease in sorted(snap.leases, key=lambda item: item.expires_at):
            out.append(
                f"{lease.id:34} {lease.tenant:20} {lease.units:5d} {lease.token:7d} "
                f"{lease.expires_at - snap.now:9.1f}s"
            )
        if snap.leases_truncated:
            out.append("... more leases not listed")
    out += ["", "limit: the most the tenant may hold now if it asks (never below its guarantee)"]
    return "\n".join(out)


def _refusal(policy: Policy, diff: PolicyDiff, args: argparse.Namespace) -> str | None:
    """Why publishing must not go ahead (None: it may)."""
    if not policy.groups:
        return (
            f"{args.file} has no groups; publishing it would unpublish every group and "
            "refuse every tenant. Nothing was published"
        )
    removed = diff.of("removed")
    if removed and not args.prune:
        names = ", ".join(f"{g.name!r} ({plural(g.tenant_count, 'tenant')})" for g in removed[:5])
        more = f" and {len(removed) - 5} more" if len(removed) > 5 else ""
        return (
            f"{args.file} leaves out {plural(len(removed), 'published group')}: {names}{more}; "
            "their tenants would be refused from then on. Add them to the file, or pass "
            "--prune to remove them. Nothing was published"
        )
    return None


def _apply(args: argparse.Namespace) -> int:
    policy = Policy.from_toml(args.file)  # PolicyFileError names the file, line and field
    if args.dry_run and not has_backend(args):
        # Validation needs no Redis; without one there is nothing to compare with.
        if args.json:
            print_json({"file": args.file, "valid": True, "groups": len(policy.groups)})
            return 0
        for group in policy.groups:
            print(
                f"group {group.name!r}: capacity {group.capacity}, "
                f"{plural(len(group.tenants), 'tenant')}"
            )
        print(f"{args.file}: valid; nothing published (--dry-run)")
        print(f"(name a Redis, or set {URL_VARIABLE}, to see what publishing would change)")
        return 0
    with client_from_args(args) as client:
        target = str(getattr(client.backend, "description", "redis"))
        diff = diff_policies(client.load_policy(), policy)
        refused = _refusal(policy, diff, args)
        versions = None
        if refused is None and not args.dry_run:
            versions = client.apply_policy(policy)
    if args.json:
        print_json(
            {
                "file": args.file,
                "target": target,
                "prefix": args.prefix,
                "diff": diff.to_dict(),
                "published": versions,
            }
        )
    else:
        print(f"{args.file} against the policy published on {target} (prefix {args.prefix!r}):")
        for line in diff.lines():
            print(f"  {line}")
        if versions is not None:
            for name, version in versions.items():
                print(f"published group {name!r} (policy version {version})")
            for gone in diff.of("removed"):
                print(f"removed group {gone.name!r}")
        elif refused is None:
            print(f"{args.file}: valid; nothing published (--dry-run)")
    if refused is not None:
        raise CommandError(refused)
    return 0


def _nothing_published(args: argparse.Namespace) -> int:
    """Exit code 1 with the command that publishes a policy (``null`` on stdout for --json)."""
    if args.json:
        print_json(None)
    print(
        f"ratequota: no policy is published under prefix {args.prefix!r}; "
        "publish one with `ratequota policy apply FILE`",
        file=sys.stderr,
    )
    return 1


def _show(args: argparse.Namespace) -> int:
    with client_from_args(args) as client:
        policy = client.load_policy()
    return _nothing_published(args) if policy is None else _print_policy(policy, args.json)


def _print_policy(policy: Policy, as_json: bool) -> int:
    """The published policy as JSON, or as the TOML file that would publish it."""
    if as_json:
        print_json(policy.to_dict())
    else:
        print(policy_to_toml(policy), end="")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    with client_from_args(args) as client:
        policy = client.load_policy()
        if policy is None:
            return _nothing_published(args)
        group = policy.group(args.group)
        if group is None:
            raise CommandError(
                f"group {args.group!r} is not in the published policy "
                f"(its groups: {', '.join(repr(g.name) for g in policy.groups[:10])})"
            )
        names = [t.name for t in group.tenants]
        snap = client.snapshot(args.group, names)
        explanation = None
        if args.tenant is not None:
            explanation = client.explain(args.tenant, args.units, group=args.group)
    if args.json:
        data = snapshot_to_dict(snap, group)
        if explanation is not None:
            data["explanation"] = explanation.describe().splitlines()
        print_json(data)
    else:
        print(render_snapshot(snap, group, leases=not args.no_leases))
        if explanation is not None:
            print("\n" + explanation.describe())
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(snap.now))
        print(f"\n(read at {stamp} UTC, Redis time)")
    return 0


def add_commands(
    sub: SubParsers, add_backend_options: Callable[[argparse.ArgumentParser], None]
) -> None:
    """Register ``policy apply``, ``policy show`` and ``inspect``."""
    policy = sub.add_parser("policy", help="publish or read the quota policy")
    actions = policy.add_subparsers(dest="policy_command", required=True)
    apply = actions.add_parser(
        "apply", help="validate a TOML policy file, show what changes, and publish it"
    )
    apply.add_argument("file", metavar="FILE", help="policy file (TOML)")
    apply.add_argument(
        "--dry-run",
        action="store_true",
        help="validate (and, with a Redis named, show what would change); publish nothing",
    )
    apply.add_argument(
        "--prune",
        action="store_true",
        help="remove published groups that FILE leaves out (refused otherwise)",
    )
    add_json_option(apply, "text")
    add_backend_options(apply)
    apply.set_defaults(handler=_apply)
    show = actions.add_parser("show", help="print the published policy")
    add_json_option(show, "TOML")
    add_backend_options(show)
    show.set_defaults(handler=_show)

    inspect = sub.add_parser("inspect", help="live per-tenant usage, limits and leases of a group")
    inspect.add_argument("--group", required=True, help="the group to look at")
    add_json_option(inspect)
    inspect.add_argument("--no-leases", action="store_true", help="omit the list of leases")
    inspect.add_argument(
        "--tenant", help="also explain this tenant's limit (and from whom it borrows)"
    )
    inspect.add_argument(
        "--units", type=int, help="with --tenant: would a request for this many units be admitted?"
    )
    add_backend_options(inspect)
    inspect.set_defaults(handler=_inspect)
