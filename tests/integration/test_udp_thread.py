"""The UDP socket's thread (server._udp_serve) in-process: a bug that escapes the hot loop costs the
packet in hand and is logged and counted, never the socket; /healthz's `serving` says whether
every UDP thread is alive."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

from helpers import TEST_POLICY, TEST_SERVICES, ask, write_blocklists
from resolver.config import Config
from resolver.loader import load_policy
from resolver.observe import Quiet
from resolver.server import Server

pytestmark = pytest.mark.integration


class Flaky(Quiet):
    """An observer whose count() fails for the first `failures` reused answers."""

    def __init__(self, failures: int):
        self.failures = failures
        self.drops: list[str] = []

    def signature(self, outcome):
        return (outcome.group, outcome.action)

    def count(self, signature, duration):
        if self.failures > 0:
            self.failures -= 1
            raise RuntimeError("a bug in the metrics")

    def dropped(self, reason):
        self.drops.append(reason)


def test_a_bug_in_the_hot_loop_costs_one_packet_not_the_socket(tmp_path, caplog):
    blocklists = write_blocklists(tmp_path / "bl", TEST_POLICY, TEST_SERVICES)
    loop = asyncio.new_event_loop()
    runner = threading.Thread(target=loop.run_forever, daemon=True)
    runner.start()

    def run(coro, timeout=15):
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)

    config = Config(listen=(("127.0.0.1", 0),), upstreams=(("127.0.0.1", 9),), blocklists=str(blocklists),
                    reload_interval=0)
    observer = Flaky(failures=2)

    async def make():
        return Server(config, load_policy(blocklists, time.time()), observer)

    server = run(make())
    try:
        address = run(server.start())[0]
        assert ask(address, "www.chat.test", source="127.0.1.5").rcode() == 3    # decided, remembered
        for _ in range(2):                         # reused: the answer goes out, then count() fails
            assert ask(address, "www.chat.test", source="127.0.1.5").rcode() == 3
        assert observer.drops == ["internal", "internal"]
        assert "UDP loop on" in caplog.text
        assert ask(address, "www.chat.test", source="127.0.1.5", timeout=3).rcode() == 3
        assert server.serving
    finally:
        run(server.stop(drain=1))
        loop.call_soon_threadsafe(loop.stop)
        runner.join(5)
    assert not server.serving and not any(t.is_alive() for t in server._udp_threads)
