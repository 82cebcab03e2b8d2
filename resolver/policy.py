"""The compiled policy (one frozen snapshot) and `decide`: (client, name, now) -> Decision.

Nothing here does I/O or reads the clock; the loader builds a Policy, the server passes `now` in.
"""
from __future__ import annotations

import datetime
import ipaddress
import itertools
import re
from dataclasses import dataclass, field
from typing import NamedTuple

RESPONSES = ("nxdomain", "nodata", "null", "sinkhole", "refused")
ENCRYPTED_DNS = "encrypted-dns"


class Rule(NamedTuple):
    """One catalog entry that can decide a name. (A NamedTuple stays tracked by the garbage
    collector, unlike a plain tuple: the rules the loader builds are frozen out of its way at start,
    and rules made at query time, ListedRule, are never kept.)"""

    service: str
    kind: str                 # domain | host | pattern | allow | built-in
    text: str                 # the name or pattern as written
    path: str                 # the file it came from (one shared string per file)
    line: int
    response: str | None = None   # built-ins answer their own way, whatever the group says

    @property
    def origin(self) -> str:
        return f"{self.path}:{self.line}" if self.line else self.path

    def describe(self) -> str:
        return f"{self.kind} {self.text}"


class ListedRule(Rule):
    """A rule made when a name from a plain-text list matches (see Policy._listed_rule)."""

    __slots__ = ()


@dataclass(frozen=True)
class IPRange:
    cidr: str
    tags: tuple[str, ...]
    origin: str


@dataclass(frozen=True)
class Service:
    name: str
    description: str
    rules: tuple[Rule, ...]
    ip_ranges: tuple[IPRange, ...]
    sources: tuple[tuple[str, str], ...]
    origin: str
    listed: int = 0               # names from plain-text lists (domain_lists, host_lists)
    lists: tuple = field(default=(), repr=False, compare=False)   # (kind, path, names, lines) until compiled

    def entries(self) -> int:
        return len(self.rules) + self.listed + len(self.ip_ranges)


@dataclass(frozen=True)
class Group:
    name: str
    subnets: tuple[str, ...]
    block: frozenset[str]
    response: str
    block_ttl: int
    sinkhole_a: tuple[str, ...]
    sinkhole_aaaa: tuple[str, ...]
    origin: str


@dataclass(frozen=True)
class Exemption:
    id: str
    clients: tuple[str, ...]
    services: frozenset[str]
    approved_by: str
    reason: str
    starts: float | None
    expires: float
    origin: str
    networks: tuple[tuple[int, int, int], ...] = ()   # (version, network int, mask int)

    def active(self, now: float) -> bool:
        return (self.starts is None or self.starts <= now) and now < self.expires

    def covers(self, version: int, addr: int) -> bool:
        return any(v == version and addr & mask == net for v, net, mask in self.networks)


class Decision(NamedTuple):
    """What to do with one query. Built once per (group, rule) and shared, except for the rules of
    plain-text lists (one per name: kept, they would only fill the collector's old generation)."""

    action: str                       # forward | block | refuse
    group: str | None
    service: str | None = None
    rule: Rule | None = None
    response: str | None = None       # for block: nxdomain | nodata | null | sinkhole | refused
    ttl: int = 0                      # for block: the answer's TTL; for an exemption: the TTL cap
    exemption: Exemption | None = None

    def explain(self) -> str:
        if self.action == "refuse":
            return "refused: the client is not in allowed_clients"
        if self.rule is None:
            return f"group {self.group}: forward (no rule of a blocked service matches)"
        why = f"service {self.service}, {self.rule.describe()} ({self.rule.origin})"
        if self.exemption is not None:
            ex = self.exemption
            return (f"group {self.group}: forward under exemption {ex.id} ({ex.origin}), "
                    f"approved by {ex.approved_by}, until {iso_time(ex.expires)}; would block: {why}")
        return f"group {self.group}: block with {self.response} (TTL {self.ttl}) because of {why}"


def iso_time(ts: float | None) -> str | None:
    """A Unix time as ISO 8601 in UTC (None stays None)."""
    return None if ts is None else datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).isoformat()


def client_key(client) -> tuple[int, int]:
    """(IP version, address as int) from a string or ipaddress object; raises ValueError."""
    if isinstance(client, str):
        if "%" in client:
            client = client.split("%", 1)[0]
        client = ipaddress.ip_address(client)
    if client.version == 6 and client.ipv4_mapped is not None:
        client = client.ipv4_mapped
    return client.version, int(client)


@dataclass(frozen=True)
class Settings:
    block_ttl: int = 10
    exemption_ttl: int = 60
    max_exemption_days: int = 90


@dataclass(frozen=True, eq=False)
class Policy:
    """A whole, validated policy. Built once by the loader, never changed, swapped whole."""

    revision: str
    groups: dict[str, Group]
    default_group: str
    allowed_clients: tuple[str, ...]
    services: dict[str, Service]
    exemptions: tuple[Exemption, ...]
    settings: Settings
    # compiled lookups
    names: dict[str, tuple[Rule, ...] | int]     # an int: one entry of a plain-text list (see rules_at)
    patterns: dict[str, tuple[tuple[Rule, re.Pattern], ...]]
    subnets: dict[int, tuple[tuple[int, dict[int, str]], ...]]
    allowed: dict[int, tuple[tuple[int, frozenset[int]], ...]]
    lists: tuple[tuple[str, str, str], ...] = ()    # (service, kind, path) of each plain-text list
    _clients: dict = field(default_factory=dict, repr=False)
    _decisions: dict = field(default_factory=dict, repr=False)
    _memo: dict = field(default_factory=dict, repr=False)
    _answers: dict = field(default_factory=dict, repr=False)
    answer_tables: dict = field(default_factory=dict, repr=False)   # client -> its group's answers
    _exempted: frozenset | None = field(default=None, repr=False)

    # -- clients -------------------------------------------------------------------------------
    def classify(self, client) -> tuple[Group | None, tuple[int, int]]:
        """The client's group (None: not allowed) and its (version, int) address."""
        memo = self._clients.get(client)
        if memo is not None:
            return memo
        version, addr = key = client_key(client)
        group = None
        if _lpm(self.allowed.get(version, ()), addr, version) is not None:
            name = _lpm(self.subnets.get(version, ()), addr, version)
            group = self.groups[name if name is not None else self.default_group]
        if len(self._clients) > 65536:
            self._clients.clear()
        if isinstance(client, str):
            self._clients[client] = (group, key)
        return group, key

    # -- memo of (group, query bytes) -> parsed query that no rule matches, for core.begin ------
    MEMO_MAX = 10000

    def memo(self, group: str) -> dict:
        """The per-group memo of this snapshot (it dies with the snapshot: a reload starts empty)."""
        table = self._memo.get(group)
        if table is None:
            table = self._memo[group] = {}
        elif len(table) >= self.MEMO_MAX:
            forget_oldest(table)
        return table

    def forward(self, group: str) -> Decision:
        """The group's decision for a name no rule matches (one shared object per group)."""
        decision = self._decisions.get(group)
        if decision is None:
            decision = self._decisions[group] = Decision("forward", group)
        return decision

    # -- finished answers, reused for the same bytes from the same group ------------------------
    ANSWERS_MAX = 1 << 17        # the default of the config's cache.answers
    CLIENTS_MAX = 1 << 16

    def remember(self, client: str, group: str, key: bytes, entry: tuple, limit: int = ANSWERS_MAX) -> None:
        """Keep a finished answer (core.Outcome.reuse_until said it may be reused) for the query
        bytes `key` (all but the ID) from `group`, and let `client` find its group's table in
        answer_tables. The server reads these tables in its hot loop; they die with the snapshot.
        An entry is what core.keep makes (answer less its ID, until when it holds, ...)."""
        table = self._answers.get(group)
        if table is None:
            table = self._answers[group] = {}
        elif len(table) >= limit:
            forget_oldest(table, min(4096, limit))
        table[key] = entry
        tables = self.answer_tables
        if tables.get(client) is not table:
            if len(tables) >= self.CLIENTS_MAX:
                tables.clear()
            tables[client] = table

    def timeless(self, decision: Decision) -> bool:
        """True when the decision depends only on (group, name): no exemption applies now and none
        in the policy names its service, so neither the clock nor the client can change it."""
        if decision.exemption is not None or decision.action == "refuse":
            return False
        if decision.service is None:
            return True
        exempted = self._exempted
        if exempted is None:
            exempted = frozenset(s for ex in self.exemptions for s in ex.services)
            object.__setattr__(self, "_exempted", exempted)
        return decision.service not in exempted

    # -- names ---------------------------------------------------------------------------------
    def match(self, group: Group, qname: str) -> Rule | None:
        """The rule of a service the group blocks that decides `qname`, or None.

        Per service the most specific rule wins: an `allow` carves a subtree out of that service's
        own domains, a `host` matches only the exact name. Costs O(labels) dict lookups, plus the
        regexes of the group's services that have patterns.
        """
        block = group.block
        if not block:
            return None
        rule, carved = self.match_name(block, qname)
        if rule is not None:
            return rule
        for service in block:
            compiled = self.patterns.get(service)
            if compiled and service not in carved:
                for rule, regex in compiled:
                    if regex.fullmatch(qname):
                        return rule
        return None

    def match_name(self, block, qname: str) -> tuple[Rule | None, tuple[str, ...]]:
        """The name rules' part of `match` (no patterns): (deciding rule or None, services carved
        out by an `allow` on the way up). The exporters compile zones from it."""
        names = self.names
        carved = ()
        name = qname
        while True:
            rules = names.get(name)
            if rules is not None:
                if rules.__class__ is int:
                    rules = (self._listed_rule(rules, name),)
                for rule in rules:
                    if rule.service not in block or rule.service in carved:
                        continue
                    if rule.kind == "allow":
                        carved = carved + (rule.service,)
                    elif rule.kind != "host" or name is qname:
                        return rule, carved
            dot = name.find(".")
            if dot < 0:
                return None, carved
            name = name[dot + 1:]

    # A name from a plain-text list is stored as one int, (list index << 32) | line, not as a Rule:
    # a million names then cost the name and a dict slot, and the Rule is made when one matches.
    def _listed_rule(self, handle: int, name: str) -> Rule:
        service, kind, path = self.lists[handle >> 32]
        return ListedRule(service, kind, name, path, handle & 0xFFFFFFFF)

    def rules_at(self, name: str) -> tuple[Rule, ...]:
        """Every rule written for exactly this name."""
        rules = self.names.get(name, ())
        return (self._listed_rule(rules, name),) if rules.__class__ is int else rules

    def name_rules(self):
        """(name, rules) for every name in the table (exports walk this)."""
        for name, rules in self.names.items():
            yield name, ((self._listed_rule(rules, name),) if rules.__class__ is int else rules)

    def exemption_for(self, key: tuple[int, int], service: str, now: float) -> Exemption | None:
        version, addr = key
        for ex in self.exemptions:
            if service in ex.services and ex.active(now) and ex.covers(version, addr):
                return ex
        return None

    def exemptions_covering(self, key: tuple[int, int], service: str) -> list[Exemption]:
        """Every exemption, active or not, for this client address and service (for `explain`)."""
        version, addr = key
        return [ex for ex in self.exemptions if service in ex.services and ex.covers(version, addr)]

    def active_exemptions(self, now: float) -> list[Exemption]:
        return [ex for ex in self.exemptions if ex.active(now)]

    def next_change(self, now: float) -> float | None:
        """The next time an exemption starts or ends after `now`."""
        times = [t for ex in self.exemptions for t in (ex.starts, ex.expires) if t is not None and t > now]
        return min(times) if times else None


def _lpm(table, addr: int, version: int):
    """Longest-prefix match over ((prefixlen, {network: value}), ...) sorted longest first."""
    bits = 32 if version == 4 else 128
    for prefixlen, nets in table:
        value = nets.get(addr >> (bits - prefixlen) << (bits - prefixlen))
        if value is not None:
            return value
    return None


REFUSE = Decision("refuse", None)


def forget_oldest(table: dict, count: int = 256) -> None:
    """Make room in a bounded memo by dropping its oldest entries (dicts keep insertion order):
    a few at a time, so no single query pays for freeing the whole table."""
    for key in list(itertools.islice(table, count)):
        del table[key]


def decide(policy: Policy, client, qname: str, now: float) -> Decision:
    """What to do with a query for `qname` (normalised: lower case, no trailing dot) from `client`."""
    group, key = policy.classify(client)
    if group is None:
        return REFUSE
    rule = policy.match(group, qname)
    if rule is None:
        return policy.forward(group.name)
    decisions = policy._decisions
    exemption = policy.exemption_for(key, rule.service, now) if policy.exemptions else None
    if exemption is not None:
        # short, and never past the expiry: revocation reaches clients within the TTL
        cap = max(0, min(policy.settings.exemption_ttl, int(exemption.expires - now)))
        return Decision("forward", group.name, rule.service, rule, ttl=cap, exemption=exemption)
    # a block depends only on (group, rule): build each Decision once per snapshot (a listed rule
    # is new at every match, so its Decision is too)
    if rule.__class__ is ListedRule:
        return Decision("block", group.name, rule.service, rule, response=rule.response or group.response,
                        ttl=group.block_ttl)
    decision = decisions.get((group.name, rule))
    if decision is None:
        if len(decisions) > 65536:
            forget_oldest(decisions)
        decision = decisions[(group.name, rule)] = Decision(
            "block", group.name, rule.service, rule, response=rule.response or group.response,
            ttl=group.block_ttl)
    return decision
