"""Frames for the sidecar tests, built with scapy (an implementation independent of the sidecar's
own parsers): Ethernet/IP/TCP/UDP, DNS, TLS ClientHellos; a policy with desktop and mobile groups.
Addresses: desktops 10.1.0.0/16 and fd00:1::/48, mobiles 10.2.0.0/16, the sanctioned resolver
10.0.0.53 / fd00::53, "the internet" on documentation addresses. Also the pieces a test needs to run
a real `sinkhole sidecar --pcap` on them: a config, pcap bytes, a FIFO's write end."""
from __future__ import annotations

import io
import os
import struct
import time
from pathlib import Path

import yaml

from scapy.layers.dns import DNS, DNSQR, DNSRR
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.layers.tls.extensions import ServerName, TLS_Ext_ALPN, TLS_Ext_ServerName, ProtocolName
from scapy.layers.tls.handshake import TLSClientHello
from scapy.layers.tls.record import TLS

from helpers import write_blocklists

DESKTOP, DESKTOP6, MOBILE, EXEMPT = "10.1.0.10", "fd00:1::10", "10.2.0.10", "10.1.0.99"
RESOLVER, RESOLVER6 = "10.0.0.53", "fd00::53"
DOH_IP, HTTPDNS_IP, CHAT_IP, WEB_IP = "203.0.113.53", "203.0.113.80", "198.51.100.7", "192.0.2.10"
DOH_IP6, WEB_IP6 = "2001:db8::53", "2001:db8::10"
SANCTIONED = (RESOLVER, RESOLVER6)

SERVICES = {
    "chat": {"description": "a test chat service", "sources": {"t": "test"},
             "domains": [{"name": "chat.test", "source": "t"}],
             "ip_ranges": [{"cidr": "198.51.100.0/25", "source": "t"}]},
    "encrypted-dns": {"description": "test resolvers", "sources": {"t": "test"},
                      "domains": [{"name": "doh.test", "source": "t", "tags": ["doh"]}],
                      "ip_ranges": [{"cidr": "203.0.113.53/32", "source": "t", "tags": ["doh", "dot"]},
                                    {"cidr": "2001:db8::53/128", "source": "t", "tags": ["doh", "dot"]},
                                    {"cidr": "203.0.113.80/32", "source": "t", "tags": ["httpdns"]}]},
}
POLICY = {
    "groups": {
        "desktop": {"subnets": ["10.1.0.0/16", "fd00:1::/48"], "block": ["chat", "encrypted-dns"],
                    "response": "nxdomain"},
        "mobile": {"subnets": ["10.2.0.0/16"], "block": []},
    },
    "default_group": "desktop",
    "allowed_clients": ["10.0.0.0/8", "fd00::/8"],
    "exemptions": [{"id": "EX-1", "clients": [EXEMPT], "services": ["chat"], "approved_by": "Head",
                    "reason": "test", "expires": "2099-01-01T00:00:00+00:00"}],
}


def write_policy(directory: Path) -> Path:
    return write_blocklists(directory, POLICY, SERVICES)


def _ip(src, dst):
    return IPv6(src=src, dst=dst) if ":" in src else IP(src=src, dst=dst)


def frame(layer) -> bytes:
    return bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / layer)


def syn(src, dst, dport, sport=40000, seq=1000) -> bytes:
    return frame(_ip(src, dst) / TCP(sport=sport, dport=dport, flags="S", seq=seq))


def tcp_data(src, dst, dport, payload, sport=40000, seq=1001) -> bytes:
    return frame(_ip(src, dst) / TCP(sport=sport, dport=dport, flags="PA", seq=seq, ack=1) / payload)


def udp(src, dst, dport, payload, sport=50000) -> bytes:
    return frame(_ip(src, dst) / UDP(sport=sport, dport=dport) / payload)


def dns_query(name: str, qid: int = 7) -> bytes:
    return bytes(DNS(id=qid, rd=1, qd=DNSQR(qname=name, qtype="A")))


def dns_answer(name: str, addresses, ttl: int = 60, qid: int = 7) -> bytes:
    answers = [DNSRR(rrname=name, type="AAAA" if ":" in a else "A", ttl=ttl, rdata=a) for a in addresses]
    return bytes(DNS(id=qid, qr=1, rd=1, ra=1, qd=DNSQR(qname=name), an=answers))


def hello_message(sni: str | None, alpn=("h2", "http/1.1"), pad: int = 0) -> bytes:
    """A ClientHello handshake message (no record layer); `pad` adds a padding extension so the
    message spans several segments like a post-quantum browser hello."""
    ext = []
    if sni is not None:
        ext.append(TLS_Ext_ServerName(servernames=[ServerName(servername=sni.encode())]))
    if alpn:
        ext.append(TLS_Ext_ALPN(protocols=[ProtocolName(protocol=a.encode()) for a in alpn]))
    body = bytes(TLSClientHello(ciphers=[0x1301, 0x1302], ext=ext))
    if pad:
        # rewrite the extensions length to add a padding extension (type 21) of `pad` bytes
        ext_len_at = len(body) - sum(len(bytes(e)) for e in ext) - 2
        exts = body[ext_len_at + 2:] + (21).to_bytes(2, "big") + pad.to_bytes(2, "big") + bytes(pad)
        body = body[:ext_len_at] + len(exts).to_bytes(2, "big") + exts
        body = body[:1] + (len(body) - 4).to_bytes(3, "big") + body[4:]
    return body


def client_hello_record(sni: str | None, alpn=("h2", "http/1.1"), pad: int = 0) -> bytes:
    msg = hello_message(sni, alpn, pad)
    return b"\x16\x03\x01" + len(msg).to_bytes(2, "big") + msg


def tls_record_via_scapy(sni: str) -> bytes:
    """The same through scapy's TLS record layer, to check our reader against another writer."""
    return bytes(TLS(msg=[TLSClientHello(ext=[TLS_Ext_ServerName(servernames=[ServerName(servername=sni.encode())])])]))


def engine(tmp_path: Path, learning: float = 0.0, started: float = 1000.0, metrics=None):
    from exporters.alerts import Alerts
    from exporters.detectors import Settings
    from exporters.sidecar import Engine
    from resolver.loader import load_policy
    policy = load_policy(write_policy(tmp_path / "blocklists"), started)
    out = io.StringIO()
    eng = Engine(policy, SANCTIONED, Alerts(out, 600.0), metrics, Settings(learning=learning), started=started)
    eng.out = out
    return eng


def sidecar_config(tmp_path: Path) -> Path:
    """sinkhole.yaml for `sinkhole sidecar`, with POLICY as its blocklists."""
    write_policy(tmp_path / "blocklists")
    path = tmp_path / "sinkhole.yaml"
    path.write_text(yaml.safe_dump({"listen": [f"{RESOLVER}:53"], "upstreams": ["192.0.2.1"],
                                    "blocklists": "blocklists", "reload_interval": 0}))
    return path


PCAP_HEADER = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)     # Ethernet, microseconds


def pcap_records(frames: list[bytes], first: int = 1000) -> bytes:
    return b"".join(struct.pack("<IIII", first + i, 0, len(f), len(f)) + f for i, f in enumerate(frames))


def pcap_bytes(frames: list[bytes]) -> bytes:
    return PCAP_HEADER + pcap_records(frames)


def open_writer(fifo: Path, deadline: float = 30.0):
    """The FIFO's write end, once the sidecar has opened the read end (bounded, never blocks)."""
    end = time.monotonic() + deadline
    for _ in range(1000):
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:                                   # ENXIO: no reader yet
            if time.monotonic() > end:
                break
            time.sleep(0.05)
            continue
        os.set_blocking(fd, True)
        return os.fdopen(fd, "wb")
    raise AssertionError(f"the sidecar never opened {fifo}")
