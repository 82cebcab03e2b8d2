"""The bypass detectors: plain functions of (Observation, Context) -> Finding | None, and `detect`,
which runs them in one order and decides, once, whether a finding alerts or is only counted.

Context is an immutable snapshot built from the resolver's Policy and Config (rebuilt whole on a
policy reload); its one mutable part is `learned`, the resolver answers and flagged clients seen
so far, which outlives reloads. Nothing here reads the clock or touches a socket.
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field, replace
from typing import NamedTuple

from resolver.policy import ENCRYPTED_DNS, Group, Policy, forget_oldest

from .lru import LRU
from .packets import Observation, ip_text

DETECTORS = ("external-dns", "dot", "doq", "doh-sni", "doh-ip", "doh-quic", "httpdns",
             "blocked-sni", "blocked-ip", "no-dns")
# Detectors that mean "this client resolves names somewhere else": its DNS-less connections
# are explained by them and are not reported again as no-dns.
RESOLVER_BYPASS = frozenset({"external-dns", "dot", "doq", "doh-sni", "doh-ip", "doh-quic", "httpdns"})

# Never "public": private, shared, loopback, link-local, multicast and unique-local space. The
# documentation ranges (192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24, 2001:db8::/32) count as
# public on purpose: the lab and the tests use them as "the internet".
INTERNAL = ("0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
            "172.16.0.0/12", "192.168.0.0/16", "224.0.0.0/3", "::/127", "fc00::/7", "fe80::/10",
            "ff00::/8")
# Shared infrastructure where a connection without a lookup is normal (connection coalescing,
# anycast front ends, Private Relay). Sources: the research notes' "shared infrastructure" list;
# Apple 17.0.0.0/8 and Cloudflare's front-end ranges as named in blocklists/services/encrypted-dns.yaml.
SHARED_INFRASTRUCTURE = ("17.0.0.0/8", "104.16.0.0/13", "162.159.0.0/16", "172.64.0.0/13")

# Plain-HTTP DNS APIs: DNSPod /d?dn=, Alibaba /<account>/d?host=, WeChat NewDNS, DoH and JSON DoH
# over cleartext. Sources: research notes section 4.1 and 4.2.
HTTPDNS_PATHS = re.compile(r"(?:^|/)d\?(?:.*&)?(?:dn|host)=|/cgi-bin/micromsg-bin/newgetdns|"
                           r"^/dns-query(?:\?|$)|^/resolve\?(?:.*&)?name=")
HTTPDNS_NAME = re.compile(r"[?&](?:dn|host|name)=([A-Za-z0-9._-]{1,253})")


class NetTable:
    """CIDR -> values; `get` returns the values of every prefix that holds an address. Immutable
    once built, so answers are memoised (bounded: the oldest are forgotten when full)."""

    MEMO_MAX = 65536

    def __init__(self, entries=()):
        table: dict[int, dict[int, dict[int, list]]] = {4: {}, 6: {}}
        for cidr, value in entries:
            net = ipaddress.ip_network(cidr, strict=False)
            bits = net.max_prefixlen
            nets = table[net.version].setdefault(net.prefixlen, {})
            nets.setdefault(int(net.network_address) >> (bits - net.prefixlen), []).append(value)
        self._table = {v: tuple(sorted(((p, {k: tuple(x) for k, x in d.items()}) for p, d in t.items()),
                                       reverse=True)) for v, t in table.items()}
        self._memo: dict[tuple[int, int], tuple] = {}

    def get(self, version: int, addr: int) -> tuple:
        key = (version, addr)
        out = self._memo.get(key)
        if out is not None:
            return out
        bits = 32 if version == 4 else 128
        out = ()
        for prefixlen, nets in self._table[version]:
            found = nets.get(addr >> (bits - prefixlen))
            if found:
                out += found
        if len(self._memo) >= self.MEMO_MAX:
            forget_oldest(self._memo)
        self._memo[key] = out
        return out

    def __contains__(self, key) -> bool:
        out = self._memo.get(key)
        return bool(out if out is not None else self.get(*key))


@dataclass(frozen=True, slots=True)
class Settings:
    window: float = 600.0         # alert dedup window, seconds
    learning: float = 1800.0      # no-dns stays quiet this long after start (answers cached before it)
    grace: float = 300.0          # an answer stays good for TTL + grace
    ttl_floor: float = 300.0      # ... and at least this long: OS and browser caches outlive short TTLs
    no_dns_allow: tuple[str, ...] = SHARED_INFRASTRUCTURE
    max_learned: int = 262144     # (client, address) pairs remembered
    max_flagged: int = 65536


class Learned:
    """What the sidecar has seen so far, shared by every Context: which addresses our resolver gave
    to which client (and to anyone), and which clients were caught resolving elsewhere."""

    def __init__(self, settings: Settings = Settings()):
        self.settings = settings
        self.per_client = LRU(settings.max_learned)    # (client key, address key) -> good until
        self.anyone = LRU(settings.max_learned)        # address key -> good until
        self.flagged = LRU(settings.max_flagged)       # client key -> (detector, until)

    def answer(self, client: tuple[int, int], address: tuple[int, int], ttl: int, now: float) -> None:
        s = self.settings
        until = now + max(ttl, s.ttl_floor) + s.grace
        if self.per_client.get((client, address), 0) < until:
            self.per_client.put((client, address), until)
        if self.anyone.get(address, 0) < until:
            self.anyone.put(address, until)

    def given(self, client: tuple[int, int], address: tuple[int, int], now: float) -> str | None:
        """'client' or 'site' when an answer still covers the address, else None."""
        if self.per_client.get((client, address), 0) >= now:
            return "client"
        if self.anyone.get(address, 0) >= now:
            return "site"
        return None

    def flag(self, client: tuple[int, int], detector: str, now: float) -> None:
        self.flagged.put(client, (detector, now + self.settings.window))

    def explained(self, client: tuple[int, int], now: float) -> str | None:
        entry = self.flagged.get(client)
        return entry[0] if entry and entry[1] >= now else None

    def sizes(self) -> int:
        return len(self.per_client) + len(self.anyone) + len(self.flagged)


@dataclass(frozen=True)
class Context:
    policy: Policy
    sanctioned: NetTable
    ranges: NetTable              # service ip_ranges -> (service name, tags)
    internal: NetTable
    allow: NetTable
    everything: Group             # a group blocking every service: to count what others would see
    learning_until: float
    learned: Learned
    settings: Settings
    sanctioned_text: tuple[str, ...] = field(default=())
    quiet: NetTable = field(default_factory=NetTable)   # internal + sanctioned + allow: no-dns skips
    clients: dict = field(default_factory=dict, compare=False)   # (version, address) -> classify()
    matches: dict = field(default_factory=dict, compare=False)   # (group name, name) -> match()

    def classify(self, version: int, address: int) -> tuple[Group | None, tuple[int, int]]:
        """policy.classify of a client given as (version, int), memoised for this snapshot."""
        key = (version, address)
        out = self.clients.get(key)
        if out is None:
            if len(self.clients) >= NetTable.MEMO_MAX:
                forget_oldest(self.clients)
            out = self.clients[key] = self.policy.classify(ip_text(version, address))
        return out

    def match(self, group: Group, name: str):
        """policy.match(group, name), memoised for this snapshot (names repeat: SNIs, Hosts)."""
        key = (None if group is self.everything else group.name, name)
        try:
            return self.matches[key]
        except KeyError:
            if len(self.matches) >= NetTable.MEMO_MAX:
                forget_oldest(self.matches)
            out = self.matches[key] = self.policy.match(group, name)
            return out


def sanctioned_addresses(config) -> tuple[str, ...]:
    """Config.sanctioned_resolvers plus every specific listen address (0.0.0.0 and :: say nothing)."""
    out = list(config.sanctioned_resolvers)
    for host, _ in config.listen:
        if not ipaddress.ip_address(host).is_unspecified:
            out.append(host)
    return tuple(dict.fromkeys(out))


def build_context(policy: Policy, sanctioned: tuple[str, ...], learned: Learned, started: float,
                  settings: Settings = Settings()) -> Context:
    ranges = [(r.cidr, (service.name, r.tags)) for service in policy.services.values() for r in service.ip_ranges]
    some = next(iter(policy.groups.values()))
    everything = replace(some, name="*", block=frozenset(policy.services))
    quiet = NetTable((c, True) for c in INTERNAL + tuple(sanctioned) + tuple(settings.no_dns_allow))
    return Context(policy, NetTable((s, True) for s in sanctioned), NetTable(ranges),
                   NetTable((c, True) for c in INTERNAL), NetTable((c, True) for c in settings.no_dns_allow),
                   everything, started + settings.learning, learned, settings, sanctioned, quiet)


class Finding(NamedTuple):
    """One detector's finding (immutable; a NamedTuple because two are built per finding)."""
    detector: str
    observation: Observation
    service: str | None            # the service whose policy this bypasses; None: the resolver itself
    evidence: str
    name: str | None = None
    group: str = "-"
    alert: bool = False
    why_quiet: str = ""            # why it is only counted


# -- the detectors -------------------------------------------------------------------------------
# Each returns a Finding (alert decided later, in `detect`) or None. They only read.

def external_dns(obs: Observation, ctx: Context) -> Finding | None:
    if obs.kind != "connect" or obs.server_port != 53 or obs.transport == "quic":
        return None
    if (obs.version, obs.server) in ctx.sanctioned:
        return None
    return Finding("external-dns", obs, None, _EXTERNAL_DNS[obs.transport], obs.name)


_EXTERNAL_DNS = {t: f"DNS over {t.upper()} to an unsanctioned server" for t in ("tcp", "udp")}   # evidence


def dot(obs: Observation, ctx: Context) -> Finding | None:
    if obs.kind == "connect" and obs.transport == "tcp" and obs.server_port == 853:
        return Finding("dot", obs, ENCRYPTED_DNS, "TCP connection to port 853 (DNS over TLS)")
    if obs.kind == "hello" and obs.transport == "tcp" and "dot" in obs.alpn:
        return Finding("dot", obs, ENCRYPTED_DNS, "TLS ClientHello with ALPN dot", obs.sni)
    return None


def doq(obs: Observation, ctx: Context) -> Finding | None:
    if obs.kind == "connect" and obs.transport in ("udp", "quic") and obs.server_port == 853:
        return Finding("doq", obs, ENCRYPTED_DNS, "UDP to port 853 (DNS over QUIC)")
    if obs.kind == "hello" and obs.transport == "quic" and any(a.startswith("doq") for a in obs.alpn):
        return Finding("doq", obs, ENCRYPTED_DNS, f"QUIC ClientHello with ALPN {','.join(obs.alpn)}", obs.sni)
    return None


def _encrypted_dns_name(name: str | None, ctx: Context) -> bool:
    if not name:
        return False
    rule = ctx.match(ctx.everything, name)
    return rule is not None and rule.service == ENCRYPTED_DNS


def doh_sni(obs: Observation, ctx: Context) -> Finding | None:
    # port 853 is DoT, reported by `dot` on the SYN; the SNI there adds nothing
    if obs.kind == "hello" and obs.transport == "tcp" and obs.server_port != 853 \
            and _encrypted_dns_name(obs.sni, ctx):
        return Finding("doh-sni", obs, ENCRYPTED_DNS, f"TLS ClientHello names encrypted-DNS host {obs.sni}",
                       obs.sni)
    return None


def doh_quic(obs: Observation, ctx: Context) -> Finding | None:
    if obs.kind == "hello" and obs.transport == "quic" and _encrypted_dns_name(obs.sni, ctx):
        return Finding("doh-quic", obs, ENCRYPTED_DNS,
                       f"QUIC Initial ClientHello names encrypted-DNS host {obs.sni}", obs.sni)
    return None


def _tagged(obs: Observation, ctx: Context, tag: str) -> bool:
    for service, tags in ctx.ranges.get(obs.version, obs.server):
        if service == ENCRYPTED_DNS and tag in tags:
            return True
    return False


def doh_ip(obs: Observation, ctx: Context) -> Finding | None:
    if obs.kind != "hello" or obs.server_port != 443 or _encrypted_dns_name(obs.sni, ctx):
        return None
    if not _tagged(obs, ctx, "doh"):
        return None
    said = f"SNI {obs.sni}" if obs.sni else "no SNI"
    return Finding("doh-ip", obs, ENCRYPTED_DNS, f"{obs.transport.upper()}/443 to a known DoH resolver address, {said}",
                   obs.sni)


def httpdns(obs: Observation, ctx: Context) -> Finding | None:
    if obs.kind == "connect" and _tagged(obs, ctx, "httpdns"):
        return Finding("httpdns", obs, ENCRYPTED_DNS,
                       f"{obs.transport.upper()}/{obs.server_port} to an HTTPDNS endpoint address")
    if obs.kind == "http" and HTTPDNS_PATHS.search(obs.detail):
        asked = HTTPDNS_NAME.search(obs.detail)
        service = ENCRYPTED_DNS
        if obs.name:
            rule = ctx.policy.match(ctx.everything, obs.name)
            if rule is not None:
                service = rule.service          # e.g. WeChat's own NewDNS host
        return Finding("httpdns", obs, service, f"HTTP DNS lookup {obs.detail[:120]} (Host {obs.name or '-'})",
                       asked.group(1).lower() if asked else obs.name)
    return None


def blocked_sni(obs: Observation, ctx: Context) -> Finding | None:
    if obs.kind != "hello" or not obs.sni:
        return None
    group, _ = ctx.classify(obs.version, obs.client)
    rule = (group and ctx.match(group, obs.sni)) or ctx.match(ctx.everything, obs.sni)
    if rule is None or rule.service == ENCRYPTED_DNS:
        return None
    return Finding("blocked-sni", obs, rule.service,
                   f"{'QUIC' if obs.transport == 'quic' else 'TLS'} ClientHello for {obs.sni} "
                   f"({rule.describe()}, {rule.origin})", obs.sni)


def blocked_ip(obs: Observation, ctx: Context) -> Finding | None:
    if obs.kind != "connect":
        return None
    for service, _tags in ctx.ranges.get(obs.version, obs.server):
        if service != ENCRYPTED_DNS:
            return Finding("blocked-ip", obs, service,
                           f"{obs.transport.upper()}/{obs.server_port} to an address range of {service}")
    return None


def no_dns(obs: Observation, ctx: Context) -> Finding | None:
    """A connection to a public address the resolver never gave this client (nor anyone, within
    TTL + grace). Only TCP SYNs and QUIC Initials: other UDP (NTP, STUN, games) is not web traffic."""
    if obs.kind != "connect" or obs.transport not in ("tcp", "quic") or obs.server_port == 53:
        return None
    where = (obs.version, obs.server)
    if where in ctx.quiet:                       # internal, sanctioned or allowed
        return None
    if ctx.ranges.get(*where):
        return None                              # blocked-ip, doh-ip or httpdns speak for it
    if ctx.learned.given((obs.version, obs.client), where, obs.time):
        return None
    return Finding("no-dns", obs, None, "connection to an address no answer from the resolver gave "
                   "(per client or site-wide) within TTL + grace")


ORDER = (external_dns, dot, doq, doh_sni, doh_quic, doh_ip, httpdns, blocked_sni, blocked_ip, no_dns)
# ORDER by observation (kind, transport, whether the server address is in any service's ip_ranges):
# the detectors that can return a finding for it (each of the others starts by returning None for
# it; tests/unit/test_sidecar_detectors.py checks this). Outside the ranges, blocked-ip, doh-ip and
# httpdns on a connection cannot fire; inside them, no-dns does not (they speak for it).
BY_KIND = {
    ("connect", "tcp", False): (external_dns, dot, no_dns),
    ("connect", "tcp", True): (external_dns, dot, httpdns, blocked_ip),
    ("connect", "udp", False): (external_dns, doq),
    ("connect", "udp", True): (external_dns, doq, httpdns, blocked_ip),
    ("connect", "quic", False): (doq, no_dns),
    ("connect", "quic", True): (doq, httpdns, blocked_ip),
    ("hello", "tcp", False): (dot, doh_sni, blocked_sni),
    ("hello", "tcp", True): (dot, doh_sni, doh_ip, blocked_sni),
    ("hello", "quic", False): (doq, doh_quic, blocked_sni),
    ("hello", "quic", True): (doq, doh_quic, doh_ip, blocked_sni),
    ("http", "tcp", False): (httpdns,),
    ("http", "tcp", True): (httpdns,),
}


def detect(obs: Observation, ctx: Context) -> list[Finding]:
    """Every finding for one observation, each marked alert or counted-only, with the reason."""
    when, kind, transport, version, client, server = obs[:6]
    findings = []
    for d in BY_KIND.get((kind, transport, ctx.ranges.get(version, server) != ()), ORDER):
        f = d(obs, ctx)
        if f is not None:
            findings.append(f)
    if not findings:
        return findings
    group, key = ctx.classify(version, client)
    if group is None:
        return [_new(Finding, (f[0], obs, f[2], f[3], f[4], "-", False, "client in no group")) for f in findings]
    policy, block, gname = ctx.policy, group.block, group.name
    out = []
    for f in findings:
        detector, _, service, evidence, name = f[:5]
        quiet = ""
        if service is None:
            if not block:
                quiet = f"group {gname} blocks nothing"
        elif service not in block:
            quiet = f"group {gname} does not block {service}"
        elif policy.exemptions and (exemption := policy.exemption_for(key, service, when)) is not None:
            quiet = f"exempted: {exemption.id}"
        if not quiet and detector == "no-dns":
            if when < ctx.learning_until:
                quiet = "learning period"
            else:
                by = ctx.learned.explained(key, when)
                if by:
                    quiet = f"explained by {by}"
        out.append(_new(Finding, (detector, obs, service, evidence, name, gname, not quiet, quiet)))
    for f in out:                   # after all are decided: one finding does not explain another
        if f.alert and f.detector in RESOLVER_BYPASS:
            ctx.learned.flag(key, f.detector, when)
    return out


_new = tuple.__new__                # a NamedTuple made from all its fields, without its __new__
