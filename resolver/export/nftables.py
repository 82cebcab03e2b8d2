"""`sinkhole export nftables`: the policy as one `table inet sinkhole` for the gateway's forward
hook, the atomic `nft -f` apply (and re-apply on policy change), and `enforce_add` for the sidecar.

The ruleset drops what DNS can only report: for clients of groups that block services it rejects
connections to those services' `ip_ranges` (the encrypted-dns ranges are the DoH resolvers), and for
groups that block encrypted-dns it drops DoT/DoQ (TCP/UDP 853) and DNS to anything but the
sanctioned resolvers. Groups that block nothing (mobile) never match a rule. Exemptions in force are
(client . range) elements that time out at the exemption's expiry.
"""
from __future__ import annotations

import ipaddress
import logging
import math
import re
import subprocess
import sys
import tempfile
import time

import netaddr

from ..policy import ENCRYPTED_DNS, Policy
from . import group_addresses, header, in_force, iso

TABLE = "sinkhole"
FAMILY = "inet"
log = logging.getLogger("sinkhole.export")


def _ident(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", text)


def _split(cidrs) -> tuple[list[str], list[str]]:
    v4, v6 = [], []
    for c in cidrs:
        net = netaddr.IPNetwork(c)
        (v4 if net.version == 4 else v6).append(str(net.cidr))
    return v4, v6


def _set(name: str, kind: str, elements: list[str], flags: str = "interval", comment: str = "") -> str:
    body = [f"\t\ttype {kind}", f"\t\tflags {flags}"]
    if comment:
        body.insert(0, f'\t\tcomment "{comment[:120]}"')
    if elements:
        body.append("\t\telements = { " + ",\n\t\t\t     ".join(elements) + " }")
    return f"\tset {name} {{\n" + "\n".join(body) + "\n\t}\n"


def ruleset(policy: Policy, now: float, sanctioned: tuple[str, ...] = ()) -> str:
    """The whole ruleset text, to be loaded with `nft -f` (it replaces the table atomically)."""
    addresses = group_addresses(policy)
    enforced = [g for g in policy.groups.values() if g.block]
    services = sorted({s for g in enforced for s in g.block if policy.services[s].ip_ranges})
    sets, rules = [], []
    sets.append(_set("bypass_v4", "ipv4_addr . ipv4_addr", [], "timeout",
                     "(client . destination) flows the sidecar caught bypassing DNS"))
    sets.append(_set("bypass_v6", "ipv6_addr . ipv6_addr", [], "timeout",
                     "(client . destination) flows the sidecar caught bypassing DNS"))
    rules.append('\t\tip saddr . ip daddr @bypass_v4 counter drop comment "bypass caught by the sidecar"')
    rules.append('\t\tip6 saddr . ip6 daddr @bypass_v6 counter drop comment "bypass caught by the sidecar"')

    exempt = {4: [], 6: []}
    for ex in in_force(policy, now):
        timeout = max(1, math.ceil(ex.expires - now))
        for client in ex.clients:
            cnet = netaddr.IPNetwork(client)
            for s in sorted(ex.services):
                for r in policy.services[s].ip_ranges:
                    rnet = netaddr.IPNetwork(r.cidr)
                    if rnet.version == cnet.version:
                        exempt[cnet.version].append(f"{_elem(cnet)} . {_elem(rnet)} timeout {timeout}s")
    for v, kind in ((4, "ipv4_addr"), (6, "ipv6_addr")):
        sets.append(_set(f"exempt_v{v}", f"{kind} . {kind}", exempt[v], "interval,timeout",
                         "exemptions in force: (client . service range), timing out at expiry"))
    rules.append('\t\tip saddr . ip daddr @exempt_v4 counter accept comment "exemption in force"')
    rules.append('\t\tip6 saddr . ip6 daddr @exempt_v6 counter accept comment "exemption in force"')

    for s in services:
        v4, v6 = _split(r.cidr for r in policy.services[s].ip_ranges)
        what = "DoH/DoT resolver addresses" if s == ENCRYPTED_DNS else f"ip_ranges of service {s}"
        sets.append(_set(f"svc_{_ident(s)}_v4", "ipv4_addr", _merge(v4), comment=what))
        sets.append(_set(f"svc_{_ident(s)}_v6", "ipv6_addr", _merge(v6), comment=what))
    v4, v6 = _split(sanctioned)
    sets.append(_set("sanctioned_v4", "ipv4_addr", _merge(v4), comment="resolvers clients may use on port 53"))
    sets.append(_set("sanctioned_v6", "ipv6_addr", _merge(v6), comment="resolvers clients may use on port 53"))

    for g in enforced:
        gid = _ident(g.name)
        v4, v6 = _ranges(addresses[g.name])
        sets.append(_set(f"clients_{gid}_v4", "ipv4_addr", v4, comment=f"clients of group {g.name}"))
        sets.append(_set(f"clients_{gid}_v6", "ipv6_addr", v6, comment=f"clients of group {g.name}"))
        for ip, v in (("ip", 4), ("ip6", 6)):
            src = f"{ip} saddr @clients_{gid}_v{v}"
            for s in sorted(g.block):
                if s in services:
                    rules.append(f"\t\t{src} {ip} daddr @svc_{_ident(s)}_v{v} counter "
                                 f'reject with icmpx admin-prohibited comment "{g.name}: {s}"')
            if ENCRYPTED_DNS in g.block:
                rules.append(f"\t\t{src} meta l4proto {{ tcp, udp }} th dport 853 counter drop "
                             f'comment "{g.name}: DNS over TLS/QUIC"')
                if sanctioned:
                    rules.append(f"\t\t{src} meta l4proto {{ tcp, udp }} th dport 53 {ip} daddr != "
                                 f'@sanctioned_v{v} counter drop comment "{g.name}: DNS to unsanctioned resolvers"')
    note = "" if sanctioned else ("# No sanctioned_resolvers configured: DNS on port 53 is not restricted.\n"
                                  "# Set sanctioned_resolvers in sinkhole.yaml (or pass --sanctioned).\n")
    return (header(policy, now, "nftables ruleset for the gateway (forward hook)") + note +
            f"table {FAMILY} {TABLE}\n"
            f"delete table {FAMILY} {TABLE}\n"           # with the line above: replace atomically
            f"table {FAMILY} {TABLE} {{\n" + "\n".join(sets) + "\n"
            "\tchain forward {\n"
            "\t\ttype filter hook forward priority filter; policy accept;\n" +
            "\n".join(rules) + "\n\t}\n}\n")


def _ranges(ipset: netaddr.IPSet) -> tuple[list[str], list[str]]:
    """An address set as interval elements: a CIDR where it is one, else first-last."""
    out = {4: [], 6: []}
    for r in ipset.iter_ipranges():
        cidrs = r.cidrs()
        first, last = netaddr.IPAddress(r.first, r.version), netaddr.IPAddress(r.last, r.version)
        out[r.version].append(str(cidrs[0]) if len(cidrs) == 1 else f"{first}-{last}")
    return out[4], out[6]


def _elem(net: netaddr.IPNetwork) -> str:
    return str(net.ip) if net.prefixlen == (32 if net.version == 4 else 128) else str(net.cidr)


def _merge(cidrs: list[str]) -> list[str]:
    """Interval sets refuse overlapping elements: merge them."""
    return [str(c) for c in netaddr.cidr_merge(cidrs)]


# -- I/O ---------------------------------------------------------------------------------------

def _run(argv, data: str | None = None) -> None:
    proc = subprocess.run(argv, input=data, capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {proc.stderr.strip() or 'exit ' + str(proc.returncode)}")


def check(text: str, nft=("nft",)) -> None:
    """`nft -c -f`: raises RuntimeError with nft's message if the ruleset would not load."""
    with tempfile.NamedTemporaryFile("w", suffix=".nft") as f:
        f.write(text)
        f.flush()
        _run([*nft, "-c", "-f", f.name])


def apply(text: str, nft=("nft",)) -> None:
    """Check, then load in one transaction (`nft -f`): the old table stays if anything fails."""
    with tempfile.NamedTemporaryFile("w", suffix=".nft") as f:
        f.write(text)
        f.flush()
        _run([*nft, "-c", "-f", f.name])
        _run([*nft, "-f", f.name])


def enforce_add(client: str, destination: str, timeout: float, nft=("nft",)) -> None:
    """Add (client . destination) to bypass_v4/v6 so the rest of that flow is dropped until
    `timeout` seconds pass. Raises ValueError for bad addresses, RuntimeError if nft fails."""
    c, d = ipaddress.ip_address(client), ipaddress.ip_address(destination)
    if c.version != d.version:
        raise ValueError(f"{client} and {destination} are not the same IP version")
    seconds = max(1, math.ceil(timeout))
    _run([*nft, "add", "element", FAMILY, TABLE, f"bypass_v{c.version}",
          f"{{ {c} . {d} timeout {seconds}s }}"])


def apply_loop(load, sanctioned: tuple[str, ...], interval: float, nft=("nft",), rounds: int | None = None,
               clock=time.time, sleep=time.sleep) -> int:
    """Re-apply whenever the policy revision changes or an exemption starts or ends.
    `load(now)` returns a Policy or raises PolicyError; a bad policy keeps the last applied one."""
    from ..loader import PolicyError
    applied, due, n = None, 0.0, 0
    while rounds is None or n < rounds:
        n += 1
        now = clock()
        try:
            policy = load(now)
        except PolicyError as e:
            for problem in e.problems:
                print(problem, file=sys.stderr)
            print("sinkhole export: policy not valid; the ruleset in force stays", file=sys.stderr)
            policy = None
        if policy is not None and (policy.revision != applied or now >= due):
            try:
                apply(ruleset(policy, now, sanctioned), nft)
            except RuntimeError as e:
                print(f"sinkhole export: apply failed, the ruleset in force stays: {e}", file=sys.stderr)
                if applied is None and rounds is not None and n == rounds:
                    return 1
            else:
                applied = policy.revision
                nxt = policy.next_change(now)
                due = nxt if nxt is not None else float("inf")
                print(f"sinkhole export: applied table {FAMILY} {TABLE} for revision {applied}; "
                      f"next regeneration {iso(nxt)}", file=sys.stderr)
        if rounds is None or n < rounds:
            sleep(interval)
    return 0 if applied is not None else 1
