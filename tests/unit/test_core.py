"""resolver/core.py: the processing order, with a real policy, a real cache and bytes on both sides."""
from __future__ import annotations

import dns.message
import dns.rcode
import dns.rrset
import pytest

from helpers import TEST_POLICY, TEST_SERVICES, write_blocklists
from resolver import core
from resolver.cache import Cache
from resolver.loader import load_policy
from resolver.wire import parse_reply

T0 = 1_800_000_000.0
DESKTOP, MOBILE = "127.0.1.5", "127.0.2.5"


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    return load_policy(write_blocklists(tmp_path_factory.mktemp("bl"), TEST_POLICY, TEST_SERVICES))


def q(name, rdtype="A"):
    return dns.message.make_query(name, rdtype).to_wire()


def upstream_reply(fwd, *rrsets):
    """What an upstream would answer to the Forward's question (the ID the upstream query used)."""
    m = dns.message.make_query(fwd.query.qname, fwd.query.qtype)
    m.id = 77
    r = dns.message.make_response(m)
    for text in rrsets:
        r.answer.append(dns.rrset.from_text(*text))
    return parse_reply(r.to_wire(), fwd.query.key, 77)


CLOAKED = [("cloak.example.test.", 60, "IN", "CNAME", "tracker.chat.test."),
           ("tracker.chat.test.", 60, "IN", "A", "192.0.2.66")]


@pytest.mark.parametrize("stale", [False, True])
def test_cname_cloaking_is_checked_on_every_path(policy, stale):
    """Fresh, cached, and (when upstreams fail) stale answers are all re-checked for a blocked target."""
    ctx = core.Context(Cache(stale_ttl=3600))
    fwd = core.begin(q("cloak.example.test"), MOBILE, policy, ctx, T0)
    reply, out = core.finish(fwd, upstream_reply(fwd, *CLOAKED), policy, ctx, T0)
    assert out.action == "forwarded" and dns.message.from_wire(reply).answer
    # the desktop: from the cache while fresh, from the stale cache when every upstream fails
    now = T0 + (120 if stale else 1)
    step = core.begin(q("cloak.example.test"), DESKTOP, policy, ctx, now)
    if stale:
        assert isinstance(step, core.Forward)
        reply, out = core.finish(step, None, policy, ctx, now)
    else:
        reply, out = step
    assert out.action == "blocked" and out.service == "chat"
    assert dns.message.from_wire(reply).rcode() == dns.rcode.NXDOMAIN


def test_stale_answer_for_an_allowed_name(policy):
    ctx = core.Context(Cache(stale_ttl=3600))
    fwd = core.begin(q("www.example.test"), MOBILE, policy, ctx, T0)
    core.finish(fwd, upstream_reply(fwd, ("www.example.test.", 60, "IN", "A", "192.0.2.20")), policy, ctx, T0)
    step = core.begin(q("www.example.test"), DESKTOP, policy, ctx, T0 + 120)
    reply, out = core.finish(step, None, policy, ctx, T0 + 120)
    msg = dns.message.from_wire(reply)
    assert out.action == "stale" and [str(rd) for rd in msg.answer[0]] == ["192.0.2.20"]
    assert msg.answer[0].ttl <= 30


def test_no_upstream_and_no_stale_is_servfail(policy):
    ctx = core.Context(Cache())
    step = core.begin(q("www.example.test"), MOBILE, policy, ctx, T0)
    reply, out = core.finish(step, None, policy, ctx, T0)
    assert out.action == "error" and dns.message.from_wire(reply).rcode() == dns.rcode.SERVFAIL


def test_blocked_names_never_touch_the_cache(policy):
    ctx = core.Context(Cache())
    reply, out = core.begin(q("www.chat.test", "HTTPS"), DESKTOP, policy, ctx, T0)
    assert out.action == "blocked" and len(ctx.cache) == 0


@pytest.mark.parametrize("client,action,rcode", [("192.0.2.1", "refused", dns.rcode.REFUSED),
                                                 (MOBILE, "local", dns.rcode.NOERROR)])
def test_outsiders_and_any(policy, client, action, rcode):
    reply, out = core.begin(q("www.example.test", "ANY"), client, policy, core.Context(Cache()), T0)
    assert out.action == action and dns.message.from_wire(reply).rcode() == rcode


@pytest.mark.parametrize("client,expected", [("192.0.2.1", None), (MOBILE, b"")])
def test_garbage(policy, client, expected):
    """Garbage from an outsider is dropped (never reflected); from a client it gets FORMERR."""
    reply, out = core.begin(b"\x12\x34\x01\x00\x00\x02" + b"\x00" * 6, client, policy, core.Context(Cache()), T0)
    if expected is None:
        assert reply is None and out.action == "dropped"
    else:
        assert dns.message.from_wire(reply).rcode() == dns.rcode.FORMERR and out.action == "error"
