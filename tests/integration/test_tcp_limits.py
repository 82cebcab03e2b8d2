"""TCP limits against the running server: a cap on connections, an idle timeout, a cap on queries
per connection; a silent, slow or non-reading client cannot hold resources. Plus UDP rate limiting
end to end (the limiter itself is tested in tests/unit/test_ratelimit.py)."""
from __future__ import annotations

import socket
import struct
import threading
import time
import urllib.request

import dns.flags
import dns.message
import dns.query
import pytest

from helpers import PyUpstream, Sinkhole, ask

pytestmark = pytest.mark.integration

SOURCE = "127.0.2.5"          # a mobile client in TEST_POLICY


def query_wire(qid: int, name: str = "x.example.test", rdtype: str = "ANY") -> bytes:
    q = dns.message.make_query(name, rdtype)           # ANY: answered locally, no upstream needed
    q.id = qid
    wire = q.to_wire()
    return struct.pack("!H", len(wire)) + wire


def read_message(s: socket.socket) -> bytes | None:
    """One length-prefixed answer, or None at end of stream."""
    buf = b""
    while len(buf) < 2 or len(buf) < 2 + struct.unpack_from("!H", buf)[0]:
        try:
            chunk = s.recv(65535 if len(buf) < 2 else 2 + struct.unpack_from("!H", buf)[0] - len(buf))
        except ConnectionResetError:
            return None
        if not chunk:
            return None
        buf += chunk
    return buf[2:]


def connect(server, timeout=5.0) -> socket.socket:
    return socket.create_connection((server.host, server.port), timeout=timeout, source_address=(SOURCE, 0))


def closed_by_server(s: socket.socket, within: float) -> bool:
    """True when the server ends the connection within `within` seconds (the socket's timeout)."""
    s.settimeout(within)
    try:
        while True:
            if not s.recv(65535):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False


def server_for(tmp_path, blocklists, **extra):
    return Sinkhole(tmp_path, {"upstreams": ["127.0.0.1:9"], "blocklists": str(blocklists), **extra})


def test_connection_cap(tmp_path, blocklists):
    with server_for(tmp_path, blocklists, tcp={"max_connections": 4, "idle_timeout": 30}) as server:
        held = []
        for i in range(4):
            s = connect(server)
            s.sendall(query_wire(i))
            assert read_message(s) is not None          # served: the server counts it now
            held.append(s)
        extra = connect(server)
        extra.sendall(query_wire(99))
        assert read_message(extra) is None, "a connection over the cap was served"
        extra.close()
        held.pop().close()
        # once one is closed, a new connection is served again (the close reaches the server
        # asynchronously: a bounded number of attempts)
        for _ in range(50):
            with connect(server) as s:
                s.sendall(query_wire(7))
                if read_message(s) is not None:
                    break
        else:
            raise AssertionError("no connection served after one was closed")
        for s in held:
            s.close()


def test_silent_client_is_dropped_after_idle_timeout(tmp_path, blocklists):
    with server_for(tmp_path, blocklists, tcp={"idle_timeout": 0.5}) as server:
        with connect(server) as s:
            assert closed_by_server(s, within=10)
        with connect(server) as s:                      # and after an answer, idle again
            s.sendall(query_wire(1))
            assert read_message(s) is not None
            assert closed_by_server(s, within=10)


def test_slow_client_cannot_hold_a_connection(tmp_path, blocklists):
    """Slowloris: one byte at a time, each just inside the idle timeout; the whole message must
    still arrive within the timeout, so the server hangs up."""
    with server_for(tmp_path, blocklists, tcp={"idle_timeout": 1.0}) as server:
        message = query_wire(5)
        started = time.monotonic()
        with connect(server) as s:
            hung_up = False
            for byte in message:
                try:
                    s.sendall(bytes([byte]))
                except (BrokenPipeError, ConnectionResetError):
                    hung_up = True
                    break
                if closed_by_server(s, within=0.4):      # paces the trickle; returns early on hang-up
                    hung_up = True
                    break
            assert hung_up
        assert time.monotonic() - started < 10


def test_queries_per_connection_cap(tmp_path, blocklists):
    """One at a time (pipelined queries past the cap would be unread data at close, which the
    kernel answers with a reset that may discard answers already sent)."""
    with server_for(tmp_path, blocklists, tcp={"max_queries": 3}) as server:
        with connect(server) as s:
            answers = []
            for i in range(5):
                try:
                    s.sendall(query_wire(i))
                except (BrokenPipeError, ConnectionResetError):
                    break
                message = read_message(s)
                if message is None:
                    break
                answers.append(struct.unpack_from("!H", message)[0])
        assert answers == [0, 1, 2]


def test_connection_lifetime_cap(tmp_path, blocklists):
    """tcp.max_lifetime: past it the server reads no new query, still delivers the answer in
    flight, then closes with a FIN (no reset, though the client keeps sending queries); a new
    connection is served. The answer is held at a real upstream until the server says the lifetime
    is over, so it is in flight at that moment by construction."""
    import dnslib
    forwarded, release = threading.Event(), threading.Event()

    def answer(request, transport):
        reply = request.reply()
        if str(request.q.qname) == "held.example.test.":
            forwarded.set()
            release.wait(20)
        reply.add_answer(dnslib.RR(request.q.qname, dnslib.QTYPE.A, rdata=dnslib.A("192.0.2.7"), ttl=60))
        return reply

    with PyUpstream(answer) as upstream, \
            Sinkhole(tmp_path, {"upstreams": [upstream.address], "upstream_timeout": 20, "blocklists": str(blocklists),
                                "tcp": {"max_lifetime": 2, "idle_timeout": 30}}, args=["-v"]) as server:
        try:
            with connect(server, timeout=10) as s:
                s.sendall(query_wire(1))
                assert struct.unpack_from("!H", read_message(s))[0] == 1      # answered locally
                s.sendall(query_wire(2, "held.example.test", "A"))
                assert forwarded.wait(10), "the query never reached the upstream"
                server.wait_for_log(lambda: server.count("reached max_lifetime 2 s: closing after 1 answer(s) "
                                                         "in flight") == 1, 10, "the lifetime to end")
                s.sendall(query_wire(3, "late.example.test", "A"))      # after the lifetime: never read
                # and ~200 KB more, past what asyncio buffers, so some of it is still unread in the
                # server's kernel buffer when the server is done: closing then would be a reset
                s.sendall(b"".join(query_wire(i, f"flood{i}.example.test", "A") for i in range(5000)))
                release.set()
                held = dns.message.from_wire(read_message(s))
                assert held.id == 2 and [rr.to_text() for rr in held.answer[0]] == ["192.0.2.7"]
                assert s.recv(65535) == b"", "more than the answer in flight"     # FIN, not a reset
        finally:
            release.set()
        with connect(server) as s:                      # a new connection is served
            s.sendall(query_wire(4))
            assert struct.unpack_from("!H", read_message(s))[0] == 4
        assert upstream.asked("late.example.test") == []


def test_client_that_never_reads_is_cut_off(tmp_path, blocklists):
    """Queries in, answers never read: the server's buffers must not grow without bound."""
    with server_for(tmp_path, blocklists, tcp={"idle_timeout": 0.5, "max_queries": 100000}) as server:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.bind((SOURCE, 0))
        s.connect((server.host, server.port))
        s.settimeout(0.5)
        batch = b"".join(query_wire(i & 0xFFFF, f"n{i}.example.test") for i in range(200))
        deadline = time.monotonic() + 30
        cut = False
        while time.monotonic() < deadline:
            try:
                s.sendall(batch)
            except (BrokenPipeError, ConnectionResetError):
                cut = True
                break
            except socket.timeout:
                continue                 # our send buffer is full too: keep trying until reset
        s.close()
        assert cut, "the server kept a non-reading client forever"
        assert ask(server, "still.example.test", "ANY", source=SOURCE).rcode() == 0


def test_udp_rate_limit_end_to_end(tmp_path, blocklists):
    """rate 5/s, burst 5, slip 2, 127.0.2.9 exempt: a flood gets ~5 answers, then every 2nd query
    a TC=1 empty answer; the exempt client is always answered."""
    limits = {"rate": 5, "burst": 5, "slip": 2, "exempt": ["127.0.2.9/32"]}
    with server_for(tmp_path, blocklists, rate_limit=limits, metrics={"listen": "127.0.0.1:0"}) as server:
        flood = [dns.message.make_query(f"q{i}.example.test", "ANY") for i in range(40)]
        replies = []
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((SOURCE, 0))
            for q in flood:
                s.sendto(q.to_wire(), (server.host, server.port))
            probe = dns.message.make_query("probe.example.test", "ANY")
            # the exempt client is answered even now
            exempt = dns.query.udp(probe, server.host, port=server.port, source="127.0.2.9", timeout=3)
            assert exempt.rcode() == 0 and exempt.answer
            s.settimeout(1.0)
            for _ in range(40):
                try:
                    replies.append(dns.message.from_wire(s.recv(65535)))
                except socket.timeout:
                    break                # nothing more is coming: the rest were dropped
        full = [r for r in replies if not r.flags & dns.flags.TC]
        slipped = [r for r in replies if r.flags & dns.flags.TC]
        # the flood takes well under a second, so at most a few tokens are refilled
        assert 5 <= len(full) <= 10
        assert all(not r.answer for r in slipped)
        over = 40 - len(full)
        assert over // 2 - 1 <= len(slipped) <= over // 2 + 1
        # every query over the limit, slipped or dropped, is counted under the reason README.md names
        server.wait_for_log(lambda: server.count("metrics on 127.0.0.1 port") == 1, 10, "the metrics line")
        line = next(l for l in server.lines if "metrics on 127.0.0.1 port" in l)
        port = int(line.split("port")[-1].split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
        dropped = {line.split("reason=")[1].split('"')[1]: float(line.rsplit(" ", 1)[1])
                   for line in text.splitlines() if line.startswith("sinkhole_dns_dropped_total{")}
        assert dropped.get("ratelimit") == over and dropped.get("other") == 0, dropped
