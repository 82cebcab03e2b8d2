"""Differential test: a real Unbound loaded with `sinkhole export unbound` answers every (client,
name, type) of a corpus with the same decision (rcode and answer) as the sinkhole resolver.
Both forward to the same dnsmasq upstream. The corpus covers every group and response type, every
service and rule kind, exemptions (in force, pending, expired), the built-in names, clients
outside allowed_clients; it runs twice in an order that would expose an answer cached for one
group being served to another. BIND's zones for the same policy pass named-checkzone."""
from __future__ import annotations

import os
import subprocess
import threading
import time
from datetime import datetime, timedelta, timezone

import dns.rcode
import pytest

from helpers import Dnsmasq, Sinkhole, ask, free_port, have, wait_for_answer, write_blocklists

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not (have("dnsmasq") and have("unbound")),
                                 reason="needs dnsmasq and unbound (Debian dnsmasq-base, unbound)"),
              pytest.mark.skipif(not os.path.exists("/usr/lib/python3/dist-packages/unboundmodule.py"),
                                 reason="needs Debian python3-unbound (Unbound's Python module)")]

NOW = datetime.now(timezone.utc).replace(microsecond=0)

SERVICES = {
    "chat": {"description": "chat", "sources": {"t": "test"},
             "domains": [{"name": "chat.test", "source": "t"}, {"name": "chat-cdn.test", "source": "t"}],
             "hosts": [{"name": "exact.other.test", "source": "t"}],
             "patterns": [{"pattern": r"file-[0-9a-z]+\.files\.test", "source": "t"}],
             "allow": [{"name": "help.chat.test", "source": "t"}],
             "ip_ranges": [{"cidr": "198.51.100.0/24", "source": "t"}]},
    "cdn": {"description": "a service that lists a name chat carves out", "sources": {"t": "test"},
            "domains": [{"name": "help.chat.test", "source": "t"}]},
    "encrypted-dns": {"description": "DoH", "sources": {"t": "test"},
                      "domains": [{"name": "doh.test", "source": "t"}]},
}


def exemption(id_, client, services, **times):
    return {"id": id_, "clients": [client], "services": services, "approved_by": "head", "reason": "test",
            **{k: v.isoformat() for k, v in times.items()}}


POLICY = {
    "groups": {
        "desktop": {"subnets": ["127.0.1.0/24"], "block": ["chat", "cdn", "encrypted-dns"], "response": "nxdomain"},
        "mobile": {"subnets": ["127.0.2.0/24"], "block": []},
        "kiosk": {"subnets": ["127.0.3.0/24"], "block": ["chat"], "response": "nodata"},
        "lab": {"subnets": ["127.0.4.0/24"], "block": ["chat", "encrypted-dns"], "response": "null"},
        "lobby": {"subnets": ["127.0.5.0/24"], "block": ["chat"], "response": "sinkhole",
                  "sinkhole": ["192.0.2.99", "2001:db8::99"]},
        "guest": {"subnets": ["127.0.6.0/24"], "block": ["chat"], "response": "refused"},
    },
    "default_group": "mobile",
    "allowed_clients": ["127.0.0.0/9", "::1/128"],
    "exemptions": [
        exemption("EX-ACTIVE", "127.0.1.50", ["chat"], expires=NOW + timedelta(days=1)),
        exemption("EX-DOH", "127.0.1.60/31", ["encrypted-dns"], expires=NOW + timedelta(days=1)),
        exemption("EX-PENDING", "127.0.1.51", ["chat"], starts=NOW + timedelta(days=1), expires=NOW + timedelta(days=2)),
        exemption("EX-EXPIRED", "127.0.1.52", ["chat"], expires=NOW - timedelta(hours=1)),
    ],
}

CLIENTS = ["127.0.2.5", "127.0.1.5", "127.0.3.5", "127.0.4.5", "127.0.5.5", "127.0.6.5", "127.0.7.5",
           "127.0.1.50", "127.0.1.51", "127.0.1.52", "127.0.1.61", "127.200.0.1"]
NAMES = ["chat.test", "www.chat.test", "help.chat.test", "x.help.chat.test", "chat-cdn.test", "a.b.chat-cdn.test",
         "exact.other.test", "sub.exact.other.test", "other.test", "file-abc1.files.test", "x.file-abc1.files.test",
         "files.test", "doh.test", "dns.doh.test", "use-application-dns.net", "mask.icloud.com",
         "mask-h2.icloud.com", "x.mask.icloud.com", "icloud.com", "resolver.arpa", "_dns.resolver.arpa",
         "normal.test", "www.example.net"]
TYPES = ["A", "AAAA", "TXT"]


class Unbound:
    def __init__(self, workdir, include: str, upstream: Dnsmasq):
        self.workdir, self.include, self.upstream = workdir, include, upstream
        self.lines: list[str] = []

    def __enter__(self):
        self.port = free_port()
        conf = self.workdir / "unbound.conf"
        conf.write_text(f"""server:
    interface: 127.0.0.1
    port: {self.port}
    chroot: ""
    username: ""
    directory: "{self.workdir}"
    pidfile: ""
    use-syslog: no
    logfile: ""
    do-daemonize: no
    num-threads: 1
    do-not-query-localhost: no
    local-zone: "test." nodefault
include: "{self.include}"
remote-control:
    control-enable: no
forward-zone:
    name: "."
    forward-addr: {self.upstream.host}@{self.upstream.port}
""")
        check = subprocess.run(["unbound-checkconf", str(conf)], capture_output=True, text=True, env=self.env)
        assert check.returncode == 0 or "is not known to work" in check.stderr, check.stderr
        self.proc = subprocess.Popen(["unbound", "-d", "-c", str(conf)], env=self.env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True).start()
        try:
            wait_for_answer("127.0.0.1", self.port, deadline=15)
        except TimeoutError:
            self.proc.kill()
            raise AssertionError("unbound did not start:\n" + "".join(self.lines))
        return self

    @property
    def env(self):
        # Debian's libpython under Unbound does not add dist-packages, where unboundmodule.py is
        return {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": "/usr/lib/python3/dist-packages"}

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def outcome(server, name, rdtype, source):
    try:
        reply = ask(server, name, rdtype, source=source, timeout=3)
    except Exception as e:  # noqa: BLE001 - a timeout is an outcome to compare too
        return ("no answer", type(e).__name__)
    answers = sorted(str(r) for rr in reply.answer for r in rr if rr.rdtype == dns.rdatatype.from_text(rdtype))
    return (dns.rcode.to_text(reply.rcode()), tuple(answers))


def test_unbound_answers_as_the_resolver_does(tmp_path):
    from resolver.export import unbound, write_outputs
    from resolver.loader import load_policy
    blocklists = write_blocklists(tmp_path / "blocklists", POLICY, SERVICES)
    policy = load_policy(blocklists, time.time())
    out = tmp_path / "unbound"
    write_outputs(unbound.export(policy, time.time(), str(out)), out)
    conf = (out / unbound.CONF).read_text()
    assert "EX-ACTIVE" in conf and "EX-PENDING" not in conf and "EX-EXPIRED" not in conf
    with Dnsmasq(["--address=/#/192.0.2.1", "--address=/#/2001:db8::1"]) as upstream, \
         Sinkhole(tmp_path, {"upstreams": [upstream.address], "blocklists": str(blocklists)}) as ours, \
         Unbound(out, str(out / unbound.CONF), upstream) as theirs:
        differences, seen = [], set()
        for _round in range(2):             # the second round answers from both caches
            for name in NAMES:
                for rdtype in TYPES:
                    for client in CLIENTS:     # mobile first: its answers would be cached first
                        a = outcome(ours, name, rdtype, client)
                        b = outcome(("127.0.0.1", theirs.port), name, rdtype, client)
                        seen.add(a[0])
                        if a != b:
                            differences.append(f"{client} {name} {rdtype}: sinkhole {a}, unbound {b}")
    assert not differences, "\n".join(differences) + "\nunbound log:\n" + "".join(theirs.lines[-30:])
    assert {"NOERROR", "NXDOMAIN", "REFUSED"} <= seen


@pytest.mark.skipif(not have("named-checkzone"), reason="needs named-checkzone (Debian bind9-utils)")
def test_bind_zones_load(tmp_path):
    from resolver.export import client_classes, rpz
    from resolver.loader import load_policy
    policy = load_policy(write_blocklists(tmp_path / "blocklists", POLICY, SERVICES), time.time())
    files = rpz.export(policy, time.time(), str(tmp_path))
    classes = client_classes(policy, time.time())
    assert {f"{c.name}.rpz" for c in classes} <= set(files)
    for cls in classes:
        path = tmp_path / f"{cls.name}.rpz"
        path.write_text(files[path.name])
        result = subprocess.run(["named-checkzone", "-q", rpz.origin(cls), str(path)], capture_output=True, text=True)
        assert result.returncode == 0, (path.name, result.stdout, result.stderr)
    assert "NOT EXPRESSED (regex pattern, no RPZ form): chat: file-[0-9a-z]+" in files["desktop.rpz"]
    assert "NOT EXPRESSED" not in files["mobile.rpz"]
