"""The answer cache: upstream replies only, shared by every group, bounded LRU, TTL-aware.

Policy is decided before the cache is read, so a cached answer never bypasses a block. Pure: the
caller passes `now`.
"""
from __future__ import annotations

from collections import OrderedDict

from .wire import Reply


class Cache:
    def __init__(self, size: int = 10000, min_ttl: int = 0, max_ttl: int = 86400,
                 negative_max_ttl: int = 3600, stale_ttl: int = 0):
        self.size = size
        self.min_ttl, self.max_ttl = min_ttl, max_ttl
        self.negative_max_ttl = negative_max_ttl
        self.stale_ttl = stale_ttl          # RFC 8767: how long past expiry an answer may be served
        self._entries: OrderedDict[bytes, tuple[Reply, float, float]] = OrderedDict()
        self.requests = 0                   # lookups of fresh answers, and how many were hits:
        self.hits = 0                       # plain counts the metrics read at scrape time

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes, now: float) -> tuple[Reply, int, float] | None:
        """(reply, age in whole seconds, until when that age holds) for a fresh entry, or None;
        counted as a lookup, and as a hit when found."""
        self.requests += 1
        hit = self.peek(key, now)
        if hit is not None:
            self.hits += 1
        return hit

    def peek(self, key: bytes, now: float) -> tuple[Reply, int, float] | None:
        """get() without counting: for the server's renewal of a remembered answer (core.renew),
        which the server counts with reused() like every other reuse."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        reply, stored, expires = entry
        if now >= expires:
            if now >= expires + self.stale_ttl:
                del self._entries[key]
            return None
        self._entries.move_to_end(key)
        age = int(now - stored)
        return reply, age, min(stored + age + 1, expires)

    def reused(self, n: int) -> None:
        """Count `n` lookups answered from the cache by way of remembered answers (the server's UDP
        loop reuses a cache hit's finished answer until its TTLs tick down; each reuse is a hit)."""
        self.requests += n
        self.hits += n

    def get_stale(self, key: bytes, now: float) -> Reply | None:
        """An expired answer still inside the serve-stale window (used only when upstreams fail)."""
        entry = self._entries.get(key)
        if entry is None or now >= entry[2] + self.stale_ttl:
            return None
        return entry[0]

    def put(self, key: bytes, reply: Reply, now: float) -> bool:
        """Store an upstream reply if it may be cached; True when stored."""
        if reply.ttl is None or self.size <= 0:
            return False
        negative = reply.rcode != 0 or reply.counts[0] == 0
        ttl = min(reply.ttl, self.negative_max_ttl if negative else self.max_ttl)
        ttl = max(ttl, self.min_ttl)
        if ttl <= 0:
            return False
        entries = self._entries
        entries[key] = (reply, now, now + ttl)
        entries.move_to_end(key)
        while len(entries) > self.size:
            entries.popitem(last=False)
        return True

    def clear(self) -> None:
        self._entries.clear()
