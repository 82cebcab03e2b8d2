"""End to end: the sidecar on a gateway between a desktop, a mobile and a fake internet, all in
network namespaces, with real clients (kdig +https/+tls, curl --doh-url, dig, curl) and real
servers (dnsdist serving DoH and DoT with a certificate from a CA made here by openssl, dnsmasq,
openssl s_server, python http.server, and the sinkhole resolver itself).

    desktop 10.1.0.10 --+
                        +-- gateway 10.1.0.1 / 10.2.0.1 / 192.0.2.1 -- internet 192.0.2.2
    mobile  10.2.0.10 --+   (sinkhole serve + sidecar)                   192.0.2.53  dnsmasq ("public DNS")
                                                                         203.0.113.53 dnsdist DoH/DoT
                                                                         203.0.113.10 HTTPS site
                                                                         198.51.100.7 blocked service
"""
from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from helpers import ROOT, have, is_root, write_blocklists  # noqa: E402

pytestmark = pytest.mark.e2e
TOOLS = ("ip", "dnsdist", "kdig", "dig", "curl", "openssl", "dnsmasq")
if not is_root():
    pytest.skip("needs root for network namespaces", allow_module_level=True)
if [t for t in TOOLS if not have(t)]:
    pytest.skip(f"needs {', '.join(t for t in TOOLS if not have(t))} (tests/debian-packages.txt)",
                allow_module_level=True)

DESKTOP, MOBILE, GW_D, GW_M, GW_I, NET = "10.1.0.10", "10.2.0.10", "10.1.0.1", "10.2.0.1", "192.0.2.1", "192.0.2.2"
PUBLIC_DNS, DOH, WEB, CHAT = "192.0.2.53", "203.0.113.53", "203.0.113.10", "198.51.100.7"

SERVICES = {
    "chat": {"description": "a test chat service", "sources": {"t": "test"},
             "domains": [{"name": "chat.test", "source": "t"}],
             "ip_ranges": [{"cidr": "198.51.100.0/24", "source": "t"}]},
    "encrypted-dns": {"description": "the lab's DoH/DoT resolver", "sources": {"t": "test"},
                      "domains": [{"name": "doh.lab.test", "source": "t", "tags": ["doh"]}],
                      "ip_ranges": [{"cidr": f"{DOH}/32", "source": "t", "tags": ["doh", "dot"]}]},
}
POLICY = {
    "groups": {"desktop": {"subnets": ["10.1.0.0/16"], "block": ["chat", "encrypted-dns"], "response": "nxdomain"},
               "mobile": {"subnets": ["10.2.0.0/16"], "block": []}},
    "default_group": "desktop",
    "allowed_clients": ["10.0.0.0/8"],
}


def run(*cmd, timeout=30, check=True, **kw):
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} -> {out.returncode}\n{out.stdout}\n{out.stderr}")
    return out


class Lab:
    """Namespaces, veths, addresses and routes; everything named with a random suffix and removed."""

    def __init__(self):
        sfx = secrets.token_hex(3)
        self.ns = {k: f"sc{k}-{os.getpid()}-{sfx}" for k in ("gw", "desk", "mob", "net")}
        self.dev = {k: f"{k}{sfx}" for k in ("gd", "dg", "gm", "mg", "gi", "ig")}
        self.procs: list[subprocess.Popen] = []

    def x(self, ns, *cmd, **kw):
        return run("ip", "netns", "exec", self.ns[ns], *cmd, **kw)

    def popen(self, ns, *cmd, **kw):
        p = subprocess.Popen(["ip", "netns", "exec", self.ns[ns], *cmd], **kw)
        self.procs.append(p)
        return p

    def __enter__(self):
        try:
            for name in self.ns.values():
                run("ip", "netns", "add", name)
            for ns in self.ns:
                self.x(ns, "ip", "link", "set", "lo", "up")
            d = self.dev
            for a, b, ns_a, ns_b in (("gd", "dg", "gw", "desk"), ("gm", "mg", "gw", "mob"), ("gi", "ig", "gw", "net")):
                run("ip", "link", "add", d[a], "netns", self.ns[ns_a], "type", "veth", "peer", "name", d[b],
                    "netns", self.ns[ns_b])
                self.x(ns_a, "ip", "link", "set", d[a], "up")
                self.x(ns_b, "ip", "link", "set", d[b], "up")
            self.x("gw", "ip", "addr", "add", f"{GW_D}/24", "dev", d["gd"])
            self.x("gw", "ip", "addr", "add", f"{GW_M}/24", "dev", d["gm"])
            self.x("gw", "ip", "addr", "add", f"{GW_I}/24", "dev", d["gi"])
            self.x("gw", "sysctl", "-qw", "net.ipv4.ip_forward=1")
            for net in ("203.0.113.0/24", "198.51.100.0/24"):
                self.x("gw", "ip", "route", "add", net, "via", NET)
            self.x("desk", "ip", "addr", "add", f"{DESKTOP}/24", "dev", d["dg"])
            self.x("desk", "ip", "route", "add", "default", "via", GW_D)
            self.x("mob", "ip", "addr", "add", f"{MOBILE}/24", "dev", d["mg"])
            self.x("mob", "ip", "route", "add", "default", "via", GW_M)
            for addr in (f"{NET}/24", f"{PUBLIC_DNS}/24", f"{DOH}/24", f"{WEB}/24", f"{CHAT}/24"):
                self.x("net", "ip", "addr", "add", addr, "dev", d["ig"])
            self.x("net", "ip", "route", "add", "10.0.0.0/8", "via", GW_I)
            return self
        except BaseException:
            self.__exit__()
            raise

    def __exit__(self, *exc):
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        for name in self.ns.values():
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


def make_ca(d: Path) -> None:
    """A test CA and a server certificate for doh.lab.test, www.example.test and the DoH address."""
    run("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", str(d / "ca.key"), "-out", str(d / "ca.pem"), "-days", "2", "-subj", "/CN=sidecar test CA")
    run("openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", str(d / "server.key"), "-out", str(d / "server.csr"), "-subj", "/CN=doh.lab.test")
    (d / "ext.cnf").write_text(f"subjectAltName=DNS:doh.lab.test,DNS:www.example.test,IP:{DOH}\n"
                               "extendedKeyUsage=serverAuth\n")
    run("openssl", "x509", "-req", "-in", str(d / "server.csr"), "-CA", str(d / "ca.pem"), "-CAkey",
        str(d / "ca.key"), "-CAcreateserial", "-out", str(d / "server.pem"), "-days", "2",
        "-extfile", str(d / "ext.cnf"))


def wait_until(check, what: str, deadline: float = 20.0, tries: int = 200):
    end = time.monotonic() + deadline
    for _ in range(tries):
        result = check()
        if result:
            return result
        if time.monotonic() > end:
            break
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def wait_line(proc: subprocess.Popen, text: str, deadline: float = 30.0) -> list[str]:
    """Read a subprocess's stderr until a line containing `text` (bounded)."""
    lines = []
    end = time.monotonic() + deadline
    for _ in range(10000):
        line = proc.stderr.readline()
        if not line:
            raise AssertionError(f"exited before '{text}': {''.join(lines)}")
        lines.append(line)
        if text in line:
            return lines
        if time.monotonic() > end:
            break
    raise AssertionError(f"no '{text}' in: {''.join(lines)}")


@pytest.fixture
def lab(tmp_path):
    with Lab() as lab:
        make_ca(tmp_path)
        write_blocklists(tmp_path / "blocklists", POLICY, SERVICES)
        (tmp_path / "sinkhole.yaml").write_text(yaml.safe_dump({
            "listen": [f"{GW_D}:53", f"{GW_M}:53"], "upstreams": [PUBLIC_DNS], "blocklists": "blocklists",
            "reload_interval": 0}))
        # the internet: public DNS, a DoH/DoT resolver, an HTTPS site, the blocked service
        lab.popen("net", "dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts", "--bind-interfaces",
                  f"--listen-address={PUBLIC_DNS}", "--port=53", "--user=root", "--pid-file=",
                  f"--host-record=www.example.test,{WEB}", f"--host-record=doh.lab.test,{DOH}",
                  f"--host-record=web.chat.test,{CHAT}", stderr=subprocess.DEVNULL)
        (tmp_path / "dnsdist.conf").write_text(
            'setLocal("127.0.0.1:5300")\n'
            'setACL({"0.0.0.0/0", "::/0"})\n'
            f'newServer({{address="{PUBLIC_DNS}:53"}})\n'
            f'addDOHLocal("{DOH}:443", "{tmp_path}/server.pem", "{tmp_path}/server.key", "/dns-query")\n'
            f'addTLSLocal("{DOH}:853", "{tmp_path}/server.pem", "{tmp_path}/server.key")\n'
            'setSecurityPollSuffix("")\n')
        lab.popen("net", "dnsdist", "--supervised", "--disable-syslog", "-C", str(tmp_path / "dnsdist.conf"),
                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        lab.popen("net", "openssl", "s_server", "-quiet", "-accept", f"{WEB}:443", "-cert",
                  str(tmp_path / "server.pem"), "-key", str(tmp_path / "server.key"), "-www",
                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        lab.popen("net", sys.executable, "-m", "http.server", "--bind", CHAT, "80", cwd=str(tmp_path),
                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # the gateway: the resolver, then the sidecar
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        lab.popen("gw", sys.executable, "-m", "resolver", "serve", "-c", str(tmp_path / "sinkhole.yaml"),
                  cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: lab.x("desk", "dig", f"@{GW_D}", "+time=1", "+tries=1", "www.example.test",
                                 check=False).returncode == 0, "the resolver")
        wait_until(lambda: lab.x("net", "kdig", f"@{DOH}", "+tls", "+time=1", "www.example.test",
                                 check=False).returncode == 0, "dnsdist DoT")
        sidecar = lab.popen("gw", sys.executable, "-m", "resolver", "sidecar", "-c", str(tmp_path / "sinkhole.yaml"),
                            "--iface", f"{lab.dev['gd']},{lab.dev['gm']}", "--learning", "0",
                            "--alerts", str(tmp_path / "alerts.jsonl"), cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wait_line(sidecar, "capturing on")
        lab.tmp, lab.sidecar = tmp_path, sidecar
        yield lab


def alerts(lab) -> list[dict]:
    path = lab.tmp / "alerts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_sidecar_alerts_on_desktop_bypass_and_not_on_mobile_or_normal_browsing(lab):
    ca = str(lab.tmp / "ca.pem")
    kdig_https = ("kdig", f"@{DOH}", "+https", f"+tls-ca={ca}", "+tls-hostname=doh.lab.test",
                  "+tls-sni=doh.lab.test", "+time=3", "www.example.test")
    kdig_tls = ("kdig", f"@{DOH}", "+tls", f"+tls-ca={ca}", "+tls-hostname=doh.lab.test", "+time=3",
                "www.example.test")
    curl_doh = ("curl", "-sS", "--max-time", "5", "--cacert", ca, "--doh-url", f"https://{DOH}/dns-query",
                "-o", "/dev/null", "https://www.example.test/")
    dig_external = ("dig", f"@{PUBLIC_DNS}", "+time=2", "+tries=1", "www.example.test")
    curl_blocked = ("curl", "-sS", "--max-time", "5", "-o", "/dev/null", f"http://{CHAT}/")

    # normal browsing first, through the resolver: lookup, then HTTPS to the answer
    for ns, client in (("desk", DESKTOP), ("mob", MOBILE)):
        answer = lab.x(ns, "dig", "+short", f"@{GW_D if ns == 'desk' else GW_M}", "www.example.test").stdout.split()
        assert answer == [WEB]
        lab.x(ns, "curl", "-sS", "--max-time", "5", "--cacert", ca, "--resolve", f"www.example.test:443:{WEB}",
              "-o", "/dev/null", "https://www.example.test/")
    # the mobile does every bypass: counted, never alerted
    for cmd in (kdig_https, kdig_tls, curl_doh, dig_external, curl_blocked):
        lab.x("mob", *cmd)
    # the desktop does them too
    for cmd in (kdig_https, kdig_tls, curl_doh, dig_external, curl_blocked):
        lab.x("desk", *cmd)

    want = {("doh-sni", DOH, 443), ("dot", DOH, 853), ("doh-ip", DOH, 443), ("external-dns", PUBLIC_DNS, 53),
            ("blocked-ip", CHAT, 80)}
    got = wait_until(lambda: (lambda rows: rows if want <= {(r["detector"], r["destination"], r["port"])
                                                           for r in rows} else None)(alerts(lab)),
                     "the desktop's alerts", deadline=30)
    lab.sidecar.send_signal(signal.SIGTERM)
    summary = lab.sidecar.communicate(timeout=20)[1]
    got = alerts(lab)
    assert {r["client"] for r in got} == {DESKTOP}, got
    assert {(r["detector"], r["destination"], r["port"]) for r in got} == want and len(got) == len(want), got
    assert all(r["group"] == "desktop" for r in got)
    by = {r["detector"]: r for r in got}
    assert by["doh-sni"]["sni"] == "doh.lab.test" and by["doh-ip"]["sni"] is None
    assert by["external-dns"]["name"] == "www.example.test" and by["blocked-ip"]["service"] == "chat"
    # the mobile's bypasses were seen and counted (the summary's "counted" column)
    counted = {line.split()[0]: int(line.split()[3]) for line in summary.splitlines()
               if line.split() and line.split()[0] in ("dot", "doh-sni", "doh-ip", "external-dns", "blocked-ip")}
    assert all(counted[d] >= 1 for d in counted) and len(counted) == 5, summary
