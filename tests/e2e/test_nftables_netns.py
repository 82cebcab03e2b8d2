"""The exported ruleset in a real nftables on a gateway namespace, with real TCP connections, over
IPv4 and IPv6 (a dual-stack department: one policy, one ruleset, the same checks in each family).

Namespaces: a desktop (10.1.0.10 and 2001:db8:1::10; 10.1.0.20 and 2001:db8:1::20 have an
exemption), a mobile client (10.2.0.10, 2001:db8:2::10), the gateway (forwarding both families; the
ruleset on its forward hook) and an "internet" host that owns, in each family, an address in a
blocked service's range (198.51.100.10, 2001:db8:ff:100::10), a DoH resolver (203.0.113.53,
2001:db8:ff::53) and two ordinary web servers (203.0.113.80/.81, 2001:db8:ff::80/81), listening on
TCP 443, 853 and 80, and two real DNS servers (dnsmasq): the sanctioned resolver (203.0.113.10,
2001:db8:ff::10) and an outside one (203.0.113.99, 2001:db8:ff::99), also on UDP 853 (DNS over
QUIC's port). DNS clients are dig. IPv6 addresses skip duplicate address detection (accept_dad=0 in
every namespace), so they are usable as soon as they are added.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import pytest

from helpers import ROOT, have, have_ipv6_loopback, is_root, write_blocklists

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(not is_root(), reason="needs root for network namespaces and nftables"),
              pytest.mark.skipif(not (have("nft") and have("ip")), reason="needs nftables and iproute2")]

SERVER = r"""
import socket, sys, threading
socks = []
for addr in sys.argv[1].split(","):
    for port in map(int, sys.argv[2:]):
        s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((addr, port)); s.listen(16); socks.append(s)
def serve(s):
    while True:
        c, _ = s.accept()
        c.sendall(b"ok\n"); c.close()
for s in socks:
    threading.Thread(target=serve, args=(s,), daemon=True).start()
print("ready", flush=True)
sys.stdin.read()
"""

CLIENT = r"""
import socket, sys
src, dst, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = socket.socket(socket.AF_INET6 if ":" in dst else socket.AF_INET); s.settimeout(1.5); s.bind((src, 0))
try:
    s.connect((dst, port)); data = s.recv(16)
except OSError as e:
    print(type(e).__name__); sys.exit(1)
print(data.decode().strip()); sys.exit(0 if data == b"ok\n" else 1)
"""

PROBE = ("probe.test", "192.0.2.77")    # the one name the DNS servers know


@dataclass(frozen=True)
class Plan:
    """One address family's addresses in the namespaces. Every link is a /`lan`; the internet
    host's addresses are host routes on its link."""
    v: int                              # 4 or 6
    lan: int
    gw_desk: str                        # the gateway on the desktops' link
    desktop: str
    exempt: str                         # a second desktop address, exempted from chat
    gw_mob: str
    mobile: str
    gw_inet: str                        # the gateway on the internet link
    inet: str                           # the internet host on that link
    clients: str                        # allowed_clients; the internet host's route back to them
    desktops: str                       # the desktop group's subnet
    mobiles: str
    outside: tuple[str, ...]            # the gateway's routes to the internet host
    chat: str                           # the blocked service's range
    blocked: str                        # an address in it
    doh: str
    web: str
    other: str
    sanctioned: str
    outside_dns: str

    @property
    def ip(self) -> str:
        """How nft matches this family's addresses."""
        return "ip" if self.v == 4 else "ip6"

    @property
    def host(self) -> int:
        return 32 if self.v == 4 else 128

    @property
    def servers(self) -> tuple[str, ...]:
        """The internet host's addresses."""
        return (self.blocked, self.doh, self.web, self.other, self.sanctioned, self.outside_dns)


V4 = Plan(4, 24, gw_desk="10.1.0.1", desktop="10.1.0.10", exempt="10.1.0.20", gw_mob="10.2.0.1",
          mobile="10.2.0.10", gw_inet="192.0.2.1", inet="192.0.2.2", clients="10.0.0.0/8",
          desktops="10.1.0.0/16", mobiles="10.2.0.0/16", outside=("198.51.100.0/24", "203.0.113.0/24"),
          chat="198.51.100.0/24", blocked="198.51.100.10", doh="203.0.113.53", web="203.0.113.80",
          other="203.0.113.81", sanctioned="203.0.113.10", outside_dns="203.0.113.99")
V6 = Plan(6, 64, gw_desk="2001:db8:1::1", desktop="2001:db8:1::10", exempt="2001:db8:1::20", gw_mob="2001:db8:2::1",
          mobile="2001:db8:2::10", gw_inet="2001:db8:ff:1::1", inet="2001:db8:ff:1::2", clients="2001:db8::/44",
          desktops="2001:db8:1::/48", mobiles="2001:db8:2::/48", outside=("2001:db8:ff::/48",),
          chat="2001:db8:ff:100::/64", blocked="2001:db8:ff:100::10", doh="2001:db8:ff::53", web="2001:db8:ff::80",
          other="2001:db8:ff::81", sanctioned="2001:db8:ff::10", outside_dns="2001:db8:ff::99")
PLANS = (V4, V6) if have_ipv6_loopback() else (V4,)
FAMILIES = [pytest.param(V4, id="ipv4"),
            pytest.param(V6, id="ipv6", marks=pytest.mark.skipif(V6 not in PLANS, reason="no IPv6 here"))]


def sh(*argv, check=True):
    return subprocess.run(argv, check=check, capture_output=True, text=True, timeout=30, cwd=ROOT)


class Net:
    def __init__(self):
        tag = uuid.uuid4().hex[:6]
        self.ns = {k: f"sk{k}{os.getpid() % 10000}{tag}" for k in ("desk", "mob", "gw", "inet")}
        self.procs = []

    def ex(self, name, *argv, check=True):
        return sh("ip", "netns", "exec", self.ns[name], *argv, check=check)

    def link(self, a, b, n):
        va, vb = f"v{n}a", f"v{n}b"
        sh("ip", "link", "add", va, "netns", self.ns[a], "type", "veth", "peer", "name", vb, "netns", self.ns[b])
        self.ex(a, "ip", "link", "set", va, "up")
        self.ex(b, "ip", "link", "set", vb, "up")
        return va, vb

    def __enter__(self):
        try:
            for name, ns in self.ns.items():
                sh("ip", "netns", "add", ns)
                self.ex(name, "ip", "link", "set", "lo", "up")
                if V6 in PLANS:         # no duplicate address detection: addresses work when added
                    self.ex(name, "sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0",
                            "net.ipv6.conf.default.accept_dad=0")
            links = {peer: self.link("gw", peer, n) for n, peer in enumerate(("desk", "mob", "inet"), 1)}
            for p in PLANS:
                for peer, gw, hosts in (("desk", p.gw_desk, (p.desktop, p.exempt)), ("mob", p.gw_mob, (p.mobile,)),
                                        ("inet", p.gw_inet, (p.inet,))):
                    gw_if, peer_if = links[peer]
                    self.ex("gw", "ip", "addr", "add", f"{gw}/{p.lan}", "dev", gw_if)
                    for host in hosts:
                        self.ex(peer, "ip", "addr", "add", f"{host}/{p.lan}", "dev", peer_if)
                    if peer != "inet":
                        self.ex(peer, "ip", f"-{p.v}", "route", "add", "default", "via", gw)
                for addr in p.servers:
                    self.ex("inet", "ip", "addr", "add", f"{addr}/{p.host}", "dev", links["inet"][1])
                self.ex("inet", "ip", f"-{p.v}", "route", "add", p.clients, "via", p.gw_inet)
                for net in p.outside:
                    self.ex("gw", "ip", f"-{p.v}", "route", "add", net, "via", p.inet)
            self.ex("gw", "sysctl", "-qw", "net.ipv4.ip_forward=1",
                    *(["net.ipv6.conf.all.forwarding=1"] if V6 in PLANS else []))
            server = subprocess.Popen(["ip", "netns", "exec", self.ns["inet"], sys.executable, "-c", SERVER,
                                       ",".join(a for p in PLANS for a in (p.blocked, p.doh, p.web, p.other)),
                                       "80", "443", "853"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            self.procs.append(server)
            assert server.stdout.readline().strip() == "ready"
            for port, addrs in ((53, [a for p in PLANS for a in (p.sanctioned, p.outside_dns)]),
                                (853, [p.outside_dns for p in PLANS])):
                self.procs.append(subprocess.Popen(
                    ["ip", "netns", "exec", self.ns["inet"], "dnsmasq", "--keep-in-foreground", "--no-resolv",
                     "--no-hosts", f"--port={port}", f"--listen-address={','.join(addrs)}", "--bind-interfaces",
                     "--pid-file=", "--user=root", f"--host-record={PROBE[0]},{PROBE[1]}"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
                for addr in addrs:
                    for _ in range(50):         # bounded: until dnsmasq answers in its namespace
                        if self.dig("inet", None, addr, port=port, tries=1) == PROBE[1]:
                            break
                    else:
                        raise RuntimeError(f"dnsmasq on {addr} port {port} did not start")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        for proc in self.procs:
            proc.kill()
            proc.wait()
        for ns in self.ns.values():
            sh("ip", "netns", "del", ns, check=False)

    def connects(self, ns, src, dst, port) -> bool:
        return self.ex(ns, sys.executable, "-c", CLIENT, src, dst, str(port), check=False).returncode == 0

    def dig(self, ns, src, server, port=53, tcp=False, tries=1) -> str | None:
        """dig for PROBE from `src` in namespace `ns`: the address answered, or None (no answer)."""
        argv = ["dig", f"@{server}", "-p", str(port), PROBE[0], "A", "+short", "+time=1", f"+tries={tries}",
                "+tcp" if tcp else "+notcp"] + (["-b", src] if src else [])
        out = self.ex(ns, *argv, check=False)
        return out.stdout.strip() or None if out.returncode == 0 else None

    def listing(self, *what) -> str:
        return self.ex("gw", "nft", "list", *what).stdout

    @property
    def nft(self):
        return ("ip", "netns", "exec", self.ns["gw"], "nft")


SERVICES = {
    "chat": {"description": "a chat app", "sources": {"t": "test"},
             "domains": [{"name": "chat.test", "source": "t"}],
             "ip_ranges": [{"cidr": p.chat, "source": "t"} for p in (V4, V6)]},
    "encrypted-dns": {"description": "DoH", "sources": {"t": "test"},
                      "domains": [{"name": "doh.test", "source": "t"}],
                      "ip_ranges": [{"cidr": f"{p.doh}/{p.host}", "source": "t", "tags": ["doh"]}
                                    for p in (V4, V6)]},
}


def policy(expires: datetime) -> dict:
    """One dual-stack policy for every test: each group and exemption has addresses in both families."""
    return {
        "groups": {"desktop": {"subnets": [V4.desktops, V6.desktops], "block": ["chat", "encrypted-dns"]},
                   "mobile": {"subnets": [V4.mobiles, V6.mobiles], "block": []}},
        "default_group": "mobile",
        "allowed_clients": [V4.clients, V6.clients],
        "exemptions": [{"id": "EX-1", "clients": [V4.exempt, V6.exempt], "services": ["chat"],
                        "approved_by": "the head", "reason": "test", "expires": expires.isoformat()}],
    }


@pytest.mark.parametrize("p", FAMILIES)
def test_gateway_drops_what_dns_cannot(tmp_path, p):
    expires = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(seconds=12)
    blocklists = write_blocklists(tmp_path / "bl", policy(expires), SERVICES)
    with Net() as net:
        assert net.connects("desk", p.desktop, p.blocked, 443), "before the ruleset everything connects"
        assert net.dig("desk", p.desktop, p.outside_dns) == PROBE[1], "before the ruleset any DNS server answers"
        applied = net.ex("gw", sys.executable, "-m", "resolver", "export", "nftables", "--blocklists",
                         str(blocklists), "--sanctioned", V4.sanctioned, "--sanctioned", V6.sanctioned,
                         "--apply", "--once", check=False)
        assert applied.returncode == 0, applied.stderr
        assert f"{p.exempt} . {p.chat} timeout" in net.listing("table", "inet", "sinkhole")

        # a desktop: the blocked range, the DoH resolver and DoT fail; ordinary traffic works
        assert not net.connects("desk", p.desktop, p.blocked, 443)
        assert not net.connects("desk", p.desktop, p.doh, 443)
        assert not net.connects("desk", p.desktop, p.web, 853)
        assert net.connects("desk", p.desktop, p.web, 80)
        assert net.connects("desk", p.desktop, p.web, 443)
        # a mobile client: all of it works
        for dst, port in ((p.blocked, 443), (p.doh, 443), (p.web, 853), (p.web, 80)):
            assert net.connects("mob", p.mobile, dst, port), (dst, port)
        # the exempted desktop reaches the exempted service only, until the exemption expires
        assert net.connects("desk", p.exempt, p.blocked, 443)
        assert not net.connects("desk", p.exempt, p.doh, 443)
        assert time.time() < expires.timestamp()
        deadline = expires.timestamp() + 10
        while time.time() < deadline and net.connects("desk", p.exempt, p.blocked, 443):
            pass
        assert not net.connects("desk", p.exempt, p.blocked, 443)
        assert time.time() >= expires.timestamp() - 1, "the exemption ended before its expiry"

        # DNS: a desktop reaches the sanctioned resolver only, on UDP and TCP; no DNS over QUIC's port
        for tcp in (False, True):
            assert net.dig("desk", p.desktop, p.sanctioned, tcp=tcp) == PROBE[1], tcp
            assert net.dig("desk", p.desktop, p.outside_dns, tcp=tcp) is None, tcp
            assert net.dig("desk", p.exempt, p.outside_dns, tcp=tcp) is None, "a chat exemption is not a DNS one"
            assert net.dig("mob", p.mobile, p.outside_dns, tcp=tcp) == PROBE[1], tcp
        assert net.dig("desk", p.desktop, p.outside_dns, port=853) is None
        assert net.dig("mob", p.mobile, p.outside_dns, port=853) == PROBE[1]

        counters = net.listing("chain", "inet", "sinkhole", "forward")
        for comment in ('"desktop: chat"', '"desktop: DNS to unsanctioned resolvers"', '"desktop: DNS over TLS/QUIC"'):
            hits = [l for l in counters.splitlines() if comment in l and f"{p.ip} saddr" in l]
            assert hits and "packets 0 " not in hits[0], (comment, counters)


@pytest.mark.parametrize("p", FAMILIES)
def test_enforce_add_drops_the_rest_of_a_flow(tmp_path, p):
    from resolver.export import nftables
    from resolver.loader import load_policy
    blocklists = write_blocklists(tmp_path / "bl", policy(datetime.now(timezone.utc) + timedelta(days=1)), SERVICES)
    with Net() as net:
        nftables.apply(nftables.ruleset(load_policy(blocklists, time.time()), time.time()), net.nft)
        assert net.connects("desk", p.desktop, p.web, 80)
        nftables.enforce_add(p.desktop, p.web, 30, nft=net.nft)
        bypass = net.listing("set", "inet", "sinkhole", f"bypass_v{p.v}")
        assert f"{p.desktop} . {p.web} timeout 30s" in bypass
        assert not net.connects("desk", p.desktop, p.web, 80)
        assert net.connects("desk", p.exempt, p.web, 80), "only that (client, destination) pair"
        assert net.connects("desk", p.desktop, p.other, 80), "only that (client, destination) pair"
        assert net.connects("mob", p.mobile, p.web, 80)
        with pytest.raises(ValueError):
            nftables.enforce_add(p.desktop, (V6 if p is V4 else V4).web, 30, nft=net.nft)


def wait_for_set(net, name, predicate, seconds, what):
    """Poll `nft list set` (bounded in count and time) until `predicate(listing)` holds."""
    deadline = time.monotonic() + seconds
    for _ in range(int(seconds * 20)):
        listing = net.ex("gw", "nft", "list", "set", "inet", "sinkhole", name, check=False).stdout
        if predicate(listing):
            return listing
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}; set {name}:\n{listing}")


def test_apply_follows_policy_changes_and_keeps_bypass_flows(tmp_path):
    """One --apply run, checked in each family the machine has (the slow part, waiting for EX-1 to
    start, is shared)."""
    from resolver.export import nftables
    starts = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(seconds=8)
    body = policy(starts + timedelta(days=1))
    body["exemptions"][0]["starts"] = starts.isoformat()       # EX-1 starts while --apply runs
    blocklists = write_blocklists(tmp_path / "bl", body, SERVICES)
    with Net() as net:
        proc = subprocess.Popen(["ip", "netns", "exec", net.ns["gw"], sys.executable, "-m", "resolver", "export",
                                 "nftables", "--blocklists", str(blocklists), "--apply", "--interval", "0.2"],
                                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        net.procs.append(proc)
        assert "applied table inet sinkhole" in proc.stderr.readline()
        assert time.time() < starts.timestamp(), "the test machine was too slow to see EX-1 pending"
        for p in PLANS:
            assert p.exempt not in net.listing("set", "inet", "sinkhole", f"exempt_v{p.v}"), p.v
            assert not net.connects("desk", p.exempt, p.blocked, 443)
            assert net.connects("desk", p.desktop, p.web, 80) and not net.connects("desk", p.desktop, p.doh, 443)
            nftables.enforce_add(p.desktop, p.other, 600, nft=net.nft)          # what the sidecar would do
            assert not net.connects("desk", p.desktop, p.other, 80)

        # a commit: chat gets another range, desktops stop blocking encrypted-dns
        services = {**SERVICES, "chat": {**SERVICES["chat"], "ip_ranges": SERVICES["chat"]["ip_ranges"]
                                         + [{"cidr": f"{p.web}/{p.host}", "source": "t"} for p in PLANS]}}
        body["groups"]["desktop"]["block"] = ["chat"]
        write_blocklists(tmp_path / "bl", body, services)
        wait_for_set(net, "svc_chat_v4", lambda text: V4.web in text, 20, "the new range in the kernel")
        table = net.listing("table", "inet", "sinkhole")
        for p in PLANS:
            assert p.web in net.listing("set", "inet", "sinkhole", f"svc_chat_v{p.v}"), "one transaction"
            assert not net.connects("desk", p.desktop, p.web, 80), "the new range is rejected"
            assert net.connects("mob", p.mobile, p.web, 80)
            assert f"svc_encrypted_dns_v{p.v}" not in table, "the set of a service no longer blocked is deleted"
            assert net.connects("desk", p.desktop, p.doh, 443)
            bypass = net.listing("set", "inet", "sinkhole", f"bypass_v{p.v}")
            assert f"{p.desktop} . {p.other}" in bypass, "the re-apply kept the sidecar's element"
            assert not net.connects("desk", p.desktop, p.other, 80) and net.connects("desk", p.exempt, p.other, 80)

        # EX-1 starts: no commit, the regeneration time alone re-applies
        wait_for_set(net, "exempt_v4", lambda text: V4.exempt in text, starts.timestamp() - time.time() + 15,
                     "EX-1 to come into force")
        assert time.time() >= starts.timestamp() - 1, "the exemption began before it starts"
        for p in PLANS:
            assert p.exempt in net.listing("set", "inet", "sinkhole", f"exempt_v{p.v}"), "one transaction"
            assert net.connects("desk", p.exempt, p.blocked, 443)
            assert not net.connects("desk", p.desktop, p.blocked, 443)
            assert f"{p.desktop} . {p.other}" in net.listing("set", "inet", "sinkhole", f"bypass_v{p.v}")
        assert proc.poll() is None, proc.stderr.read()
