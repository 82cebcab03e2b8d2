"""Property-based fuzzing (hypothesis) of the packet path and the blocklist loader.

The packet path: arbitrary bytes and mutated valid queries through parse_query and core.begin;
arbitrary upstream replies through parse_reply/build_reply. The loader: hostile YAML documents
(random shapes and types, non-UTF-8 bytes) in policy.yaml and a service file. The only allowed
failures are WireError / PolicyError; every answer is a well-formed DNS response no bigger than it
should be, and a packet with QR set is never answered.

`make test` runs a bounded number of examples (FUZZ_EXAMPLES, default 200 per property);
bench/fuzz.py runs the same checks for as long as you ask.
"""
from __future__ import annotations

import os
import struct
import tempfile
import time
from pathlib import Path

import dns.message
import dns.rdatatype
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from helpers import TEST_POLICY, TEST_SERVICES, write_blocklists
from resolver import core
from resolver.cache import Cache
from resolver.loader import PolicyError, load_policy
from resolver.wire import WireError, build_reply, parse_query, parse_reply

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "200"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

_DIR = Path(tempfile.mkdtemp(prefix="sinkhole-fuzz-"))
POLICY = load_policy(write_blocklists(_DIR / "blocklists", TEST_POLICY, TEST_SERVICES), time.time())
CLIENTS = ["127.0.1.5", "127.0.2.5", "192.0.2.1", "::1", "2001:db8::1"]   # desktop, mobile, outsiders
NAMES = ["www.chat.test", "help.chat.test", "file-ab1.files.test", "doh.test", "ok.example.test",
         "use-application-dns.net", "", "a" * 63 + ".test", "x.y.z.resolver.arpa"]
TYPES = [1, 2, 5, 6, 12, 13, 15, 16, 28, 33, 41, 64, 65, 251, 252, 255, 0, 65535]


# -- strategies --------------------------------------------------------------------------------

@st.composite
def valid_queries(draw) -> bytes:
    name = draw(st.sampled_from(NAMES) | st.from_regex(r"[a-z0-9-]{1,20}(\.[a-z0-9-]{1,20}){0,4}", fullmatch=True))
    rdtype = draw(st.sampled_from(TYPES))
    edns = draw(st.sampled_from([None, 0, 1]))
    query = dns.message.make_query(name or ".", rdtype, use_edns=edns if edns is not None else None,
                                   payload=draw(st.sampled_from([0, 512, 1232, 4096, 65535])),
                                   want_dnssec=draw(st.booleans()))
    query.id = draw(st.integers(0, 0xFFFF))
    return query.to_wire()


@st.composite
def mutated_queries(draw) -> bytes:
    data = bytearray(draw(valid_queries()))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "set", "cut", "insert", "pointer", "count"]))
        if op == "flip" and data:
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        elif op == "cut":
            del data[draw(st.integers(0, len(data))):]
        elif op == "insert":
            i = draw(st.integers(0, len(data)))
            data[i:i] = draw(st.binary(max_size=300))
        elif op == "pointer" and len(data) > 13:      # a compression pointer, often a loop
            i = draw(st.integers(12, len(data) - 2))
            data[i:i + 2] = struct.pack("!H", 0xC000 | draw(st.integers(0, min(len(data), 0x3FFF))))
        elif op == "count" and len(data) >= 12:       # QD/AN/NS/AR counts
            i = draw(st.sampled_from([4, 6, 8, 10]))
            data[i:i + 2] = struct.pack("!H", draw(st.sampled_from([0, 1, 2, 9, 0xFFFF])))
    return bytes(data)


packets = st.binary(max_size=600) | valid_queries() | mutated_queries()


# -- the checks (bench/fuzz.py runs these too) -------------------------------------------------

def check_parse_query(data: bytes) -> None:
    try:
        query = parse_query(data)
    except WireError as e:
        assert e.rcode in (None, 1, 4, 5)
        return
    assert not data[2] & 0x80                      # a response is never taken for a query
    assert query.qtype == struct.unpack_from("!H", data, 12 + len(query.question) - 4)[0]


def check_begin(data: bytes, client: str) -> None:
    step = core.begin(data, client, POLICY, core.Context(Cache(100)), 1_000_000.0)
    if isinstance(step, core.Forward):
        assert len(data) >= 12 and not data[2] & 0x80
        return
    reply, outcome = step
    assert outcome.action in ("blocked", "cached", "forwarded", "stale", "local", "refused", "error", "dropped")
    if reply is None:
        return
    assert len(data) >= 12 and not data[2] & 0x80, "answered a response or a runt: reflection"
    assert reply[:2] == data[:2], "the answer does not echo the query ID"
    assert reply[2] & 0x80, "our answer has QR clear"
    assert len(reply) <= len(data) + 128, "amplification"
    parsed = dns.message.from_wire(reply, ignore_trailing=False)   # a well-formed message
    assert parsed.rcode() == outcome.rcode or outcome.rcode == 16


def check_reply(data: bytes, question: bytes) -> None:
    key = question.lower()
    qid = struct.unpack_from("!H", data)[0] if len(data) >= 2 else 0
    try:
        reply = parse_reply(data, key, qid)
    except WireError:
        return
    query = parse_query(b"\x00\x01\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + question)
    out = build_reply(query, reply, age=5, ttl_cap=60)
    dns.message.from_wire(out)


def check_loader(policy_text: bytes, service_text: bytes) -> None:
    with tempfile.TemporaryDirectory(prefix="sinkhole-fuzz-") as tmp:
        root = Path(tmp)
        (root / "services").mkdir()
        (root / "policy.yaml").write_bytes(policy_text)
        (root / "services" / "chat.yaml").write_bytes(service_text)
        try:
            load_policy(root, 1_000_000.0)
        except PolicyError as e:
            assert e.problems
            for p in e.problems:
                assert str(p).startswith(str(root)) or str(p).startswith(("policy.yaml", "services/")), str(p)
                assert isinstance(p.line, int) and p.line >= 1


# -- hostile YAML ------------------------------------------------------------------------------

scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True)
           | st.text(max_size=40) | st.sampled_from(["chat", "desktop", "127.0.1.0/24", "nxdomain",
                                                     "2026-01-01T00:00:00Z", "chat.test", "*", "."]))
shapes = st.recursive(scalars, lambda inner: st.lists(inner, max_size=5)
                      | st.dictionaries(st.sampled_from(sorted({"groups", "default_group", "allowed_clients",
                                                                "exemptions", "subnets", "block", "response",
                                                                "domains", "hosts", "patterns", "allow",
                                                                "ip_ranges", "sources", "name", "cidr",
                                                                "clients", "services", "expires", "x"})) | st.text(max_size=8),
                                        inner, max_size=6), max_leaves=30)


@st.composite
def hostile_yaml(draw) -> bytes:
    kind = draw(st.sampled_from(["shape", "mutated", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=400))
    if kind == "shape":
        return yaml.safe_dump(draw(shapes), allow_unicode=True).encode()
    good = yaml.safe_dump(draw(st.sampled_from([TEST_POLICY, TEST_SERVICES["chat"]])), sort_keys=False).encode()
    data = bytearray(good)
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(data) - 1))
        data[i:i + draw(st.integers(0, 3))] = draw(st.sampled_from(
            [b"", b"\xff", b"\xc3", b"- ", b": ", b"[", b"{", b"&a ", b"*a", b"!!python/object ", b"\t", b"\n  "]))
    return bytes(data)


GOOD_POLICY = yaml.safe_dump(TEST_POLICY).encode()
GOOD_SERVICE = yaml.safe_dump(TEST_SERVICES["chat"]).encode()


# -- the properties ----------------------------------------------------------------------------

@FUZZ
@given(packets)
def test_parse_query_raises_only_wire_errors(data):
    check_parse_query(data)


@FUZZ
@given(packets, st.sampled_from(CLIENTS))
def test_begin_answers_safely_or_drops(data, client):
    check_begin(data, client)


@FUZZ
@given(st.binary(max_size=600) | mutated_queries(), valid_queries())
def test_upstream_replies_are_checked(data, query):
    question = query[12:]
    question = question[:len(question) - (11 if query[11] else 0)]
    check_reply(data, question)


@FUZZ
@given(hostile_yaml(), st.booleans())
def test_loader_gives_problems_never_crashes(text, in_policy):
    check_loader(text, GOOD_SERVICE) if in_policy else check_loader(GOOD_POLICY, text)


def test_the_good_files_load():
    """The fuzz baseline is a valid directory, so mutations start from something that loads."""
    check_loader(GOOD_POLICY, GOOD_SERVICE)
    with tempfile.TemporaryDirectory() as tmp:
        root = write_blocklists(Path(tmp), TEST_POLICY, TEST_SERVICES)
        assert load_policy(root, 1_000_000.0).groups
