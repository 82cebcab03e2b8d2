"""A bounded least-recently-used map: every table the sidecar keeps per flow or per client is one,
so a flood of new flows evicts old state instead of growing memory."""
from __future__ import annotations

from collections import OrderedDict

_get = dict.get                # OrderedDict's own get (no super() call on the hot path)


class LRU(OrderedDict):
    """OrderedDict with a size limit; `get` and `put` refresh an entry; `evicted` counts drops."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit = max(1, limit)
        self.evicted = 0

    def get(self, key, default=None):
        value = _get(self, key, default)
        if value is not default:
            self.move_to_end(key)
        return value

    def put(self, key, value) -> None:
        self[key] = value
        self.move_to_end(key)
        if len(self) > self.limit:          # only put() adds: one in, at most one out
            self.popitem(False)             # the oldest (positional: no keyword call)
            self.evicted += 1
