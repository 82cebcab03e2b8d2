"""resolver/cache.py: bounded LRU, TTLs that count down, RFC 2308 negative caching, serve-stale."""
from __future__ import annotations

import dns.message
import dns.rcode
import dns.rrset
import pytest

from resolver.cache import Cache
from resolver.wire import build_reply, parse_query, parse_reply

T0 = 1_000_000.0


def reply(name="x.test", ttl=300, rcode=0, soa=None):
    """An upstream Reply for `name` A: an answer with `ttl`, or an `rcode` with an SOA (ttl, minimum)."""
    q = dns.message.make_query(name, "A")
    q.id = 1
    r = dns.message.make_response(q)
    r.set_rcode(rcode)
    if rcode == 0 and soa is None:
        r.answer.append(dns.rrset.from_text(name + ".", ttl, "IN", "A", "192.0.2.1"))
    if soa is not None:
        r.authority.append(dns.rrset.from_text("test.", soa[0], "IN", "SOA",
                                               f"ns.test. h.test. 1 3600 600 86400 {soa[1]}"))
    key = parse_query(q.to_wire()).key
    return key, parse_reply(r.to_wire(), key, 1)


def test_fresh_entry_is_returned_with_its_age_until_it_expires():
    c = Cache()
    key, r = reply(ttl=300)
    assert c.put(key, r, T0)
    assert c.get(key, T0) == (r, 0, T0 + 1)
    assert c.get(key, T0 + 120.7) == (r, 120, T0 + 121)     # the age holds until the next second
    assert c.get(key, T0 + 299.9)[1:] == (299, T0 + 300)     # and never past the expiry
    assert c.get(key, T0 + 300) is None
    assert len(c) == 0


def test_ttl_counts_down_in_the_answer():
    c = Cache()
    key, r = reply(ttl=300)
    c.put(key, r, T0)
    cached, age, _ = c.get(key, T0 + 100)
    client = parse_query(dns.message.make_query("x.test", "A").to_wire())
    assert dns.message.from_wire(build_reply(client, cached, age)).answer[0].ttl == 200


@pytest.mark.parametrize("case,kwargs,rcode,soa,stored_for", [
    ("nxdomain: SOA minimum", {}, dns.rcode.NXDOMAIN, (3600, 120), 120),
    ("nxdomain: SOA TTL", {}, dns.rcode.NXDOMAIN, (45, 900), 45),
    ("nodata: SOA minimum", {}, dns.rcode.NOERROR, (3600, 300), 300),
    ("negative capped", {"negative_max_ttl": 60}, dns.rcode.NXDOMAIN, (3600, 3600), 60),
    ("nxdomain without SOA", {}, dns.rcode.NXDOMAIN, None, None),
    ("servfail", {}, dns.rcode.SERVFAIL, None, None),
    ("TTL 0", {}, dns.rcode.NXDOMAIN, (0, 0), None),
])
def test_negative_caching_rfc2308(case, kwargs, rcode, soa, stored_for):
    c = Cache(**kwargs)
    key, r = reply(rcode=rcode, soa=soa)
    assert c.put(key, r, T0) == (stored_for is not None), case
    if stored_for is not None:
        assert c.get(key, T0 + stored_for - 0.5) is not None, case
        assert c.get(key, T0 + stored_for) is None, case
    else:
        assert c.get(key, T0) is None


@pytest.mark.parametrize("kwargs,ttl,stored_for", [
    ({"max_ttl": 100}, 300, 100),
    ({"min_ttl": 60}, 5, 60),
    ({}, 86400 * 7, 86400),
])
def test_min_and_max_ttl(kwargs, ttl, stored_for):
    c = Cache(**kwargs)
    key, r = reply(ttl=ttl)
    c.put(key, r, T0)
    assert c.get(key, T0 + stored_for - 1) is not None
    assert c.get(key, T0 + stored_for) is None


def test_lru_is_bounded_and_evicts_the_least_recently_used():
    c = Cache(size=3)
    entries = [reply(f"n{i}.test") for i in range(4)]
    for key, r in entries[:3]:
        c.put(key, r, T0)
    assert c.get(entries[0][0], T0 + 1) is not None     # n0 is now the most recent
    c.put(*entries[3], T0 + 2)
    assert len(c) == 3
    assert c.get(entries[1][0], T0 + 3) is None          # n1 was the least recently used
    assert all(c.get(k, T0 + 3) is not None for k in (entries[0][0], entries[2][0], entries[3][0]))


def test_size_zero_stores_nothing():
    c = Cache(size=0)
    key, r = reply()
    assert not c.put(key, r, T0) and len(c) == 0


def test_keys_differ_by_type_and_not_by_case():
    c = Cache()
    key, r = reply()
    c.put(key, r, T0)
    upper = parse_query(dns.message.make_query("X.TEST", "A").to_wire()).key
    https = parse_query(dns.message.make_query("x.test", "HTTPS").to_wire()).key
    assert c.get(upper, T0) is not None
    assert c.get(https, T0) is None


def test_stale_answers_only_inside_the_window():
    c = Cache(stale_ttl=600)
    key, r = reply(ttl=60)
    c.put(key, r, T0)
    assert c.get(key, T0 + 61) is None                   # expired: not served as fresh
    assert c.get_stale(key, T0 + 61) is r
    assert c.get_stale(key, T0 + 659) is r
    assert c.get_stale(key, T0 + 660) is None
    no_stale = Cache()
    no_stale.put(key, r, T0)
    assert no_stale.get_stale(key, T0 + 61) is None


def test_reused_answers_count_as_lookups_that_hit():
    c = Cache()
    key, r = reply()
    c.put(key, r, T0)
    c.get(key, T0)
    c.get(b"other", T0)
    assert (c.requests, c.hits) == (2, 1)
    c.reused(5)
    assert (c.requests, c.hits) == (7, 6)
