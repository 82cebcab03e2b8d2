"""`sinkhole sidecar --enforce`: a detected bypass adds (client, destination) to the gateway's
nftables set `bypass_v4`/`bypass_v6` (from `sinkhole export nftables`) with a timeout, so the rest
of that flow is dropped. Off by default; `no-dns` is not enforced unless asked, since it is a
heuristic. A failing `nft` costs the enforcement (logged, counted), never the sidecar."""
from __future__ import annotations

import logging

from resolver.export.nftables import enforce_add

log = logging.getLogger("sinkhole.sidecar")
NOT_ENFORCED_BY_DEFAULT = frozenset({"no-dns"})


class Enforcer:
    def __init__(self, timeout: float = 600.0, skip=NOT_ENFORCED_BY_DEFAULT, nft=("nft",), add=enforce_add):
        self.timeout, self.skip, self.nft, self._add = timeout, frozenset(skip), tuple(nft), add
        self.added = 0
        self.failures = 0

    def __call__(self, row: dict) -> bool:
        """Enforce one alert row; True when the pair went into the set."""
        if row["detector"] in self.skip:
            return False
        try:
            self._add(row["client"], row["destination"], self.timeout, nft=self.nft)
        except (ValueError, RuntimeError, OSError) as e:
            self.failures += 1
            log.error("could not enforce %s -> %s (%s): %s", row["client"], row["destination"],
                      row["detector"], e)
            return False
        self.added += 1
        log.info("enforced: %s -> %s dropped for %ds (%s)", row["client"], row["destination"],
                 self.timeout, row["detector"])
        return True
