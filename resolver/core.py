"""The order in which a query is processed, written once. No sockets, no clock: `now` comes in.

`begin` turns a client's bytes into an immediate answer or a `Forward`; after the upstream has
answered (or not), `finish` turns the `Forward` into an answer. Both return an `Outcome`, which is
all that metrics and the query log get to see.
"""
from __future__ import annotations

from dataclasses import dataclass

from .cache import Cache
from .policy import Decision, Policy, decide
from .wire import (ANY, AXFR, IN, IXFR, REFUSED, SERVFAIL, EdnsVersionError, Query,
                   Reply, WireError, age_ttls, block_reply, build_reply, error_reply, formerr_for,
                   hinfo_reply, parse_query)

FOREVER = float("inf")           # reusable for the life of the policy snapshot


@dataclass(slots=True)
class Outcome:
    """What happened to one query, for the query log and the metrics."""

    action: str                  # blocked | cached | forwarded | stale | local | refused | error | dropped
    group: str | None = None
    qname: str | None = None
    qtype: int = 0
    rcode: int = 0
    service: str | None = None
    rule: str | None = None      # "path:line"
    exemption: str | None = None
    client: str | None = None    # the address policy used (the ECS address behind a forwarder)
    udp_limit: int = 512         # the largest UDP answer this client accepts
    reuse_until: float = 0.0     # until when the same bytes (but the ID) from the same group may get
                                 # the same answer and Outcome (see Policy.remember); 0: never
    renewal: tuple | None = None  # a reusable cache answer's (cache key, its Reply's body, where that
                                  # body starts in the answer less its ID): see renew()


@dataclass(slots=True)
class Forward:
    """A query that needs the upstream."""

    query: Query
    decision: Decision
    client: str


@dataclass(frozen=True)
class Context:
    """What `begin` needs besides the policy: the cache and the trusted ECS forwarders."""

    cache: Cache
    ecs_from: object = None      # callable(client) -> bool: may this client speak for others via ECS?


def begin(data: bytes, client: str, policy: Policy, ctx: Context, now: float):
    """-> (reply bytes or None, Outcome) or Forward."""
    # 1. Who is asking: clients outside allowed_clients get REFUSED (or nothing, if the packet is
    #    not even a query), so this is never an open resolver or a reflector.
    group, _ = policy.classify(client)
    # 2. The same bytes (all but the ID) from the same group, already parsed and found to forward
    #    (no rule applies) in this snapshot: skip 3 to 5. (Finished answers that can be reused,
    #    blocks among them, are kept by the server: Outcome.reuse_until, Policy.remember.)
    memo = policy.memo(group.name) if group is not None and ctx.ecs_from is None else None
    seen = memo.get(data[2:]) if memo is not None else None
    if seen is not None:
        query = Query((data[0] << 8) | data[1], *seen)
        decision = policy.forward(group.name)
    else:
        # 3. Parse. Malformed input gets FORMERR/NOTIMP, or is dropped when no answer is safe.
        try:
            query = parse_query(data)
        except EdnsVersionError as e:
            return (error_reply(e.query, 16) if group else None), Outcome("error", rcode=16, client=client)
        except WireError as e:
            if group is None or e.rcode is None:
                return None, Outcome("dropped", client=client)
            return (formerr_for(data) if e.rcode == 1 else _bare(data, e.rcode),
                    Outcome("error", rcode=e.rcode, client=client))
        # 4. A trusted forwarder may name the real client in an ECS option (/32 or /128 only).
        if query.ecs is not None and ctx.ecs_from is not None and group is not None and ctx.ecs_from(client):
            address, prefix = query.ecs
            if prefix == (32 if ":" not in address else 128):
                client = address
        # 5. Policy.
        decision = decide(policy, client, query.qname, now)
        if memo is not None and decision.rule is None and decision.action == "forward":
            memo[data[2:]] = tuple(query)[1:]   # a plain tuple of plain values: the collector
                                                # stops tracking it (a NamedTuple it never would)
    if decision.action == "refuse":
        return error_reply(query, REFUSED), Outcome("refused", None, query.qname, query.qtype, REFUSED,
                                                    client=client, udp_limit=query.max_udp)
    out = Outcome("blocked", decision.group, query.qname, query.qtype, 0, decision.service,
                  decision.rule.origin if decision.rule else None,
                  decision.exemption.id if decision.exemption else None, client, query.max_udp)
    # 6. Only IN-class queries, no zone transfers: there is nothing else to serve.
    reusable = memo is not None and policy.timeless(decision)
    lasting = FOREVER if reusable else 0.0          # what the answers of 6 to 8 may be reused for
    if query.qclass != IN or query.qtype in (AXFR, IXFR):
        out.action, out.rcode = "refused", REFUSED
        out.reuse_until = lasting
        return error_reply(query, REFUSED), out
    # 7. Policy before the cache: a blocked name never reaches the cache or the upstream, and the
    #    block answers every query type.
    if decision.action == "block":
        reply = block_reply(query, decision.response, decision.ttl, *_sinkhole(policy, decision))
        out.rcode = reply[3] & 0xF
        out.reuse_until = lasting
        return reply, out
    # 8. ANY gets the RFC 8482 minimal answer: no amplification.
    if query.qtype == ANY:
        out.action = "local"
        out.reuse_until = lasting
        return hinfo_reply(query), out
    # 9. The cache: upstream answers only, shared by all groups.
    #    The answer may be reused until its TTLs would tick down (whole seconds), if no exemption can
    #    change it: neither for the name nor for any name its CNAME chain passes through; then
    #    renew() brings it to the next second while the cache still holds the same reply.
    hit = ctx.cache.get(query.key, now)
    if hit is not None:
        reply, age, until = hit
        checked, timeless = _recheck_cnames(policy, client, reply, query, decision, now, out)
        if reusable and timeless:
            out.reuse_until = until
        if checked is not None:
            return checked, out
        out.action, out.rcode = "cached", reply.rcode
        if out.reuse_until:
            out.renewal = (query.key, reply.body, 10 + len(query.question))
        return build_reply(query, reply, age, decision.ttl if decision.exemption else None), out
    # 10. The upstream.
    return Forward(query, decision, client)


def keep(reply: bytes, outcome: Outcome, sig, tail: str, renewal: tuple | None) -> tuple:
    """The entry Policy.remember keeps for a finished answer that may be reused until
    outcome.reuse_until: (answer less its ID, until when it holds, metrics signature `sig`, query-log
    middle `tail`, whether it is a cache hit, `renewal`: outcome.renewal, or None where the answer
    sent is not the one renew() can rebuild, e.g. truncated). renew() and the server's loop read it."""
    return (reply[2:], outcome.reuse_until, sig, tail, outcome.action == "cached", renewal)


def renew(entry: tuple, cache: Cache, now: float) -> tuple | None:
    """A remembered cache answer (an entry keep() made) whose second has passed, brought to `now`:
    the same bytes with the TTLs the cache entry's age gives now, good until the next second. None
    when the cache no longer holds that reply fresh (expired, evicted, replaced, cleared): the query
    then takes the whole way (step 9). Nothing else can have changed: only answers whose decisions
    no clock or client can change are remembered, and the remembered tables die with their policy
    snapshot. Counts nothing (the server counts reuses)."""
    key, body, base = entry[5]
    hit = cache.peek(key, now)
    if hit is None or hit[0].body is not body:     # the reply whose TTLs the bytes carry, or none
        return None
    reply, age, until = hit
    buf = bytearray(entry[0])
    age_ttls(buf, base, reply, age)
    return (bytes(buf), until) + entry[2:]


def finish(fwd: Forward, reply: Reply | None, policy: Policy, ctx: Context, now: float):
    """-> (reply bytes, Outcome) once the upstream answered (`reply`) or failed (None)."""
    query, decision = fwd.query, fwd.decision
    out = Outcome("forwarded", decision.group, query.qname, query.qtype, 0, decision.service,
                  decision.rule.origin if decision.rule else None,
                  decision.exemption.id if decision.exemption else None, fwd.client, query.max_udp)
    if reply is None:
        # Every upstream failed: serve stale if allowed (RFC 8767), else SERVFAIL, never NXDOMAIN.
        stale = ctx.cache.get_stale(query.key, now)
        if stale is None:
            out.action, out.rcode = "error", SERVFAIL
            return error_reply(query, SERVFAIL), out
        checked, _ = _recheck_cnames(policy, fwd.client, stale, query, decision, now, out)
        if checked is not None:
            return checked, out
        out.action, out.rcode = "stale", stale.rcode
        return build_reply(query, stale, 0, 30), out
    ctx.cache.put(query.key, reply, now)
    # CNAME cloaking: the chain of an allowed name may end in a blocked one.
    checked, _ = _recheck_cnames(policy, fwd.client, reply, query, decision, now, out)
    if checked is not None:
        return checked, out
    out.rcode = reply.rcode
    return build_reply(query, reply, 0, decision.ttl if decision.exemption else None), out


def _recheck_cnames(policy, client, reply: Reply, query: Query, decision: Decision, now, out: Outcome):
    """-> (block answer or None, whether every decision on the way was timeless)."""
    timeless = True
    for target in reply.cnames:
        second = decide(policy, client, target, now)
        timeless = timeless and policy.timeless(second)
        if second.action == "block":
            out.action, out.service = "blocked", second.service
            out.rule = second.rule.origin if second.rule else None
            answer = block_reply(query, second.response, second.ttl, *_sinkhole(policy, second))
            out.rcode = answer[3] & 0xF
            return answer, timeless
    return None, timeless


def _sinkhole(policy: Policy, decision: Decision):
    group = policy.groups.get(decision.group)
    return (group.sinkhole_a, group.sinkhole_aaaa) if group else ((), ())


def _bare(data: bytes, rcode: int) -> bytes:
    reply = bytearray(formerr_for(data) or b"")
    if reply:
        reply[3] = (reply[3] & 0xF0) | rcode
    return bytes(reply) or None
