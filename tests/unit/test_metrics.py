"""The resolver's metrics: every declared metric passes the naming lint and `promtool check metrics`,
the counts follow the Outcomes the pure core produces for real DNS packets, labels carry no client
address or query name, and the HTTP endpoint serves /metrics and /healthz."""
from __future__ import annotations

import datetime
import struct
import subprocess
import urllib.error
import urllib.request

import dns.message
import dns.rrset
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from helpers import TEST_POLICY, TEST_SERVICES, have, write_blocklists
from resolver import core, wire
from resolver.config import Config
from resolver.exposition import bypass_detections, lint, serve_metrics
from resolver.loader import load_policy
from resolver.metrics import NO_GROUP, PrometheusObserver
from resolver.server import Server

NOW = 1_900_000_000.0          # a fixed "now" for the pure core (2030-03-17)
EXPIRES = NOW + 3 * 86400


def _policy_dir(tmp_path, extra=None):
    policy = dict(TEST_POLICY, exemptions=[{
        "id": "EX-1", "clients": ["127.0.1.9"], "services": ["chat"], "approved_by": "Head of IT",
        "reason": "test", "expires": datetime.datetime.fromtimestamp(EXPIRES, datetime.timezone.utc).isoformat()}])
    policy.update(extra or {})
    return write_blocklists(tmp_path / "blocklists", policy, TEST_SERVICES)


@pytest.fixture
def resolver(tmp_path):
    """A real Server (not listening) bound to an observer with a private registry."""
    directory = _policy_dir(tmp_path)
    config = Config(blocklists=str(directory), upstreams=(("127.0.0.1", 5300), ("::1", 5301)))
    observer = PrometheusObserver(None, CollectorRegistry(), clock=lambda: NOW)
    server = Server(config, load_policy(directory, NOW), observer, clock=lambda: NOW)
    return server, observer


def ask(server, observer, name, client="127.0.1.5", rdtype="A", answer: str | None = None,
        data: bytes | None = None):
    """One real DNS packet through the pure core; `answer` plays the upstream (None: it failed)."""
    data = data if data is not None else dns.message.make_query(name, rdtype).to_wire()
    step = core.begin(data, client, server.policy, server.ctx, NOW)
    if isinstance(step, core.Forward):
        reply = None
        if answer is not None:
            upstream_query = dns.message.from_wire(wire.make_query(7, step.query.key))
            response = dns.message.make_response(upstream_query)
            response.answer.append(dns.rrset.from_text(upstream_query.question[0].name, 300, "IN", "A", answer))
            reply = wire.parse_reply(response.to_wire(), step.query.key, 7)
        _, outcome = core.finish(step, reply, server.policy, server.ctx, NOW)
    else:
        _, outcome = step
    observer.query(outcome, 0.0031)
    return outcome


def value(observer, name, **labels):
    return observer.registry.get_sample_value(name, labels)


def traffic(server, observer):
    ask(server, observer, "www.chat.test")                                   # desktop: blocked
    ask(server, observer, "www.chat.test", client="127.0.2.5", answer="192.0.2.10")   # mobile: forwarded
    ask(server, observer, "www.chat.test", client="127.0.2.5")               # mobile: cached
    ask(server, observer, "img.chat.test", client="127.0.1.9", answer="192.0.2.11")   # exempt desktop
    ask(server, observer, "down.test", client="127.0.2.5", rdtype="MX")      # upstream failed: SERVFAIL
    ask(server, observer, "www.chat.test", client="192.0.2.1")               # not allowed: REFUSED
    ask(server, observer, "x.test", rdtype="ANY")                            # RFC 8482 local answer
    ask(server, observer, "", data=b"\x00\x01garbage")                       # too short: dropped
    ask(server, observer, "", data=struct.pack("!6H", 1, 0x0100, 1, 0, 0, 0) + b"\x03abc")  # FORMERR
    observer.upstream("127.0.0.1:5300", 0.004, True)
    observer.upstream("[::1]:5301", 1.5, False)
    observer.dropped("malformed")
    observer.dropped("something-new")


# -- the lint and promtool ---------------------------------------------------------------------------
def test_every_declared_metric_passes_the_lint(resolver):
    server, observer = resolver
    traffic(server, observer)
    assert lint(observer.registry) == []
    exposed = {f.name for f in observer.registry.collect()}
    # the list, all present
    for name in ("sinkhole_dns_queries", "sinkhole_dns_responses", "sinkhole_dns_blocked",
                 "sinkhole_dns_request_duration_seconds", "sinkhole_cache_requests", "sinkhole_cache_hits",
                 "sinkhole_cache_entries", "sinkhole_upstream_requests", "sinkhole_upstream_failures",
                 "sinkhole_upstream_request_duration_seconds", "sinkhole_policy_reloads",
                 "sinkhole_policy_reload_failures", "sinkhole_policy_last_reload_success_timestamp_seconds",
                 "sinkhole_policy_entries", "sinkhole_policy", "sinkhole_exemptions_active",
                 "sinkhole_exemptions_next_expiry_timestamp_seconds", "sinkhole_querylog_lines_dropped",
                 "sinkhole_build"):
        assert name in exposed, name


@pytest.mark.skipif(not have("promtool"), reason="needs promtool (Debian prometheus)")
def test_exposition_passes_promtool(resolver):
    server, observer = resolver
    traffic(server, observer)
    text = generate_latest(observer.registry)
    result = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, timeout=30)
    assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), result


@pytest.mark.skipif(not have("promtool"), reason="needs promtool (Debian prometheus)")
def test_lint_and_promtool_reject_bad_metrics():
    registry = CollectorRegistry()
    Gauge("sinkhole_dns_latency_milliseconds", "x", registry=registry).set(1)
    Counter("sinkhole_dns_answers", "x", ["client"], registry=registry).labels("192.0.2.7").inc()
    Gauge("sinkhole_dns_seen_total", "x", registry=registry).set(1)
    Histogram("sinkhole_dns_size", "x", registry=registry).observe(3)
    Gauge("sinkhole_policy_reload_time", "x", registry=registry).set(1)
    Gauge("sinkhole_dns_qtypes", "x", ["qtype"], registry=registry).labels("NULL").set(1)
    Gauge("sinkhole_dns_pending", "x", ["group"], registry=registry)
    Gauge("dnsqueries", "", registry=registry).set(1)
    problems = "\n".join(lint(registry))
    for expected in ("sinkhole_dns_latency_milliseconds (gauge): use base units",
                     "sinkhole_dns_answers_total (counter): label 'client' is not one of",
                     "sinkhole_dns_seen_total (gauge): only counters end in _total",
                     "sinkhole_dns_size (histogram): a histogram needs a base unit suffix",
                     "sinkhole_policy_reload_time (gauge): times are <name>_timestamp_seconds",
                     "sinkhole_dns_qtypes (gauge): qtype='NULL' is not one of",
                     "sinkhole_dns_pending (gauge): no samples",
                     "dnsqueries (gauge): not sinkhole_", "dnsqueries (gauge): no help text"):
        assert expected in problems, problems
    result = subprocess.run(["promtool", "check", "metrics"], input=generate_latest(registry),
                            capture_output=True, timeout=30)
    assert result.returncode != 0 and b"milliseconds" in result.stdout + result.stderr


# -- what gets counted ---------------------------------------------------------------------------------
def test_counts_follow_the_outcomes(resolver):
    server, observer = resolver
    traffic(server, observer)
    v = lambda name, **labels: value(observer, name, **labels)
    assert v("sinkhole_dns_queries_total", group="desktop", qtype="A") == 2
    assert v("sinkhole_dns_queries_total", group="mobile", qtype="A") == 2
    assert v("sinkhole_dns_queries_total", group="mobile", qtype="MX") == 1
    assert v("sinkhole_dns_queries_total", group="desktop", qtype="ANY") == 1
    assert v("sinkhole_dns_queries_total", group=NO_GROUP, qtype="A") == 1
    assert v("sinkhole_dns_responses_total", group="desktop", action="blocked", rcode="NXDOMAIN") == 1
    assert v("sinkhole_dns_responses_total", group="mobile", action="forwarded", rcode="NOERROR") == 1
    assert v("sinkhole_dns_responses_total", group="mobile", action="cached", rcode="NOERROR") == 1
    assert v("sinkhole_dns_responses_total", group="desktop", action="forwarded", rcode="NOERROR") == 1
    assert v("sinkhole_dns_responses_total", group="mobile", action="error", rcode="SERVFAIL") == 1
    assert v("sinkhole_dns_responses_total", group=NO_GROUP, action="refused", rcode="REFUSED") == 1
    assert v("sinkhole_dns_responses_total", group="desktop", action="local", rcode="NOERROR") == 1
    assert v("sinkhole_dns_responses_total", group=NO_GROUP, action="error", rcode="FORMERR") == 1
    assert v("sinkhole_dns_queries_total", group=NO_GROUP, qtype="other") == 2
    assert v("sinkhole_dns_blocked_total", group="desktop", service="chat") == 1
    assert v("sinkhole_dns_request_duration_seconds_count", action="blocked") == 1
    assert v("sinkhole_dns_request_duration_seconds_bucket", action="blocked", le="0.0025") == 0
    assert v("sinkhole_dns_request_duration_seconds_bucket", action="blocked", le="0.005") == 1
    # the cache: three lookups by mobile and the exempt desktop's one (blocks never reach the cache)
    assert v("sinkhole_cache_requests_total") == 4
    assert v("sinkhole_cache_hits_total") == 1
    assert v("sinkhole_cache_entries") == 2
    assert v("sinkhole_upstream_requests_total", upstream="127.0.0.1:5300") == 1
    assert v("sinkhole_upstream_failures_total", upstream="127.0.0.1:5300") == 0
    assert v("sinkhole_upstream_failures_total", upstream="[::1]:5301") == 1
    assert v("sinkhole_upstream_request_duration_seconds_bucket", upstream="[::1]:5301", le="1.0") == 0
    assert v("sinkhole_dns_dropped_total", reason="malformed") == 1
    assert v("sinkhole_dns_dropped_total", reason="other") == 1
    assert v("sinkhole_exemptions_active") == 1
    assert v("sinkhole_exemptions_next_expiry_timestamp_seconds") == EXPIRES
    assert v("sinkhole_policy_entries", service="chat") == 6          # 2 domains, host, pattern, allow, range
    assert v("sinkhole_policy_info", revision=server.policy.revision) == 1
    assert v("sinkhole_policy_reload_interval_seconds") == 5.0


def test_series_exist_at_zero_before_any_query(resolver):
    _, observer = resolver
    v = lambda name, **labels: value(observer, name, **labels)
    assert v("sinkhole_dns_blocked_total", group="desktop", service="encrypted-dns") == 0
    assert v("sinkhole_dns_queries_total", group="mobile", qtype="other") == 0
    assert v("sinkhole_dns_responses_total", group="desktop", action="stale", rcode="SERVFAIL") == 0
    assert v("sinkhole_upstream_requests_total", upstream="[::1]:5301") == 0
    assert v("sinkhole_dns_dropped_total", reason="overload") == 0
    assert v("sinkhole_cache_hits_total") == 0
    assert v("sinkhole_dns_blocked_total", group="mobile", service="chat") is None     # mobile blocks nothing


def test_no_client_address_or_query_name_in_any_label(resolver):
    server, observer = resolver
    traffic(server, observer)
    ask(server, observer, "secret-project.chat.test", client="127.0.1.77")
    text = generate_latest(observer.registry).decode()
    for leak in ("127.0.1.5", "127.0.1.77", "127.0.2.5", "192.0.2.1", "secret-project", "chat.test", "down.test"):
        assert leak not in text


def test_reloads_failures_and_unchanged_checks(resolver, tmp_path):
    server, observer = resolver
    v = lambda name, **labels: value(observer, name, **labels)
    observer.reload(True, server.policy, NOW)                     # the start: not a reload
    assert (v("sinkhole_policy_reloads_total"), v("sinkhole_policy_last_reload_successful")) == (0, 1)
    observer.reload(False, server.policy, NOW + 10)
    assert v("sinkhole_policy_reloads_total") == 1 and v("sinkhole_policy_reload_failures_total") == 1
    assert v("sinkhole_policy_last_reload_successful") == 0
    assert v("sinkhole_policy_last_reload_success_timestamp_seconds") == NOW
    third = dict(TEST_POLICY["groups"], lab={"subnets": ["127.0.3.0/24"], "block": ["chat"]})
    new = load_policy(_policy_dir(tmp_path / "new", {"groups": third}), NOW)
    observer.reload(True, new, NOW + 20)
    assert v("sinkhole_policy_reloads_total") == 2 and v("sinkhole_policy_last_reload_successful") == 1
    assert v("sinkhole_policy_last_reload_success_timestamp_seconds") == NOW + 20
    assert v("sinkhole_dns_blocked_total", group="lab", service="chat") == 0      # new group pre-initialised
    observer.reload(True, new, NOW + 30)                          # files unchanged: confirmed, not counted
    assert v("sinkhole_policy_reloads_total") == 2
    assert v("sinkhole_policy_last_reload_success_timestamp_seconds") == NOW + 30


def test_exemptions_gauges_follow_the_clock(resolver):
    server, observer = resolver
    observer.clock = lambda: EXPIRES + 1
    assert value(observer, "sinkhole_exemptions_active") == 0
    assert value(observer, "sinkhole_exemptions_next_expiry_timestamp_seconds") is None


def test_bypass_helper_preinitialises_and_lints():
    registry = CollectorRegistry()
    children = bypass_detections(registry, ["doh-sni", "dot"], ["desktop", "mobile"])
    children[("dot", "desktop")].inc()
    assert registry.get_sample_value("sinkhole_bypass_detections_total", {"detector": "doh-sni", "group": "mobile"}) == 0
    assert registry.get_sample_value("sinkhole_bypass_detections_total", {"detector": "dot", "group": "desktop"}) == 1
    assert lint(registry) == []


# -- the HTTP endpoint ---------------------------------------------------------------------------------
def _get(url):
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_endpoint_serves_metrics_and_health(resolver, host, caplog):
    server, _ = resolver
    caplog.set_level("INFO", logger="sinkhole")
    observer = PrometheusObserver((host, 0), CollectorRegistry())
    try:
        port = observer.endpoint.port
        assert port != 0 and f"metrics on {host} port {port}" in caplog.text
        base = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
        status, body = _get(base + "/healthz")
        assert status == 503 and "not serving" in body              # no server bound yet
        observer.bind(server)
        server.addresses.append(("127.0.0.1", 53))                   # as start() records a listener
        status, body = _get(base + "/healthz")
        assert status == 200 and server.policy.revision in body
        status, body = _get(base + "/metrics")
        assert status == 200 and 'sinkhole_policy_info{revision="%s"} 1.0' % server.policy.revision in body
        assert _get(base + "/")[0] == 404
    finally:
        observer.close()


def test_endpoint_port_in_use_is_an_error():
    registry = CollectorRegistry()
    first = serve_metrics(registry, "127.0.0.1", 0)
    try:
        with pytest.raises(OSError):
            serve_metrics(registry, "127.0.0.1", first.port)
    finally:
        first.close()


def test_a_batch_counts_as_its_queries_one_by_one(tmp_path):
    """count_many (a UDP batch: one duration for all) leaves every series where count() per
    answer would, the duration histogram included."""
    directory = _policy_dir(tmp_path)
    config = Config(blocklists=str(directory), upstreams=(("127.0.0.1", 5300),))
    one, many = (PrometheusObserver(None, CollectorRegistry(), clock=lambda: NOW) for _ in range(2))
    for observer in (one, many):                 # each bound to a server of its own, no query asked
        Server(config, load_policy(directory, NOW), observer, clock=lambda: NOW)
    source = Server(config, load_policy(directory, NOW), None, clock=lambda: NOW)
    quiet = PrometheusObserver(None, CollectorRegistry())
    outcomes = [ask(source, quiet, name, client, rdtype) for name, client, rdtype in (
        ("www.chat.test", "127.0.1.5", "A"), ("www.chat.test", "127.0.1.5", "AAAA"), ("x.test", "127.0.1.5", "ANY"),
        ("www.chat.test", "192.0.2.1", "A"), ("", "127.0.1.5", "A"))]
    for o in outcomes:
        one.count(one.signature(o), 0.0031)
    many.count_many([many.signature(o) for o in outcomes], 0.0031)
    many.count_many([], 0.0031)
    one.count(one.signature(outcomes[3]), 0.2)     # a lone answer (a batch of one) too
    many.count_many([many.signature(outcomes[3])], 0.2)
    series = lambda observer: sorted((s.name, tuple(sorted(s.labels.items())), s.value)
                                     for family in observer.registry.collect() for s in family.samples
                                     if not s.name.startswith(("sinkhole_build", "python_", "process_")))
    assert series(many) == series(one)
    assert value(many, "sinkhole_dns_responses_total", group="desktop", action="blocked", rcode="NXDOMAIN") == 2
