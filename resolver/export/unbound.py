"""`sinkhole export unbound`: an Unbound configuration that answers as the resolver does, per
client subnet. A tag per client class (`define-tag`, `access-control-tag` on its networks), an RPZ
per tag for the names (the same zones as `export rpz`), and a Python module (Debian's
python3-unbound) for what zones cannot say: service `patterns` and groups whose response is
`refused`. The module keeps answers that differ between classes out of the cache.
"""
from __future__ import annotations

import json
from pathlib import Path

import netaddr

from ..policy import Policy
from . import client_classes, header, iso, rpz

MODULE = "sinkhole_unbound.py"
CONF = "sinkhole-unbound.conf"
_TEMPLATE = Path(__file__).with_name("unbound_module.py.txt")


def module(policy: Policy, now: float) -> str:
    """The Python module's source, with the policy it needs as data."""
    classes = client_classes(policy, now)
    data = {
        "revision": policy.revision,
        "names": {name: [[r.service, r.kind, r.response] for r in rules] for name, rules in policy.names.items()},
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
    """The configuration fragment (server:, python: and rpz: clauses) for `include:`."""
    classes = client_classes(policy, now)
    allowed = netaddr.IPSet(policy.allowed_clients)
    out = [header(policy, now, "Unbound configuration fragment for the sinkhole policy"),
           "# Include it from unbound.conf. It sets module-config; keep `python` before `iterator`\n"
           "# if you add modules (for example: \"respip validator python iterator\").\n",
           "server:\n",
           '    module-config: "respip python iterator"\n',
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
    for cls in classes:
        if cls.group.response == "refused" or not cls.group.block:
            continue                      # the module answers REFUSED; nothing to do for the others
        out.append(f"\nrpz:\n    name: \"{rpz.origin(cls)}\"\n    zonefile: \"{directory}/{cls.name}.rpz\"\n"
                   f'    tags: "{cls.name}"\n    rpz-log: yes\n    rpz-log-name: "{cls.name}"\n')
    return "".join(out)


def export(policy: Policy, now: float, directory: str) -> dict[str, str]:
    classes = client_classes(policy, now)
    files = {CONF: config(policy, now, directory), MODULE: module(policy, now)}
    for cls in classes:
        if cls.group.block and cls.group.response != "refused":
            files[f"{cls.name}.rpz"] = rpz.zone(policy, cls, now)
    return files
