"""The policy's life in a running server: exemptions that begin and end on the clock, hot reloads
(git pull, an atomic symlink flip, SIGHUP) under continuous load with no failed answer, invalid
changes rejected while the old policy keeps answering, in-flight queries finishing on the snapshot
they started with, and clients behind a trusted forwarder (ECS)."""
from __future__ import annotations

import asyncio
import datetime
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import dns.edns
import dns.exception
import dns.message
import dns.query
import dns.rrset
import pytest
import yaml

from helpers import (ROOT, SINKHOLE, TEST_POLICY, TEST_SERVICES, Dnsmasq, Sinkhole, ask, have,
                     write_blocklists)

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not have("dnsmasq"), reason="needs dnsmasq (Debian dnsmasq-base)")]

RECORDS = ["--host-record=www.chat.test,192.0.2.10", "--host-record=news.test,192.0.2.11",
           "--host-record=doh.test,192.0.2.12", "--host-record=plain.test,192.0.2.13"]
NEWS = {"description": "a service added by a policy change", "sources": {"t": "test"},
        "domains": [{"name": "news.test", "source": "t"}]}
DESKTOP, MOBILE = "127.0.1.5", "127.0.2.5"


def iso(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).isoformat()


def until(predicate, timeout: float, what: str, pace: float = 0.05):
    """Ask `predicate` (which sends a query) until it holds; bounded in tries and time."""
    end = time.monotonic() + timeout
    for _ in range(int(timeout / pace) + 1):
        if predicate():
            return
        if time.monotonic() > end:
            break
        threading.Event().wait(pace)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def rcode(server, name, source) -> int:
    return ask(server, name, source=source, timeout=2).rcode()


# -- exemptions on the clock -------------------------------------------------------------------

def test_exemption_window_without_reload(tmp_path):
    starts = int(time.time()) + 5
    expires = starts + 3
    policy = dict(TEST_POLICY, exemptions=[{
        "id": "EX-WINDOW", "clients": [DESKTOP], "services": ["chat"], "approved_by": "Head of IT",
        "reason": "ticket CHG-3", "starts": iso(starts), "expires": iso(expires)}])
    blocklists = write_blocklists(tmp_path / "bl", policy, TEST_SERVICES)
    samples = []              # (sent, received, rcode, ttl or None)
    with Dnsmasq(RECORDS) as upstream, \
         Sinkhole(tmp_path, {"upstreams": [upstream.address], "blocklists": str(blocklists)}) as server:
        assert time.time() < starts, "the server took too long to start for this window"
        for _ in range(1000):                                   # ~20 queries a second, ~9 s
            sent = time.time()
            reply = ask(server, "www.chat.test", source=DESKTOP, timeout=2)
            received = time.time()
            ttl = reply.answer[0].ttl if reply.answer else None
            samples.append((sent, received, reply.rcode(), ttl))
            if sent > expires + 1:
                break
            threading.Event().wait(0.05)
        loads = server.count("loaded")
    before = [s for s in samples if s[1] < starts]
    inside = [s for s in samples if s[0] >= starts and s[1] < expires]
    after = [s for s in samples if s[0] >= expires]
    assert before and inside and after
    assert all(rc == 3 and ttl is None for _, _, rc, ttl in before), before
    assert all(rc == 0 and ttl is not None and ttl <= expires - sent for sent, _, rc, ttl in inside), inside
    assert all(rc == 3 and ttl is None for _, _, rc, ttl in after), after
    assert loads == 0                                          # no reload happened


# -- hot reload --------------------------------------------------------------------------------

def git(*args, cwd):
    subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid", *args],
                   cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


class Load:
    """Queries in a loop from a thread, each with a known right answer, counting every miss."""

    STABLE = [("www.chat.test", MOBILE, {0}), ("doh.test", DESKTOP, {3}), ("plain.test", DESKTOP, {0})]

    def __init__(self, server, changing):
        self.server, self.changing = server, changing      # changing: [(name, source)] -> {0, 3}
        self.sent = self.answered = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def _run(self):
        cases = self.STABLE + [(n, s, {0, 3}) for n, s in self.changing]
        for i in range(200000):
            if self._stop.is_set():
                return
            name, source, ok = cases[i % len(cases)]
            self.sent += 1
            try:
                got = ask(self.server, name, source=source, timeout=2).rcode()
            except (dns.exception.Timeout, OSError) as e:
                self.failures.append(f"{name} from {source}: {e!r}")
                continue
            self.answered += 1
            if got not in ok:
                self.failures.append(f"{name} from {source}: rcode {got}, expected {ok}")

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(10)


def test_reload_under_load_git_pull_and_symlink_flip(tmp_path):
    origin = write_blocklists(tmp_path / "origin", TEST_POLICY, dict(TEST_SERVICES, news=NEWS))
    git("init", "-q", "-b", "main", cwd=origin)
    git("add", "-A", cwd=origin)
    git("commit", "-qm", "initial", cwd=origin)
    git("clone", "-q", str(origin), str(tmp_path / "A"), cwd=tmp_path)
    link = tmp_path / "current"
    os.symlink(tmp_path / "A", link)

    def commit(policy, message):
        (origin / "policy.yaml").write_text(yaml.safe_dump(policy, sort_keys=False))
        git("commit", "-qam", message, cwd=origin)
        git("pull", "-q", "--ff-only", cwd=tmp_path / "A")

    blocks_news = yaml.safe_load(yaml.safe_dump(TEST_POLICY))
    blocks_news["groups"]["desktop"]["block"].append("news")
    with Dnsmasq(RECORDS) as upstream, \
         Sinkhole(tmp_path, {"upstreams": [upstream.address], "blocklists": str(link),
                             "reload_interval": 0.5}) as server, \
         Load(server, [("news.test", DESKTOP), ("www.chat.test", DESKTOP)]) as load:
        assert rcode(server, "news.test", DESKTOP) == 0
        # 1. a valid change arrives by git pull
        commit(blocks_news, "block news on desktops")
        until(lambda: rcode(server, "news.test", DESKTOP) == 3, 10, "the pulled policy to apply")
        # 2. an invalid change arrives by git pull: rejected, the old policy keeps answering
        broken = yaml.safe_load(yaml.safe_dump(blocks_news))
        broken["groups"]["desktop"]["block"].append("no-such-service")
        commit(broken, "a mistake")
        server.wait_for_log(lambda: server.count("reload rejected") >= 1, 10, "the reload to be rejected")
        rejected = [l for l in server.lines if "reload rejected" in l]
        assert any("policy.yaml:" in l and "unknown service 'no-such-service'" in l for l in rejected)
        for _ in range(20):
            assert rcode(server, "news.test", DESKTOP) == 3
            assert rcode(server, "www.chat.test", DESKTOP) == 3
        # 3. git-sync style: a new directory, then the symlink flipped atomically
        b = tmp_path / "B"
        shutil.copytree(tmp_path / "A", b, ignore=shutil.ignore_patterns(".git"))
        fixed = yaml.safe_load(yaml.safe_dump(blocks_news))
        fixed["groups"]["desktop"]["block"].remove("chat")
        (b / "policy.yaml").write_text(yaml.safe_dump(fixed, sort_keys=False))
        os.symlink(b, tmp_path / "current.new")
        os.replace(tmp_path / "current.new", link)
        until(lambda: rcode(server, "www.chat.test", DESKTOP) == 0, 10, "the flipped policy to apply")
        assert rcode(server, "news.test", DESKTOP) == 3
        # let the load run on the final policy for a while
        done = load.answered
        until(lambda: load.answered > done + 50, 10, "more answers")
    assert load.failures == [] and load.sent == load.answered and load.answered > 100
    assert server.count("reload rejected") == len(rejected)     # one broken change, reported once
    assert server.count("Traceback") == 0


def test_sighup_reloads_now(tmp_path, blocklists):
    with Dnsmasq(RECORDS) as upstream, \
         Sinkhole(tmp_path, {"upstreams": [upstream.address], "blocklists": str(blocklists)}) as server:
        assert rcode(server, "news.test", DESKTOP) == 0
        (blocklists / "services" / "news.yaml").write_text(yaml.safe_dump(NEWS))
        policy = yaml.safe_load((blocklists / "policy.yaml").read_text())
        policy["groups"]["desktop"]["block"].append("news")
        (blocklists / "policy.yaml").write_text(yaml.safe_dump(policy))
        assert rcode(server, "news.test", DESKTOP) == 0          # reload_interval 0: no polling
        server.proc.send_signal(signal.SIGHUP)
        server.wait_for_log(lambda: server.count("loaded (was") >= 1, 10, "the SIGHUP reload")
        assert rcode(server, "news.test", DESKTOP) == 3


def test_invalid_initial_policy_refuses_to_start(tmp_path):
    broken = dict(TEST_POLICY, default_group="nobody")
    blocklists = write_blocklists(tmp_path / "bl", broken, TEST_SERVICES)
    config = tmp_path / "sinkhole.yaml"
    config.write_text(yaml.safe_dump({"listen": ["127.0.0.1:0"], "upstreams": ["127.0.0.1:9"],
                                      "blocklists": str(blocklists)}))
    proc = subprocess.run(SINKHOLE + ["serve", "-c", str(config)], cwd=ROOT, capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 1
    assert "policy.yaml:" in proc.stderr and "default_group 'nobody' is not a group" in proc.stderr
    assert "not starting" in proc.stderr and "serving DNS" not in proc.stderr


def test_fingerprint_sees_a_symlink_flip_and_nothing_else(tmp_path, blocklists):
    from resolver.server import fingerprint
    copy = tmp_path / "copy"
    shutil.copytree(blocklists, copy, copy_function=shutil.copy2)
    link = tmp_path / "link"
    os.symlink(blocklists, link)
    first = fingerprint(str(link))
    assert fingerprint(str(link)) == first
    os.symlink(copy, tmp_path / "link.new")
    os.replace(tmp_path / "link.new", link)
    assert fingerprint(str(link)) != first
    flipped = fingerprint(str(link))
    (copy / ".git").mkdir()                     # git's own files are not the policy
    (copy / ".git" / "HEAD").write_text("x")
    assert fingerprint(str(link)) == flipped
    (copy / "services" / "chat.yaml").write_text((copy / "services" / "chat.yaml").read_text() + "\n")
    assert fingerprint(str(link)) != flipped


# -- in-flight queries keep their snapshot (in-process server, real sockets) ---------------------

class HeldUpstream:
    """A real DNS server on loopback that answers www.alias.test with a CNAME to cdn.news.test,
    holding its first answer until released."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.received, self.release, self.done = threading.Event(), threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        for i in range(1000):
            if self.done.is_set():
                return
            try:
                data, addr = self.sock.recvfrom(4096)
            except socket.timeout:
                continue
            query = dns.message.from_wire(data)
            if not self.received.is_set():
                self.received.set()
                self.release.wait(10)
            reply = dns.message.make_response(query)
            owner = query.question[0].name
            reply.answer.append(dns.rrset.from_text(owner, 300, "IN", "CNAME", "cdn.news.test."))
            reply.answer.append(dns.rrset.from_text("cdn.news.test.", 300, "IN", "A", "192.0.2.20"))
            self.sock.sendto(reply.to_wire(), addr)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.release.set()
        self.done.set()
        self.thread.join(5)
        self.sock.close()


def test_in_flight_query_finishes_on_its_snapshot(tmp_path):
    from resolver.config import Config
    from resolver.loader import load_policy
    from resolver.server import Server

    services = dict(TEST_SERVICES, news=NEWS)
    blocklists = write_blocklists(tmp_path / "bl", TEST_POLICY, services)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def run(coro, timeout=15):
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)

    with HeldUpstream() as upstream:
        config = Config(listen=(("127.0.0.1", 0),), upstreams=(("127.0.0.1", upstream.port),),
                        upstream_timeout=10, blocklists=str(blocklists), reload_interval=0)
        old = load_policy(blocklists, time.time())

        async def make():
            return Server(config, old)

        server = run(make())
        try:
            address = run(server.start())[0]
            result = {}
            first = threading.Thread(target=lambda: result.update(
                reply=ask(address, "www.alias.test", source=DESKTOP, timeout=10)))
            first.start()
            assert upstream.received.wait(10), "the query did not reach the upstream"
            # the query is in flight; now a valid change (block news on desktops) and an invalid one
            blocks_news = yaml.safe_load(yaml.safe_dump(TEST_POLICY))
            blocks_news["groups"]["desktop"]["block"].append("news")
            write_blocklists(blocklists, blocks_news, services)
            assert run(server.reload()) is True and server.policy is not old
            new = server.policy
            broken = dict(blocks_news, default_group="nobody")
            write_blocklists(blocklists, broken, services)
            assert run(server.reload()) is False
            assert server.policy is new and server.reload_failures == 1
            upstream.release.set()
            first.join(15)
            # started on the old policy (news allowed): the CNAME to cdn.news.test is answered
            reply = result["reply"]
            assert reply.rcode() == 0 and "192.0.2.20" in reply.to_text()
            # the same name now (from the cache) is re-checked against the new policy: blocked
            again = ask(address, "www.alias.test", source=DESKTOP, timeout=5)
            assert again.rcode() == 3 and not again.answer
        finally:
            run(server.stop(drain=1))
            loop.call_soon_threadsafe(loop.stop)
            thread.join(5)


# -- clients behind a forwarder (ECS) ----------------------------------------------------------

def test_ecs_only_from_trusted_forwarders(tmp_path, blocklists):
    log_path = tmp_path / "query.log"
    forwarder, stranger = "127.0.3.1", "127.0.2.9"      # both in the mobile (default) group

    def via(source, address, prefix):
        query = dns.message.make_query("www.chat.test", "A", use_edns=0,
                                       options=[dns.edns.ECSOption(address, prefix)])
        return dns.query.udp(query, server.host, port=server.port, timeout=3, source=source).rcode()

    with Dnsmasq(RECORDS) as upstream, \
         Sinkhole(tmp_path, {"upstreams": [upstream.address], "blocklists": str(blocklists),
                             "ecs_clients_from": ["127.0.3.0/24"],
                             "query_log": {"target": str(log_path)}}) as server:
        assert via(forwarder, DESKTOP, 32) == 3           # trusted, full address: the desktop's policy
        assert via(stranger, DESKTOP, 32) == 0            # untrusted: its own address decides
        assert via(forwarder, "127.0.1.0", 24) == 0       # not a full address: ignored
        assert via(forwarder, MOBILE, 32) == 0            # a mobile behind the forwarder
        assert rcode(server, "www.chat.test", forwarder) == 0   # no ECS: the forwarder's own group
    import json
    clients = [json.loads(l)["client"] for l in log_path.read_text().splitlines()]
    assert clients == [DESKTOP, stranger, forwarder, MOBILE, forwarder]
