"""exporters.tls: ClientHello fields, records and TCP segments put back together."""
import os
import random
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from exporters.tls import (MAX_HELLO, ClientHello, Reassembly, TLSError, hello_from_handshake,  # noqa: E402
                           hello_from_records)
from sidecar_frames import client_hello_record, hello_message, tls_record_via_scapy  # noqa: E402


@pytest.mark.parametrize("sni, alpn", [("doh.test", ("h2", "http/1.1")), ("WWW.Example.Test.", ()),
                                       (None, ("dot",)), ("a" * 60 + ".test", ("doq",))])
def test_client_hello_fields(sni, alpn):
    hello = hello_from_records(client_hello_record(sni, alpn))
    assert hello.sni == (sni.lower().rstrip(".") if sni else None)
    assert hello.alpn == alpn


def test_reads_scapys_record_layer():
    assert hello_from_records(tls_record_via_scapy("x.chat.test")).sni == "x.chat.test"


def test_incomplete_needs_more_and_wrong_content_raises():
    record = client_hello_record("doh.test", pad=2000)
    for cut in (0, 3, 5, 100, len(record) - 1):
        assert hello_from_records(record[:cut]) is None
    with pytest.raises(TLSError):
        hello_from_records(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    with pytest.raises(TLSError):
        hello_from_handshake(b"\x02\x00\x00\x04abcd")                # a ServerHello
    with pytest.raises(TLSError):
        hello_from_handshake(b"\x01\x00\x00\x03" + b"\x03\x03\x00")   # body shorter than its fields


def test_one_handshake_message_over_several_records():
    msg = hello_message("split.doh.test", pad=1500)
    records = b"".join(b"\x16\x03\x03" + len(c).to_bytes(2, "big") + c
                       for c in (msg[:7], msg[7:700], msg[700:]))
    assert hello_from_records(records).sni == "split.doh.test"


def test_reassembly_in_any_order():
    record = client_hello_record("late.chat.test", pad=3000)
    segments = [(i, record[i:i + 600]) for i in range(0, len(record), 600)]
    rng = random.Random(4)
    for _ in range(20):
        order = segments[:] + [segments[1]]                          # and a retransmission
        rng.shuffle(order)
        r = Reassembly(base=5000)
        results = [hello_from_records(r.add(5000 + i, seg)) for i, seg in order]
        assert results[-1] == ClientHello("late.chat.test", ("h2", "http/1.1"))
        assert all(x is None for x in results[:results.index(results[-1])])


def test_reassembly_without_syn_starts_at_a_tls_record_and_wraps_sequence_numbers():
    record = client_hello_record("wrap.test", pad=800)
    r = Reassembly(None)
    assert r.add(0xFFFFFF00 + 9999, b"\x00junk") == b""             # not a record start: ignored
    base = 0xFFFFFF00
    r.add(base, record[:300])
    assert hello_from_records(r.add((base + 300) & 0xFFFFFFFF, record[300:])).sni == "wrap.test"


def test_reassembly_is_bounded():
    r = Reassembly(base=0)
    r.add(0, b"\x16\x03\x01" + b"\x00" * 100)
    for i in range(200):
        r.add(200 + i * 1000, b"x" * 1000)                           # gaps: all pending
    r.add(10 * MAX_HELLO, b"y" * 1000)
    for i in range(32):
        r.add(200 + i, b"z" * MAX_HELLO)                             # overlapping, each as big as allowed
    assert r.size <= MAX_HELLO and len(r.pending) <= 32
