"""EDNS details: OPT kept in truncated answers (RFC 6891 7), OPT owned by the root only."""
import struct

import dns.message
import pytest

from resolver.wire import TC, WireError, block_reply, parse_query, truncate


def query_bytes(edns: bool) -> bytes:
    q = dns.message.make_query("big.example.test", "TXT", use_edns=0 if edns else False, payload=1232)
    q.id = 4242
    return q.to_wire()


@pytest.mark.parametrize("edns", [True, False])
def test_truncated_answer_keeps_opt_only_for_edns_clients(edns):
    q = parse_query(query_bytes(edns))
    reply = block_reply(q, "nxdomain", 10)
    cut = truncate(reply + b"", 20)     # force truncation
    msg = dns.message.from_wire(cut)
    assert msg.flags & TC
    assert msg.id == 4242 and len(msg.question) == 1
    assert (msg.edns >= 0) == edns
    assert not msg.answer and not msg.authority


def test_opt_with_a_non_root_owner_is_formerr():
    good = query_bytes(True)
    # replace the OPT owner (root, one zero byte just before type 41) with the name "x."
    at = good.rindex(b"\x00\x00\x29")
    bad = good[:at] + b"\x01x\x00" + good[at + 1:]
    with pytest.raises(WireError) as e:
        parse_query(bad)
    assert e.value.rcode == 1
    assert parse_query(good).edns == 1232
