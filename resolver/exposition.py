"""Serving a Prometheus registry over HTTP, and the naming rules every metric we declare follows.

Shared by the resolver (resolver/metrics.py) and the sidecar: `serve_metrics(registry, host, port)`
answers `/metrics` (and `/healthz` when given a health function) from a thread of its own and logs
"metrics on HOST port N" (port 0 picks a free port). `lint(registry)` checks names, units and label
names against STYLE.md section 4; the tests run it on every registry the code builds.
"""
from __future__ import annotations

import logging
import re
import socket
import threading
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, disable_created_metrics, make_wsgi_app

NAMESPACE = "sinkhole"

# `_created` series double the number of series and nothing here reads them.
disable_created_metrics()

# Label names and, where the set is fixed, their values. Values of group, service, upstream and
# detector come from the policy, the configuration or the sidecar's own detector list.
LABELS = {
    "group": None, "service": None, "upstream": None, "detector": None,
    "action": frozenset({"blocked", "cached", "forwarded", "stale", "local", "refused", "error"}),
    "rcode": frozenset({"NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED", "BADVERS", "other"}),
    "qtype": frozenset({"A", "AAAA", "CNAME", "HTTPS", "SVCB", "MX", "TXT", "PTR", "SRV", "NS", "SOA",
                        "ANY", "other"}),
    "reason": frozenset({"malformed", "internal", "overload", "tcp-connections", "ratelimit", "other"}),
    "result": frozenset({"ok", "failed"}),      # the sidecar's policy reloads
}
# `_info` metrics carry descriptive labels (one series at a time), nothing else may.
INFO_LABELS = frozenset({"version", "python_version", "revision"})
FOREIGN_PREFIXES = ("process_", "python_")     # prometheus_client's own collectors
UNITS = ("seconds", "bytes", "entries", "ratio")
_NAME = re.compile(r"[a-z][a-z0-9]*(_[a-z0-9]+)+\Z")
_BAD_UNITS = re.compile(r"_(milliseconds|ms|microseconds|us|minutes|hours|days|kilobytes|megabytes|percent)(_|\Z)")


def lint(registry, labels=LABELS) -> list[str]:
    """Problems with the metrics a registry exposes (empty when all is well)."""
    problems = []
    for family in registry.collect():
        kind = family.type
        name = family.name + {"counter": "_total", "info": "_info"}.get(kind, "")   # as exposed
        if name.startswith(FOREIGN_PREFIXES):
            continue
        where = f"{name} ({kind})"
        if not name.startswith(NAMESPACE + "_") or not _NAME.match(name) or name.count("_") < 2:
            problems.append(f"{where}: not sinkhole_<subsystem>_<name>[_<unit>] in lower case")
        if not family.documentation.strip():
            problems.append(f"{where}: no help text")
        if _BAD_UNITS.search(name):
            problems.append(f"{where}: use base units (seconds, bytes)")
        if kind != "counter" and name.endswith("_total") or name.endswith("_total_total"):
            problems.append(f"{where}: only counters end in _total")
        if ("time" in name.split("_") or name.endswith("_timestamp")) and not name.endswith("_timestamp_seconds"):
            problems.append(f"{where}: times are <name>_timestamp_seconds")
        if kind == "histogram" and not name.endswith(("_seconds", "_bytes")):
            problems.append(f"{where}: a histogram needs a base unit suffix")
        info = kind == "info" or name.endswith("_info")
        if not family.samples:
            problems.append(f"{where}: no samples (labelled series must be pre-initialised to 0)")
        for sample in family.samples:
            if info and sample.value != 1:
                problems.append(f"{where}: an _info series has the value 1")
            for label, value in sample.labels.items():
                if label in ("le", "quantile") and kind in ("histogram", "summary"):
                    continue
                if info and label in INFO_LABELS:
                    continue
                if label not in labels:
                    problems.append(f"{where}: label {label!r} is not one of {sorted(labels)}")
                elif labels[label] is not None and value not in labels[label]:
                    problems.append(f"{where}: {label}={value!r} is not one of {sorted(labels[label])}")
    return sorted(set(problems))


# -- the HTTP endpoint -----------------------------------------------------------------------------
class _Quiet(WSGIRequestHandler):
    def log_message(self, format, *args):      # a scrape every few seconds is not news
        pass


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _Server6(_Server):
    address_family = socket.AF_INET6


@dataclass
class Endpoint:
    host: str
    port: int
    _httpd: WSGIServer
    _thread: threading.Thread

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)


def app(registry, health=None):
    """A WSGI app: GET /metrics from `registry`; GET /healthz -> health() = (ok, text)."""
    metrics = make_wsgi_app(registry)

    def route(environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return metrics(environ, start_response)
        if path == "/healthz" and health is not None:
            try:
                ok, text = health()
            except Exception as e:        # noqa: BLE001 - a failing check is an unhealthy answer
                ok, text = False, f"health check failed: {e}"
            start_response("200 OK" if ok else "503 Service Unavailable",
                           [("Content-Type", "text/plain; charset=utf-8")])
            return [(text.rstrip("\n") + "\n").encode()]
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [b"not found: try /metrics" + (b" or /healthz" if health else b"") + b"\n"]

    return route


def serve_metrics(registry, host: str, port: int, health=None,
                  log: logging.Logger | None = None) -> Endpoint:
    """Bind host:port now (OSError if taken) and serve from a daemon thread; logs the bound port."""
    server_class = _Server6 if ":" in host else _Server
    httpd = make_server(host, port, app(registry, health), server_class, handler_class=_Quiet)
    bound = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, name="metrics-http", daemon=True)
    thread.start()
    (log or logging.getLogger(NAMESPACE)).info("metrics on %s port %d", host, bound)
    return Endpoint(host, bound, httpd, thread)


# -- the sidecar's metric, declared once so the dashboard, the alerts and the sidecar agree -------
BYPASS_DETECTIONS = "sinkhole_bypass_detections"


def bypass_detections(registry: CollectorRegistry, detectors, groups) -> dict[tuple[str, str], object]:
    """`sinkhole_bypass_detections_total{detector,group}`, every pair pre-initialised to 0; returns
    the children keyed by (detector, group) so the sidecar increments without formatting labels."""
    counter = Counter(BYPASS_DETECTIONS, "Bypass attempts the sidecar detected, by detector and client group.",
                      ["detector", "group"], registry=registry)
    return {(d, g): counter.labels(d, g) for d in detectors for g in groups}
