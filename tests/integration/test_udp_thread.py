"""The UDP socket's thread (server._udp_serve) in-process: a bug that escapes the hot loop costs the
batch in hand (at worst its counting) and is logged and counted, never the socket; /healthz's `serving` says whether
every UDP thread is alive."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

from helpers import TEST_POLICY, TEST_SERVICES, ask, write_blocklists
from resolver import core
from resolver.config import CacheConfig, Config
from resolver.loader import load_policy
from resolver.observe import Quiet
from resolver.server import Server

pytestmark = pytest.mark.integration


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

    def __init__(self, blocklists, observer, **config):
        self.config = Config(listen=(("127.0.0.1", 0),), upstreams=(("127.0.0.1", 9),),
                             blocklists=str(blocklists), reload_interval=0, **config)
        self.observer = observer

    def run(self, coro, timeout=15):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def __enter__(self):
        self.loop = asyncio.new_event_loop()
        self.runner = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.runner.start()

        async def make():
            return Server(self.config, load_policy(self.config.blocklists, time.time()), self.observer)

        self.server = self.run(make())
        self.address = self.run(self.server.start())[0]
        return self

    def __exit__(self, *exc):
        self.run(self.server.stop(drain=1))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.runner.join(5)


def test_no_reuse_when_cache_answers_is_0(tmp_path, monkeypatch):
    blocklists = write_blocklists(tmp_path / "bl", TEST_POLICY, TEST_SERVICES)
    decided = []                                   # core.begin runs: each query decided afresh
    begin = core.begin
    monkeypatch.setattr(core, "begin", lambda *args: decided.append(1) or begin(*args))
    with Running(blocklists, Quiet(), cache=CacheConfig(answers=0)) as r:
        for _ in range(3):
            assert ask(r.address, "www.chat.test", source="127.0.1.5").rcode() == 3
        assert len(decided) == 3 and r.server.policy.answer_tables == {}
    decided.clear()
    with Running(blocklists, Quiet()) as r:
        for _ in range(3):
            assert ask(r.address, "www.chat.test", source="127.0.1.5").rcode() == 3
        assert len(decided) == 1 and r.server.policy.answer_tables


def test_a_bug_in_the_hot_loop_costs_one_packet_not_the_socket(tmp_path, caplog):
    blocklists = write_blocklists(tmp_path / "bl", TEST_POLICY, TEST_SERVICES)
    observer = Flaky(failures=2)
    running = Running(blocklists, observer).__enter__()
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
