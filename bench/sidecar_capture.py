"""A realistic mixed capture for benchmarking `sinkhole sidecar --pcap` (and tshark beside it).

Built with struct, deterministic (seeded), streamed to disk. Most packets are what a gateway
mostly sees: mid-flow TCP data and ACKs of established HTTPS flows and QUIC short-header packets;
each web session starts with a lookup at the resolver (DNS query + answer), a SYN handshake and a
TLS ClientHello (some split over two segments like post-quantum browser hellos) or a QUIC Initial
(a real RFC 9001 Initial); ordinary UDP (NTP, media) is mixed in; a small share of sessions are
bypass attempts (external DNS, DoT, DoH by name, blocked services by name and address, no lookup).

    python bench/sidecar_capture.py OUT_DIR [--packets 1000000] [--format pcap|pcapng]

writes OUT_DIR/capture.pcap(ng) and OUT_DIR/sinkhole.yaml (resolver 10.0.0.53, the repository's
blocklists), so `sinkhole sidecar -c OUT_DIR/sinkhole.yaml --pcap OUT_DIR/capture.pcap --learning 0`
runs on it.
"""
from __future__ import annotations

import argparse
import ipaddress
import random
import struct
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from exporters.quic import protect_initial, varint  # noqa: E402

RESOLVER = "10.0.0.53"
ETH = b"\x02\x00\x00\x00\x00\x02\x02\x00\x00\x00\x00\x01"
ORDINARY = ["www.example.com", "intranet.example.org", "cdn.example.net", "mail.example.com",
            "news.example.org", "api.example.net", "static.example.com", "maps.example.org"]
# (share of sessions, kind, client group, destination, name, port)
BYPASS = [
    (0.004, "external-dns", "desktop", "8.8.8.8", "www.example.com", 53),
    (0.002, "dot", "desktop", "1.1.1.1", "one.one.one.one", 853),
    (0.004, "doh-sni", "desktop", None, "dns.google", 443),
    (0.004, "blocked-sni", "desktop", None, "web.whatsapp.com", 443),
    (0.003, "blocked-ip", "desktop", "31.13.65.49", "", 5222),
    (0.006, "no-lookup", "desktop", None, "www.example.com", 443),
]


def _addr(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


class Frames:
    """Ethernet/IPv4/IPv6/TCP/UDP frames (checksums zero: nothing here checks them)."""

    def __init__(self):
        self.ip_id = 0

    def ip(self, src: bytes, dst: bytes, proto: int, l4: bytes) -> bytes:
        if len(src) == 4:
            self.ip_id = (self.ip_id + 1) & 0xFFFF
            return ETH + b"\x08\x00" + struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), self.ip_id, 0x4000,
                                                   64, proto, 0, src, dst) + l4
        return ETH + b"\x86\xdd" + struct.pack("!IHBB16s16s", 0x60000000, len(l4), proto, 64, src, dst) + l4

    def tcp(self, src, dst, sport, dport, seq, ack, flags, payload=b""):
        return self.ip(src, dst, 6, struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF,
                                                0x50, flags, 65535, 0, 0) + payload)

    def udp(self, src, dst, sport, dport, payload):
        return self.ip(src, dst, 17, struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload)


def _ext(kind: int, data: bytes) -> bytes:
    return struct.pack("!HH", kind, len(data)) + data


def client_hello(rng: random.Random, sni: str | None, alpn=("h2", "http/1.1"), pad: int = 0,
                 quic: bool = False) -> bytes:
    """A TLS 1.3 ClientHello handshake message (no record layer)."""
    exts = b""
    if sni:
        name = sni.encode()
        entry = b"\x00" + struct.pack("!H", len(name)) + name
        exts += _ext(0, struct.pack("!H", len(entry)) + entry)
    protos = b"".join(bytes([len(a)]) + a.encode() for a in alpn)
    exts += _ext(16, struct.pack("!H", len(protos)) + protos)
    exts += _ext(43, b"\x02\x03\x04") + _ext(13, b"\x00\x04\x04\x03\x08\x04")
    exts += _ext(51, b"\x00\x24\x00\x1d\x00\x20" + rng.randbytes(32))
    if quic:
        exts += _ext(0x39, b"\x01\x04\x80\x00\x75\x30")
    if pad:
        exts += _ext(21, bytes(pad))
    body = (b"\x03\x03" + rng.randbytes(32) + b"\x20" + rng.randbytes(32) + b"\x00\x06\x13\x01\x13\x02\x13\x03"
            + b"\x01\x00" + struct.pack("!H", len(exts)) + exts)
    return b"\x01" + len(body).to_bytes(3, "big") + body


def dns_query(qid: int, name: str) -> bytes:
    q = b"".join(bytes([len(label)]) + label.encode() for label in name.split(".")) + b"\x00"
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + q + b"\x00\x01\x00\x01"


def dns_answer(qid: int, name: str, address: bytes) -> bytes:
    q = dns_query(qid, name)
    rtype = 1 if len(address) == 4 else 28
    head = struct.pack("!HHHHHH", qid, 0x8180, 1, 1, 0, 0)
    return head + q[12:] + b"\xc0\x0c" + struct.pack("!HHIH", rtype, 1, 300, len(address)) + address


class Capture:
    def __init__(self, seed: int = 7):
        self.rng = random.Random(seed)
        self.f = Frames()
        self.junk = self.rng.randbytes(1 << 16)
        self.qid = 0
        rng = self.rng
        self.desktops = [_addr(f"10.1.{i // 250}.{i % 250 + 2}") for i in range(400)]
        self.desktops6 = [_addr(f"fd00:1::{i:x}") for i in range(1, 100)]
        self.mobiles = [_addr(f"10.2.{i // 250}.{i % 250 + 2}") for i in range(200)]
        self.servers = [_addr(f"{net}.{h}") for net in ("192.0.2", "198.51.100", "203.0.113")
                        for h in range(1, 255)]
        self.servers6 = [_addr(f"2001:db8::{h:x}") for h in range(1, 500)]
        self.resolver, self.resolver6 = _addr(RESOLVER), _addr("fd00::53")
        self.names = {s: rng.choice(ORDINARY) for s in self.servers + self.servers6}

    def _chunk(self, n: int) -> bytes:
        start = self.rng.randrange(0, len(self.junk) - n)
        chunk = self.junk[start:start + n]
        while chunk[:1] in (b"\x16", b"G", b"P", b"H"):      # mid-flow bytes that start nothing
            chunk = bytes([self.rng.randrange(0x20, 0x40)]) + chunk[1:]
        return chunk

    # -- sessions: generators of frames, interleaved by `frames` ------------------------------
    def web(self):
        rng, f = self.rng, self.f
        v6 = rng.random() < 0.2
        r = rng.random()
        group = "mobile" if r < 0.2 else "desktop"
        kind, dest, name, port = "web", None, None, 443
        acc = 0.0
        for share, k, g, d, n, p in BYPASS:
            acc += share
            if r > 1 - acc and not v6:
                kind, group, dest, name, port = k, g, d, n, p
                break
        c = rng.choice(self.desktops6 if v6 else self.mobiles if group == "mobile" else self.desktops)
        s = _addr(dest) if dest else rng.choice(self.servers6 if v6 else self.servers)
        name = name if name is not None else self.names[s]
        res = self.resolver6 if v6 else self.resolver
        sport = rng.randrange(32768, 61000)
        if kind == "external-dns":
            yield f.udp(c, s, sport, 53, dns_query(self.qid, name))
            yield f.udp(s, c, 53, sport, dns_answer(self.qid, name, self.servers[0]))
            return
        if kind not in ("no-lookup", "blocked-ip", "dot"):
            self.qid = (self.qid + 1) & 0xFFFF
            dport = rng.randrange(32768, 61000)
            yield f.udp(c, res, dport, 53, dns_query(self.qid, name))
            yield f.udp(res, c, 53, dport, dns_answer(self.qid, name, s))
        if kind in ("web", "doh-sni", "blocked-sni", "no-lookup") and rng.random() < 0.15:
            yield from self._quic(c, s, sport, name)
            return
        cseq, sseq = rng.randrange(1 << 32), rng.randrange(1 << 32)
        yield f.tcp(c, s, sport, port, cseq, 0, 0x02)
        yield f.tcp(s, c, port, sport, sseq, cseq + 1, 0x12)
        cseq, sseq = cseq + 1, sseq + 1
        yield f.tcp(c, s, sport, port, cseq, sseq, 0x10)
        if port in (443, 853) and kind != "blocked-ip":
            msg = client_hello(rng, name, pad=1200 if rng.random() < 0.3 else 0)
            record = b"\x16\x03\x01" + struct.pack("!H", len(msg)) + msg
            for i in range(0, len(record), 1400):
                yield f.tcp(c, s, sport, port, cseq, sseq, 0x18, record[i:i + 1400])
                cseq += len(record[i:i + 1400])
            server_hello = b"\x16\x03\x03" + self._chunk(1445)
            yield f.tcp(s, c, port, sport, sseq, cseq, 0x18, server_hello)
            sseq += len(server_hello)
        for i in range(rng.randrange(8, 80)):                  # the bulk: data down, ACKs up
            if i % 7 == 3:
                data = b"\x17\x03\x03" + self._chunk(rng.randrange(40, 600))
                yield f.tcp(c, s, sport, port, cseq, sseq, 0x18, data)
                cseq += len(data)
            data = self._chunk(1448)
            yield f.tcp(s, c, port, sport, sseq, cseq, 0x10, data)
            sseq += len(data)
            if i % 2:
                yield f.tcp(c, s, sport, port, cseq, sseq, 0x10)
        yield f.tcp(c, s, sport, port, cseq, sseq, 0x11)
        yield f.tcp(s, c, port, sport, sseq, cseq + 1, 0x11)

    def _quic(self, c, s, sport, name):
        rng, f = self.rng, self.f
        dcid, scid = rng.randbytes(8), rng.randbytes(8)
        msg = client_hello(rng, name, alpn=("h3",), quic=True)
        frames = b"\x06" + varint(0) + varint(len(msg)) + msg
        yield f.udp(c, s, sport, 443, protect_initial(dcid, scid, 0, frames + bytes(1162 - len(frames))))
        for i in range(rng.randrange(10, 60)):
            if i % 3:
                yield f.udp(s, c, 443, sport, b"\x40" + scid + self._chunk(1200))
            else:
                yield f.udp(c, s, sport, 443, b"\x40" + dcid + self._chunk(rng.randrange(30, 90)))

    def other_udp(self):
        rng, f = self.rng, self.f
        c = rng.choice(self.desktops + self.mobiles)
        if rng.random() < 0.3:                                      # NTP
            s = rng.choice(self.servers)
            yield f.udp(c, s, 123, 123, self._chunk(48))
            yield f.udp(s, c, 123, 123, self._chunk(48))
            return
        s, sport, dport = rng.choice(self.servers), rng.randrange(40000, 50000), rng.randrange(3478, 3482)
        for _ in range(rng.randrange(20, 200)):                     # media
            yield f.udp(c, s, sport, dport, self._chunk(rng.randrange(100, 1200)))
            if rng.random() < 0.5:
                yield f.udp(s, c, dport, sport, self._chunk(rng.randrange(100, 1200)))

    def frames(self, count: int, concurrent: int = 300):
        """(time, frame) for `count` frames from `concurrent` interleaved sessions."""
        rng = self.rng
        active = []
        when = 1_700_000_000.0
        n = 0
        while n < count:
            while len(active) < concurrent:
                active.append(self.other_udp() if rng.random() < 0.08 else self.web())
            i = rng.randrange(len(active))
            try:
                frame = next(active[i])
            except StopIteration:
                active[i] = active[-1]
                active.pop()
                continue
            when += 0.00005
            n += 1
            yield when, frame


def write_pcap(path: Path, frames) -> int:
    n = 0
    with open(path, "wb", buffering=1 << 20) as out:
        out.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
        for when, frame in frames:
            sec = int(when)
            out.write(struct.pack("<IIII", sec, int((when - sec) * 1e6), len(frame), len(frame)) + frame)
            n += 1
    return n


def write_pcapng(path: Path, frames) -> int:
    n = 0
    with open(path, "wb", buffering=1 << 20) as out:
        out.write(struct.pack("<IIIHHqI", 0x0A0D0D0A, 28, 0x1A2B3C4D, 1, 0, -1, 28))        # SHB
        out.write(struct.pack("<IIHHII", 1, 20, 1, 0, 65535, 20))                           # IDB, us
        for when, frame in frames:
            ts = int(round(when * 1e6))
            padded = frame + bytes(-len(frame) % 4)
            size = 32 + len(padded)
            out.write(struct.pack("<IIIIIII", 6, size, 0, ts >> 32, ts & 0xFFFFFFFF, len(frame), len(frame))
                      + padded + struct.pack("<I", size))
            n += 1
    return n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--packets", type=int, default=1_000_000)
    p.add_argument("--format", choices=("pcap", "pcapng"), default="pcap")
    p.add_argument("--seed", type=int, default=7)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"capture.{args.format}"
    writer = write_pcap if args.format == "pcap" else write_pcapng
    n = writer(path, Capture(args.seed).frames(args.packets))
    (args.out / "sinkhole.yaml").write_text(
        f"listen: ['{RESOLVER}:53', '[fd00::53]:53']\nupstreams: ['192.0.2.1']\n"
        f"blocklists: {ROOT / 'blocklists'}\n")
    print(f"{path}: {n} packets", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
