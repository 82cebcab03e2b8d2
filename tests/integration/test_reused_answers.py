"""Finished answers the server reuses (Policy.remember: the same query bytes from the same group get
the same answer without parsing or deciding again) against a real `sinkhole serve`: each client
still gets its own query ID, its own query-log line and its own count in the metrics; a cached
answer is reused only while its TTLs would read the same, so they still count down; and a reload
starts afresh."""
from __future__ import annotations

import json
import re
import subprocess
import time

import dns.message
import dns.query
import pytest

from helpers import TEST_POLICY, TEST_SERVICES, Dnsmasq, Sinkhole, have, write_blocklists

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not have("dnsmasq"), reason="needs dnsmasq (Debian dnsmasq-base)"),
              pytest.mark.skipif(not have("curl"), reason="needs curl")]

RECORDS = ["--host-record=plain.test,192.0.2.11"]           # TTL 300 (helpers.Dnsmasq)


def query(server, name, qid, source):
    q = dns.message.make_query(name, "A", use_edns=False)
    q.id = qid
    return dns.query.udp(q, server.host, port=server.port, timeout=3, source=source)


def scrape(port: int) -> str:
    return subprocess.run(["curl", "-s", f"http://127.0.0.1:{port}/metrics"], capture_output=True, text=True,
                          timeout=10, check=True).stdout


def sample(text: str, name: str, **labels) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        m = re.match(rf"{name}(?:\{{(.*)\}})? (\S+)$", line)
        if m and ",".join(sorted((m.group(1) or "").split(","))) == want:
            return float(m.group(2))
    raise AssertionError(f"no sample {name} {labels}")


def test_reused_answers_keep_ids_log_lines_counts_and_ttls(tmp_path, blocklists):
    log_path = tmp_path / "query.log"
    with Dnsmasq(RECORDS) as upstream, \
         Sinkhole(tmp_path, {"upstreams": [upstream.address], "blocklists": str(blocklists),
                             "metrics": {"listen": "127.0.0.1:0"},
                             "query_log": {"target": str(log_path)}}) as server:
        metrics_port = int(next(l for l in server.lines if "metrics on" in l).split()[-1])
        desktops = [f"127.0.1.{n}" for n in range(10, 16)]
        for n, source in enumerate(desktops):             # the first is decided, the rest reused
            reply = query(server, "www.chat.test", 1000 + n, source)
            assert reply.id == 1000 + n and reply.rcode() == 3
        mobiles = [f"127.0.2.{n}" for n in range(10, 16)]
        first = query(server, "plain.test", 7, mobiles[0])   # forwarded, then cached
        assert first.answer and first.answer[0].ttl <= 300
        ttls = []
        for n, source in enumerate(mobiles[1:]):
            reply = query(server, "plain.test", 2000 + n, source)
            assert reply.id == 2000 + n and reply.rcode() == 0
            assert [r.address for r in reply.answer[0]] == ["192.0.2.11"]
            ttls.append(reply.answer[0].ttl)
        # a reused cached answer lasts only until its TTLs would tick down: ask until they do
        deadline = time.monotonic() + 5
        later = ttls[-1]
        while later == ttls[-1] and time.monotonic() < deadline:
            later = query(server, "plain.test", 3000, mobiles[-1]).answer[0].ttl
        assert later < ttls[-1], "the TTL of a cached answer must count down"
        text = scrape(metrics_port)
        assert sample(text, "sinkhole_dns_blocked_total", group="desktop", service="chat") == len(desktops)
        assert sample(text, "sinkhole_dns_responses_total", group="desktop", action="blocked",
                      rcode="NXDOMAIN") == len(desktops)
        cached = sample(text, "sinkhole_dns_responses_total", group="mobile", action="cached", rcode="NOERROR")
        assert cached >= len(mobiles) - 1 + 1
        assert sample(text, "sinkhole_cache_hits_total") == cached    # reused cache answers are hits too
    lines = [json.loads(l) for l in log_path.read_text().splitlines()]
    blocked = [l for l in lines if l["qname"] == "www.chat.test"]
    assert [l["client"] for l in blocked] == desktops
    assert all(l["decision"] == "blocked" and l["rule"] and l["service"] == "chat" for l in blocked)
    plain = [l for l in lines if l["qname"] == "plain.test"]
    assert [l["client"] for l in plain[:len(mobiles)]] == mobiles
    assert [l["decision"] for l in plain] == ["forwarded"] + ["cached"] * (len(plain) - 1)


def test_a_reload_forgets_reused_answers(tmp_path):
    services = {k: dict(v) for k, v in TEST_SERVICES.items()}
    blocklists = write_blocklists(tmp_path / "bl", TEST_POLICY, services)
    with Dnsmasq(["--host-record=www.chat.test,192.0.2.10"]) as upstream, \
         Sinkhole(tmp_path, {"upstreams": [upstream.address], "blocklists": str(blocklists)}) as server:
        for qid in (1, 2, 3):
            assert query(server, "www.chat.test", qid, "127.0.1.5").rcode() == 3
        policy = dict(TEST_POLICY, groups={name: dict(g, block=[]) for name, g in TEST_POLICY["groups"].items()})
        write_blocklists(blocklists, policy, services)
        server.proc.send_signal(1)                           # SIGHUP: reload now
        server.wait_for_log(lambda: server.count("loaded (was") >= 1, 20, "the reload")
        reply = query(server, "www.chat.test", 4, "127.0.1.5")
        assert reply.id == 4 and reply.rcode() == 0 and reply.answer
