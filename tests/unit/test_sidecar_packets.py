"""exporters.packets: raw frame parsing (checked against frames scapy builds) and DNS readers."""
import os
import random
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from scapy.layers.inet import IP, TCP, UDP  # noqa: E402
from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment  # noqa: E402
from scapy.layers.l2 import Dot1Q, Ether  # noqa: E402

from exporters.packets import (LINKTYPE_RAW, Observation, addresses, dns_addresses, dns_question,  # noqa: E402
                               locate, observation, parse)
from sidecar_frames import dns_answer, dns_query, frame, syn, tcp_data, udp  # noqa: E402


@pytest.mark.parametrize("raw, want", [
    (syn("10.1.0.10", "192.0.2.1", 443), ("10.1.0.10", "192.0.2.1", 6, 40000, 443, True, b"")),
    (syn("fd00:1::10", "2001:db8::1", 853), ("fd00:1::10", "2001:db8::1", 6, 40000, 853, True, b"")),
    (tcp_data("10.1.0.10", "192.0.2.1", 80, b"GET / HTTP/1.1\r\n"),
     ("10.1.0.10", "192.0.2.1", 6, 40000, 80, False, b"GET / HTTP/1.1\r\n")),
    (udp("10.1.0.10", "192.0.2.1", 53, b"abc"), ("10.1.0.10", "192.0.2.1", 17, 50000, 53, False, b"abc")),
    (udp("fd00:1::10", "2001:db8::1", 443, b"\xc0xyz"), ("fd00:1::10", "2001:db8::1", 17, 50000, 443, False, b"\xc0xyz")),
    # an 802.1Q tag, an IPv6 destination-options header, a first fragment
    (bytes(Ether() / Dot1Q(vlan=5) / IP(src="10.1.0.1", dst="192.0.2.9") / UDP(sport=1, dport=53) / b"q"),
     ("10.1.0.1", "192.0.2.9", 17, 1, 53, False, b"q")),
    (bytes(Ether() / IPv6(src="fd00:1::1", dst="2001:db8::9") / IPv6ExtHdrDestOpt() / TCP(sport=5, dport=443, flags="S")),
     ("fd00:1::1", "2001:db8::9", 6, 5, 443, True, b"")),
    (bytes(Ether() / IPv6(src="fd00:1::1", dst="2001:db8::9") / IPv6ExtHdrFragment(offset=0, m=1)
           / UDP(sport=7, dport=443) / b"abcd"), ("fd00:1::1", "2001:db8::9", 17, 7, 443, False, b"abcd")),
])
def test_headers_are_read_like_scapy_wrote_them(raw, want):
    p = parse(raw, 1, 5.0)
    assert (p.src_ip, p.dst_ip, p.proto, p.sport, p.dport, p.syn, p.payload) == want
    assert p.time == 5.0
    at = locate(raw, 1)
    obs = observation(5.0, "hello", "tcp", raw, at, "a.test", ("h2",), "n.test", "/x")
    assert obs == Observation(5.0, "hello", "tcp", *addresses(raw, at), "a.test", ("h2",), "n.test", "/x")
    assert type(obs) is Observation and (obs.client_ip, obs.server_ip, obs.server_port) == (want[0], want[1], want[4])
    assert observation(5.0, "connect", "udp", raw, at) == Observation(5.0, "connect", "udp", *addresses(raw, at))


def test_raw_ip_linktype_and_ethernet_trailer_padding():
    raw = bytes(IP(src="10.1.0.1", dst="192.0.2.9") / UDP(sport=1, dport=53) / b"x")
    assert parse(raw, LINKTYPE_RAW).payload == b"x"
    padded = frame(IP(src="10.1.0.1", dst="192.0.2.9") / UDP(sport=1, dport=53) / b"x") + b"\x00" * 20
    assert parse(padded).payload == b"x"          # the IP total length, not the frame, ends it


@pytest.mark.parametrize("raw", [
    b"", b"\x00" * 13, frame(b"\x45"),                              # too short
    bytes(Ether() / IP(src="10.0.0.1", dst="10.0.0.2", frag=10) / UDP() / b"later fragment"),
    bytes(Ether() / IP(src="10.0.0.1", dst="10.0.0.2", proto=1) / b"\x08\x00icmp"),
    bytes(Ether(type=0x0806) / (b"\x00" * 28)),                      # ARP
    frame(IP(src="10.0.0.1", dst="10.0.0.2") / TCP())[:40],          # truncated TCP header
])
def test_what_is_not_tcp_or_udp_is_none(raw):
    assert parse(raw) is None


def test_random_bytes_never_raise():
    rng = random.Random(9001)
    base = syn("10.1.0.10", "192.0.2.1", 443)
    for _ in range(3000):
        b = bytearray(base if rng.random() < 0.5 else rng.randbytes(rng.randrange(0, 90)))
        for _ in range(rng.randrange(1, 6)):
            if b:
                b[rng.randrange(len(b))] = rng.randrange(256)
        parse(bytes(b), rng.choice((1, 101, 113, 276)))


def test_dns_question_and_answers():
    assert dns_question(dns_query("Chat.Test.")) == "chat.test"
    assert dns_question(b"\x00\x01") is None
    reply = dns_answer("www.example.test", ["192.0.2.10", "2001:db8::10"], ttl=77)
    assert dns_addresses(reply) == [(4, 0xC000020A, 77), (6, 0x20010DB8 << 96 | 0x10, 77)]
    assert dns_addresses(dns_query("x.test")) == []                  # a query, not a response
    assert dns_addresses(reply[:-3]) == [(4, 0xC000020A, 77)]        # truncated: what was readable


def test_dns_question_fast_path_equals_parse_query():
    """dns_question reads a plain query itself; on 20,000 mutated queries (flags, counts, label
    lengths, dots and backslashes in labels, truncation, case) it must equal parse_query's qname,
    or None where parse_query raises, also when the same question comes again."""
    from resolver.wire import WireError, parse_query
    rng = random.Random(11)
    bases = [dns_query(n) for n in ("Chat.Test.", "a.b.c.example.org.", "x.", "web.whatsapp.com.")]
    fast = 0
    for _ in range(20000):
        q = bytearray(rng.choice(bases))
        for _ in range(rng.randrange(3)):
            at = rng.randrange(len(q))
            q[at] = rng.choice((0, 1, 2, 46, 92, 63, 64, 0x80, 0xC0, 0xFF, rng.randrange(256)))
        if rng.random() < 0.2:
            q = q[:rng.randrange(len(q) + 1)]
        q = bytes(q)
        try:
            want = parse_query(q).qname
        except (WireError, IndexError, ValueError, UnicodeError):
            want = None
        assert dns_question(q) == want, q
        assert dns_question(q) == want, q   # again: now maybe from the names remembered by question
        fast += want is not None and q[4:12] == b"\0\1\0\0\0\0\0\0"
    assert fast > 1000                      # the fast path was taken, not only parse_query


def test_truncated_ipv4_tcp_frames_are_unparsed_not_a_crash(tmp_path):
    """A captured TCP frame cut short (snap length) inside the TCP header: the engine's inline
    locate counts it unparsed, as packets.locate does, instead of raising IndexError."""
    from exporters.packets import locate
    from sidecar_frames import engine as make_engine
    engine = make_engine(tmp_path)
    whole = syn("10.1.0.10", "192.0.2.1", 443)
    for cut in range(42, 54):
        assert locate(whole[:cut], 1) is None
        assert engine.feed(5.0, 1, whole[:cut]) == []
    assert engine.unparsed == 12
