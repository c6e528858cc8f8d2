"""Redis URLs as the user gave them, and as ratequota shows them: credentials masked.

A URL reaches descriptions, shard ids, error messages and reports; none of
them may show its password. ``redact`` masks a URL, ``scrub`` masks the same
secrets inside a foreign message (redis-py quotes URLs in its errors), and
``placement_ids`` gives the shards of a sharded client their placement names.
No I/O, no redis import: both backends' modules use it.
"""

from __future__ import annotations

from collections.abc import Sequence

from ratequota.errors import ConfigError

__all__ = ["placement_ids", "redact", "scrub"]


#: Query parameters whose values are never shown (``?password=…`` and relatives).
_SECRET_PARAMETERS = ("password", "passwd", "secret", "token")


def redact(url: str) -> str:
    """The URL without its credentials, for descriptions, shard ids, errors and reports.

    Both places redis-py reads a password from are masked: the user-info part
    (``redis://user:secret@host`` shows ``user:***@host``; a lone
    ``redis://secret@host`` shows ``***@host``, since some URLs carry the
    password there) and query parameters such as ``?password=secret``. Never
    raises: an unparsable URL is shown by its scheme only.
    """
    if not isinstance(url, str):
        return repr(type(url).__name__)
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "***" if "@" in url or "password" in url.lower() else url
    # Credentials first, on the whole remainder: a password may hold '?' or '#' itself
    # (masking too much is harmless; too little is a leak).
    shown = ""
    if "@" in rest:
        creds, _, rest = rest.rpartition("@")
        user, colon, _secret = creds.partition(":")
        user = user.split("/", 1)[0].split("?", 1)[0]
        shown = f"{user}:***@" if colon and user else "***@"
    rest, hash_sign, fragment = rest.partition("#")
    host, question, query = rest.partition("?")
    if query:
        query = "&".join(_redact_parameter(p) for p in query.split("&"))
    return f"{scheme}://{shown}{host}{question}{query}{hash_sign}{'***' if fragment else ''}"


def _redact_parameter(parameter: str) -> str:
    name, equals, _value = parameter.partition("=")
    if equals and any(word in name.lower() for word in _SECRET_PARAMETERS):
        return f"{name}=***"
    return parameter


def scrub(text: str, url: str) -> str:
    """``text`` with every credential of ``url`` masked (for foreign error messages)."""
    secrets: list[str] = []
    rest = url.partition("://")[2]
    if "@" in rest:
        secrets.append(rest.rpartition("@")[0].partition(":")[2])
    for parameter in rest.partition("?")[2].split("&"):
        name, _, value = parameter.partition("=")
        if any(word in name.lower() for word in _SECRET_PARAMETERS):
            secrets.append(value)
    for secret in sorted(filter(None, secrets), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def placement_ids(urls: Sequence[str], ids: Sequence[str] | None) -> list[str]:
    """The placement names of ``urls``: ``ids`` if given (one per URL), else the redacted URLs.

    Both clients place a group on the same shard because both name the
    shards here; the order of ``urls`` does not matter.
    """
    if isinstance(urls, str) or not urls:
        raise ConfigError("shards", "must be a non-empty list of redis:// URLs")
    names = [redact(u) for u in urls] if ids is None else list(ids)
    if len(names) != len(urls):
        raise ConfigError("shard_ids", "needs one id per shard URL")
    return names
