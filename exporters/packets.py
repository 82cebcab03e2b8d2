"""Raw frames -> `Packet`: the hot path's own Ethernet/SLL/IPv4/IPv6/TCP/UDP header parsing.

No scapy here: one frame is a few struct reads and slices. Anything it cannot read returns None
(counted as unparsed by the caller); nothing here raises on malformed input.
"""
from __future__ import annotations

import socket
from dataclasses import dataclass

# pcap link types (tcpdump.org/linktypes.html)
LINKTYPE_ETHERNET, LINKTYPE_RAW, LINKTYPE_LINUX_SLL, LINKTYPE_LINUX_SLL2 = 1, 101, 113, 276
LINKTYPE_RAW_ALIASES = {12, 14, 101, 228, 229}

TCP, UDP = 6, 17
FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10
_V6_EXTENSIONS = {0, 43, 60}        # hop-by-hop, routing, destination options (fragment 44: dropped)
_VLAN = {0x8100, 0x88A8, 0x9100}


@dataclass(slots=True)
class Packet:
    time: float
    version: int              # 4 or 6
    src: int                  # address as int
    dst: int
    proto: int                # 6 TCP, 17 UDP
    sport: int
    dport: int
    payload: bytes
    flags: int = 0            # TCP flags
    seq: int = 0              # TCP sequence number

    @property
    def src_ip(self) -> str:
        return ip_text(self.version, self.src)

    @property
    def dst_ip(self) -> str:
        return ip_text(self.version, self.dst)

    @property
    def syn(self) -> bool:
        """A connection attempt: SYN without ACK."""
        return self.proto == TCP and self.flags & (SYN | ACK) == SYN


def ip_text(version: int, addr: int) -> str:
    if version == 4:
        return socket.inet_ntop(socket.AF_INET, addr.to_bytes(4, "big"))
    return socket.inet_ntop(socket.AF_INET6, addr.to_bytes(16, "big"))


def parse(frame: bytes, linktype: int = LINKTYPE_ETHERNET, when: float = 0.0) -> Packet | None:
    """One captured frame -> Packet, or None when it is not a (first-fragment) TCP/UDP packet."""
    try:
        if linktype == LINKTYPE_ETHERNET:
            if len(frame) < 14:
                return None
            ethertype = int.from_bytes(frame[12:14], "big")
            offset = 14
            for _ in range(2):                      # 802.1Q / QinQ tags
                if ethertype not in _VLAN:
                    break
                ethertype = int.from_bytes(frame[offset + 2:offset + 4], "big")
                offset += 4
        elif linktype == LINKTYPE_LINUX_SLL:
            ethertype, offset = int.from_bytes(frame[14:16], "big"), 16
        elif linktype == LINKTYPE_LINUX_SLL2:
            ethertype, offset = int.from_bytes(frame[0:2], "big"), 20
        elif linktype in LINKTYPE_RAW_ALIASES:
            first = frame[0] >> 4 if frame else 0
            ethertype, offset = {4: 0x0800, 6: 0x86DD}.get(first, 0), 0
        else:
            return None
        if ethertype == 0x0800:
            return _ipv4(frame, offset, when)
        if ethertype == 0x86DD:
            return _ipv6(frame, offset, when)
        return None
    except (IndexError, ValueError):
        return None


def _ipv4(frame: bytes, o: int, when: float) -> Packet | None:
    if len(frame) < o + 20 or frame[o] >> 4 != 4:
        return None
    ihl = (frame[o] & 0x0F) * 4
    total = int.from_bytes(frame[o + 2:o + 4], "big")
    if ihl < 20 or total < ihl:
        return None
    if int.from_bytes(frame[o + 6:o + 8], "big") & 0x1FFF:
        return None                               # a later fragment: no transport header
    end = min(len(frame), o + total)
    return _transport(frame, o + ihl, end, frame[o + 9], 4,
                      int.from_bytes(frame[o + 12:o + 16], "big"),
                      int.from_bytes(frame[o + 16:o + 20], "big"), when)


def _ipv6(frame: bytes, o: int, when: float) -> Packet | None:
    if len(frame) < o + 40 or frame[o] >> 4 != 6:
        return None
    end = min(len(frame), o + 40 + int.from_bytes(frame[o + 4:o + 6], "big"))
    nxt = frame[o + 6]
    src = int.from_bytes(frame[o + 8:o + 24], "big")
    dst = int.from_bytes(frame[o + 24:o + 40], "big")
    p = o + 40
    for _ in range(8):                            # bounded walk over extension headers
        if nxt not in _V6_EXTENSIONS:
            break
        if p + 2 > end:
            return None
        nxt, p = frame[p], p + (frame[p + 1] + 1) * 8
    if nxt == 44:                                 # fragment header
        if p + 8 > end or int.from_bytes(frame[p + 2:p + 4], "big") & 0xFFF8:
            return None
        nxt, p = frame[p], p + 8
    return _transport(frame, p, end, nxt, 6, src, dst, when)


def _transport(frame, p, end, proto, version, src, dst, when) -> Packet | None:
    if proto == TCP:
        if p + 20 > end:
            return None
        hlen = (frame[p + 12] >> 4) * 4
        if hlen < 20 or p + hlen > end:
            return None
        return Packet(when, version, src, dst, TCP, int.from_bytes(frame[p:p + 2], "big"),
                      int.from_bytes(frame[p + 2:p + 4], "big"), bytes(frame[p + hlen:end]),
                      frame[p + 13], int.from_bytes(frame[p + 4:p + 8], "big"))
    if proto == UDP:
        if p + 8 > end:
            return None
        return Packet(when, version, src, dst, UDP, int.from_bytes(frame[p:p + 2], "big"),
                      int.from_bytes(frame[p + 2:p + 4], "big"), bytes(frame[p + 8:end]))
    return None


@dataclass(frozen=True, slots=True)
class Observation:
    """What a detector looks at: one thing a client did, derived once from one or more packets.

    kind: `connect` (a TCP SYN, or the first datagram of a UDP flow), `hello` (a complete TLS or
    QUIC ClientHello), `http` (the first plain-HTTP request of a flow).
    """

    time: float
    kind: str
    transport: str            # tcp | udp | quic
    version: int
    client: int
    server: int
    client_port: int
    server_port: int
    sni: str | None = None
    alpn: tuple[str, ...] = ()
    name: str | None = None   # the DNS question (port 53), HTTP Host, or the name an HTTPDNS URL asks for
    detail: str = ""          # the HTTP request target

    @property
    def client_ip(self) -> str:
        return ip_text(self.version, self.client)

    @property
    def server_ip(self) -> str:
        return ip_text(self.version, self.server)


def dns_question(message: bytes) -> str | None:
    """The name a DNS query asks for, or None when it is not a readable query."""
    from resolver.wire import WireError, parse_query
    try:
        return parse_query(message).qname
    except (WireError, IndexError, ValueError, UnicodeError):
        return None


def dns_addresses(message: bytes) -> list[tuple[int, int, int]]:
    """(version, address, TTL) of every A and AAAA record in a DNS response's answer section
    (CNAME chains included: the addresses are what the client will connect to)."""
    from resolver.wire import WireError, read_name
    out: list[tuple[int, int, int]] = []
    try:
        if len(message) < 12 or not message[2] & 0x80:
            return out
        qd, an = int.from_bytes(message[4:6], "big"), int.from_bytes(message[6:8], "big")
        p = 12
        for _ in range(min(qd, 4)):
            _, p = read_name(message, p)
            p += 4
        for _ in range(min(an, 256)):
            _, p = read_name(message, p)
            if p + 10 > len(message):
                break
            rtype = int.from_bytes(message[p:p + 2], "big")
            ttl = int.from_bytes(message[p + 4:p + 8], "big") & 0x7FFFFFFF
            rdlen = int.from_bytes(message[p + 8:p + 10], "big")
            rdata = message[p + 10:p + 10 + rdlen]
            p += 10 + rdlen
            if rtype == 1 and len(rdata) == 4:
                out.append((4, int.from_bytes(rdata, "big"), ttl))
            elif rtype == 28 and len(rdata) == 16:
                out.append((6, int.from_bytes(rdata, "big"), ttl))
    except (WireError, IndexError, ValueError):
        pass
    return out
