"""The detectors through the whole engine: frames built with scapy in, alert lines out; one or more
cases per detector, and the negatives (allowed browsing, mobiles, the sanctioned resolver)."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from exporters import quic  # noqa: E402
from exporters.detectors import DETECTORS  # noqa: E402
from exporters.metrics import SidecarMetrics  # noqa: E402
from resolver.exposition import LABELS, lint  # noqa: E402
from sidecar_frames import (CHAT_IP, DESKTOP, DESKTOP6, DOH_IP, DOH_IP6, EXEMPT, HTTPDNS_IP, MOBILE,  # noqa: E402
                            RESOLVER, WEB_IP, WEB_IP6, client_hello_record, dns_answer, dns_query, engine,
                            hello_message, syn, tcp_data, udp)

T0 = 1000.0


def feed(eng, frames, start=T0, step=0.01):
    rows = []
    for i, f in enumerate(frames):
        rows += eng.feed(start + i * step, 1, f)
    return rows


def tls_flow(src, dst, sni, port=443, sport=41000, pad=0, split=None, order=None, alpn=("h2",)):
    """SYN, then the ClientHello record cut into `split`-byte segments, sent in `order`."""
    record = client_hello_record(sni, alpn, pad)
    split = split or len(record)
    segs = [(i, record[i:i + split]) for i in range(0, len(record), split)]
    if order:
        segs = [segs[i] for i in order]
    return [syn(src, dst, port, sport, seq=999)] + [tcp_data(src, dst, port, s, sport, 1000 + i) for i, s in segs]


def quic_flow(src, dst, sni, alpn=("h3",), port=443, sport=42000, parts=1, pad=0):
    msg = hello_message(sni, alpn, pad)
    dcid = os.urandom(8)
    size = -(-len(msg) // parts)
    out = []
    for pn, o in enumerate(range(0, len(msg), size)):
        chunk = msg[o:o + size]
        frames = b"\x06" + quic.varint(o) + quic.varint(len(chunk)) + chunk
        out.append(udp(src, dst, port, quic.protect_initial(dcid, b"", pn, frames + bytes(1100 - len(frames) % 1100)),
                       sport))
    return out[::-1] if parts > 1 else out          # out of order across packets, too


def answer(client, name, addresses, ttl=60):
    return udp(RESOLVER, client, 50000, dns_answer(name, addresses, ttl), sport=53)


def detectors(rows):
    return sorted(r["detector"] for r in rows)


@pytest.fixture
def eng(tmp_path):
    return engine(tmp_path, started=T0)


# -- one table: frames from a client -> the alerts they raise ------------------------------------
CASES = {
    "external-dns udp": ([udp(DESKTOP, "192.0.2.1", 53, dns_query("www.example.test"))], ["external-dns"]),
    "external-dns tcp": ([syn(DESKTOP, "192.0.2.1", 53)], ["external-dns"]),
    "external-dns v6": ([udp(DESKTOP6, "2001:db8::1", 53, dns_query("x.test"))], ["external-dns"]),
    "dot to a listed resolver": ([syn(DESKTOP, DOH_IP, 853)], ["dot"]),
    "dot with a resolver's sni is dot only": (tls_flow(DESKTOP, DOH_IP, "doh.test", port=853), ["dot"]),
    "dot to anyone": ([syn(DESKTOP, "192.0.2.77", 853)], ["dot", "no-dns"]),
    "doq on 853": ([udp(DESKTOP, "192.0.2.77", 853, b"\xc0" + bytes(40))], ["doq"]),
    "doq by alpn": (quic_flow(DESKTOP, WEB_IP, "www.example.test", alpn=("doq",)), ["doq", "no-dns"]),
    "doh-sni split out of order": (tls_flow(DESKTOP, WEB_IP, "dns.doh.test", pad=3000, split=700,
                                            order=[2, 0, 4, 1, 3]), ["doh-sni", "no-dns"]),
    "doh-sni v6": (tls_flow(DESKTOP6, WEB_IP6, "doh.test"), ["doh-sni", "no-dns"]),
    "doh-ip without sni": (tls_flow(DESKTOP, DOH_IP, None), ["doh-ip"]),
    "doh-ip with another sni": (tls_flow(DESKTOP, DOH_IP, "www.example.test"), ["doh-ip"]),
    "doh-ip v6": (tls_flow(DESKTOP6, DOH_IP6, None), ["doh-ip"]),
    "doh-sni to the resolver's address is not doh-ip too": (tls_flow(DESKTOP, DOH_IP, "doh.test"), ["doh-sni"]),
    "doh-quic split over initials": (quic_flow(DESKTOP, WEB_IP, "doh.test", parts=3, pad=2000),
                                     ["doh-quic", "no-dns"]),
    "httpdns by url": ([syn(DESKTOP, "192.0.2.50", 80),
                        tcp_data(DESKTOP, "192.0.2.50", 80, b"GET /d?dn=web.chat.test&ttl=1 HTTP/1.1\r\n"
                                 b"Host: 192.0.2.50\r\n\r\n")], ["httpdns", "no-dns"]),
    "httpdns by address": ([syn(DESKTOP, HTTPDNS_IP, 443)], ["httpdns"]),
    "blocked-sni tls": (tls_flow(DESKTOP, WEB_IP, "web.chat.test"), ["blocked-sni", "no-dns"]),
    "blocked-sni quic": (quic_flow(DESKTOP, WEB_IP, "web.chat.test"), ["blocked-sni", "no-dns"]),
    "blocked-ip": ([syn(DESKTOP, CHAT_IP, 5222)], ["blocked-ip"]),
    "no-dns": ([syn(DESKTOP, "192.0.2.99", 443)], ["no-dns"]),
    # negatives
    "sanctioned resolver": ([udp(DESKTOP, RESOLVER, 53, dns_query("www.example.test")),
                            syn(DESKTOP, RESOLVER, 53), syn(DESKTOP, RESOLVER, 853)], ["dot"]),
    "allowed https after a lookup": ([answer(DESKTOP, "www.example.test", [WEB_IP])]
                                     + tls_flow(DESKTOP, WEB_IP, "www.example.test")
                                     + quic_flow(DESKTOP, WEB_IP, "www.example.test"), []),
    "mobile does everything": ([udp(MOBILE, "192.0.2.1", 53, dns_query("x.test")), syn(MOBILE, CHAT_IP, 443),
                                syn(MOBILE, DOH_IP, 853)] + tls_flow(MOBILE, DOH_IP, "doh.test")
                               + tls_flow(MOBILE, WEB_IP, "web.chat.test", sport=41001), []),
    "exempted client": (tls_flow(EXEMPT, CHAT_IP, "web.chat.test") + [syn(EXEMPT, CHAT_IP, 5222, 40001)], []),
    "internal destinations": ([syn(DESKTOP, "10.9.9.9", 443), syn(DESKTOP6, "fd00:9::9", 443)], []),
    "shared infrastructure": ([syn(DESKTOP, "17.253.1.1", 443)], []),
    "not a client's syn": ([tcp_data(WEB_IP, DESKTOP, 41000, b"\x16\x03\x03\x00\x10" + bytes(16), sport=443)], []),
}


@pytest.mark.parametrize("name", CASES)
def test_detector_table(eng, name):
    frames, want = CASES[name]
    rows = feed(eng, frames)
    assert detectors(rows) == sorted(want), rows
    for row in rows:
        assert row["client"] in (DESKTOP, DESKTOP6) and row["group"] == "desktop"


def test_alert_fields(eng):
    rows = feed(eng, tls_flow(DESKTOP, WEB_IP, "web.chat.test", port=8443))
    row = next(r for r in rows if r["detector"] == "blocked-sni")
    assert row == {**row, "client": DESKTOP, "destination": WEB_IP, "port": 8443, "protocol": "tcp",
                   "sni": "web.chat.test", "name": "web.chat.test", "service": "chat", "group": "desktop",
                   "suppressed_before": 0}
    assert row["time"].startswith("1970-01-01T00:16:40") and "chat.test" in row["evidence"]
    assert [json.loads(line) for line in eng.out.getvalue().splitlines()] == rows


def test_httpdns_names_what_is_asked(eng):
    rows = feed(eng, [tcp_data(DESKTOP, "192.0.2.50", 80, b"GET /1234/d?host=Web.Chat.Test HTTP/1.1\r\n\r\n")])
    assert [(r["detector"], r["name"]) for r in rows] == [("httpdns", "web.chat.test")]


def test_mobile_is_counted_not_alerted(eng):
    feed(eng, CASES["mobile does everything"][0])
    counted = {d: c[2] for d, c in eng.counts.items() if c[2]}
    # no-dns only for the one destination outside every service's ranges (WEB_IP)
    assert counted == {"external-dns": 1, "blocked-ip": 1, "dot": 1, "doh-sni": 1, "blocked-sni": 1,
                       "no-dns": 1}


def test_one_alert_per_client_detector_destination_per_window(eng):
    flows = [syn(DESKTOP, CHAT_IP, 5222, sport=40000 + i) for i in range(5)]
    assert detectors(feed(eng, flows)) == ["blocked-ip"]
    assert eng.counts["blocked-ip"][:2] == [1, 4]
    assert detectors(feed(eng, [syn(DESKTOP, "198.51.100.8", 5222)])) == ["blocked-ip"]   # another destination
    later = feed(eng, [syn(DESKTOP, CHAT_IP, 5222, sport=49999)], start=T0 + 601)
    assert [(r["detector"], r["suppressed_before"]) for r in later] == [("blocked-ip", 4)]


# -- no-dns: how false positives are kept down ---------------------------------------------------
def test_no_dns_honours_ttl_plus_grace_and_a_floor(eng):
    feed(eng, [answer(DESKTOP, "www.example.test", [WEB_IP, WEB_IP6], ttl=30)])
    assert feed(eng, [syn(DESKTOP, WEB_IP, 443), syn(DESKTOP6, WEB_IP6, 443)], start=T0 + 500) == []
    # 30 s TTL, floored to 300, plus 300 grace: good until T0 + 600
    assert detectors(feed(eng, [syn(DESKTOP, WEB_IP, 443, sport=40001)], start=T0 + 700)) == ["no-dns"]


def test_no_dns_site_wide_answer_counts(eng):
    feed(eng, [answer(MOBILE, "shared.example.test", ["192.0.2.33"])])
    assert feed(eng, [syn(DESKTOP, "192.0.2.33", 443)]) == []


def test_no_dns_quiet_while_learning_and_for_clients_caught_resolving_elsewhere(tmp_path):
    eng = engine(tmp_path, learning=1800, started=T0)
    feed(eng, [syn(DESKTOP, "192.0.2.99", 443)], start=T0 + 10)
    assert eng.counts["no-dns"] == [0, 0, 1]
    rows = feed(eng, [udp(DESKTOP, "192.0.2.1", 53, dns_query("x.test")), syn(DESKTOP, "192.0.2.98", 443)],
                start=T0 + 2000)
    assert detectors(rows) == ["external-dns"]          # no-dns explained by external-dns
    assert eng.counts["no-dns"] == [0, 0, 2]


def test_answers_are_learned_in_packet_order_across_runs(tmp_path):
    """feed_all handles frames sidecar.RUN at a time (flow tables first, then reporting); an
    answer from our resolver is learned in its place among the observations: the SYN before it is
    no-dns, the one after it is not, on every side of a run's end; the same rows as frame by frame."""
    from exporters.sidecar import RUN
    frames = []
    for i in range(RUN):
        server = f"11.0.{i // 250}.{i % 250 + 1}"
        frames += [syn(DESKTOP, server, 443, sport=2000 + i), answer(DESKTOP, f"s{i}.example.test", [server]),
                   syn(DESKTOP, server, 443, sport=30000 + i)]
    batched, one_by_one = engine(tmp_path), engine(tmp_path)
    rows = batched.feed_all((T0 + i * 0.001, 1, f) for i, f in enumerate(frames))
    assert rows == [r for i, f in enumerate(frames) for r in one_by_one.feed(T0 + i * 0.001, 1, f)]
    assert [r["destination"] for r in rows] == [f"11.0.{i // 250}.{i % 250 + 1}" for i in range(RUN)]
    assert {r["detector"] for r in rows} == {"no-dns"} and batched.counts["no-dns"] == [RUN, 0, 0]
    assert len(batched.learned.per_client) == RUN and batched.packets == 3 * RUN


def test_frames_read_before_an_error_are_handled(tmp_path):
    """A capture that breaks off (the reader raises) after more than a run of frames: every frame
    read before the error is counted, observed and reported (alerts written), then the error goes on."""
    from exporters.capture import CaptureError
    from exporters.sidecar import RUN
    eng = engine(tmp_path)

    def frames():
        for i in range(RUN + 7):
            yield T0 + i * 0.001, 1, syn(DESKTOP, f"11.1.{i // 250}.{i % 250 + 1}", 443, sport=2000 + i)
        raise CaptureError("x.pcap: truncated record at byte 99")
    with pytest.raises(CaptureError):
        eng.feed_all(frames())
    assert eng.packets == RUN + 7 and eng.counts["no-dns"] == [RUN + 7, 0, 0]
    assert len(eng.out.getvalue().splitlines()) == RUN + 7


# -- policy, metrics, bounds ---------------------------------------------------------------------
def test_metrics_count_by_detector_and_group(tmp_path):
    m = SidecarMetrics()
    eng = engine(tmp_path, metrics=m, started=T0)
    feed(eng, [syn(DESKTOP, CHAT_IP, 5222), syn(DESKTOP, CHAT_IP, 5222, 40001), syn(MOBILE, CHAT_IP, 5222),
               b"\x00garbage"])
    get = m.registry.get_sample_value
    assert get("sinkhole_bypass_detections_total", {"detector": "blocked-ip", "group": "desktop"}) == 2
    assert get("sinkhole_bypass_detections_total", {"detector": "blocked-ip", "group": "mobile"}) == 1
    assert get("sinkhole_bypass_detections_total", {"detector": "doq", "group": "mobile"}) == 0
    assert get("sinkhole_bypass_alerts_total", {"detector": "blocked-ip"}) == 1
    assert get("sinkhole_bypass_alerts_suppressed_total", {"detector": "blocked-ip"}) == 1
    assert get("sinkhole_bypass_packets_total") == 4
    assert get("sinkhole_bypass_packets_unparsed_total") == 1


def test_metric_names_follow_the_house_rules():
    m = SidecarMetrics()
    names = [metric.name for metric in m.registry.collect()]
    assert len(names) == 9
    for metric in m.registry.collect():
        assert metric.name.startswith("sinkhole_bypass_")
        if metric.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in metric.samples)
        for s in metric.samples:
            assert set(s.labels) <= {"detector", "group", "result"}
    assert set(DETECTORS) == {s.labels["detector"] for s in m.registry.collect()
                              if s.name == "sinkhole_bypass_alerts" for s in s.samples}
    m.groups(["desktop", "mobile"])
    # the shared lint (resolver.exposition) with the shared label sets, reloads{result} included
    assert lint(m.registry) == []
    assert {s.labels["result"] for f in m.registry.collect() if f.name == "sinkhole_bypass_policy_reloads"
            for s in f.samples} == LABELS["result"]


def test_a_flood_of_flows_cannot_grow_state(tmp_path):
    eng = engine(tmp_path, started=T0)
    eng.tcp.limit = eng.udp.limit = eng.quic.limit = 100
    for i in range(3000):
        eng.feed(T0, 1, syn(DESKTOP, "192.0.2.99", 443, sport=1024 + i))
        eng.feed(T0, 1, udp(DESKTOP, "192.0.2.1", 53, b"x", sport=1024 + i))
    for _ in range(300):
        eng.feed(T0, 1, quic_flow(DESKTOP, WEB_IP, "x.test", sport=3000 + _)[0])
    assert len(eng.tcp) <= 100 and len(eng.udp) <= 100 and len(eng.quic) <= 100
    assert len(eng.alerts.recent) <= eng.alerts.recent.limit


def test_reload_swaps_policy_and_keeps_the_last_good_one(tmp_path):
    import yaml
    from exporters.sidecar import Reloader
    eng = engine(tmp_path, started=T0)
    m = SidecarMetrics()
    directory = tmp_path / "blocklists"
    reloader = Reloader(eng, str(directory), 0, m)
    policy_file = directory / "policy.yaml"
    original = policy_file.read_text()
    policy_file.write_text("groups: [not, a, mapping]\n")
    reloader.requested = True
    reloader.maybe()
    assert detectors(feed(eng, [syn(DESKTOP, CHAT_IP, 5222)])) == ["blocked-ip"]
    data = yaml.safe_load(original)
    data["groups"]["desktop"]["block"] = ["encrypted-dns"]
    policy_file.write_text(yaml.safe_dump(data))
    reloader.requested = True
    reloader.maybe()
    assert feed(eng, [syn(DESKTOP, CHAT_IP, 5223, sport=40002)], start=T0 + 700) == []
    get = m.registry.get_sample_value
    assert (get("sinkhole_bypass_policy_reloads_total", {"result": "failed"}),
            get("sinkhole_bypass_policy_reloads_total", {"result": "ok"})) == (1, 1)


def test_detect_skips_only_detectors_that_cannot_fire_for_a_kind(eng):
    """detect() runs BY_KIND[(kind, transport, ranged)], not ORDER: every detector left out for a
    kind, transport and server in or outside the services' ip_ranges must return None for every
    observation of them (all ports, names, ALPNs, servers)."""
    import ipaddress
    import itertools

    from exporters.detectors import BY_KIND, ORDER
    from exporters.packets import Observation
    ctx = eng.ctx
    kinds = {("connect", "tcp"), ("connect", "udp"), ("connect", "quic"), ("hello", "tcp"), ("hello", "quic"),
             ("http", "tcp")}
    assert set(BY_KIND) == {(k, t, ranged) for k, t in kinds for ranged in (False, True)}
    for key in BY_KIND:
        assert [d for d in ORDER if d in BY_KIND[key]] == list(BY_KIND[key])     # ORDER kept
    servers = [ipaddress.ip_address(a) for a in (DOH_IP, HTTPDNS_IP, CHAT_IP, WEB_IP, RESOLVER, DOH_IP6, WEB_IP6)]
    assert {bool(ctx.ranges.get(s.version, int(s))) for s in servers} == {False, True}
    names = [None, "dns.doh.test", "web.chat.test", "www.example.test"]
    fired = set()
    for (kind, transport), port, server, name, alpn, detail in itertools.product(
            sorted(kinds), (53, 80, 443, 853), servers, names,
            ((), ("dot",), ("doq",), ("h3",)), ("", "/dns-query?dns=x", "/d?dn=a.test")):
        client = ipaddress.ip_address(DESKTOP6 if server.version == 6 else DESKTOP)
        obs = Observation(T0 + 10, kind, transport, server.version, int(client), int(server), 40000, port,
                          sni=name, alpn=alpn, name=name, detail=detail)
        selected = BY_KIND[(kind, transport, bool(ctx.ranges.get(server.version, int(server))))]
        for d in ORDER:
            found = d(obs, ctx)
            if d not in selected:
                assert found is None, (d.__name__, obs)
            elif found is not None:
                fired.add((kind, d.__name__))
    assert {d.__name__ for d in ORDER} - {d for _, d in fired} == set()      # the product reaches every detector
