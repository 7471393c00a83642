"""RFB handshakes, websocket framing and request checks of the CPVM data path (pure)."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, modes
from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader

from agent.roles.consoleproxy import rfb, wsframe
from agent.roles.consoleproxy.server import (
    ConfigError,
    HeadError,
    ProxyConfig,
    Refused,
    config_from,
    cookie_value,
    origin_allowed,
    parse_head,
    target_from_reply,
)


def test_des_key_bit_reversal_and_known_vector() -> None:
    # 'p' = 0x70 = 01110000 -> 00001110 = 0x0e
    assert rfb.des_key("p")[0] == 0x0E
    assert rfb.des_key("12345678901") == rfb.des_key("12345678")  # only 8 bytes count
    challenge = bytes(range(16))
    resp = rfb.vnc_auth_response("secret", challenge)
    dec = Cipher(TripleDES(rfb.des_key("secret") * 3), modes.ECB()).decryptor()
    assert dec.update(resp) + dec.finalize() == challenge
    assert resp != rfb.vnc_auth_response("secreT", challenge)


def test_hypervisor_handshake_vnc_auth_38() -> None:
    hs = rfb.HypervisorHandshake("pw")
    assert hs.receive(b"RFB 003.008\n") == b"RFB 003.008\n"
    assert hs.receive(b"\x02\x01\x02") == b"\x02"  # prefers VNC auth when we have a password
    challenge = os.urandom(16)
    assert hs.receive(challenge[:7]) == b""  # partial input waits
    assert hs.receive(challenge[7:]) == rfb.vnc_auth_response("pw", challenge)
    assert not hs.done
    assert hs.receive(b"\0\0\0\0") == b"" and hs.done and hs.leftover == b""


def test_hypervisor_handshake_wrong_password_reason() -> None:
    hs = rfb.HypervisorHandshake("pw")
    hs.receive(b"RFB 003.008\n\x01\x02" + bytes(16))
    reason = b"Authentication failed\0"
    with pytest.raises(rfb.RfbError) as e:
        hs.receive(struct.pack("!II", 1, len(reason)) + reason)
    assert e.value.auth and e.value.reason.endswith("Authentication failed")


def test_hypervisor_handshake_33_and_none_and_refusals() -> None:
    hs = rfb.HypervisorHandshake("")
    assert hs.receive(b"RFB 003.003\n") == b"RFB 003.003\n"
    hs.receive(struct.pack("!I", 1))
    assert hs.done
    hs = rfb.HypervisorHandshake("")
    assert hs.receive(b"RFB 003.007\n\x01\x01") == b"RFB 003.007\n\x01"
    assert hs.done  # 3.7 has no SecurityResult for None
    hs = rfb.HypervisorHandshake("")
    with pytest.raises(rfb.RfbError, match="none is on record"):
        hs.receive(b"RFB 003.008\n\x01\x02")
    hs = rfb.HypervisorHandshake("pw")
    with pytest.raises(rfb.RfbError, match="too many"):
        hs.receive(b"RFB 003.008\n\x00" + struct.pack("!I", 8) + b"too many")
    with pytest.raises(rfb.RfbError, match="not a VNC server"):
        rfb.HypervisorHandshake("x").receive(b"HTTP/1.1 400 \n")
    with pytest.raises(rfb.RfbError, match="no supported"):
        rfb.HypervisorHandshake("x").receive(b"RFB 003.008\n\x01\x10")
    assert rfb.parse_version(b"RFB 003.889\n") == 8


def test_browser_handshake_offers_only_none() -> None:
    hs = rfb.BrowserHandshake()
    assert hs.greeting() == b"RFB 003.008\n"
    assert hs.receive(b"RFB 003.008\n") == b"\x01\x01"
    assert hs.receive(b"\x01\x01") == b"\0\0\0\0"  # ClientInit left over
    assert hs.done and hs.leftover == b"\x01"
    with pytest.raises(rfb.RfbError):
        rfb.BrowserHandshake().receive(b"RFB 003.008\n\x02")
    hs = rfb.BrowserHandshake()
    assert hs.receive(b"RFB 003.003\n") == struct.pack("!I", 1) and hs.done


def test_browser_handshake_failure_reason() -> None:
    hs = rfb.BrowserHandshake("VNC authentication to the hypervisor failed")
    out = hs.receive(b"RFB 003.008\n")
    assert out[0] == 0 and out[5:] == b"VNC authentication to the hypervisor failed"
    assert hs.failed and not hs.done


def _client_frame(opcode: Opcode, data: bytes, fin: bool = True) -> bytes:
    return Frame(opcode, data, fin).serialize(mask=True, extensions=[])


def test_frame_parser_against_websockets_client_frames() -> None:
    parser = wsframe.FrameParser(1 << 20)
    blob = b"".join(
        _client_frame(Opcode.BINARY, os.urandom(n)) for n in (0, 1, 125, 126, 65535, 65536)
    )
    datas = []
    # Feed in awkward pieces; payloads come out joined, in order.
    for i in range(0, len(blob), 1000):
        d, c = parser.feed(blob[i : i + 1000])
        datas.append(b"".join(d))
        assert c == []
    joined = b"".join(datas)
    assert len(joined) == 1 + 125 + 126 + 65535 + 65536 and parser.pending == 0
    d, c = parser.feed(_client_frame(Opcode.PING, b"hi") + _client_frame(Opcode.BINARY, b"x"))
    assert d == [b"x"] and c == [(wsframe.OP_PING, b"hi")]
    d, c = parser.feed(
        _client_frame(Opcode.BINARY, b"ab", fin=False) + _client_frame(Opcode.CONT, b"cd")
    )
    assert b"".join(d) == b"abcd"


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (_client_frame(Opcode.TEXT, b"hello"), 1003),
        (Frame(Opcode.BINARY, b"x").serialize(mask=False, extensions=[]), 1002),
        (_client_frame(Opcode.CONT, b"x"), 1002),
        (_client_frame(Opcode.BINARY, b"x" * 2000), 1009),
        (bytes([0x82 | 0x40, 0x80]) + bytes(4), 1002),
    ],
)
def test_frame_parser_errors(frame: bytes, code: int) -> None:
    with pytest.raises(wsframe.WsError) as e:
        wsframe.FrameParser(1024).feed(frame)
    assert e.value.code == code


def test_server_frames_parse_as_websockets_client_expects() -> None:
    for n in (0, 3, 200, 70000):
        payload = os.urandom(n)
        reader = StreamReader()
        reader.feed_data(wsframe.frame(wsframe.OP_BINARY, payload))
        gen = Frame.parse(reader.read_exact, mask=False)
        try:
            next(gen)
        except StopIteration as stop:
            frame = stop.value
        assert frame.data == payload and frame.opcode is Opcode.BINARY
    assert wsframe.parse_close(wsframe.close_frame(4000, "idle")[2:]) == (4000, "idle")
    assert wsframe.accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    assert wsframe.valid_client_key("dGhlIHNhbXBsZSBub25jZQ==")
    assert not wsframe.valid_client_key("short")


def test_head_origin_cookie() -> None:
    h = parse_head(b"GET /websockify?vm=a HTTP/1.1\r\nHost: cp:80\r\nX: 1\r\nx: 2")
    assert (h.method, h.target, h.headers["x"]) == ("GET", "/websockify?vm=a", "1, 2")
    for bad in (b"GET /\r\n", b"GET / HTTP/1.1\r\nno-colon", b"GET / HTTP/1.1\r\n :x"):
        with pytest.raises(HeadError):
            parse_head(bad)
    cfg = ProxyConfig(allowed_origins=frozenset({"https://ui.example"}))
    assert origin_allowed("http://cp:80", "cp:80", "http", cfg)
    assert origin_allowed("https://ui.example/", "cp:80", "http", cfg)
    assert not origin_allowed("http://evil", "cp:80", "http", cfg)
    assert not origin_allowed(None, "cp:80", "http", cfg)
    assert not origin_allowed("http://cp:80", "cp:80", "http", ProxyConfig(allow_same_origin=False))
    assert cookie_value("a=1; sysvm_resume_v=tok; b=2", "sysvm_resume_v") == "tok"
    assert cookie_value("", "x") == ""


def test_config_and_reply_validation() -> None:
    base = ProxyConfig()
    cfg = config_from(
        {
            "settings": {"consoleproxy.loadscan.interval": 7, "consoleproxy.session.max": 80},
            "consoleproxy": {
                "listen_port": 8080,
                "idle_timeout": 60,
                "write_high": 65536,
                "allowed_origins": ["https://a/"],
                "novnc_dir": "/x",
            },
        },
        base,
    )
    assert (cfg.port, cfg.idle_timeout, cfg.loadscan_interval, cfg.session_max_report) == (
        8080,
        60.0,
        7.0,
        80,
    )
    assert cfg.write_low == 16384 and cfg.allowed_origins == {"https://a"}
    assert cfg.novnc_dir == Path("/x")
    for bad in (
        {"listen_port": 70000},
        {"idle_timeout": "x"},
        {"draining": 1},
        {"allowed_origins": "x"},
        {"max_sessions": True},
    ):
        with pytest.raises(ConfigError):
            config_from({"consoleproxy": bad}, base)
    assert config_from({}, base) == base
    t = target_from_reply({"vm_id": "v", "host": "h", "port": 5900, "password": "p"})
    assert t.port == 5900 and "p" not in repr(t).replace("port", "")
    for bad_reply in (
        {},
        {"vm_id": "v", "host": "h", "port": 0},
        None,
        {"vm_id": "v", "host": "h", "port": True},
    ):
        with pytest.raises(Refused):
            target_from_reply(bad_reply)


def test_frame_parser_any_split_points() -> None:
    import random

    rng = random.Random(7)
    frames, want_data, want_ctl = [], b"", []
    for i in range(60):
        if i % 7 == 3:
            body = rng.randbytes(rng.randint(0, 125))
            frames.append(_client_frame(Opcode.PING, body))
            want_ctl.append((wsframe.OP_PING, body))
        else:
            body = rng.randbytes(rng.choice([0, 1, 5, 125, 126, 300, 70000]))
            frames.append(_client_frame(Opcode.BINARY, body))
            want_data += body
    blob = b"".join(frames)
    for _ in range(5):
        parser = wsframe.FrameParser(1 << 20)
        got, ctl, pos = b"", [], 0
        while pos < len(blob):
            step = rng.choice([1, 2, 3, 7, 14, 100, 5000, 80000])
            d, c = parser.feed(blob[pos : pos + step])
            got += b"".join(d)
            ctl += c
            pos += step
        assert got == want_data and ctl == want_ctl and parser.pending == 0


def test_session_timers() -> None:
    from agent.roles.consoleproxy.server import Session, expired_sessions

    cfg = ProxyConfig(handshake_timeout=10, idle_timeout=60, max_session=3600)
    hand = Session("1.1.1.1", now=0.0)
    idle = Session("1.1.1.1", now=0.0)
    idle.relaying, idle.last = True, 5.0
    busy = Session("1.1.1.1", now=0.0)
    busy.relaying, busy.last = True, 3000.0
    assert expired_sessions([hand, idle, busy], cfg, 9.0) == []
    assert [(c, r) for _, c, r in expired_sessions([hand], cfg, 11.0)] == [
        (1008, "handshake timeout")
    ]
    assert [c for _, c, _ in expired_sessions([idle, busy], cfg, 66.0)] == [4000]
    busy.last = 3599.0
    assert [c for _, c, _ in expired_sessions([busy], cfg, 3601.0)] == [4001]
    info = busy.info(mono_now=3601.0, wall_now=1_000_000.0)
    assert info["last_used"] == 1_000_000.0 - 2.0 and info["client"] == "1.1.1.1"


def test_role_loads_through_the_role_loader(tmp_path: Path) -> None:
    from agent.roles import Role, RoleContext, load

    ctx = RoleContext(
        vm_id="v",
        name="v-1-VM",
        zone_id="z",
        role="consoleproxy",
        state_dir=tmp_path,
        extra={"listen_port": 8080, "idle_timeout": "bad"},  # bad extra -> defaults, logged
    )
    role = load("consoleproxy", ctx)
    assert isinstance(role, Role)
    assert role.status() == {"listening": None, "sessions": 0}
