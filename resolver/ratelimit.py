"""Per-client rate limiting for UDP: token buckets keyed by /32 (IPv4) or /64 (IPv6), in a bounded
table. Pure: the caller passes `now`. TCP needs none of this (its source cannot be spoofed).

Over the limit, every `slip`-th query gets an empty truncated answer (TC=1) so that a real client
whose address is being spoofed can still get through over TCP, and the rest are dropped: the same
idea as BIND's response-rate-limiting `slip` (default 2). `slip: 0` drops everything over the limit.
"""
from __future__ import annotations

import ipaddress
from collections import OrderedDict

from .wire import NOERROR, WireError, error_reply, parse_query, truncate

PASS, SLIP, DROP = "pass", "slip", "drop"
MAX_CLIENTS = 65536         # buckets kept; the least recently seen client is forgotten first


def bucket_key(client: str):
    """The bucket a client address counts against: the IPv4 address, or the IPv6 /64."""
    if ":" not in client:
        return client
    try:
        return ipaddress.IPv6Address(client.split("%")[0]).packed[:8]
    except ValueError:
        return client


class RateLimiter:
    """`check(client, now)` -> PASS, SLIP or DROP. `rate` queries per second with bursts up to
    `burst`; clients in `exempt` (CIDRs) are never limited."""

    def __init__(self, rate: float, burst: int = 0, exempt=(), slip: int = 2, max_clients: int = MAX_CLIENTS):
        if rate <= 0:
            raise ValueError("rate must be > 0")
        self.rate = float(rate)
        self.burst = float(max(burst, 1) if burst else max(rate, 1))
        self.slip = max(int(slip), 0)
        self.max_clients = max(int(max_clients), 1)
        self.exempt = tuple(ipaddress.ip_network(n, strict=False) for n in exempt)
        self._exempt_seen: dict[str, bool] = {}
        # key -> [tokens, last refill time, queries over the limit so far]
        self._buckets: OrderedDict[object, list] = OrderedDict()
        self.limited = 0            # queries over the limit since start (slipped + dropped)

    def __len__(self) -> int:
        return len(self._buckets)

    def _is_exempt(self, client: str) -> bool:
        if not self.exempt:
            return False
        known = self._exempt_seen.get(client)
        if known is None:
            try:
                addr = ipaddress.ip_address(client.split("%")[0])
                known = any(addr.version == n.version and addr in n for n in self.exempt)
            except ValueError:
                known = False
            if len(self._exempt_seen) >= self.max_clients:
                self._exempt_seen.clear()           # bounded: start over rather than grow
            self._exempt_seen[client] = known
        return known

    def check(self, client: str, now: float) -> str:
        if self._is_exempt(client):
            return PASS
        key = bucket_key(client)
        buckets = self._buckets
        bucket = buckets.get(key)
        if bucket is None:
            if len(buckets) >= self.max_clients:
                buckets.popitem(last=False)
            bucket = buckets[key] = [self.burst, now, 0]
        else:
            buckets.move_to_end(key)
            elapsed = now - bucket[1]
            if elapsed > 0:
                bucket[0] = min(self.burst, bucket[0] + elapsed * self.rate)
                bucket[1] = now
        if bucket[0] >= 1.0:
            bucket[0] -= 1.0
            return PASS
        bucket[2] += 1
        self.limited += 1
        if self.slip and bucket[2] % self.slip == 0:
            return SLIP
        return DROP


def slip_answer(data: bytes) -> bytes | None:
    """The empty TC=1 answer a slipped query gets: header and question only, so no amplification.
    None when the packet is not a well-formed query (those are simply dropped)."""
    try:
        query = parse_query(data)
    except WireError:
        return None
    return truncate(error_reply(query, NOERROR), 0)
