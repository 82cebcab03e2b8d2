"""resolver/wire.py: queries read from bytes, our block answers, upstream replies read and rebuilt.

dnspython builds and reads the messages on the other side, so the bytes are checked by an
independent DNS implementation.
"""
from __future__ import annotations

import struct

import dns.edns
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest

from resolver import wire
from resolver.wire import WireError, block_reply, build_reply, parse_query, parse_reply, truncate


def query_bytes(name="www.Example.TEST.", rdtype="A", use_edns=None, payload=None, **kw) -> bytes:
    # dnspython turns EDNS on when any EDNS argument is given: pass payload only with EDNS
    q = dns.message.make_query(name, rdtype, use_edns=use_edns, payload=payload or 1232, **kw) \
        if use_edns is not None else dns.message.make_query(name, rdtype, **kw)
    q.id = 4242
    return q.to_wire()


def read(data: bytes) -> dns.message.Message:
    return dns.message.from_wire(data)


# -- parse_query ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name,expected", [
    ("www.Example.TEST.", "www.example.test"),
    ("WWW.CHAT.TEST", "www.chat.test"),
    ("a.b.c.d.e.f", "a.b.c.d.e.f"),
    (".", ""),
])
def test_query_name_is_lower_case_without_trailing_dot(name, expected):
    q = parse_query(query_bytes(name))
    assert q.qname == expected
    assert q.id == 4242 and q.qclass == wire.IN


@pytest.mark.parametrize("rdtype", ["A", "AAAA", "HTTPS", "SVCB", "MX", "TXT", "ANY", "CAA", "NAPTR"])
def test_query_type_and_cache_key_keep_the_type(rdtype):
    """The cache key is the question with the name lower-cased; the type must survive as sent
    (lower-casing the whole question turned HTTPS, 0x0041 'A', into type 97)."""
    q = parse_query(query_bytes("X.test", rdtype))
    assert q.qtype == dns.rdatatype.from_text(rdtype)
    assert q.key[-4:] == struct.pack("!HH", q.qtype, 1)
    assert q.key[:-4] == q.question[:-4].lower()
    sent = read(wire.make_query(7, q.key))
    assert sent.question[0].rdtype == q.qtype and str(sent.question[0].name) == "x.test."


def test_edns_size_and_do_bit():
    q = parse_query(query_bytes(use_edns=0, payload=4000, want_dnssec=True))
    assert (q.edns, q.do, q.max_udp) == (4000, True, 4000)
    plain = parse_query(query_bytes())
    assert (plain.edns, plain.max_udp) == (None, 512)
    tiny = parse_query(query_bytes(use_edns=0, payload=100))
    assert tiny.max_udp == 512


def test_edns_version_1_is_badvers():
    with pytest.raises(wire.EdnsVersionError) as e:
        parse_query(query_bytes(use_edns=1))
    reply = read(wire.error_reply(e.value.query, 16))
    assert reply.rcode() == dns.rcode.BADVERS


def _header(flags=0x0100, qd=1, an=0, ns=0, ar=0):
    return struct.pack("!HHHHHH", 1, flags, qd, an, ns, ar)


QUESTION = b"\x03www\x07example\x00\x00\x01\x00\x01"


@pytest.mark.parametrize("data,rcode", [
    (b"", None),                                              # shorter than a header
    (b"\x00" * 11, None),
    (_header(flags=0x8100) + QUESTION, None),                 # a response: never answered
    (_header(flags=0x2100) + QUESTION, wire.NOTIMP),          # opcode UPDATE
    (_header(qd=0), wire.FORMERR),
    (_header(qd=2) + QUESTION * 2, wire.FORMERR),
    (_header() + b"\x03www\x07exam", wire.FORMERR),           # label past the end
    (_header() + b"\x03www\x07example\x00\x00", wire.FORMERR),  # no type/class
    (_header() + b"\xc0\x0c\x00\x01\x00\x01", wire.FORMERR),  # compression in the question
    (_header(an=1) + QUESTION, wire.FORMERR),
    (_header() + b"\x3f" + b"a" * 63 + b"\x3f" + b"a" * 63 + b"\x3f" + b"a" * 63 + b"\x3f" + b"a" * 63
     + b"\x00\x00\x01\x00\x01", wire.FORMERR),                # name longer than 255
    (_header(ar=2) + QUESTION + (b"\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x00") * 2, wire.FORMERR),
    (_header(ar=1) + QUESTION + b"\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x10", wire.FORMERR),  # rdata past end
    (_header(ar=9) + QUESTION, wire.FORMERR),
])
def test_malformed_queries(data, rcode):
    with pytest.raises(WireError) as e:
        parse_query(data)
    assert e.value.rcode == rcode


def test_ecs_option_is_read():
    ecs = dns.edns.ECSOption("192.0.2.77", 32)
    q = parse_query(query_bytes(use_edns=0, options=[ecs]))
    assert q.ecs == ("192.0.2.77", 32)


# -- block answers --------------------------------------------------------------------------------

ADDRESS_TYPES = {dns.rdatatype.A, dns.rdatatype.AAAA, dns.rdatatype.HTTPS, dns.rdatatype.SVCB}
ALL_TYPES = ["A", "AAAA", "HTTPS", "SVCB", "MX", "TXT", "ANY", "CNAME", "NS", "SRV", "PTR", "SOA", "CAA"]


def _records(msg):
    return [(rrset.rdtype, rd) for section in (msg.answer, msg.authority, msg.additional)
            for rrset in section for rd in rrset]


@pytest.mark.parametrize("rdtype", ALL_TYPES)
@pytest.mark.parametrize("response,rcode", [("nxdomain", dns.rcode.NXDOMAIN), ("nodata", dns.rcode.NOERROR)])
def test_negative_block_answers_carry_an_soa_and_nothing_else(rdtype, response, rcode):
    data = block_reply(parse_query(query_bytes("www.chat.test", rdtype, use_edns=0)), response, 10)
    msg = read(data)
    assert msg.id == 4242 and msg.flags & dns.flags.QR and msg.flags & dns.flags.RA
    assert msg.rcode() == rcode
    assert not msg.answer
    assert [rrset.rdtype for rrset in msg.authority] == [dns.rdatatype.SOA]
    soa = msg.authority[0]
    assert soa.ttl == 10 and soa[0].minimum == 10        # RFC 2308: negative TTL = min(TTL, minimum)
    assert msg.edns == 0                                 # EDNS in, EDNS out


@pytest.mark.parametrize("rdtype", ALL_TYPES)
def test_null_answers_zero_addresses_for_a_and_aaaa_only(rdtype):
    msg = read(block_reply(parse_query(query_bytes("www.chat.test", rdtype)), "null", 10))
    assert msg.rcode() == dns.rcode.NOERROR
    if rdtype in ("A", "AAAA"):
        assert [str(rd) for _, rd in _records(msg)] == ["0.0.0.0" if rdtype == "A" else "::"]
        assert msg.answer[0].ttl == 10
    else:
        assert not msg.answer and [r.rdtype for r in msg.authority] == [dns.rdatatype.SOA]


@pytest.mark.parametrize("rdtype,expected", [
    ("A", ["192.0.2.53", "192.0.2.54"]), ("AAAA", ["2001:db8::53"]), ("HTTPS", []), ("MX", []), ("TXT", []),
])
def test_sinkhole_answers_the_configured_addresses(rdtype, expected):
    msg = read(block_reply(parse_query(query_bytes("www.chat.test", rdtype)), "sinkhole", 30,
                           ("192.0.2.53", "192.0.2.54"), ("2001:db8::53",)))
    assert msg.rcode() == dns.rcode.NOERROR
    assert sorted(str(rd) for rrset in msg.answer for rd in rrset) == expected
    assert all(rrset.ttl == 30 for rrset in msg.answer)


@pytest.mark.parametrize("response", ["nxdomain", "nodata", "null", "sinkhole", "refused"])
@pytest.mark.parametrize("rdtype", ALL_TYPES)
def test_no_block_answer_leaks_an_address_hint(response, rdtype):
    msg = read(block_reply(parse_query(query_bytes("www.chat.test", rdtype)), response, 10,
                           ("192.0.2.53",), ("2001:db8::53",)))
    for kind, rd in _records(msg):
        if kind in ADDRESS_TYPES:
            assert kind == dns.rdatatype.from_text(rdtype)
            assert str(rd) in ("0.0.0.0", "::", "192.0.2.53", "2001:db8::53")


def test_refused_block():
    msg = read(block_reply(parse_query(query_bytes("www.chat.test")), "refused", 10))
    assert msg.rcode() == dns.rcode.REFUSED and not _records(msg)


def test_any_gets_the_rfc8482_hinfo():
    msg = read(wire.hinfo_reply(parse_query(query_bytes("x.test", "ANY"))))
    assert [r.rdtype for r in msg.answer] == [dns.rdatatype.HINFO]
    assert msg.answer[0][0].cpu == b"RFC8482"


# -- truncation ---------------------------------------------------------------------------------

def _big_reply(n: int) -> bytes:
    q = dns.message.make_query("big.test", "A")
    r = dns.message.make_response(q)
    r.answer.append(dns.rrset.from_text("big.test.", 300, "IN", "A", *[f"192.0.2.{i}" for i in range(1, n + 1)]))
    return r.to_wire()


@pytest.mark.parametrize("n,limit,truncated", [(10, 512, False), (40, 512, True), (40, 1232, False),
                                               (100, 1232, True), (100, 4096, False)])
def test_truncate(n, limit, truncated):
    data = _big_reply(n)
    out = truncate(data, limit)
    msg = read(out)
    assert len(out) <= limit
    assert bool(msg.flags & dns.flags.TC) == truncated
    assert (len(msg.answer[0]) if msg.answer else 0) == (0 if truncated else n)
    assert str(msg.question[0].name) == "big.test."


# -- upstream replies --------------------------------------------------------------------------

def _upstream(name, rdtype, build, qid=999):
    key = parse_query(query_bytes(name, rdtype)).key
    q = dns.message.make_query(name, rdtype)
    q.id = qid
    r = dns.message.make_response(q)
    build(r)
    return key, r.to_wire()


def _soa(r, ttl, minimum):
    r.authority.append(dns.rrset.from_text("test.", ttl, "IN", "SOA",
                                           f"ns.test. host.test. 1 3600 600 86400 {minimum}"))


@pytest.mark.parametrize("case,build,rcode,ttl", [
    ("min of answer TTLs", lambda r: (r.answer.append(dns.rrset.from_text("x.test.", 300, "IN", "A", "192.0.2.1")),
                                      r.answer.append(dns.rrset.from_text("x.test.", 60, "IN", "AAAA", "2001:db8::1"))),
     0, 60),
    ("nxdomain: SOA minimum below its TTL", lambda r: (r.set_rcode(dns.rcode.NXDOMAIN), _soa(r, 3600, 120)), 3, 120),
    ("nxdomain: SOA TTL below minimum", lambda r: (r.set_rcode(dns.rcode.NXDOMAIN), _soa(r, 30, 900)), 3, 30),
    ("nodata with SOA", lambda r: _soa(r, 600, 300), 0, 300),
    ("nxdomain without SOA: not cacheable", lambda r: r.set_rcode(dns.rcode.NXDOMAIN), 3, None),
    ("servfail: not cacheable", lambda r: r.set_rcode(dns.rcode.SERVFAIL), 2, None),
])
def test_reply_cache_ttl(case, build, rcode, ttl):
    key, data = _upstream("x.test", "A", build)
    reply = parse_reply(data, key, 999)
    assert (reply.rcode, reply.ttl) == (rcode, ttl), case


def test_reply_for_https_matches_its_question():
    key, data = _upstream("X.Test", "HTTPS", lambda r: _soa(r, 60, 60))
    assert parse_reply(data, key, 999).ttl == 60


@pytest.mark.parametrize("mutate,qid", [
    (lambda d: d, 1000),                                       # another ID
    (lambda d: d[:2] + bytes([d[2] & 0x7F]) + d[3:], 999),     # not a response
    (lambda d: d[:12] + b"\x01y" + d[14:], 999),               # another question
    (lambda d: d[:-3], 999),                                   # cut short
    (lambda d: d[:11], 999),
])
def test_reply_that_does_not_match_is_rejected(mutate, qid):
    key, data = _upstream("x.test", "A", lambda r: r.answer.append(
        dns.rrset.from_text("x.test.", 300, "IN", "A", "192.0.2.1")))
    with pytest.raises(WireError):
        parse_reply(mutate(data), key, qid)


def test_cname_targets_are_collected_lower_case():
    def build(r):
        r.answer.append(dns.rrset.from_text("x.test.", 300, "IN", "CNAME", "Hop.Example.TEST."))
        r.answer.append(dns.rrset.from_text("hop.example.test.", 300, "IN", "CNAME", "tracker.chat.test."))
        r.answer.append(dns.rrset.from_text("tracker.chat.test.", 300, "IN", "A", "192.0.2.66"))
    key, data = _upstream("x.test", "A", build)
    assert parse_reply(data, key, 999).cnames == ("hop.example.test", "tracker.chat.test")


@pytest.mark.parametrize("age,cap,expected", [(0, None, [300, 60]), (50, None, [250, 10]),
                                              (100, None, [200, 0]), (0, 30, [30, 30]), (40, 30, [30, 20])])
def test_build_reply_counts_ttls_down_and_caps_them(age, cap, expected):
    def build(r):
        r.answer.append(dns.rrset.from_text("x.test.", 300, "IN", "A", "192.0.2.1"))
        r.answer.append(dns.rrset.from_text("x.test.", 60, "IN", "AAAA", "2001:db8::1"))
    key, data = _upstream("x.test", "A", build)
    reply = parse_reply(data, key, 999)
    client = parse_query(query_bytes("X.TEST", "A", use_edns=0))
    msg = read(build_reply(client, reply, age, cap))
    assert msg.id == 4242 and str(msg.question[0].name) == "X.TEST."
    assert [rrset.ttl for rrset in msg.answer] == expected
    assert msg.edns == 0
