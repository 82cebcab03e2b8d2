"""The resolver as a real server on loopback port 0, a real upstream (dnsmasq, or a small dnslib
server where dnsmasq cannot misbehave on purpose), and dnspython/dig as independent clients.

Source addresses stand for subnets: 127.0.1.x desktop, 127.0.2.x mobile, and one group per
response kind (see POLICY). Queries from 127.0.9.x are outside allowed_clients.
"""
from __future__ import annotations

import socket
import struct
import subprocess

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dnslib
import pytest

from helpers import (TEST_SERVICES, Dnsmasq, PyUpstream, Sinkhole, ask, free_port, have, have_ipv6_loopback,
                     write_blocklists, zone_answer)

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not have("dnsmasq"), reason="needs dnsmasq (Debian dnsmasq-base)")]

POLICY = {
    "groups": {
        "desktop": {"subnets": ["127.0.1.0/24"], "block": ["chat", "encrypted-dns"], "response": "nxdomain"},
        "lab": {"subnets": ["127.0.1.128/25"], "block": ["chat"], "response": "nodata"},
        "mobile": {"subnets": ["127.0.2.0/24"], "block": []},
        "nulls": {"subnets": ["127.0.3.0/24"], "block": ["chat", "encrypted-dns"], "response": "null"},
        "sinks": {"subnets": ["127.0.4.0/24"], "block": ["chat"], "response": "sinkhole",
                  "sinkhole": ["192.0.2.53", "2001:db8::53"]},
        "refusers": {"subnets": ["127.0.5.0/24"], "block": ["chat"], "response": "refused"},
        "slow": {"subnets": ["127.0.6.0/24"], "block": ["chat"], "block_ttl": 42},
    },
    "default_group": "mobile",
    "allowed_clients": ["127.0.0.1/32", "127.0.1.0/24", "127.0.2.0/24", "127.0.3.0/24", "127.0.4.0/24",
                        "127.0.5.0/24", "127.0.6.0/24", "::1/128"],
}
DESKTOP, LAB, MOBILE, NULLS, SINKS, REFUSERS, SLOW, OUTSIDER = (
    "127.0.1.5", "127.0.1.200", "127.0.2.5", "127.0.3.5", "127.0.4.5", "127.0.5.5", "127.0.6.5", "127.0.9.9")

HINT = "00010000040004c000020a"          # SVCB/HTTPS: priority 1, target ".", ipv4hint 192.0.2.10
RECORDS = [
    "--host-record=www.chat.test,192.0.2.10,2001:db8::10",
    "--host-record=chat.test,192.0.2.11",
    "--host-record=help.chat.test,192.0.2.12",
    "--host-record=exact.other.test,192.0.2.13",
    "--host-record=www.exact.other.test,192.0.2.14",
    "--host-record=file-abc.files.test,192.0.2.15",
    "--host-record=www.example.test,192.0.2.20,2001:db8::20",
    f"--dns-rr=www.chat.test,65,{HINT}", f"--dns-rr=www.chat.test,64,{HINT}",
    f"--dns-rr=www.example.test,65,{HINT}",
    "--txt-record=www.chat.test,chat text", "--mx-host=www.chat.test,mail.example.test,10",
    "--srv-host=_xmpp._tcp.www.chat.test,www.chat.test,5222",
    "--host-record=tracker.chat.test,192.0.2.66",
    "--cname=cloak.example.test,tracker.chat.test",
    "--cname=cloak2.example.test,tracker.chat.test",
    "--host-record=use-application-dns.net,192.0.2.77",
    "--host-record=mask.icloud.com,192.0.2.78",
    "--host-record=doh.test,192.0.2.79",
    "--address=/nx.example.test/",
] + [f"--host-record=big.example.test,192.0.2.{i}" for i in range(1, 101)] \
  + [f"--host-record=mid.example.test,192.0.2.{i}" for i in range(1, 41)]

QTYPES = ["A", "AAAA", "HTTPS", "SVCB", "MX", "TXT", "ANY", "SRV", "CNAME", "NS", "CAA", "SOA"]
ADDRESSY = {dns.rdatatype.A, dns.rdatatype.AAAA, dns.rdatatype.HTTPS, dns.rdatatype.SVCB}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """One dnsmasq upstream and one sinkhole for the tests that only ask questions."""
    tmp = tmp_path_factory.mktemp("world")
    blocklists = write_blocklists(tmp / "blocklists", POLICY, TEST_SERVICES)
    with Dnsmasq(RECORDS) as upstream, \
         Sinkhole(tmp, {"upstreams": [upstream.address], "blocklists": str(blocklists)}) as server:
        yield server


def query(server, name, rdtype="A", source=None, edns=None, payload=1232, tcp=False):
    """dnspython with explicit EDNS: edns=None sends a query without an OPT record."""
    q = (dns.message.make_query(name, rdtype) if edns is None
         else dns.message.make_query(name, rdtype, use_edns=edns, payload=payload))
    host, port = server.host, server.port
    if tcp:
        return dns.query.tcp(q, host, port=port, timeout=5, source=source)
    return dns.query.udp(q, host, port=port, timeout=5, source=source)


def addresses(msg):
    return sorted(str(rd) for rrset in msg.answer for rd in rrset
                  if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA))


def soa_ttl(msg):
    soas = [rrset for rrset in msg.authority if rrset.rdtype == dns.rdatatype.SOA]
    assert len(soas) == 1, msg
    return soas[0].ttl


# -- response kinds ------------------------------------------------------------------------------

def test_mobile_is_forwarded(world):
    r = query(world, "www.chat.test", "A", MOBILE)
    assert r.rcode() == dns.rcode.NOERROR and addresses(r) == ["192.0.2.10"]


def test_nxdomain_with_soa_and_default_ttl(world):
    r = query(world, "www.chat.test", "A", DESKTOP)
    assert r.rcode() == dns.rcode.NXDOMAIN and not r.answer
    assert soa_ttl(r) == 10


def test_nodata_longest_prefix_group(world):
    r = query(world, "www.chat.test", "A", LAB)        # 127.0.1.200: the /25 inside desktop's /24
    assert r.rcode() == dns.rcode.NOERROR and not r.answer
    assert soa_ttl(r) == 10


@pytest.mark.parametrize("rdtype,expected", [("A", ["0.0.0.0"]), ("AAAA", ["::"])])
def test_null(world, rdtype, expected):
    r = query(world, "www.chat.test", rdtype, NULLS)
    assert r.rcode() == dns.rcode.NOERROR and addresses(r) == expected
    assert r.answer[0].ttl == 10


@pytest.mark.parametrize("rdtype,expected", [("A", ["192.0.2.53"]), ("AAAA", ["2001:db8::53"])])
def test_sinkhole(world, rdtype, expected):
    r = query(world, "www.chat.test", rdtype, SINKS)
    assert r.rcode() == dns.rcode.NOERROR and addresses(r) == expected


def test_refused_response(world):
    r = query(world, "www.chat.test", "A", REFUSERS)
    assert r.rcode() == dns.rcode.REFUSED and not r.answer
    assert addresses(query(world, "www.example.test", "A", REFUSERS)) == ["192.0.2.20"]


def test_configured_block_ttl(world):
    assert soa_ttl(query(world, "www.chat.test", "A", SLOW)) == 42


@pytest.mark.parametrize("name", ["www.chat.test", "www.example.test", "nx.example.test"])
def test_outside_allowed_clients_refused(world, name):
    r = query(world, name, "A", OUTSIDER)
    assert r.rcode() == dns.rcode.REFUSED and not r.answer and not r.authority


# -- every query type for a blocked name -----------------------------------------------------------

@pytest.mark.parametrize("rdtype", QTYPES)
@pytest.mark.parametrize("source", [DESKTOP, LAB, NULLS, SINKS, REFUSERS])
def test_every_qtype_is_blocked_without_an_address_leak(world, source, rdtype):
    r = query(world, "www.chat.test", rdtype, source, edns=0)
    for section in (r.answer, r.authority, r.additional):
        for rrset in section:
            assert rrset.rdtype in ADDRESSY | {dns.rdatatype.SOA}, rrset
            if rrset.rdtype in ADDRESSY:
                assert rrset.rdtype == dns.rdatatype.from_text(rdtype)
                assert {str(rd) for rd in rrset} <= {"0.0.0.0", "::", "192.0.2.53", "2001:db8::53"}
    assert r.rcode() in (dns.rcode.NXDOMAIN, dns.rcode.NOERROR, dns.rcode.REFUSED)


@pytest.mark.parametrize("rdtype", ["HTTPS", "SVCB", "MX", "TXT", "SRV"])
def test_the_upstream_has_what_the_block_hides(world, rdtype):
    """The other side of the leak test: mobile gets these records, so the block really hides them."""
    name = "_xmpp._tcp.www.chat.test" if rdtype == "SRV" else "www.chat.test"
    assert query(world, name, rdtype, MOBILE).answer
    assert query(world, name, rdtype, DESKTOP).rcode() == dns.rcode.NXDOMAIN


# -- matching over the wire ------------------------------------------------------------------------

@pytest.mark.parametrize("name,blocked", [
    ("WWW.Chat.TEST.", True), ("chat.test", True), ("help.chat.test", False), ("exact.other.test", True),
    ("www.exact.other.test", False), ("file-abc.files.test", True), ("www.example.test", False),
])
def test_matching(world, name, blocked):
    r = query(world, name, "A", DESKTOP)
    assert (r.rcode() == dns.rcode.NXDOMAIN) == blocked
    if not blocked:
        assert addresses(r)
    assert str(r.question[0].name) == (name if name.endswith(".") else name + ".")   # case kept


@pytest.mark.parametrize("name,rdtype,rcode", [
    ("use-application-dns.net", "A", dns.rcode.NXDOMAIN), ("mask.icloud.com", "A", dns.rcode.NXDOMAIN),
    ("mask-h2.icloud.com", "AAAA", dns.rcode.NXDOMAIN), ("_dns.resolver.arpa", "SVCB", dns.rcode.NOERROR),
])
@pytest.mark.parametrize("source", [DESKTOP, NULLS])
def test_built_ins(world, name, rdtype, rcode, source):
    """Built-ins answer their own way in any group that blocks encrypted-dns, even a null group."""
    r = query(world, name, rdtype, source)
    assert r.rcode() == rcode and not r.answer
    soa_ttl(r)


def test_built_ins_are_only_for_groups_blocking_encrypted_dns(world):
    assert addresses(query(world, "use-application-dns.net", "A", MOBILE)) == ["192.0.2.77"]
    assert addresses(query(world, "use-application-dns.net", "A", SINKS)) == ["192.0.2.77"]


# -- CNAME cloaking ------------------------------------------------------------------------------

def test_cname_cloaking_forwarded_path(world):
    r = query(world, "cloak.example.test", "A", DESKTOP)
    assert r.rcode() == dns.rcode.NXDOMAIN and not r.answer
    assert addresses(query(world, "cloak.example.test", "A", SINKS)) == ["192.0.2.53"]
    mobile = query(world, "cloak.example.test", "A", MOBILE)
    assert addresses(mobile) == ["192.0.2.66"]
    assert any(rrset.rdtype == dns.rdatatype.CNAME for rrset in mobile.answer)


def test_cname_cloaking_cached_path(world):
    """Mobile fills the shared cache first; the desktop's cache hit is re-checked all the same."""
    assert addresses(query(world, "cloak2.example.test", "A", MOBILE)) == ["192.0.2.66"]
    assert query(world, "cloak2.example.test", "A", DESKTOP).rcode() == dns.rcode.NXDOMAIN


# -- TCP -----------------------------------------------------------------------------------------

def test_tcp(world):
    assert query(world, "www.chat.test", "A", DESKTOP, tcp=True).rcode() == dns.rcode.NXDOMAIN
    assert addresses(query(world, "www.example.test", "AAAA", MOBILE, tcp=True)) == ["2001:db8::20"]
    assert query(world, "www.chat.test", "A", OUTSIDER, tcp=True).rcode() == dns.rcode.REFUSED


def test_tcp_pipelined_queries_on_one_connection(world):
    """RFC 7766: several queries written at once on one connection, each answered by its ID."""
    names = [("www.chat.test", 11), ("www.example.test", 12), ("cloak.example.test", 13),
             ("help.chat.test", 14), ("nx.example.test", 15)]
    wire = b""
    for name, qid in names:
        q = dns.message.make_query(name, "A")
        q.id = qid
        data = q.to_wire()
        wire += struct.pack("!H", len(data)) + data
    answers = {}
    with socket.create_connection((world.host, world.port), timeout=5, source_address=(DESKTOP, 0)) as s:
        s.sendall(wire)
        for _ in names:
            size = struct.unpack("!H", _recv(s, 2))[0]
            msg = dns.message.from_wire(_recv(s, size))
            answers[msg.id] = msg
    assert sorted(answers) == [11, 12, 13, 14, 15]
    assert answers[11].rcode() == dns.rcode.NXDOMAIN
    assert addresses(answers[12]) == ["192.0.2.20"]
    assert answers[13].rcode() == dns.rcode.NXDOMAIN
    assert addresses(answers[14]) == ["192.0.2.12"]
    assert answers[15].rcode() == dns.rcode.NXDOMAIN and str(answers[15].question[0].name) == "nx.example.test."


def _recv(sock, n):
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        assert chunk, "connection closed early"
        buf += chunk
    return buf


@pytest.mark.skipif(not have("dig"), reason="needs dig (Debian dnsutils)")
def test_dig_over_tcp(world):
    out = subprocess.run(["dig", "+tcp", "+tries=1", "+time=5", "-b", DESKTOP, "-p", str(world.port),
                          f"@{world.host}", "www.chat.test", "A"], capture_output=True, text=True, timeout=30)
    assert "status: NXDOMAIN" in out.stdout, out.stdout
    assert "sinkhole.invalid." in out.stdout                 # the SOA, for negative caching
    out = subprocess.run(["dig", "+tcp", "+short", "+tries=1", "+time=5", "-b", MOBILE, "-p", str(world.port),
                          f"@{world.host}", "www.example.test", "A"], capture_output=True, text=True, timeout=30)
    assert out.stdout.split() == ["192.0.2.20"]


# -- truncation ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name,edns,payload,count", [
    ("mid.example.test", None, None, 0),       # 40 A records: over 512 without EDNS
    ("mid.example.test", 0, 1232, 40),
    ("big.example.test", 0, 1232, 0),          # 100 A records: over 1232
    ("big.example.test", 0, 4096, 100),        # dnsmasq truncated it at 1232: fetched again over TCP
])
def test_udp_truncation(world, name, edns, payload, count):
    r = query(world, name, "A", MOBILE, edns=edns, payload=payload)
    assert bool(r.flags & dns.flags.TC) == (count == 0)
    assert len(addresses(r)) == count
    assert str(r.question[0].name) == name + "."


@pytest.mark.parametrize("name,count", [("mid.example.test", 40), ("big.example.test", 100)])
def test_tcp_is_never_truncated(world, name, count):
    r = query(world, name, "A", MOBILE, tcp=True)
    assert not r.flags & dns.flags.TC and len(addresses(r)) == count


# -- upstreams: failure, failover, TCP retry, query types ----------------------------------------

@pytest.fixture
def blocklists_dir(tmp_path):
    return write_blocklists(tmp_path / "blocklists", POLICY, TEST_SERVICES)


def test_dead_upstream_is_servfail_never_nxdomain(tmp_path, blocklists_dir):
    dead = f"127.0.0.1:{free_port()}"          # nothing listens there: ICMP port unreachable
    with Sinkhole(tmp_path, {"upstreams": [dead], "blocklists": str(blocklists_dir),
                             "upstream_timeout": 0.3}) as server:
        for rdtype in ("A", "AAAA", "MX"):
            r = query(server, "www.example.test", rdtype, MOBILE)
            assert r.rcode() == dns.rcode.SERVFAIL and not r.answer
        assert query(server, "www.example.test", "A", MOBILE, tcp=True).rcode() == dns.rcode.SERVFAIL
        # blocks need no upstream
        assert query(server, "www.chat.test", "A", DESKTOP).rcode() == dns.rcode.NXDOMAIN


def test_silent_upstream_times_out_to_servfail(tmp_path, blocklists_dir):
    with PyUpstream(lambda request, transport: None) as silent, \
         Sinkhole(tmp_path, {"upstreams": [silent.address], "blocklists": str(blocklists_dir),
                             "upstream_timeout": 0.3}) as server:
        assert query(server, "www.example.test", "A", MOBILE).rcode() == dns.rcode.SERVFAIL
        assert silent.asked("www.example.test")


def test_next_upstream_on_timeout_and_on_servfail(tmp_path, blocklists_dir):
    def servfail(request, transport):
        reply = request.reply()
        reply.header.rcode = dnslib.RCODE.SERVFAIL
        return reply

    with PyUpstream(lambda request, transport: None) as silent, PyUpstream(servfail) as failing, \
         Dnsmasq(RECORDS) as good, \
         Sinkhole(tmp_path, {"upstreams": [silent.address, failing.address, good.address],
                             "blocklists": str(blocklists_dir), "upstream_timeout": 0.3}) as server:
        r = query(server, "www.example.test", "A", MOBILE)
        assert r.rcode() == dns.rcode.NOERROR and addresses(r) == ["192.0.2.20"]
        assert silent.asked("www.example.test") and failing.asked("www.example.test")


ZONE = "\n".join(["many.example.test. 300 IN A 192.0.2.%d" % i for i in range(1, 201)]
                 + ["www.example.test. 300 IN A 192.0.2.20",
                    "www.example.test. 300 IN HTTPS 1 . alpn=h2"])


def test_truncated_upstream_answer_is_fetched_over_tcp(tmp_path, blocklists_dir):
    with PyUpstream(zone_answer(ZONE), truncate_udp=True) as upstream, \
         Sinkhole(tmp_path, {"upstreams": [upstream.address], "blocklists": str(blocklists_dir)}) as server:
        r = query(server, "many.example.test", "A", MOBILE, tcp=True)
        assert len(addresses(r)) == 200
        assert [t for t, _, _ in upstream.asked("many.example.test")] == ["udp", "tcp"]


def test_https_query_reaches_the_upstream_as_https(tmp_path, blocklists_dir):
    with PyUpstream(zone_answer(ZONE)) as upstream, \
         Sinkhole(tmp_path, {"upstreams": [upstream.address], "blocklists": str(blocklists_dir)}) as server:
        r = query(server, "WWW.Example.Test", "HTTPS", MOBILE, edns=0)
        assert r.rcode() == dns.rcode.NOERROR
        assert [rrset.rdtype for rrset in r.answer] == [dns.rdatatype.HTTPS]
        assert [q for _, _, q in upstream.asked("www.example.test")] == ["HTTPS"]


@pytest.mark.parametrize("rdtype", QTYPES)
def test_blocked_and_built_in_names_never_reach_the_upstream(tmp_path, blocklists_dir, rdtype):
    with PyUpstream(zone_answer(ZONE)) as upstream, \
         Sinkhole(tmp_path, {"upstreams": [upstream.address], "blocklists": str(blocklists_dir)}) as server:
        for name in ("www.chat.test", "use-application-dns.net", "mask.icloud.com", "_dns.resolver.arpa",
                     "doh.test"):
            query(server, name, rdtype, DESKTOP)
        query(server, "www.example.test", "A", DESKTOP)           # the one name that is forwarded
        asked = {name for _, name, _ in upstream.queries}
    assert asked == {"www.example.test"}


# -- IPv6 listener -------------------------------------------------------------------------------

@pytest.mark.skipif(not have_ipv6_loopback(), reason="no IPv6 loopback (::1)")
def test_ipv6_listener(tmp_path):
    policy = dict(POLICY, groups=dict(POLICY["groups"], desktop=dict(
        POLICY["groups"]["desktop"], subnets=["127.0.1.0/24", "::1/128"])))
    blocklists = write_blocklists(tmp_path / "blocklists", policy, TEST_SERVICES)
    with Dnsmasq(RECORDS) as upstream, \
         Sinkhole(tmp_path, {"listen": ["[::1]:0", "127.0.0.1:0"], "upstreams": [upstream.address],
                             "blocklists": str(blocklists)}) as server:
        assert server.addresses[0][0] == "::1" and server.addresses[0][1] > 0
        blocked = query(server, "www.chat.test", "AAAA")
        assert blocked.rcode() == dns.rcode.NXDOMAIN
        assert addresses(query(server, "www.example.test", "AAAA")) == ["2001:db8::20"]
        assert addresses(query(server, "www.example.test", "A", tcp=True)) == ["192.0.2.20"]
        v4 = ask(server.addresses[1], "www.chat.test", source=MOBILE)
        assert addresses(v4) == ["192.0.2.10"]
