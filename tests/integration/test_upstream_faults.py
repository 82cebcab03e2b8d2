"""Upstream faults against the running server. Each broken upstream is a small real DNS server on
loopback (UDP and TCP on one port) that misbehaves in one way; behind it sits a good one. The
client must get the good answer (failover) or SERVFAIL, never a poisoned or broken one.
"""
from __future__ import annotations

import random
import selectors
import socket
import struct
import threading
import time
from pathlib import Path

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rrset
import pytest

from helpers import Sinkhole, ask

pytestmark = pytest.mark.integration

GOOD, POISON = "192.0.2.10", "203.0.113.66"


class FakeUpstream:
    """A real DNS server on 127.0.0.1 (UDP + TCP, same port). `mode` says how it answers:
    good, servfail, refused, garbage, garbage-same-id, wrong-id-then-right, wrong-question,
    other-port, silent, truncated (UDP TC=1; TCP answers in full), ttl1 (good with TTL 1)."""

    def __init__(self, mode: str, address: str = GOOD):
        self.mode, self.address = mode, address
        self.seen: list[tuple[int, int, str]] = []     # (source port, query ID, name) per UDP query
        self.tcp_queries = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()

    def __enter__(self):
        for _ in range(20):
            self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.udp.bind(("127.0.0.1", 0))
            self.port = self.udp.getsockname()[1]
            self.tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                self.tcp.bind(("127.0.0.1", self.port))
                break
            except OSError:
                self.udp.close()
                self.tcp.close()
        self.tcp.listen(16)
        self.other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.other.bind(("127.0.0.1", 0))
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self.thread.join(5)
        for s in (self.udp, self.tcp, self.other):
            s.close()

    @property
    def hostport(self) -> str:
        return f"127.0.0.1:{self.port}"

    def answer(self, query: dns.message.Message, ttl: int = 300) -> dns.message.Message:
        response = dns.message.make_response(query)
        response.flags |= dns.flags.RA
        q = query.question[0]
        if q.rdtype == 1:
            response.answer.append(dns.rrset.from_text(q.name, ttl, "IN", "A", self.address))
        return response

    def _run(self):
        sel = selectors.DefaultSelector()
        sel.register(self.udp, selectors.EVENT_READ, "udp")
        sel.register(self.tcp, selectors.EVENT_READ, "tcp")
        while not self._stop.is_set():
            for key, _ in sel.select(0.1):
                if key.data == "udp":
                    data, addr = self.udp.recvfrom(65535)
                    self._udp(data, addr)
                else:
                    conn, _ = self.tcp.accept()
                    with conn:
                        conn.settimeout(2)
                        self._tcp(conn)
        sel.close()

    def _udp(self, data: bytes, addr):
        query = dns.message.from_wire(data)
        with self._lock:
            self.seen.append((addr[1], query.id, str(query.question[0].name)))
        mode = self.mode
        send = lambda wire: self.udp.sendto(wire, addr)
        if mode == "silent":
            return
        if mode == "slow":                                      # answers after 0.5 s
            threading.Timer(0.5, send, args=(self.answer(query).to_wire(),)).start()
        elif mode in ("good", "ttl1"):
            send(self.answer(query, 1 if mode == "ttl1" else 300).to_wire())
        elif mode in ("servfail", "refused"):
            response = dns.message.make_response(query)
            response.set_rcode(dns.rcode.SERVFAIL if mode == "servfail" else dns.rcode.REFUSED)
            send(response.to_wire())
        elif mode == "garbage":
            send(random.Random(query.id).randbytes(80))
        elif mode == "garbage-same-id":
            send(data[:2] + b"\x81\x80\x00\x01\x00\x05" + random.Random(1).randbytes(60))
        elif mode == "wrong-id-then-right":
            poisoned = self.answer(query)
            poisoned.id = (query.id + 1) & 0xFFFF
            poisoned.answer[0] = dns.rrset.from_text(query.question[0].name, 300, "IN", "A", POISON)
            send(poisoned.to_wire())
            send(self.answer(query).to_wire())
        elif mode == "wrong-question":
            other = dns.message.make_query("elsewhere.test", "A")
            other.id = query.id
            poisoned = self.answer(other)
            poisoned.answer[0] = dns.rrset.from_text("elsewhere.test.", 300, "IN", "A", POISON)
            send(poisoned.to_wire())
        elif mode == "other-port":
            poisoned = self.answer(query)
            poisoned.answer[0] = dns.rrset.from_text(query.question[0].name, 300, "IN", "A", POISON)
            self.other.sendto(poisoned.to_wire(), addr)      # right ID and question, wrong port
        elif mode == "truncated":
            response = dns.message.make_response(query)
            response.flags |= dns.flags.TC
            send(response.to_wire())

    def _tcp(self, conn):
        try:
            size = struct.unpack("!H", conn.recv(2))[0]
            data = b""
            while len(data) < size:
                chunk = conn.recv(size - len(data))
                if not chunk:
                    return
                data += chunk
        except (OSError, struct.error):
            return
        self.tcp_queries += 1
        if self.mode == "silent":
            return
        query = dns.message.from_wire(data)
        big = self.answer(query)
        q = query.question[0]
        if q.rdtype == 1:       # more than fits in 512 bytes: why the UDP answer was truncated
            big.answer = [dns.rrset.from_text(q.name, 300, "IN", "A", *[f"192.0.2.{i}" for i in range(10, 60)])]
        wire = big.to_wire()
        conn.sendall(struct.pack("!H", len(wire)) + wire)


def sinkhole(tmp_path: Path, blocklists, *upstreams: FakeUpstream, **extra) -> Sinkhole:
    config = {"upstreams": [u.hostport for u in upstreams], "blocklists": str(blocklists),
              "upstream_timeout": 0.3, **extra}
    return Sinkhole(tmp_path, config)


def addresses(reply) -> list[str]:
    return sorted(str(r) for rr in reply.answer for r in rr)


FAULTS = ["servfail", "refused", "garbage", "garbage-same-id", "wrong-question", "other-port", "silent"]


@pytest.mark.parametrize("fault", FAULTS)
def test_failover_past_a_broken_upstream(tmp_path, blocklists, fault):
    with FakeUpstream(fault) as bad, FakeUpstream("good") as good, \
         sinkhole(tmp_path, blocklists, bad, good) as server:
        reply = ask(server, f"{fault}.example.test", source="127.0.2.5")
        assert reply.rcode() == 0
        assert addresses(reply) == [GOOD]
        assert len(bad.seen) == 1 and len(good.seen) == 1        # the bad one was asked first


@pytest.mark.parametrize("fault", FAULTS)
def test_every_upstream_broken_is_servfail(tmp_path, blocklists, fault):
    with FakeUpstream(fault) as bad, FakeUpstream("silent") as silent, \
         sinkhole(tmp_path, blocklists, bad, silent) as server:
        reply = ask(server, f"{fault}.example.test", source="127.0.2.5")
        assert reply.rcode() == dns.rcode.SERVFAIL and not reply.answer
        assert server.proc.poll() is None


def test_wrong_id_is_ignored_and_the_right_one_taken(tmp_path, blocklists):
    with FakeUpstream("wrong-id-then-right") as upstream, FakeUpstream("silent") as spare, \
         sinkhole(tmp_path, blocklists, upstream, spare) as server:
        reply = ask(server, "spoof.example.test", source="127.0.2.5")
        assert addresses(reply) == [GOOD]
        assert spare.seen == []


def test_truncated_answer_is_retried_over_tcp(tmp_path, blocklists):
    with FakeUpstream("truncated") as upstream, sinkhole(tmp_path, blocklists, upstream) as server:
        reply = ask(server, "big.example.test", source="127.0.2.5", tcp=True)
        assert upstream.tcp_queries == 1
        assert len(addresses(reply)) == 50
        # over UDP without EDNS (512 bytes) the client gets TC, to retry over TCP itself
        query = dns.message.make_query("big.example.test", "A")
        udp = dns.query.udp(query, server.host, port=server.port, timeout=3, source="127.0.2.5")
        assert udp.flags & dns.flags.TC and not udp.answer


def test_truncated_and_tcp_dead_fails_over(tmp_path, blocklists):
    with FakeUpstream("truncated") as upstream, FakeUpstream("good") as good, \
         sinkhole(tmp_path, blocklists, upstream, good) as server:
        upstream.mode = "truncated"
        upstream.tcp.close()                        # TCP refused on the truncating upstream
        reply = ask(server, "tc.example.test", source="127.0.2.5")
        assert addresses(reply) == [GOOD]


def test_query_ids_and_source_ports_are_random(tmp_path, blocklists):
    with FakeUpstream("good") as upstream, sinkhole(tmp_path, blocklists, upstream) as server:
        for i in range(60):
            assert ask(server, f"n{i}.example.test", source="127.0.2.5").rcode() == 0
    ports = [p for p, _, _ in upstream.seen]
    ids = [i for _, i, _ in upstream.seen]
    assert len(upstream.seen) == 60
    # 60 draws from ~28k ephemeral ports / 65536 IDs: a handful of repeats at most, never a sequence
    assert len(set(ports)) >= 55 and len(set(ids)) >= 55
    steps = {(b - a) % 65536 for a, b in zip(ids, ids[1:])}
    assert len(steps) > 50


def wait_until_asked_again(server, upstream, name):
    """Query until the 1-second answer has expired and the server asks the upstream again (the
    event), at most 10 seconds; the last reply is the one given after expiry."""
    deadline = time.monotonic() + 10
    for _ in range(20000):
        reply = ask(server, name, source="127.0.2.5")
        if len(upstream.seen) >= 2 or time.monotonic() > deadline:
            return reply


def test_serve_stale_when_every_upstream_is_down(tmp_path, blocklists):
    with FakeUpstream("ttl1") as upstream, \
         sinkhole(tmp_path, blocklists, upstream, cache={"serve_stale": 3600}) as server:
        assert addresses(ask(server, "stale.example.test", source="127.0.2.5")) == [GOOD]
        upstream.mode = "silent"
        # wait for the event "the cached answer expired": the server asks the upstream again
        reply = wait_until_asked_again(server, upstream, "stale.example.test")
        assert len(upstream.seen) >= 2, "the 1-second answer never expired"
        assert reply.rcode() == 0 and addresses(reply) == [GOOD]
        assert all(rr.ttl <= 30 for rr in reply.answer)


def test_no_serve_stale_by_default(tmp_path, blocklists):
    with FakeUpstream("ttl1") as upstream, sinkhole(tmp_path, blocklists, upstream) as server:
        assert addresses(ask(server, "stale.example.test", source="127.0.2.5")) == [GOOD]
        upstream.mode = "silent"
        reply = wait_until_asked_again(server, upstream, "stale.example.test")
        assert len(upstream.seen) >= 2
        assert reply.rcode() == dns.rcode.SERVFAIL


def test_sigterm_drains_queries_in_flight(tmp_path, blocklists):
    with FakeUpstream("slow") as upstream, \
         sinkhole(tmp_path, blocklists, upstream, upstream_timeout=3) as server:
        query = dns.message.make_query("drain.example.test", "A")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.2.5", 0))
            s.settimeout(5)
            s.sendto(query.to_wire(), (server.host, server.port))
            deadline = time.monotonic() + 5
            while not upstream.seen and time.monotonic() < deadline:     # the event: it is in flight
                time.sleep(0.01)
            assert upstream.seen
            server.proc.terminate()
            reply = dns.message.from_wire(s.recv(65535))
        assert reply.id == query.id and addresses(reply) == [GOOD]
        assert server.proc.wait(10) == 0
        assert server.count("draining in-flight queries") == 1
