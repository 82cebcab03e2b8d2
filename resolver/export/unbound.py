"""`sinkhole export unbound`: an Unbound configuration that answers as the resolver does, per
client subnet. A tag per client class (`define-tag`, `access-control-tag` on its networks) and a
Python module (Debian's python3-unbound) that decides every query as the resolver does: the names,
service `patterns`, refused groups, RFC 8482 ANY, and the CNAME targets of forwarded answers.

No RPZ: Unbound applies RPZ to CNAME targets without looking at the client's tags (the first
zone with a trigger decides, for every client), so per-group CNAME re-checks need the module.
Nothing goes into Unbound's cache: the worker answers from its message cache before any module
runs, so a cached answer (a CNAME chain's target included) would reach every group alike.
"""
from __future__ import annotations

import json
from pathlib import Path

import netaddr

from ..policy import Policy
from . import client_classes, header, iso

MODULE = "sinkhole_unbound.py"
CONF = "sinkhole-unbound.conf"
CACHE_NOTE = (
    "# Unbound's cache is left empty (the module sets no_cache_store on every query): Unbound answers\n"
    "# from its message cache before any module runs, for every client alike, so an answer cached for\n"
    "# one group (or a CNAME chain's target, cached on the way) would be served to the others. Let the\n"
    "# upstream forwarders cache. prefetch and serve-expired have nothing to work on.\n")
CNAME_NOTE = (
    "# CNAME cloaking: an allowed name whose upstream CNAME chain reaches a name the client's group\n"
    "# blocks gets that block's answer, as from the resolver. The module re-checks the targets per\n"
    "# client class; Unbound's RPZ is not used because it checks CNAME targets without the client's tags.\n")
CONCURRENT_NOTE = (
    "# KNOWN DIFFERENCE (simultaneous queries): Unbound resolves one query for all clients that ask the\n"
    "# same name and type while its query for it is still at the upstream, whatever their tags. When\n"
    "# their classes decide the name or a CNAME target of the answer differently, every one of those\n"
    "# clients gets SERVFAIL (and asks again), where the resolver gives each its own group's answer.\n"
    "# No group gets another group's answer. Names the module answers itself are not affected.\n")
ANY_NOTE = "# ANY queries get the RFC 8482 answer (one HINFO \"RFC8482\"), as from the resolver.\n"
_TEMPLATE = Path(__file__).with_name("unbound_module.py.txt")


def module(policy: Policy, now: float) -> str:
    """The Python module's source, with the policy it needs as data."""
    classes = client_classes(policy, now)
    data = {
        "revision": policy.revision,
        "names": {name: [[r.service, r.kind, r.response] for r in rules] for name, rules in policy.name_rules()},
        "patterns": {s: [rule.text for rule, _ in compiled] for s, compiled in policy.patterns.items()},
        "classes": {c.name: {"block": sorted(c.group.block), "exempt": sorted(c.exempt_services),
                             "response": c.group.response, "ttl": c.group.block_ttl,
                             "a": list(c.group.sinkhole_a), "aaaa": list(c.group.sinkhole_aaaa)}
                    for c in classes},
        "nets": [[n, c.name] for c in classes for n in c.networks],
    }
    text = json.dumps(data, sort_keys=True)
    return (_TEMPLATE.read_text().replace("__REVISION__", policy.revision)
            .replace("__NEXT__", iso(policy.next_change(now))).replace("__DATA__", text.replace("'''", "\\'\\'\\'")))


def config(policy: Policy, now: float, directory: str) -> str:
    """The configuration fragment (server: and python: clauses) for `include:`."""
    classes = client_classes(policy, now)
    allowed = netaddr.IPSet(policy.allowed_clients)
    out = [header(policy, now, "Unbound configuration fragment for the sinkhole policy"),
           "# Include it from unbound.conf. It sets module-config; keep `python` before `iterator`\n"
           "# if you add modules (for example: \"validator python iterator\"). The tags name the classes\n"
           "# for your own tag-based rules; the module classifies clients by address, as the resolver.\n",
           CACHE_NOTE, CNAME_NOTE, CONCURRENT_NOTE, ANY_NOTE,
           "server:\n",
           '    module-config: "python iterator"\n',
           f'    define-tag: "{" ".join(c.name for c in classes)}"\n',
           "    access-control: 0.0.0.0/0 refuse\n",
           "    access-control: ::/0 refuse\n"]
    seen = set()
    for net in policy.allowed_clients:
        seen.add(str(netaddr.IPNetwork(net).cidr))
        out.append(f"    access-control: {net} allow\n")
    for net in ("127.0.0.0/8", "::1/128", "::ffff:127.0.0.1/128"):   # Unbound allows these by default
        if net not in seen:
            out.append(f"    access-control: {net} refuse\n")
    for cls in classes:
        out.append(f"    # class {cls.name}: group {cls.group.name}"
                   + (f", exemptions {', '.join(e.id for e in cls.exemptions)}" if cls.exemptions else "") + "\n")
        for net in cls.networks:
            for part in (netaddr.IPSet([net]) & allowed).iter_cidrs():
                if str(part) not in seen:
                    seen.add(str(part))
                    out.append(f"    access-control: {part} allow\n")
                out.append(f'    access-control-tag: {part} "{cls.name}"\n')
    out.append(f"\npython:\n    python-script: \"{directory}/{MODULE}\"\n")
    return "".join(out)


def export(policy: Policy, now: float, directory: str) -> dict[str, str]:
    return {CONF: config(policy, now, directory), MODULE: module(policy, now)}
