"""`sinkhole export rpz`: one response-policy zone per client class (group, or group with the
exemptions in force for some of its clients) and a BIND views example (`match-clients`).

Each name a blocked service lists gets an exact trigger, and a `*.` trigger when its subtree is
decided too (domains, allows); the most specific trigger wins in RPZ as in the resolver's walk.
Patterns (regexes) have no RPZ form; the output lists them.
"""
from __future__ import annotations

import netaddr

from ..policy import Policy
from . import ClientClass, client_classes, header, name_decision, unexpressed_patterns, zone_names

SUFFIX = "rpz.sinkhole"


def origin(cls: ClientClass) -> str:
    return f"{cls.name}.{SUFFIX}"


def actions(policy: Policy, cls: ClientClass, decision: tuple[str, str | None]) -> list[str]:
    """RPZ records for one decision. RPZ has no REFUSED: a refused block becomes NXDOMAIN."""
    action, response = decision
    if action == "forward":
        return ["CNAME rpz-passthru."]
    if response == "nodata":
        return ["CNAME *."]
    if response == "null":
        return ["A 0.0.0.0", "AAAA ::"]
    if response == "sinkhole":
        return [f"A {a}" for a in cls.group.sinkhole_a] + [f"AAAA {a}" for a in cls.group.sinkhole_aaaa]
    return ["CNAME ."]                   # nxdomain (and refused, which RPZ cannot say)


def zone(policy: Policy, cls: ClientClass, now: float) -> str:
    """The zone file text for one class."""
    ttl = cls.group.block_ttl
    lines = [header(policy, now, f"RPZ for client class {cls.name} (group {cls.group.name})", ";")]
    if cls.exemptions:
        lines.append(f"; exemptions in force: {', '.join(e.id for e in cls.exemptions)}\n")
    if cls.group.response == "refused":
        lines.append("; group response 'refused' has no RPZ form: blocked names answer NXDOMAIN here\n")
    for text in unexpressed_patterns(policy, cls):
        lines.append(f"; NOT EXPRESSED (regex pattern, no RPZ form): {text}\n")
    lines.append(f"$ORIGIN {origin(cls)}.\n$TTL {ttl}\n"
                 f"@ SOA localhost. hostmaster.localhost. {int(now) & 0xFFFFFFFF} 3600 600 86400 {ttl}\n"
                 "@ NS localhost.\n")
    for name, subtree in zone_names(policy, cls):
        for owner, probe in ((name, name), (f"*.{name}", f"*.{name}")) if subtree else ((name, name),):
            for record in actions(policy, cls, name_decision(policy, cls, probe)):
                lines.append(f"{owner} {record}\n")
    return "".join(lines)


def views(policy: Policy, classes: list[ClientClass], directory: str, now: float) -> str:
    """named.conf example: one view per class; match-clients excludes more specific networks of
    other classes, so BIND's first-match gives the resolver's longest-prefix classification."""
    out = [header(policy, now, "BIND views for the sinkhole RPZ zones (an example to adapt)", "//")]
    out.append("// KNOWN DIFFERENCES from the sinkhole (tested with BIND 9.18): regex patterns have no RPZ\n"
               "// form (listed per view below); a 'refused' group answers NXDOMAIN; ANY is relayed to\n"
               "// the forwarders, where the sinkhole answers RFC 8482's minimal HINFO.\n\n")
    out.append("acl \"sinkhole-allowed\" { " + " ".join(f"{n};" for n in policy.allowed_clients) + " };\n\n")
    for cls in classes:
        nets = [netaddr.IPNetwork(n) for n in cls.networks]
        if not nets:
            continue
        others = [netaddr.IPNetwork(n) for c in classes if c is not cls for n in c.networks]
        match = []
        for net in nets:
            match += [f"!{o.cidr};" for o in others if o in net and o.prefixlen > net.prefixlen]
            match.append(f"{net.cidr};")
        patterns = unexpressed_patterns(policy, cls)
        out.append(f"view \"{cls.name}\" {{\n")
        for text in patterns:
            out.append(f"    // NOT EXPRESSED (regex pattern, no RPZ form): {text}\n")
        out.append(f"    match-clients {{ {' '.join(dict.fromkeys(match))} }};\n"
                   "    recursion yes;\n"
                   "    allow-recursion { \"sinkhole-allowed\"; };\n"
                   "    allow-query { \"sinkhole-allowed\"; };\n"
                   f"    response-policy {{ zone \"{origin(cls)}\"; }} break-dnssec yes qname-wait-recurse no;\n"
                   f"    zone \"{origin(cls)}\" {{ type primary; file \"{directory}/{cls.name}.rpz\"; "
                   "allow-query { none; }; };\n"
                   "};\n\n")
    return "".join(out)


def export(policy: Policy, now: float, directory: str) -> dict[str, str]:
    """{file name: text}: a zone per class and named.conf.sinkhole-views."""
    classes = client_classes(policy, now)
    files = {f"{cls.name}.rpz": zone(policy, cls, now) for cls in classes}
    files["named.conf.sinkhole-views"] = views(policy, classes, directory, now)
    return files
