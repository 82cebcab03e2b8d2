"""What the server tells the outside world about itself: the interface the metrics implement.

The server calls these and nothing else; `Quiet` does nothing (tests, `--no-metrics`).
"""
from __future__ import annotations


class Quiet:
    """The do-nothing observer."""

    def query(self, outcome, duration: float) -> None:
        """One query answered (or dropped): its Outcome and how long it took, in seconds.
        The same as count(signature(outcome), duration)."""

    def signature(self, outcome):
        """What this observer counts of an Outcome, as an immutable value: the server keeps it with
        an answer it reuses, and counts each reuse with count()."""
        return None

    def count(self, signature, duration: float) -> None:
        """One query answered with an Outcome of this signature, taking `duration` seconds."""

    def count_many(self, signatures: list, duration: float) -> None:
        """One query answered per entry of `signatures` (repeats allowed), each taking `duration`
        seconds: a batch of answers sent together."""

    def upstream(self, upstream: str, seconds: float, ok: bool) -> None:
        """One attempt at one upstream."""

    def reload(self, ok: bool, policy, when: float) -> None:
        """A policy reload finished: ok and the policy now in force, or failed."""

    def dropped(self, reason: str) -> None:
        """A packet dropped without an answer (malformed, rate-limited, overload)."""

    def bind(self, server) -> None:
        """Called once with the server, so gauges can read the cache, the policy and the query log."""
