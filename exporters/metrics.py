"""The sidecar's Prometheus metrics (sinkhole_bypass_*), on a registry of its own, and the one
function that serves them. Labels come only from known sets: detector names and policy groups."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from .detectors import DETECTORS


class SidecarMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.packets = Counter("sinkhole_bypass_packets_total", "Packets the capture handed over.", registry=r)
        self.unparsed = Counter("sinkhole_bypass_packets_unparsed_total",
                                "Packets whose headers could not be read (not TCP/UDP over IP, truncated).",
                                registry=r)
        self.detections = Counter("sinkhole_bypass_detections_total",
                                  "Findings by detector and client group, alerting or only counted.",
                                  ["detector", "group"], registry=r)
        self.alerts = Counter("sinkhole_bypass_alerts_total", "Alert lines written, by detector.",
                              ["detector"], registry=r)
        self.suppressed = Counter("sinkhole_bypass_alerts_suppressed_total",
                                  "Alerts held back as repeats inside the dedup window, by detector.",
                                  ["detector"], registry=r)
        self.kernel_drops = Counter("sinkhole_bypass_kernel_drops_total",
                                    "Packets the kernel dropped before the sidecar read them.", registry=r)
        self.flows = Gauge("sinkhole_bypass_flow_table_entries",
                           "Flows with reassembly or first-packet state held.", registry=r)
        self.learned = Gauge("sinkhole_bypass_learned_entries",
                             "Resolver answers and flagged clients remembered for no-dns.", registry=r)
        self.reloads = Counter("sinkhole_bypass_policy_reloads_total", "Policy reloads by result.",
                               ["result"], registry=r)
        for result in ("ok", "failed"):
            self.reloads.labels(result)
        for detector in DETECTORS:
            self.alerts.labels(detector)
            self.suppressed.labels(detector)

    def groups(self, names) -> None:
        """Pre-initialise detections for the policy's groups (and '-', clients in no group)."""
        for detector in DETECTORS:
            for group in (*names, "-"):
                self.detections.labels(detector, group)


def serve(metrics: SidecarMetrics, host: str, port: int):
    """Expose the registry over HTTP on host:port (0: any free port); returns the bound port."""
    server, _thread = start_http_server(port, addr=host, registry=metrics.registry)
    return server.server_port
