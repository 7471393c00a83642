"""CloudStack API request signatures, pure (no I/O, time is an argument).

CloudStack (``ApiServer.verifyRequest``) builds the string to sign from every parameter
except ``signature``: names sorted (Java ``String.compareTo``, i.e. case-sensitive), each as
``name=URLEncoder.encode(value, "UTF-8").replaceAll("\\+", "%20")`` joined with ``&``, the
whole string lower-cased, HMAC-SHA1 with the secret key, base64. The name is not encoded.

``java.net.URLEncoder`` leaves only ``A-Z a-z 0-9 . - * _`` alone; a space becomes ``+`` and
then ``%20``. Clients differ in small ways: ``cs`` encodes with Python's ``quote(safe="*")``
(which leaves ``~`` alone), libcloud sorts by lower-cased name and leaves ``[`` ``]`` alone.
All of these sign the same parameters with the same values, so :func:`verify` accepts any of
the few canonical forms (each compared in constant time); nothing unsigned gets through.

``signatureVersion=3`` adds ``expires`` (ISO 8601 with a time zone, e.g.
``2024-05-01T10:00:00+0000``); the request is refused once that instant has passed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from urllib.parse import quote

_JAVA_SAFE = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-*_")
_HEX = "0123456789ABCDEF"


class SignatureError(Exception):
    """Why a request's signature was refused (for the log; clients get one generic text)."""


def java_urlencode(value: str) -> str:
    """``URLEncoder.encode(value, "UTF-8").replaceAll("\\+", "%20")``."""
    out: list[str] = []
    for b in value.encode("utf-8", "surrogatepass"):
        if b in _JAVA_SAFE:
            out.append(chr(b))
        else:
            out.append("%" + _HEX[b >> 4] + _HEX[b & 15])
    return "".join(out)


def _quote_cs(value: str) -> str:  # the cs client: urllib quote, "~" left alone
    return quote(value, safe="*")


def _quote_libcloud(value: str) -> str:  # libcloud: "[" and "]" left alone too
    return quote(value, safe="[]*")


_ENCODERS: tuple[Callable[[str], str], ...] = (java_urlencode, _quote_cs, _quote_libcloud)


def canonical(
    params: Mapping[str, str],
    *,
    encode: Callable[[str], str] = java_urlencode,
    sort_lower: bool = False,
) -> str:
    """The lower-cased string CloudStack signs (``signature`` itself left out)."""
    items = [(k, v) for k, v in params.items() if k.lower() != "signature"]
    if sort_lower:
        items.sort(key=lambda kv: (kv[0].lower(), kv[0]))
    else:
        items.sort(key=lambda kv: kv[0])
    return "&".join(f"{k}={encode(v)}" for k, v in items).lower()


def _hmac_b64(secret: str, text: str) -> str:
    digest = hmac.new(secret.encode("utf-8"), text.encode("utf-8"), hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")


def sign(params: Mapping[str, str], secret: str) -> str:
    """The signature CloudStack computes for ``params``."""
    return _hmac_b64(secret, canonical(params))


def candidate_strings(params: Mapping[str, str]) -> list[str]:
    """The distinct canonical forms accepted (CloudStack's first)."""
    seen: dict[str, None] = {}
    for sort_lower in (False, True):
        for enc in _ENCODERS:
            seen.setdefault(canonical(params, encode=enc, sort_lower=sort_lower), None)
    return list(seen)


def verify(params: Mapping[str, str], secret: str, signature: str) -> bool:
    """True if ``signature`` signs ``params`` with ``secret`` in any accepted form. Every
    candidate is computed and compared, so timing does not depend on which one matched."""
    # "+" in a base64 signature sent unencoded in a query string arrives as a space.
    presented = signature.strip().replace(" ", "+").encode("ascii", "replace")
    ok = False
    for text in candidate_strings(params):
        ok |= hmac.compare_digest(presented, _hmac_b64(secret, text).encode("ascii"))
    return ok


def parse_expires(text: str) -> float:
    """UNIX time of an ``expires`` value; it must carry a time zone."""
    value = text.strip()
    if value.endswith("Z"):
        value = value[:-1] + "+00:00"
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise SignatureError(f"expires is not an ISO 8601 date: {text[:40]!r}") from None
    if when.tzinfo is None:
        raise SignatureError("expires has no time zone")
    return when.timestamp()


def check(
    params: Mapping[str, str],
    secret: str,
    now: float,
    *,
    max_ahead: float = 0.0,
) -> None:
    """Raises :class:`SignatureError` unless ``params`` carry a good signature for ``secret``
    (and, for ``signatureVersion=3``, an ``expires`` not yet passed)."""
    lower = lower_keys(params)
    signature = lower.get("signature")
    if not signature:
        raise SignatureError("missing signature")
    if lower.get("signatureversion") == "3":
        expires = lower.get("expires")
        if not expires:
            raise SignatureError("signatureVersion=3 without expires")
        when = parse_expires(expires)
        if when < now:
            raise SignatureError("request expired")
        if max_ahead > 0 and when > now + max_ahead:
            raise SignatureError("expires too far in the future")
    if not verify(params, secret, signature):
        raise SignatureError("signature mismatch")


def lower_keys(params: Mapping[str, str]) -> dict[str, str]:
    """Lower-cased names; the first of names equal but for case wins."""
    out: dict[str, str] = {}
    for k, v in params.items():
        out.setdefault(k.lower(), v)
    return out


def first_values(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Like the servlet's ``getParameterMap()[name][0]``: the first value of each name."""
    out: dict[str, str] = {}
    for k, v in pairs:
        out.setdefault(k, v)
    return out
