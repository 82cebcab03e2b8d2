"""Alerts out: one JSON line per (client, detector, destination) per window; repeats inside the
window are counted and reported with the next alert for that key."""
from __future__ import annotations

import datetime
import json
import sys

from .detectors import Finding
from .lru import LRU


def record(f: Finding, repeats: int) -> dict:
    o = f.observation
    return {
        "time": datetime.datetime.fromtimestamp(o.time, datetime.timezone.utc).isoformat(timespec="milliseconds"),
        "detector": f.detector, "client": o.client_ip, "group": f.group, "service": f.service,
        "destination": o.server_ip, "port": o.server_port, "protocol": o.transport,
        "sni": o.sni, "name": f.name, "evidence": f.evidence, "suppressed_before": repeats,
    }


class Alerts:
    def __init__(self, out=None, window: float = 600.0, limit: int = 65536):
        self.out = out if out is not None else sys.stdout
        self.window = window
        self.recent = LRU(limit)          # key -> [window start, repeats suppressed]
        self.emitted = 0
        self.suppressed = 0

    def offer(self, f: Finding) -> dict | None:
        """Write the alert unless one for the same key went out within the window."""
        o = f.observation
        key = (o.version, o.client, f.detector, o.server)
        entry = self.recent.get(key)
        if entry is not None and 0 <= o.time - entry[0] < self.window:
            entry[1] += 1
            self.suppressed += 1
            return None
        row = record(f, entry[1] if entry is not None else 0)
        self.recent.put(key, [o.time, 0])
        self.out.write(json.dumps(row, separators=(",", ":")) + "\n")
        self.out.flush()
        self.emitted += 1
        return row
