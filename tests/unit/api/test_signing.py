"""Signatures, checked against CloudStack's documented example and the real clients'
signing code (cs, libcloud), not against our own implementation."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest

from manager.api import signing
from manager.api.signing import SignatureError

# From CloudStack's "Signing API Requests" documentation.
DOC_APIKEY = (
    "plgWJfZK4gyS3mOMTVmjUVg-X-jlWlnfaUJ9GAbBbf9EdM-kAYMmAiLqzzq1ElZLYq_u38zCm0bewzGUdP66mg"
)
DOC_SECRET = (
    "VDaACYb0LV9eNjTetIOElcVQkvJck_J_QljX_FcHRj87ZKiy0z0ty0ZsYBkoXkY9b7eq1EhwJaw7FF3akA3KBQ"
)
DOC_SIGNATURE = "TTpdDq/7j/J58XCRHomKoQXEQds="
SECRET = "s3cr3t-key"
NOW = 1_700_000_000.0


def doc_params() -> dict[str, str]:
    return {"command": "listUsers", "response": "json", "apiKey": DOC_APIKEY}


def test_cloudstack_documented_example() -> None:
    assert signing.sign(doc_params(), DOC_SECRET) == DOC_SIGNATURE
    signing.check({**doc_params(), "signature": DOC_SIGNATURE}, DOC_SECRET, NOW)


@pytest.mark.parametrize(
    ("raw", "encoded"),
    [
        ("a b", "a%20b"),
        ("a+b", "a%2Bb"),
        ("*", "*"),
        ("~", "%7E"),
        ("-_.", "-_."),
        ("é", "%C3%A9"),
        ("[0]", "%5B0%5D"),
        ("a=b&c", "a%3Db%26c"),
    ],
)
def test_java_urlencode(raw: str, encoded: str) -> None:
    assert signing.java_urlencode(raw) == encoded


def cs_sign(params: dict[str, str], secret: str) -> str:
    from cs.client import CloudStack

    c = CloudStack(endpoint="http://127.0.0.1:1/client/api", key="k", secret=secret)
    data = dict(params)
    c._sign(data)
    return str(data["signature"])


def libcloud_sign(params: dict[str, str], secret: str) -> str:
    from libcloud.common.cloudstack import CloudStackConnection

    conn = CloudStackConnection("k", secret, host="127.0.0.1", port=1)
    return str(conn._make_signature(dict(params)).decode())


TRICKY = {
    "command": "listConfigurations",
    "apiKey": "AbC",
    "keyword": "a b~*+&=é[x]",
    "zoneId": "Z",
    "details[0].key": "v[1]",
}


@pytest.mark.parametrize("client_sign", [cs_sign, libcloud_sign], ids=["cs", "libcloud"])
def test_real_clients_signatures_verify(client_sign: object) -> None:
    sig = client_sign(TRICKY, SECRET)  # type: ignore[operator]
    signing.check({**TRICKY, "signature": sig}, SECRET, NOW)
    assert not signing.verify(TRICKY, "other-secret", sig)


def test_replay_with_other_params_fails() -> None:
    sig = signing.sign(TRICKY, SECRET)
    signing.check({**TRICKY, "signature": sig}, SECRET, NOW)
    for changed in (
        {**TRICKY, "keyword": "other"},
        {**TRICKY, "extra": "1"},
        {k: v for k, v in TRICKY.items() if k != "zoneId"},
        {**TRICKY, "command": "updateConfiguration"},
    ):
        with pytest.raises(SignatureError, match="mismatch"):
            signing.check({**changed, "signature": sig}, SECRET, NOW)


def test_bad_and_missing_signature() -> None:
    with pytest.raises(SignatureError, match="missing signature"):
        signing.check(TRICKY, SECRET, NOW)
    with pytest.raises(SignatureError, match="mismatch"):
        signing.check({**TRICKY, "signature": "AAAA"}, SECRET, NOW)
    with pytest.raises(SignatureError, match="mismatch"):
        signing.check({**TRICKY, "signature": "\u00e9\u00e9"}, SECRET, NOW)


def test_plus_decoded_as_space_still_verifies() -> None:
    params = dict(doc_params())
    sig = signing.sign(params, DOC_SECRET)
    # Unencoded "+" in a query string arrives as " ".
    if "+" in sig:
        assert signing.verify(params, DOC_SECRET, sig.replace("+", " "))
    assert signing.verify(params, DOC_SECRET, f" {sig} ")


def v3(expires: str) -> dict[str, str]:
    p = {**TRICKY, "signatureVersion": "3", "expires": expires}
    return {**p, "signature": signing.sign(p, SECRET)}


def iso(ts: float, fmt: str = "%Y-%m-%dT%H:%M:%S%z") -> str:
    return datetime.fromtimestamp(ts, UTC).strftime(fmt)


def test_v3_expires() -> None:
    signing.check(v3(iso(NOW + 60)), SECRET, NOW)
    signing.check(v3(iso(NOW + 60, "%Y-%m-%dT%H:%M:%SZ")), SECRET, NOW)
    plus_two = datetime.fromtimestamp(NOW + 60, UTC).astimezone(
        __import__("datetime").timezone(timedelta(hours=2))
    )
    signing.check(v3(plus_two.isoformat()), SECRET, NOW)
    with pytest.raises(SignatureError, match="expired"):
        signing.check(v3(iso(NOW - 1)), SECRET, NOW)
    with pytest.raises(SignatureError, match="time zone"):
        signing.check(v3(iso(NOW + 60, "%Y-%m-%dT%H:%M:%S")), SECRET, NOW)
    with pytest.raises(SignatureError, match="not an ISO 8601"):
        signing.check(v3("tomorrow"), SECRET, NOW)
    with pytest.raises(SignatureError, match="too far"):
        signing.check(v3(iso(NOW + 7200)), SECRET, NOW, max_ahead=3600)
    p = {**TRICKY, "signatureVersion": "3"}
    with pytest.raises(SignatureError, match="without expires"):
        signing.check({**p, "signature": signing.sign(p, SECRET)}, SECRET, NOW)


def test_v3_expires_is_signed() -> None:
    good = v3(iso(NOW + 60))
    tampered = {**good, "expires": iso(NOW + 3600)}
    with pytest.raises(SignatureError, match="mismatch"):
        signing.check(tampered, SECRET, NOW)


def test_cs_client_v3_signature_with_real_clock() -> None:
    from cs.client import EXPIRES_FORMAT

    expires = datetime.now(UTC) + timedelta(minutes=10)
    p = {**TRICKY, "signatureVersion": "3", "expires": expires.strftime(EXPIRES_FORMAT)}
    signing.check({**p, "signature": cs_sign(p, SECRET)}, SECRET, time.time())


def test_first_values_and_lower_keys() -> None:
    pairs = [("a", "1"), ("a", "2"), ("B", "3"), ("b", "4")]
    first = signing.first_values(pairs)
    assert first == {"a": "1", "B": "3", "b": "4"}
    assert signing.lower_keys(first) == {"a": "1", "b": "3"}
