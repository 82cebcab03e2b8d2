"""The resolver's Prometheus metrics: the observer the server calls (observe.py), and the gauges read
from the server at scrape time. Served on `metrics: {listen: host:port}` with /healthz.

Per query the cost is one plain dict increment keyed by the query's signature (group, qtype,
action, rcode, service) and one histogram bucket (no prometheus-client child, no lock): the counts
become metric families only when Prometheus scrapes. What the server already counts (cache size
and hits, policy entries, exemptions, query-log drops) is read when Prometheus scrapes, not pushed
per query. Labels come only from small known sets (see exposition.LABELS); client addresses and
query names never do: they belong to the query log.
"""
from __future__ import annotations

import logging
import platform
import time
from bisect import bisect_left
from collections import Counter as TallyCounter

from prometheus_client import (CollectorRegistry, Counter, Gauge, GCCollector, Histogram, Info,
                               PlatformCollector, ProcessCollector)
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily,
                                   InfoMetricFamily)
from prometheus_client.utils import floatToGoString

from . import __version__
from .exposition import LABELS, serve_metrics
from .upstream import upstream_label
from .wire import QTYPE_NAMES, RCODE_NAMES

log = logging.getLogger("sinkhole")

NO_GROUP = "_none"      # clients in no group (refused, unparseable); '_' is not allowed in group names
ACTIONS = tuple(sorted(LABELS["action"]))
QTYPES = {code: name for code, name in QTYPE_NAMES.items() if name in LABELS["qtype"]}   # others: "other"
RCODES = {code: name for code, name in RCODE_NAMES.items() if name in LABELS["rcode"]}
DROP_REASONS = tuple(sorted(LABELS["reason"]))
QUERY_BUCKETS = (.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5)
UPSTREAM_BUCKETS = (.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5)


def new_registry() -> CollectorRegistry:
    """A registry with the process, platform and garbage-collector metrics prometheus-client offers."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


class PrometheusObserver:
    """The observer (see observe.Quiet) that counts into a Prometheus registry and serves it."""

    def __init__(self, listen: tuple[str, int] | None = None, registry: CollectorRegistry | None = None,
                 clock=time.time):
        self.registry = registry = registry if registry is not None else new_registry()
        self.clock = clock
        self.server = None
        self.policy = None
        self.hot = _HotCounts()             # queries, responses, blocked, request duration
        registry.register(self.hot)
        self.drops = Counter("sinkhole_dns_dropped", "Packets dropped without an answer, by reason.", ["reason"],
                             registry=registry)
        self.upstream_requests = Counter("sinkhole_upstream_requests", "Queries sent to each upstream.",
                                         ["upstream"], registry=registry)
        self.upstream_failures = Counter("sinkhole_upstream_failures", "Upstream queries that timed out, failed "
                                         "or got SERVFAIL/REFUSED, per upstream.", ["upstream"], registry=registry)
        self.upstream_duration = Histogram("sinkhole_upstream_request_duration_seconds", "Time each upstream took "
                                           "to answer (or fail).", ["upstream"], buckets=UPSTREAM_BUCKETS,
                                           registry=registry)
        self.reloads = Counter("sinkhole_policy_reloads", "Policy reloads attempted after the start (changed "
                               "files or SIGHUP), including failed ones.", registry=registry)
        self.reload_failures = Counter("sinkhole_policy_reload_failures", "Policy reloads rejected; the "
                                       "previous policy stayed in force.", registry=registry)
        self.last_success = Gauge("sinkhole_policy_last_reload_success_timestamp_seconds", "When the policy in "
                                  "force was last loaded or confirmed to match the files.", registry=registry)
        self.last_ok = Gauge("sinkhole_policy_last_reload_successful", "1 if the last policy load succeeded, "
                             "0 if the files on disk were rejected.", registry=registry)
        Info("sinkhole_build", "The resolver's version.", registry=registry).info(
            {"version": __version__, "python_version": platform.python_version()})
        self._drops = {r: self.drops.labels(r) for r in DROP_REASONS}
        self._signatures: dict[tuple, tuple] = {}
        self._upstreams: dict[str, tuple] = {}
        self._add_group(NO_GROUP, ())
        self.gauges = _ServerGauges(self)
        registry.register(self.gauges)
        self.endpoint = serve_metrics(registry, *listen, health=self.health, log=log) if listen else None

    # -- pre-initialised children --------------------------------------------------------------
    def _add_group(self, group: str, services) -> None:
        hot = self.hot
        for qtype in LABELS["qtype"]:
            hot.queries.setdefault((group, qtype), 0)
        for action in ACTIONS:
            for rcode in LABELS["rcode"]:
                hot.responses.setdefault((group, action, rcode), 0)
        for service in services:
            hot.blocked.setdefault((group, service), 0)

    def _add_policy(self, policy) -> None:
        for group in policy.groups.values():
            self._add_group(group.name, group.block)

    def _add_upstream(self, label: str) -> tuple:
        children = (self.upstream_requests.labels(label), self.upstream_failures.labels(label),
                    self.upstream_duration.labels(label))
        self._upstreams[label] = children
        return children

    @staticmethod
    def _child(children: dict, metric, key: tuple):
        child = children.get(key)
        if child is None:
            child = children[key] = metric.labels(*key)
        return child

    # -- the observer interface ------------------------------------------------------------------
    def signature(self, outcome) -> tuple:
        """What the counters need to know of an Outcome, as one shared tuple of strings (a server
        may keep it with a reusable answer and count that answer again with count())."""
        service = outcome.service if outcome.action == "blocked" else None
        sig = (outcome.group or NO_GROUP, QTYPES.get(outcome.qtype, "other"), outcome.action,
               RCODES.get(outcome.rcode, "other"), service)
        return self._signatures.setdefault(sig, sig)

    def count(self, sig: tuple, duration: float, n: int = 1) -> None:
        # plain dict increments: no lock and no object per query (the scrape builds the families)
        counts = self.hot.signatures
        counts[sig] = counts.get(sig, 0) + n
        action = sig[2]
        if action == "dropped":
            return                      # no answer: counted by dropped()
        buckets = self.hot.duration.get(action) or self.hot.new_action(action)
        buckets[bisect_left(QUERY_BUCKETS, duration)] += n
        buckets[-1] += duration * n

    def count_many(self, sigs: list, duration: float) -> None:
        # a UDP batch: its answers share one duration, so each signature is counted once per batch
        # with how often it came (collections.Counter counts the list in C). A lone answer, the
        # usual batch of a quiet server, is counted directly: Counter costs 1 us more than it saves
        if len(sigs) == 1:
            self.count(sigs[0], duration)
            return
        count = self.count
        for sig, n in TallyCounter(sigs).items():
            count(sig, duration, n)

    def query(self, outcome, duration: float) -> None:
        self.count(self.signature(outcome), duration)

    def upstream(self, upstream: str, seconds: float, ok: bool) -> None:
        children = self._upstreams.get(upstream) or self._add_upstream(upstream)
        children[0].inc()
        children[2].observe(seconds)
        if not ok:
            children[1].inc()

    def reload(self, ok: bool, policy, when: float) -> None:
        if not ok:
            self.reloads.inc()
            self.reload_failures.inc()
            self.last_ok.set(0)
            return
        if policy is not self.policy:          # a new snapshot; the same one means "files unchanged"
            if self.policy is not None:
                self.reloads.inc()
            self.policy = policy
            self._add_policy(policy)
        self.last_ok.set(1)
        self.last_success.set(when)

    def dropped(self, reason: str) -> None:
        (self._drops.get(reason) or self._drops["other"]).inc()

    def bind(self, server) -> None:
        self.server = server
        self.policy = server.policy
        self._add_policy(server.policy)
        for host, port in server.config.upstreams:
            self._add_upstream(upstream_label(host, port))

    # -- /healthz --------------------------------------------------------------------------------
    def health(self) -> tuple[bool, str]:
        """200 when a policy is in force and DNS is being served; the text names the revision."""
        server = self.server
        if server is None or not server.serving:
            return False, "not serving DNS (starting or stopping)"
        return True, f"ok: serving DNS with policy {server.policy.revision}"

    def close(self) -> None:
        if self.endpoint is not None:
            self.endpoint.close()
            self.endpoint = None


class _HotCounts:
    """The per-query counters as plain ints, turned into metric families only when scraped.
    Written by the event loop thread; the scrape thread copies each dict in one C call."""

    def __init__(self):
        self.queries: dict[tuple[str, str], int] = {}
        self.responses: dict[tuple[str, str, str], int] = {}
        self.blocked: dict[tuple[str, str], int] = {}
        self.signatures: dict[tuple, int] = {}  # (group, qtype, action, rcode, service) -> count
        self.duration: dict[str, list] = {}     # action -> [count per bucket ..., +Inf, sum]
        for action in ACTIONS:
            self.new_action(action)

    def new_action(self, action: str) -> list:
        buckets = self.duration[action] = [0] * (len(QUERY_BUCKETS) + 1) + [0.0]
        return buckets

    def describe(self):
        return list(self._families(False))

    def collect(self):
        return self._families(True)

    def totals(self) -> tuple[dict, dict, dict]:
        """The three counter tables: the pre-initialised zeros plus what the signatures counted."""
        queries, responses, blocked = dict(self.queries), dict(self.responses), dict(self.blocked)
        for (group, qtype, action, rcode, service), n in dict(self.signatures).items():
            queries[(group, qtype)] = queries.get((group, qtype), 0) + n
            if action == "dropped":
                continue
            responses[(group, action, rcode)] = responses.get((group, action, rcode), 0) + n
            if action == "blocked":
                blocked[(group, service)] = blocked.get((group, service), 0) + n
        return queries, responses, blocked

    def _families(self, samples: bool):
        queries, responses, blocked = self.totals() if samples else ({}, {}, {})
        specs = (("sinkhole_dns_queries", "DNS queries received, by client group and query type.",
                  ["group", "qtype"], queries),
                 ("sinkhole_dns_responses", "DNS answers sent, by client group, what the resolver did "
                  "(action) and response code.", ["group", "action", "rcode"], responses),
                 ("sinkhole_dns_blocked", "Queries answered by a block, by client group and service.",
                  ["group", "service"], blocked))
        for name, doc, labels, counts in specs:
            family = CounterMetricFamily(name, doc, labels=labels)
            for key, value in (sorted(counts.items()) if samples else ()):
                family.add_metric(list(key), value)
            yield family
        family = HistogramMetricFamily("sinkhole_dns_request_duration_seconds", "Time from receiving a "
                                       "query to answering it, by action.", labels=["action"])
        bounds = [floatToGoString(b) for b in QUERY_BUCKETS] + ["+Inf"]
        for action, buckets in (sorted(dict(self.duration).items()) if samples else ()):
            buckets = list(buckets)
            total, cumulative = 0, []
            for bound, count in zip(bounds, buckets[:-1]):
                total += count
                cumulative.append((bound, total))
            family.add_metric([action], cumulative, buckets[-1])
        yield family


class _ServerGauges:
    """What the server already knows, read at scrape time (never per query)."""

    def __init__(self, observer: PrometheusObserver):
        self.observer = observer

    def describe(self):
        return list(self._families(None, None))

    def collect(self):
        server = self.observer.server
        if server is None:
            return []
        return self._families(server, self.observer.clock())

    @staticmethod
    def _families(server, now):
        def gauge(name, doc, value=None, labels=None):
            family = GaugeMetricFamily(name, doc, labels=labels)
            if value is not None:
                family.add_metric([], value)
            return family

        def counter(name, doc, value):
            family = CounterMetricFamily(name, doc)
            if value is not None:
                family.add_metric([], value)
            return family

        live = server is not None
        cache, policy, querylog = (server.cache, server.policy, server.querylog) if live else (None, None, None)
        yield gauge("sinkhole_cache_entries", "Answers in the cache now.", len(cache) if live else None)
        yield counter("sinkhole_cache_requests_total", "Cache lookups (queries not blocked, refused or local).",
                      cache.requests if live else None)
        yield counter("sinkhole_cache_hits_total", "Cache lookups answered from the cache.",
                      cache.hits if live else None)
        entries = gauge("sinkhole_policy_entries", "Rules and IP ranges per service in the policy in force.",
                        labels=["service"])
        info = InfoMetricFamily("sinkhole_policy", "The policy in force (revision: a hash of its files).")
        if live:
            for name, service in sorted(policy.services.items()):
                entries.add_metric([name], service.entries())
            info.add_metric([], {"revision": policy.revision})
        yield entries
        yield info
        yield gauge("sinkhole_policy_reload_interval_seconds", "How often the blocklists directory is checked "
                    "for changes (0: only on SIGHUP).", server.config.reload_interval if live else None)
        active = upcoming = None
        if live:
            active = len(policy.active_exemptions(now))
            upcoming = min((ex.expires for ex in policy.exemptions if ex.expires > now), default=None)
        yield gauge("sinkhole_exemptions_active", "Exemptions in force now.", active)
        yield gauge("sinkhole_exemptions_next_expiry_timestamp_seconds", "When the next exemption (active or "
                    "pending) expires; absent when none is left.", upcoming)
        yield counter("sinkhole_querylog_lines_written_total", "Query log lines written.",
                      querylog.written if live else None)
        yield counter("sinkhole_querylog_lines_dropped_total", "Query log lines lost (queue full or write "
                      "failed); the answers went out regardless.", querylog.dropped if live else None)
