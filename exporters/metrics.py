"""The sidecar's Prometheus metrics (sinkhole_bypass_*), on a registry of its own, and what its
/healthz says (Health). Both are served by resolver.exposition.serve_metrics, as the resolver's are.
Labels come only from known sets: detector names and policy groups."""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge

from resolver.exposition import BYPASS_DETECTIONS, LABELS

from .detectors import DETECTORS


class SidecarMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.packets = Counter("sinkhole_bypass_packets_total", "Packets the capture handed over.", registry=r)
        self.unparsed = Counter("sinkhole_bypass_packets_unparsed_total",
                                "Packets whose headers could not be read (not TCP/UDP over IP, truncated).",
                                registry=r)
        self.detections = Counter(BYPASS_DETECTIONS,
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
        for result in sorted(LABELS["result"]):
            self.reloads.labels(result)
        for detector in DETECTORS:
            self.alerts.labels(detector)
            self.suppressed.labels(detector)

    def groups(self, names) -> None:
        """Pre-initialise detections for the policy's groups (and '-', clients in no group)."""
        for detector in DETECTORS:
            for group in (*names, "-"):
                self.detections.labels(detector, group)


class Health:
    """The sidecar's /healthz: `check(now)` -> (ok, text), now from time.monotonic().

    Live capture: healthy while the capture loop goes round. The loop wakes at least every 0.5 s,
    packets or not, so a loop not seen for `stall` seconds is stuck (in a packet, a reload, a
    socket) and restarting the sidecar is the right fix. A quiet link is *not* unhealthy: restarting
    brings no packets, so the time since the last packet is reported in the text, not judged.
    A pcap file: healthy while it is read and once it is read to the end; unhealthy if it could not
    be read. Before the capture opens (or if it cannot), unhealthy."""

    STALL = 10.0

    def __init__(self, stall: float = STALL):
        self.stall = stall
        self.state, self.source, self.error = "starting", "", ""
        self.round: float | None = None        # when the capture loop last went round
        self.packet: float | None = None       # when it last handed over a packet
        self.packets = 0

    # -- what the capture loop reports (plain attribute writes: the HTTP thread only reads) -----
    def capturing(self, ifaces, now: float) -> None:
        self.source, self.round, self.state = ",".join(ifaces), now, "capturing"

    def went_round(self, now: float, packets: int) -> None:
        self.round = now
        if packets:
            self.packet, self.packets = now, self.packets + packets

    def reading(self, path: str) -> None:
        self.source, self.state = path, "reading"

    def finished(self, packets: int) -> None:
        self.packets, self.state = packets, "finished"

    def failed(self, error: str) -> None:
        self.error, self.state = error, "failed"

    # -- what /healthz answers ------------------------------------------------------------------
    def check(self, now: float) -> tuple[bool, str]:
        state, source = self.state, self.source
        if state == "capturing":
            since = now - self.round
            if since > self.stall:
                return False, f"capture loop on {source} stalled: last round {since:.0f} s ago"
            last = "no packet yet" if self.packet is None else f"last packet {now - self.packet:.0f} s ago"
            return True, f"capturing on {source}: {self.packets} packets, {last}"
        if state == "reading":
            return True, f"reading {source}"
        if state == "finished":
            return True, f"finished reading {source}: {self.packets} packets"
        if state == "failed":
            return False, f"capture failed: {self.error}"
        return False, "capture not open yet"

    def __call__(self) -> tuple[bool, str]:
        return self.check(time.monotonic())
