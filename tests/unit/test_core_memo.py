"""core.begin's memo: the same bytes from the same group skip parsing and deciding, but only for
decisions no clock or client can change; every answer still carries its own query ID."""
import gc

import dns.message
import dns.rrset
import pytest

from helpers import write_blocklists
from resolver import core
from resolver.cache import Cache
from resolver.loader import load_policy
from resolver.wire import parse_query, parse_reply

SERVICES = {
    "chat": {"description": "c", "sources": {"t": "t"}, "domains": [{"name": "chat.test", "source": "t"}]},
    "drive": {"description": "d", "sources": {"t": "t"}, "domains": [{"name": "drive.test", "source": "t"}]},
}
POLICY = {
    "groups": {"desktop": {"subnets": ["10.1.0.0/16"], "block": ["chat", "drive"]},
               "mobile": {"subnets": ["10.2.0.0/16"], "block": []}},
    "default_group": "mobile", "allowed_clients": ["10.0.0.0/8"],
    "exemptions": [{"id": "EX-1", "clients": ["10.1.0.99"], "services": ["drive"], "approved_by": "head",
                    "reason": "r", "starts": "2030-01-01T00:00:00+00:00", "expires": "2030-01-02T00:00:00+00:00"}],
}
IN_WINDOW = 1893456000 + 3600          # 2030-01-01T01:00Z


@pytest.fixture
def policy(tmp_path):
    return load_policy(write_blocklists(tmp_path / "bl", POLICY, SERVICES))


def wire(name, qid):
    q = dns.message.make_query(name, "A")
    q.id = qid
    return q.to_wire()


def test_same_bytes_new_id_each_answer_its_own(policy):
    ctx = core.Context(Cache(100))
    for qid in (1, 2, 65535):
        step = core.begin(wire("www.chat.test", qid), "10.2.0.5", policy, ctx, 0)     # mobile: forward
        assert isinstance(step, core.Forward) and step.query.id == qid and step.query.qname == "www.chat.test"
    assert len(policy.memo("mobile")) == 1


def test_memo_values_are_plain_tuples_the_collector_stops_tracking(policy):
    ctx = core.Context(Cache(100))
    core.begin(wire("www.example.test", 1), "10.2.0.5", policy, ctx, 0)
    gc.collect()
    (value,) = policy.memo("mobile").values()
    assert type(value) is tuple and not gc.is_tracked(value)


def test_blocks_are_not_memoised_but_marked_reusable_for_the_snapshot(policy):
    ctx = core.Context(Cache(100))
    for qid in (1, 2):
        reply, out = core.begin(wire("www.chat.test", qid), "10.1.0.5", policy, ctx, 0)
        assert dns.message.from_wire(reply).id == qid and out.service == "chat"
        assert out.reuse_until == core.FOREVER
    assert policy.memo("desktop") == {}


def test_a_service_with_an_exemption_is_never_memoised_nor_reused(policy):
    ctx = core.Context(Cache(100))
    before, out = core.begin(wire("www.drive.test", 7), "10.1.0.99", policy, ctx, 0)
    assert dns.message.from_wire(before).rcode() == 3               # before the window: blocked
    assert out.reuse_until == 0                                      # but the clock can change that
    step = core.begin(wire("www.drive.test", 8), "10.1.0.99", policy, ctx, IN_WINDOW)
    assert isinstance(step, core.Forward) and step.decision.exemption.id == "EX-1"
    assert policy.memo("desktop") == {}


def test_groups_have_separate_memos(policy):
    ctx = core.Context(Cache(100))
    core.begin(wire("www.chat.test", 1), "10.2.0.5", policy, ctx, 0)
    reply, out = core.begin(wire("www.chat.test", 1), "10.1.0.5", policy, ctx, 0)
    assert out.action == "blocked"                                  # desktop: not the mobile's forward


def test_memo_is_bounded(policy):
    ctx = core.Context(Cache(100))
    for i in range(policy.MEMO_MAX + 5):
        core.begin(wire(f"n{i}.example.test", 1), "10.2.0.5", policy, ctx, 0)
    assert len(policy.memo("mobile")) <= policy.MEMO_MAX


def test_no_memo_and_no_reuse_when_ecs_can_name_the_client(policy):
    ctx = core.Context(Cache(100), ecs_from=lambda client: True)
    core.begin(wire("www.example.test", 1), "10.2.0.5", policy, ctx, 0)
    _, out = core.begin(wire("www.chat.test", 1), "10.1.0.5", policy, ctx, 0)
    assert policy.memo("mobile") == {} and out.reuse_until == 0


def test_remembered_answers_are_bounded_plain_tuples_per_group(policy):
    policy.remember("10.1.0.5", "desktop", b"k", (b"tail", 1.0, ("desktop", "A"), "mid", True,
                                                       (b"key", b"body", 30)))
    gc.collect()
    table = policy.answer_tables["10.1.0.5"]
    assert table[b"k"][0] == b"tail" and not gc.is_tracked(table[b"k"])
    for i in range(policy.ANSWERS_MAX + 10):
        policy.remember("10.1.0.6", "desktop", b"%d" % i, (b"t", 1.0, None, "m", False, None))
    assert len(table) <= policy.ANSWERS_MAX and policy.answer_tables["10.1.0.6"] is table


# -- core.renew: a remembered cache answer brought to a later second ----------------------------
T0 = 1_000_000.25


def upstream_reply(query_wire: bytes, kind: str):
    """A real upstream Reply for the query: a CNAME chain (TTLs 300 and 120) or a NODATA answer
    with the zone's SOA (RFC 2308: negative TTL 60)."""
    q = dns.message.from_wire(query_wire)
    r = dns.message.make_response(q)
    name = q.question[0].name.to_text()
    if kind == "chain":
        r.answer.append(dns.rrset.from_text(name, 300, "IN", "CNAME", "edge.cdn.test."))
        r.answer.append(dns.rrset.from_text("edge.cdn.test.", 120, "IN", "A", "192.0.2.7", "192.0.2.8"))
    else:
        r.authority.append(dns.rrset.from_text("example.test.", 3600, "IN", "SOA",
                                               "ns.example.test. h.example.test. 1 3600 600 86400 60"))
    key = parse_query(query_wire).key
    return key, parse_reply(r.to_wire(), key, q.id)


def remembered(policy, ctx, data, now):
    """What the server keeps for a cache answer (core.keep, as server._udp_loop calls it)."""
    answer, out = core.begin(data, "10.2.0.5", policy, ctx, now)
    assert out.action == "cached" and out.renewal is not None and out.reuse_until == int(now - T0) + T0 + 1
    entry = core.keep(answer, out, ("mobile", "cached"), "middle", out.renewal)
    assert entry[0] == answer[2:] and entry[1] == out.reuse_until and entry[4] is True
    return entry


def ttls(answer_less_id: bytes) -> list[int]:
    m = dns.message.from_wire(b"\x00\x07" + answer_less_id)
    return [rrset.ttl for section in (m.answer, m.authority) for rrset in section]


@pytest.mark.parametrize("edns", [False, True], ids=["plain", "edns"])
@pytest.mark.parametrize("kind", ["chain", "nodata"])
def test_a_renewed_cache_answer_is_the_answer_the_whole_way_gives_then(policy, kind, edns):
    data = dns.message.make_query("www.example.test", "A", use_edns=0 if edns else False).to_wire()
    ctx = core.Context(Cache(100))
    key, upstream = upstream_reply(data, kind)
    assert ctx.cache.put(key, upstream, T0)
    entry = remembered(policy, ctx, data, T0 + 0.5)
    first = ttls(entry[0])
    for later in (T0 + 1.0, T0 + 1.7, T0 + 2.0, T0 + 37.9, T0 + 59.99):
        renewed = core.renew(entry, ctx.cache, later)
        fresh, out = core.begin(data, "10.2.0.5", policy, ctx, later)      # the whole way, for comparison
        assert renewed[0] == fresh[2:] and renewed[1] == out.reuse_until
        assert renewed[2:] == entry[2:]                 # signature, log middle, cached, renewal unchanged
        age = int(later - T0)
        assert ttls(renewed[0]) == [max(t - age, 0) for t in first]
        entry = renewed


def test_renewal_ends_when_the_cache_lets_the_reply_go(policy):
    data = wire("www.example.test", 1)
    key, upstream = upstream_reply(data, "nodata")      # cached for 60 s
    for let_go in ("expired", "cleared", "replaced", "evicted"):
        ctx = core.Context(Cache(1))
        ctx.cache.put(key, upstream, T0)
        entry = remembered(policy, ctx, data, T0)
        later = T0 + 5.5
        if let_go == "expired":
            later = T0 + 60
        elif let_go == "cleared":
            ctx.cache.clear()
        elif let_go == "replaced":                      # the same name cached again, a new reply
            ctx.cache.put(key, upstream_reply(data, "nodata")[1], T0 + 5)
        else:
            ctx.cache.put(*upstream_reply(wire("other.example.test", 1), "nodata"), T0 + 5)
        assert core.renew(entry, ctx.cache, later) is None, let_go
        requests = ctx.cache.requests
        assert core.renew(entry, ctx.cache, later) is None and ctx.cache.requests == requests   # counts nothing
