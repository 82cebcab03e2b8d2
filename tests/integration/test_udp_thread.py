"""The UDP socket's thread (server._udp_serve) in-process, reading a batch at a time (udpio's
recvmmsg) and one datagram at a time (`udp: {batch: 1}`): a burst from several clients, blocked and
allowed names mixed, gets one answer per query to the client that asked, with its own ID, and one
query-log line each; a bug that escapes the hot loop costs the batch in hand (at worst its counting)
and is logged and counted, never the socket; /healthz's `serving` says whether every UDP thread is
alive."""
from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections import Counter

import dns.message
import dns.rcode
import pytest

from helpers import TEST_POLICY, TEST_SERVICES, Dnsmasq, ask, have, settled, write_blocklists
from resolver import core
from resolver import server as server_module
from resolver.config import CacheConfig, Config, QueryLogConfig, UdpConfig
from resolver.loader import load_policy
from resolver.observe import Quiet
from resolver.server import Server
from resolver.udpio import AdaptiveIO

pytestmark = pytest.mark.integration

BATCHES = [pytest.param(64, id="batch-64"), pytest.param(1, id="batch-1")]


class Flaky(Quiet):
    """An observer whose count_many() (a batch's answers kept for reuse and their reuses) fails
    `failures` times."""

    def __init__(self, failures: int):
        self.failures = failures
        self.drops: list[str] = []
        self.changed = threading.Condition()

    def signature(self, outcome):
        return (outcome.group, outcome.action)

    def count_many(self, signatures, duration):
        if self.failures > 0:
            self.failures -= 1
            raise RuntimeError("a bug in the metrics")

    def dropped(self, reason):
        with self.changed:
            self.drops.append(reason)
            self.changed.notify_all()

    def wait_drops(self, count: int, timeout: float = 5.0) -> list[str]:
        """The drops once `count` are in (the answer goes out before count_many() fails)."""
        with self.changed:
            self.changed.wait_for(lambda: len(self.drops) >= count, timeout)
            return list(self.drops)


class Running:
    """A Server on its own event loop thread, for the length of a `with`."""

    def __init__(self, blocklists, observer, clock=time.time, **config):
        self.config = Config(**{"listen": (("127.0.0.1", 0),), "upstreams": (("127.0.0.1", 9),),
                                "blocklists": str(blocklists), "reload_interval": 0, **config})
        self.observer, self.clock = observer, clock

    def run(self, coro, timeout=15):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def __enter__(self):
        self.loop = asyncio.new_event_loop()
        self.runner = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.runner.start()

        async def make():
            return Server(self.config, load_policy(self.config.blocklists, self.clock()), self.observer,
                          clock=self.clock)

        self.server = self.run(make())
        self.address = self.run(self.server.start())[0]
        return self

    def __exit__(self, *exc):
        self.run(self.server.stop(drain=1))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.runner.join(5)


@pytest.mark.parametrize("batch", BATCHES)
def test_no_reuse_when_cache_answers_is_0(tmp_path, monkeypatch, batch):
    blocklists = write_blocklists(tmp_path / "bl", TEST_POLICY, TEST_SERVICES)
    decided = []                                   # core.begin runs: each query decided afresh
    begin = core.begin
    monkeypatch.setattr(core, "begin", lambda *args: decided.append(1) or begin(*args))
    with Running(blocklists, Quiet(), cache=CacheConfig(answers=0), udp=UdpConfig(batch)) as r:
        for _ in range(3):
            assert ask(r.address, "www.chat.test", source="127.0.1.5").rcode() == 3
        assert len(decided) == 3 and r.server.policy.answer_tables == {}
    decided.clear()
    with Running(blocklists, Quiet(), udp=UdpConfig(batch)) as r:
        for _ in range(3):
            assert ask(r.address, "www.chat.test", source="127.0.1.5").rcode() == 3
        assert len(decided) == 1 and r.server.policy.answer_tables


class Clock:
    """The server's clock, moved by the test."""

    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.mark.skipif(not have("dnsmasq"), reason="needs dnsmasq (Debian dnsmasq-base)")
@pytest.mark.parametrize("batch", BATCHES)
def test_a_remembered_cache_answer_is_renewed_each_second_until_the_cache_lets_go(tmp_path, monkeypatch, batch):
    """A reused cache answer whose second has passed gets the TTLs of the cache entry's new age
    without being decided again (core.renew), counted as a cache hit; once the cache entry expires
    the query takes the whole way to the upstream again."""
    blocklists = write_blocklists(tmp_path / "bl", TEST_POLICY, TEST_SERVICES)
    decided = []
    begin = core.begin
    monkeypatch.setattr(core, "begin", lambda *args: decided.append(1) or begin(*args))
    start = 1_900_000_000.25
    clock = Clock(start)
    with Dnsmasq(["--host-record=plain.test,192.0.2.11"]) as upstream, \
         Running(blocklists, Quiet(), clock=clock, upstreams=(("127.0.0.1", upstream.port),),
                 udp=UdpConfig(batch)) as r:
        cache = r.server.cache
        first = ask(r.address, "plain.test", source="127.0.2.5")           # forwarded, then cached
        assert first.answer[0].ttl == 300 and len(decided) == 1
        assert ask(r.address, "plain.test", source="127.0.2.6").answer[0].ttl == 300   # decided, kept
        assert len(decided) == 2
        ttls = []
        for age in (1, 2, 2, 7, 299):
            clock.now = start + age + 0.5
            reply = ask(r.address, "plain.test", source="127.0.2.6")   # a client with its table
            assert [a.address for a in reply.answer[0]] == ["192.0.2.11"]
            ttls.append(reply.answer[0].ttl)
        assert ttls == [299, 298, 298, 293, 1]
        assert len(decided) == 2, "renewed without being decided again"
        assert (cache.requests, cache.hits) == (1 + 1 + 5, 1 + 5)  # the forward's miss, then all hits
        clock.now = start + 300.5                                        # the cache entry has expired
        assert ask(r.address, "plain.test", source="127.0.2.7").answer[0].ttl == 300
        assert len(decided) == 3 and cache.hits == 6


@pytest.mark.parametrize("batch", BATCHES)
def test_a_bug_in_the_hot_loop_costs_one_packet_not_the_socket(tmp_path, caplog, batch):
    blocklists = write_blocklists(tmp_path / "bl", TEST_POLICY, TEST_SERVICES)
    observer = Flaky(failures=2)
    running = Running(blocklists, observer, udp=UdpConfig(batch)).__enter__()
    server, address = running.server, running.address
    try:
        for _ in range(2):                         # kept, then reused: the answer goes out, then count_many() fails
            assert ask(address, "www.chat.test", source="127.0.1.5").rcode() == 3
        assert observer.wait_drops(2) == ["internal", "internal"]
        assert "UDP loop on" in caplog.text
        assert ask(address, "www.chat.test", source="127.0.1.5", timeout=3).rcode() == 3
        assert server.serving
    finally:
        running.__exit__(None, None, None)
    assert not server.serving and not any(t.is_alive() for t in server._udp_threads)


class Counted:
    """The server's udpio object, recording how many datagrams each receive() gave."""

    def __init__(self, io, sizes: list[int]):
        self.io, self.sizes = io, sizes
        self.send, self.address, self.query = io.send, io.address, io.query

    def receive(self):
        batch = self.io.receive()
        if batch is not None:
            self.sizes.append(len(batch))
        return batch


RECORDS = ["--host-record=www.chat.test,192.0.2.10", "--host-record=plain.test,192.0.2.11",
           "--host-record=help.chat.test,192.0.2.13"]
ADDRESSES = {"www.chat.test": "192.0.2.10", "plain.test": "192.0.2.11", "help.chat.test": "192.0.2.13"}
# per client: (name, blocked?); plain.test is in the cache before the burst, the others are not
DESKTOP_NAMES = [("www.chat.test", True), ("plain.test", False), ("file-a1.files.test", True),
                 ("help.chat.test", False), ("www.chat.test", True)]
MOBILE_NAMES = [("www.chat.test", False), ("plain.test", False), ("plain.test", False)]


@pytest.mark.skipif(not have("dnsmasq"), reason="needs dnsmasq (Debian dnsmasq-base)")
@pytest.mark.parametrize("batch", BATCHES)
def test_a_burst_from_several_clients_gets_one_answer_and_one_log_line_per_query(tmp_path, blocklists,
                                                                                  monkeypatch, batch):
    sizes: list[int] = []
    udp_io = server_module.udp_io
    monkeypatch.setattr(server_module, "udp_io", lambda sock, size: Counted(udp_io(sock, size), sizes))
    log_path = tmp_path / "query.log"
    plan = [(f"127.0.1.{n}", DESKTOP_NAMES) for n in range(10, 14)] + \
           [(f"127.0.2.{n}", MOBILE_NAMES) for n in range(10, 14)]
    clients, sent = [], {}                          # sent: (source, query ID) -> (name, blocked?)
    with Dnsmasq(RECORDS) as upstream, \
         Running(blocklists, Quiet(), upstreams=((upstream.host, upstream.port),),
                 query_log=QueryLogConfig(str(log_path)), udp=UdpConfig(batch)) as r:
        assert ask(r.address, "plain.test", source="127.0.2.99").rcode() == 0
        before = len(sizes)
        try:
            qid = 100
            with r.server.lock:                     # the UDP thread may take some in, but answers none yet
                for source, names in plan:
                    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                    clients.append(s)
                    s.bind((source, 0))
                    s.settimeout(5)
                    for name, blocked in names:
                        qid += 1
                        s.sendto(dns.message.make_query(name, "A", id=qid, use_edns=False).to_wire(), r.address)
                        sent[source, qid] = (name, blocked)
                settled()
            for s in clients:
                source = s.getsockname()[0]
                mine = {q: v for (src, q), v in sent.items() if src == source}
                for _ in range(len(mine)):
                    reply = dns.message.from_wire(s.recv(65535))
                    name, blocked = mine.pop(reply.id)      # a reply for another client, or twice: KeyError
                    assert reply.question[0].name.to_text(omit_final_dot=True) == name
                    if blocked:
                        assert reply.rcode() == dns.rcode.NXDOMAIN and not reply.answer, (source, name)
                    else:
                        assert reply.rcode() == dns.rcode.NOERROR, (source, name)
                        assert [a.address for a in reply.answer[0]] == [ADDRESSES[name]]
            assert r.server.querylog.flush()
        finally:
            for s in clients:
                s.close()
    burst = sizes[before:]
    assert sum(burst) == len(sent)
    if batch == 1:
        assert set(burst) == {1}
    else:
        # the lone query before had AdaptiveIO read one datagram at a time for PROBE receives;
        # then one recvmmsg takes the rest (at most one receive more before the lock was let go)
        probe = AdaptiveIO.PROBE
        assert set(burst[:probe]) == {1} and len(burst) <= probe + 2 and len(burst) > probe, burst
    lines = [json.loads(line) for line in log_path.read_text().splitlines()]
    lines = [line for line in lines if line["client"] != "127.0.2.99"]
    assert Counter((line["client"], line["qname"]) for line in lines) == \
        Counter((source, name) for (source, _), (name, _) in sent.items())
    blocked = {name for name, is_blocked in DESKTOP_NAMES if is_blocked}
    for line in lines:
        if line["client"].startswith("127.0.1.") and line["qname"] in blocked:
            assert (line["decision"], line["rcode"], line["group"]) == ("blocked", "NXDOMAIN", "desktop")
        else:
            assert line["decision"] in ("cached", "forwarded") and line["rcode"] == "NOERROR", line


@pytest.mark.parametrize("batch", BATCHES)
def test_a_query_longer_than_a_batch_slot_is_dropped_as_malformed(tmp_path, batch):
    """A datagram longer than udpio.SLOT (cut short by recvmmsg, or too long for recvfrom's
    buffer) is dropped and counted as malformed, with no answer, whatever udp.batch says; the
    socket serves on."""
    from resolver.udpio import SLOT
    blocklists = write_blocklists(tmp_path / "bl", TEST_POLICY, TEST_SERVICES)
    observer = Flaky(failures=0)
    with Running(blocklists, observer, udp=UdpConfig(batch)) as r:
        query = dns.message.make_query("www.chat.test", "A", use_edns=False).to_wire()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.1.5", 0))
            s.settimeout(0.5)
            s.sendto(query + b"\0" * (SLOT + 1 - len(query)), r.address)
            assert observer.wait_drops(1) == ["malformed"]
            with pytest.raises(socket.timeout):
                s.recv(65535)
        assert ask(r.address, "www.chat.test", source="127.0.1.5").rcode() == 3
