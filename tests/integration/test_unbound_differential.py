"""Differential test: a real Unbound loaded with `sinkhole export unbound` answers every (client,
name, type) of a corpus with the same decision (rcode and answer) as the sinkhole resolver.
Both forward to the same dnsmasq upstream. The corpus covers every group and response type, every
service and rule kind, exemptions (in force, pending, expired), the built-in names, clients
outside allowed_clients; it runs twice in an order that would expose an answer cached for one
group being served to another. A real BIND (named) loaded with `sinkhole export rpz`'s zones and
views example, as written, gives the resolver's answers too, but where RPZ cannot say it: a
'refused' group gets NXDOMAIN, and regex patterns are not expressed (both named in the export);
the test checks those differences are exactly what it finds."""
from __future__ import annotations

import copy
import os
import re
import socket
import subprocess
import threading
import time
from datetime import datetime, timedelta, timezone

import dns.message
import dns.rcode
import pytest

from helpers import TEST_SERVICES, stop_process, Dnsmasq, PyUpstream, Sinkhole, ask, free_port, have, wait_for_answer, write_blocklists

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not (have("dnsmasq") and have("unbound")),
                                 reason="needs dnsmasq and unbound (Debian dnsmasq-base, unbound)"),
              pytest.mark.skipif(not os.path.exists("/usr/lib/python3/dist-packages/unboundmodule.py"),
                                 reason="needs Debian python3-unbound (Unbound's Python module)")]

NOW = datetime.now(timezone.utc).replace(microsecond=0)

SERVICES = {
    "chat": copy.deepcopy(TEST_SERVICES["chat"]),   # a copy: the corpus below adds hosts to it
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
        "desktop": {"subnets": ["127.0.1.0/24", "::1/128"], "block": ["chat", "cdn", "encrypted-dns"], "response": "nxdomain"},
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

CLIENTS = ["::1", "127.0.2.5", "127.0.1.5", "127.0.3.5", "127.0.4.5", "127.0.5.5", "127.0.6.5", "127.0.7.5",
           "127.0.1.50", "127.0.1.51", "127.0.1.52", "127.0.1.61", "127.200.0.1"]
NAMES = ["chat.test", "www.chat.test", "help.chat.test", "x.help.chat.test", "chat-cdn.test", "a.b.chat-cdn.test",
         "exact.other.test", "sub.exact.other.test", "other.test", "file-abc1.files.test", "x.file-abc1.files.test",
         "files.test", "doh.test", "dns.doh.test", "use-application-dns.net", "mask.icloud.com",
         "mask-h2.icloud.com", "x.mask.icloud.com", "icloud.com", "resolver.arpa", "_dns.resolver.arpa",
         "normal.test", "www.example.net", "plain-alias.test"]
TYPES = ["A", "AAAA", "TXT", "ANY"]
# Not TXT for the aliases: Unbound chases dnsmasq's CNAME itself and answers SERVFAIL where the
# target has no TXT, while the resolver relays dnsmasq's NOERROR: an upstream artefact, not policy.
CNAME_TYPES = ["A", "AAAA", "ANY"]
# The upstream's CNAMEs (dnsmasq `--cname`). The main corpus has an alias to an allowed name;
# CHAINS below add an alias per kind of target (a domain, a host, a pattern, a name a service
# carves out of another, encrypted DNS, an allowed name, a two-hop chain), each asked in a
# sequence that would expose a chain or its target cached for one group and served to another.
CNAMES = {"plain-alias.test": "normal.test"}
KINDS = {"domain": "t{i}.chat.test", "host": "exact{i}.other.test", "pattern": "file-c{i}.files.test",
         "carved": "t{i}.help.chat.test", "doh": "t{i}.doh.test", "allowed": "t{i}.normal.test",
         "chain": "hop{i}.test"}
STARTERS = ["127.0.2.5", "127.0.1.5", "127.0.6.5", "127.0.1.50"]   # mobile, desktop, guest, exempt
CHAINS = []          # (alias, target, which of the two is asked first, by which client)
for _kind, _template in KINDS.items():
    for _first in ("alias", "target"):
        for _starter in STARTERS:
            _n = len(CHAINS)
            CHAINS.append((f"alias{_n}-{_kind}.test", _template.format(i=_n), _first, _starter))
            CNAMES[CHAINS[-1][0]] = CHAINS[-1][1]
            if _kind == "chain":
                CNAMES[CHAINS[-1][1]] = f"t{_n}-end.chat.test"
            elif _kind == "host":
                SERVICES["chat"]["hosts"].append({"name": CHAINS[-1][1], "source": "t"})
UPSTREAM = ["--address=/#/192.0.2.1", "--address=/#/2001:db8::1"] + \
    [f"--host-record={t},192.0.2.2,2001:db8::2" for t in sorted(set(CNAMES.values()) - set(CNAMES))] + \
    [f"--cname={a},{t}" for a, t in CNAMES.items()]


def start_answering(server, cmd: list[str], env=None) -> None:
    """Start `cmd` as server.proc, its output collected in server.lines, and wait until it answers
    on 127.0.0.1:server.port (its log in the failure if it never does)."""
    server.proc = subprocess.Popen(cmd, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    threading.Thread(target=lambda: server.lines.extend(server.proc.stdout), daemon=True).start()
    try:
        wait_for_answer("127.0.0.1", server.port, deadline=15)
    except TimeoutError:
        server.proc.kill()
        raise AssertionError(f"{cmd[0]} did not start:\n" + "".join(server.lines))


class Unbound:
    def __init__(self, workdir, include: str, upstream: Dnsmasq):
        self.workdir, self.include, self.upstream = workdir, include, upstream
        self.lines: list[str] = []

    def __enter__(self):
        self.port = free_port()
        conf = self.workdir / "unbound.conf"
        conf.write_text(f"""server:
    interface: 127.0.0.1
    interface: ::1
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
        start_answering(self, ["unbound", "-d", "-c", str(conf)], self.env)
        return self

    @property
    def env(self):
        # Debian's libpython under Unbound does not add dist-packages, where unboundmodule.py is
        return {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": "/usr/lib/python3/dist-packages"}

    def __exit__(self, *exc):
        stop_process(self.proc)


def outcome(server, name, rdtype, source):
    try:
        reply = ask(server, name, rdtype, source=source, timeout=3)
    except Exception as e:  # noqa: BLE001 - a timeout is an outcome to compare too
        return ("no answer", type(e).__name__)
    wanted = dns.rdatatype.from_text(rdtype)
    answers = sorted(f"{dns.rdatatype.to_text(rr.rdtype)} {r}" for rr in reply.answer for r in rr
                     if rr.rdtype == wanted or wanted == dns.rdatatype.ANY)
    return (dns.rcode.to_text(reply.rcode()), tuple(answers))


class Pair:
    """The sinkhole resolver and another server with the export (Unbound, BIND), both forwarding to
    one dnsmasq. `expected(client, name, rdtype, ours, theirs)` names a difference the export
    documents (None: none is expected there)."""

    def __init__(self, ours, theirs, label="unbound", expected=lambda *answer: None):
        self.ours, self.theirs, self.label, self.expected = ours, theirs, label, expected
        self.seen, self.differences, self.documented = set(), [], set()

    def compare(self, client, name, rdtype):
        v6 = ":" in client
        a = outcome(self.ours.addresses[1] if v6 else self.ours.addresses[0], name, rdtype, client)
        b = outcome(("::1" if v6 else "127.0.0.1", self.theirs.port), name, rdtype, client)
        self.seen.add(a[0])
        if a != b:
            kind = self.expected(client, name, rdtype, a, b)
            if kind is None:
                self.differences.append(f"{client} {name} {rdtype}: sinkhole {a}, {self.label} {b}")
            else:
                self.documented.add(kind)
        return a

    def check(self):
        differences, self.differences = self.differences, []
        assert not differences, "\n".join(differences) + f"\n{self.label} log:\n" + "".join(self.theirs.lines[-30:])


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from resolver.export import unbound, write_outputs
    from resolver.loader import load_policy
    tmp_path = tmp_path_factory.mktemp("unbound")
    blocklists = write_blocklists(tmp_path / "blocklists", POLICY, SERVICES)
    policy = load_policy(blocklists, time.time())
    out = tmp_path / "unbound"
    write_outputs(unbound.export(policy, time.time(), str(out)), out)
    conf = (out / unbound.CONF).read_text()
    assert "EX-ACTIVE" in conf and "EX-PENDING" not in conf and "EX-EXPIRED" not in conf
    with Dnsmasq(UPSTREAM) as upstream, \
         Sinkhole(tmp_path, {"upstreams": [upstream.address], "blocklists": str(blocklists),
                             "listen": ["127.0.0.1:0", "[::1]:0"]}) as ours, \
         Unbound(out, str(out / unbound.CONF), upstream) as theirs:
        yield Pair(ours, theirs)


def ask_corpus(pair, types, alias_types):
    for _round in range(2):             # the second round answers from both caches
        for name in NAMES:
            for rdtype in types if name not in CNAMES else alias_types:
                for client in CLIENTS:     # mobile first: its answers would be cached first
                    pair.compare(client, name, rdtype)
    pair.check()
    assert {"NOERROR", "NXDOMAIN", "REFUSED"} <= pair.seen


def ask_chains(pair, types):
    """CNAME cloaking (an allowed alias whose chain reaches a name the client's group blocks) and
    targets a chain put in the cache: one client asks the alias (or the target) first, then every
    client asks the target and the alias, in both orders; every answer must be the resolver's."""
    blocked_for = {}
    for alias, target, first, starter in CHAINS:
        names = (alias, target) if first == "alias" else (target, alias)
        pair.compare(starter, names[0], "A")
        for client in CLIENTS:
            for name in (names[1], names[0]):
                for rdtype in types:
                    answer = pair.compare(client, name, rdtype)
                    if name == alias and rdtype == "A":
                        blocked_for.setdefault(alias, set()).add((client, answer[0], answer[1] == ()))
    pair.check()
    # the corpus exercises what it claims: cloaked chains blocked for desktops, not for mobiles
    desktop = {alias for alias, seen in blocked_for.items() if ("127.0.1.5", "NXDOMAIN", True) in seen}
    mobile = {alias for alias, seen in blocked_for.items() if any(c == "127.0.2.5" and rc == "NOERROR" and not empty
                                                                   for c, rc, empty in seen)}
    assert {a for a, t, *_ in CHAINS if "-allowed" not in a} <= desktop and set(blocked_for) <= mobile


def test_unbound_answers_as_the_resolver_does(pair):
    ask_corpus(pair, TYPES, CNAME_TYPES)


def test_cname_chains_and_their_targets_answer_per_group(pair):
    ask_chains(pair, CNAME_TYPES)


def test_simultaneous_queries_of_groups_that_decide_differently(tmp_path):
    """The documented difference (KNOWN DIFFERENCE (simultaneous queries) in the export header):
    a mobile and a desktop ask an alias whose upstream CNAME reaches a name desktops block, the
    desktop while the mobile's query is still at the upstream. Unbound resolves it once for both
    (whatever their tags, for A as for TXT), and both get SERVFAIL where the resolver answers each
    for its group. Neither gets the other group's answer."""
    import dnslib
    from resolver.export import unbound, write_outputs
    from resolver.loader import load_policy
    held, release = threading.Event(), threading.Event()

    def answer(request, _transport):
        qname, qtype = str(request.q.qname), dnslib.QTYPE.get(request.q.qtype)
        reply = request.reply()
        if qname.startswith("held"):
            held.set()
            release.wait(10)
            reply.add_answer(dnslib.RR(qname, dnslib.QTYPE.CNAME, rdata=dnslib.CNAME("x.chat.test."), ttl=60))
        target = "x.chat.test." if qname.startswith("held") else qname
        if qtype == "A":
            reply.add_answer(dnslib.RR(target, dnslib.QTYPE.A, rdata=dnslib.A("192.0.2.7"), ttl=60))
        elif qtype == "TXT":
            reply.add_answer(dnslib.RR(target, dnslib.QTYPE.TXT, rdata=dnslib.TXT("t"), ttl=60))
        return reply

    blocklists = write_blocklists(tmp_path / "blocklists", POLICY, SERVICES)
    policy = load_policy(blocklists, time.time())
    out = tmp_path / "unbound"
    write_outputs(unbound.export(policy, time.time(), str(out)), out)
    mobile, desktop = "127.0.2.5", "127.0.1.5"
    with PyUpstream(answer) as upstream, \
         Sinkhole(tmp_path, {"upstreams": [upstream.address], "blocklists": str(blocklists)}) as ours, \
         Unbound(out, str(out / unbound.CONF), upstream) as theirs:
        server = ("127.0.0.1", theirs.port)
        results = {}
        for n, rdtype in enumerate(["A", "TXT"]):
            name = f"held{n}.test"
            held.clear()
            release.clear()
            sockets = {}
            for client in (mobile, desktop):
                sockets[client] = sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                sock.bind((client, 0))
                sock.settimeout(5)
                sock.sendto(dns.message.make_query(name, rdtype, use_edns=False).to_wire(), server)
                if client == mobile:
                    assert held.wait(10), "the upstream never got the first query"
            # a query Unbound answers at once, sent after the desktop's: when it is answered,
            # Unbound has read the desktop's query (one thread, one socket, in order)
            assert outcome(server, "chat.test", "A", desktop)[0] == "NXDOMAIN"
            release.set()
            for client, sock in sockets.items():
                with sock:
                    reply = dns.message.from_wire(sock.recv(4096))
                results[(rdtype, client)] = (dns.rcode.to_text(reply.rcode()), tuple(sorted(
                    f"{dns.rdatatype.to_text(rr.rdtype)} {r}" for rr in reply.answer for r in rr
                    if dns.rdatatype.to_text(rr.rdtype) == rdtype)))
                results[(rdtype, client, "sinkhole")] = outcome(ours, name, rdtype, client)
    for rdtype, data in (("A", "A 192.0.2.7"), ("TXT", 'TXT "t"')):
        assert results[(rdtype, mobile, "sinkhole")] == ("NOERROR", (data,))
        assert results[(rdtype, desktop, "sinkhole")] == ("NXDOMAIN", ())
        assert results[(rdtype, mobile)] == results[(rdtype, desktop)] == ("SERVFAIL", ()), results
    assert any("decide it differently: SERVFAIL" in line for line in theirs.lines)


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


class Bind:
    """A real BIND (named) with `sinkhole export rpz`'s views example included as written, the
    export's zones, and the dnsmasq upstream as its only forwarder; named-checkconf must pass first."""

    def __init__(self, workdir, views, upstream: Dnsmasq):
        self.workdir, self.views, self.upstream = workdir, views, upstream
        self.lines: list[str] = []

    def __enter__(self):
        self.port = free_port()
        conf = self.workdir / "named.conf"
        conf.write_text(f"""options {{
    directory "{self.workdir}";
    pid-file none;
    session-keyfile none;
    managed-keys-directory "{self.workdir}";
    listen-on port {self.port} {{ 127.0.0.1; }};
    listen-on-v6 port {self.port} {{ ::1; }};
    forwarders {{ {self.upstream.host} port {self.upstream.port}; }};
    forward only;
    dnssec-validation no;
}};
controls {{ }};
include "{self.views}";
""")
        check = subprocess.run(["named-checkconf", "-z", str(conf)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        start_answering(self, ["named", "-g", "-c", str(conf)])
        return self

    def __exit__(self, *exc):
        stop_process(self.proc)


GUEST, MOBILE = "127.0.6.5", "127.0.2.5"        # the 'refused' group; the group blocking nothing
PATTERN = re.compile(SERVICES["chat"]["patterns"][0]["pattern"])
BIND_TYPES = ["A", "AAAA", "TXT"]   # not ANY: the resolver answers RFC 8482's HINFO, BIND relays ANY
BIND_ALIAS_TYPES = ["A", "AAAA"]    # and not TXT for aliases, as for Unbound (CNAME_TYPES)


def chain_end(name: str) -> str:
    for _ in range(len(CNAMES) + 1):
        if name not in CNAMES:
            break
        name = CNAMES[name]
    return name


def rpz_cannot_say(ours):
    """The differences `sinkhole export rpz` writes into its zones: a 'refused' group answers
    NXDOMAIN; a regex pattern has no RPZ form, so what only it blocks is answered as for a group
    that blocks nothing. None for any other difference."""
    def kind(client, name, rdtype, answer, theirs):
        if client == GUEST and answer == ("REFUSED", ()) and theirs == ("NXDOMAIN", ()):
            return "refused: NXDOMAIN"
        if PATTERN.fullmatch(chain_end(name)) and theirs == outcome(ours.addresses[0], name, rdtype, MOBILE):
            return "pattern: not expressed"
        return None
    return kind


@pytest.fixture(scope="module")
def bind_pair(tmp_path_factory):
    from resolver.export import rpz, write_outputs
    from resolver.loader import load_policy
    if not (have("named") and have("named-checkconf")):
        pytest.skip("needs named and named-checkconf (Debian bind9, bind9-utils)")
    tmp_path = tmp_path_factory.mktemp("bind")
    blocklists = write_blocklists(tmp_path / "blocklists", POLICY, SERVICES)
    out = tmp_path / "rpz"
    write_outputs(rpz.export(load_policy(blocklists, time.time()), time.time(), str(out)), out)
    with Dnsmasq(UPSTREAM) as upstream, \
         Sinkhole(tmp_path, {"upstreams": [upstream.address], "blocklists": str(blocklists),
                             "listen": ["127.0.0.1:0", "[::1]:0"]}) as ours, \
         Bind(tmp_path, out / "named.conf.sinkhole-views", upstream) as theirs:
        yield Pair(ours, theirs, "bind", rpz_cannot_say(ours))


def test_bind_answers_as_the_resolver_does_but_where_rpz_cannot_say_it(bind_pair):
    bind_pair.documented.clear()
    ask_corpus(bind_pair, BIND_TYPES, BIND_ALIAS_TYPES)
    assert bind_pair.documented == {"refused: NXDOMAIN", "pattern: not expressed"}


def test_bind_cname_chains_and_their_targets_answer_per_view(bind_pair):
    """BIND applies each view's RPZ to every name of a CNAME chain, and its views keep separate
    caches: no chain or target decided for one group reaches another."""
    bind_pair.documented.clear()
    ask_chains(bind_pair, BIND_ALIAS_TYPES)
    assert bind_pair.documented == {"refused: NXDOMAIN", "pattern: not expressed"}
