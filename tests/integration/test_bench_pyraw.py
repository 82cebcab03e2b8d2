"""bench/pyraw.py, the benchmark's bare-Python reference server, on loopback with a real dnsmasq
upstream: it blocks a listed name and everything below it for any client, forwards the rest,
answers repeats from its question-bytes cache, and shrugs off packets that are not queries."""
import socket
import subprocess
import sys

import dns.message
import dns.query
import dns.rcode
import pytest

from helpers import ROOT, Dnsmasq, ask, free_port, have, stop_process, wait_for_answer

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not have("dnsmasq"), reason="needs dnsmasq (Debian dnsmasq-base)")]


@pytest.fixture
def pyraw(tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("# blocked\nchat.example.test\n\nDoH.Example.TEST.\n")
    with Dnsmasq(["--address=/example.test/192.0.2.7"]) as upstream:
        port = free_port()
        proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "pyraw.py"), "--port", str(port),
                                 "--upstream", upstream.address, "--list", str(names), "--timeout", "0.5"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_for_answer("127.0.0.1", port, "probe.example.test")
            yield ("127.0.0.1", port), upstream, proc
        finally:
            stop_process(proc)


def test_blocks_the_name_and_below_for_any_client(pyraw):
    server, _, _ = pyraw
    for name, source in [("chat.example.test", "127.0.1.5"), ("www.CHAT.example.test", "127.0.2.5"),
                         ("doh.example.test", "127.0.0.1")]:
        reply = ask(server, name, source=source)
        assert reply.rcode() == dns.rcode.NXDOMAIN, name
        assert not reply.answer and str(reply.question[0].name).rstrip(".") == name
    parent = ask(server, "example.test")               # a parent of a blocked name is not blocked
    assert parent.rcode() == dns.rcode.NOERROR
    assert [str(r) for rr in parent.answer for r in rr] == ["192.0.2.7"]


def test_repeats_come_from_the_cache_with_their_own_id(pyraw):
    server, upstream, _ = pyraw
    first = ask(server, "www.example.test")
    assert [str(r) for rr in first.answer for r in rr] == ["192.0.2.7"]
    stop_process(upstream.proc, 5)                     # from now on only the cache can answer
    query = dns.message.make_query("www.example.test", "A", use_edns=False)
    query.id = (first.id + 1) & 0xFFFF
    again = dns.query.udp(query, server[0], port=server[1], timeout=3)
    assert again.id == query.id and again.rcode() == dns.rcode.NOERROR
    assert [str(r) for rr in again.answer for r in rr] == ["192.0.2.7"]
    other = ask(server, "other.example.test")          # not cached, upstream gone: SERVFAIL
    assert other.rcode() == dns.rcode.SERVFAIL


def test_packets_that_are_not_queries_get_no_answer(pyraw):
    server, _, proc = pyraw
    response = dns.message.make_response(dns.message.make_query("chat.example.test", "A")).to_wire()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.3)
        for packet in [b"", b"\x12", b"\0" * 12, b"\xff" * 40, response,
                       b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x40" + b"a" * 64 + b"\0\0\1\0\1"]:
            s.sendto(packet, server)
            with pytest.raises(socket.timeout):
                s.recv(512)
    assert proc.poll() is None
    assert ask(server, "chat.example.test").rcode() == dns.rcode.NXDOMAIN
