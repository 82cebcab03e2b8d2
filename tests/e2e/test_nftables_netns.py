"""The exported ruleset in a real nftables on a gateway namespace, with real TCP connections.

Namespaces: a desktop (10.1.0.10, and 10.1.0.20 with an exemption), a mobile client (10.2.0.10),
the gateway (forwarding; the ruleset on its forward hook) and an "internet" host that owns
198.51.100.10 (a blocked service's range), 203.0.113.53 (a DoH resolver) and 203.0.113.80 (an
ordinary web server), listening on TCP 443, 853 and 80.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone

import pytest

from helpers import ROOT, have, is_root, write_blocklists

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(not is_root(), reason="needs root for network namespaces and nftables"),
              pytest.mark.skipif(not (have("nft") and have("ip")), reason="needs nftables and iproute2")]

SERVER = r"""
import socket, sys, threading
socks = []
for port in map(int, sys.argv[1:]):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port)); s.listen(16); socks.append(s)
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
s = socket.socket(); s.settimeout(1.5); s.bind((src, 0))
try:
    s.connect((dst, port)); data = s.recv(16)
except OSError as e:
    print(type(e).__name__); sys.exit(1)
print(data.decode().strip()); sys.exit(0 if data == b"ok\n" else 1)
"""

BLOCKED, DOH, WEB = "198.51.100.10", "203.0.113.53", "203.0.113.80"
DESKTOP, EXEMPT, MOBILE = "10.1.0.10", "10.1.0.20", "10.2.0.10"


def sh(*argv, check=True):
    return subprocess.run(argv, check=check, capture_output=True, text=True, timeout=30, cwd=ROOT)


class Net:
    def __init__(self):
        tag = uuid.uuid4().hex[:6]
        self.ns = {k: f"sk{k}{os.getpid() % 10000}{tag}" for k in ("desk", "mob", "gw", "inet")}
        self.procs = []

    def ex(self, name, *argv, check=True):
        return sh("ip", "netns", "exec", self.ns[name], *argv, check=check)

    def link(self, a, b, a_addr, b_addr, n):
        va, vb = f"v{n}a", f"v{n}b"
        sh("ip", "link", "add", va, "netns", self.ns[a], "type", "veth", "peer", "name", vb, "netns", self.ns[b])
        self.ex(a, "ip", "addr", "add", a_addr, "dev", va)
        self.ex(b, "ip", "addr", "add", b_addr, "dev", vb)
        self.ex(a, "ip", "link", "set", va, "up")
        self.ex(b, "ip", "link", "set", vb, "up")
        return va, vb

    def __enter__(self):
        for ns in self.ns.values():
            sh("ip", "netns", "add", ns)
            sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        try:
            self.link("gw", "desk", "10.1.0.1/24", f"{DESKTOP}/24", 1)
            self.ex("desk", "ip", "addr", "add", f"{EXEMPT}/24", "dev", "v1b")
            self.ex("desk", "ip", "route", "add", "default", "via", "10.1.0.1")
            self.link("gw", "mob", "10.2.0.1/24", f"{MOBILE}/24", 2)
            self.ex("mob", "ip", "route", "add", "default", "via", "10.2.0.1")
            _, inet_if = self.link("gw", "inet", "192.0.2.1/24", "192.0.2.2/24", 3)
            for addr in (BLOCKED, DOH, WEB):
                self.ex("inet", "ip", "addr", "add", f"{addr}/32", "dev", inet_if)
            self.ex("inet", "ip", "route", "add", "10.0.0.0/8", "via", "192.0.2.1")
            for net in ("198.51.100.0/24", "203.0.113.0/24"):
                self.ex("gw", "ip", "route", "add", net, "via", "192.0.2.2")
            self.ex("gw", "sysctl", "-qw", "net.ipv4.ip_forward=1")
            server = subprocess.Popen(["ip", "netns", "exec", self.ns["inet"], sys.executable, "-c", SERVER,
                                       "80", "443", "853"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            self.procs.append(server)
            assert server.stdout.readline().strip() == "ready"
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

    @property
    def nft(self):
        return ("ip", "netns", "exec", self.ns["gw"], "nft")


SERVICES = {
    "chat": {"description": "a chat app", "sources": {"t": "test"},
             "domains": [{"name": "chat.test", "source": "t"}],
             "ip_ranges": [{"cidr": "198.51.100.0/24", "source": "t"}]},
    "encrypted-dns": {"description": "DoH", "sources": {"t": "test"},
                      "domains": [{"name": "doh.test", "source": "t"}],
                      "ip_ranges": [{"cidr": f"{DOH}/32", "source": "t", "tags": ["doh"]}]},
}


def policy(expires: datetime) -> dict:
    return {
        "groups": {"desktop": {"subnets": ["10.1.0.0/16"], "block": ["chat", "encrypted-dns"]},
                   "mobile": {"subnets": ["10.2.0.0/16"], "block": []}},
        "default_group": "mobile",
        "allowed_clients": ["10.0.0.0/8"],
        "exemptions": [{"id": "EX-1", "clients": [EXEMPT], "services": ["chat"], "approved_by": "the head",
                        "reason": "test", "expires": expires.isoformat()}],
    }


def test_gateway_drops_what_dns_cannot(tmp_path):
    expires = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(seconds=12)
    blocklists = write_blocklists(tmp_path / "bl", policy(expires), SERVICES)
    with Net() as net:
        assert net.connects("desk", DESKTOP, BLOCKED, 443), "before the ruleset everything connects"
        applied = net.ex("gw", sys.executable, "-m", "resolver", "export", "nftables", "--blocklists",
                         str(blocklists), "--apply", "--once", check=False)
        assert applied.returncode == 0, applied.stderr
        listing = net.ex("gw", "nft", "list", "table", "inet", "sinkhole").stdout
        assert f"{EXEMPT} . 198.51.100.0/24 timeout" in listing

        # a desktop: the blocked range, the DoH resolver and DoT fail; ordinary traffic works
        assert not net.connects("desk", DESKTOP, BLOCKED, 443)
        assert not net.connects("desk", DESKTOP, DOH, 443)
        assert not net.connects("desk", DESKTOP, WEB, 853)
        assert net.connects("desk", DESKTOP, WEB, 80)
        # a mobile client: all of it works
        for dst, port in ((BLOCKED, 443), (DOH, 443), (WEB, 853), (WEB, 80)):
            assert net.connects("mob", MOBILE, dst, port), (dst, port)
        # the exempted desktop reaches the exempted service only, until the exemption expires
        assert net.connects("desk", EXEMPT, BLOCKED, 443)
        assert not net.connects("desk", EXEMPT, DOH, 443)
        assert time.time() < expires.timestamp()
        deadline = expires.timestamp() + 10
        while time.time() < deadline and net.connects("desk", EXEMPT, BLOCKED, 443):
            pass
        assert not net.connects("desk", EXEMPT, BLOCKED, 443)
        assert time.time() >= expires.timestamp() - 1, "the exemption ended before its expiry"

        counters = net.ex("gw", "nft", "list", "chain", "inet", "sinkhole", "forward").stdout
        rejected = [l for l in counters.splitlines() if '"desktop: chat"' in l and "ip saddr" in l]
        assert rejected and "packets 0 " not in rejected[0], counters


def test_enforce_add_drops_the_rest_of_a_flow(tmp_path):
    from resolver.export import nftables
    from resolver.loader import load_policy
    blocklists = write_blocklists(tmp_path / "bl", policy(datetime.now(timezone.utc) + timedelta(days=1)), SERVICES)
    with Net() as net:
        nftables.apply(nftables.ruleset(load_policy(blocklists, time.time()), time.time()), net.nft)
        assert net.connects("desk", DESKTOP, WEB, 80)
        nftables.enforce_add(DESKTOP, WEB, 30, nft=net.nft)
        assert "timeout 30s" in net.ex("gw", "nft", "list", "set", "inet", "sinkhole", "bypass_v4").stdout
        assert not net.connects("desk", DESKTOP, WEB, 80)
        assert net.connects("desk", EXEMPT, WEB, 80), "only that (client, destination) pair"
        assert net.connects("mob", MOBILE, WEB, 80)
        with pytest.raises(ValueError):
            nftables.enforce_add(DESKTOP, "2001:db8::1", 30, nft=net.nft)
