"""Raw frames -> `Packet`: the hot path's own Ethernet/SLL/IPv4/IPv6/TCP/UDP header parsing.

No scapy here: one frame is a few struct reads and slices. Anything it cannot read returns None
(counted as unparsed by the caller); nothing here raises on malformed input.
"""
from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from typing import NamedTuple

from resolver.policy import forget_oldest

# pcap link types (tcpdump.org/linktypes.html)
LINKTYPE_ETHERNET, LINKTYPE_RAW, LINKTYPE_LINUX_SLL, LINKTYPE_LINUX_SLL2 = 1, 101, 113, 276
LINKTYPE_RAW_ALIASES = {12, 14, 101, 228, 229}

TCP, UDP = 6, 17
_ONE_QUESTION = b"\0\1\0\0\0\0\0\0"       # QDCOUNT 1, AN, NS and AR 0
FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10
_V6_EXTENSIONS = {0, 43, 60}        # hop-by-hop, routing, destination options (fragment 44: dropped)
_VLAN = {0x8100, 0x88A8, 0x9100}
_V4_ADDRESSES, _PORTS = struct.Struct("!II").unpack_from, struct.Struct("!HH").unpack_from
_V4_FLOW = struct.Struct("!IIHH").unpack_from


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
    flow: bytes = b""         # flow_key(): this direction of the flow, as the engine's tables key it

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
    at = locate(frame, linktype)
    return None if at is None else packet_at(frame, at, when)


def locate(frame: bytes, linktype: int = LINKTYPE_ETHERNET) -> tuple[int, int, int, int, int, int] | None:
    """Where things are in a frame, without building anything: (IP version, IP header offset,
    protocol, transport header offset, payload offset, payload end), or None when it is not a
    readable (first-fragment) TCP/UDP packet. Nothing raises."""
    try:
        if linktype == LINKTYPE_ETHERNET:
            ethertype = frame[12] << 8 | frame[13]
            offset = 14
            for _ in range(2):                      # 802.1Q / QinQ tags
                if ethertype not in _VLAN:
                    break
                ethertype = frame[offset + 2] << 8 | frame[offset + 3]
                offset += 4
        elif linktype == LINKTYPE_LINUX_SLL:
            ethertype, offset = frame[14] << 8 | frame[15], 16
        elif linktype == LINKTYPE_LINUX_SLL2:
            ethertype, offset = frame[0] << 8 | frame[1], 20
        elif linktype in LINKTYPE_RAW_ALIASES:
            first = frame[0] >> 4 if frame else 0
            ethertype, offset = {4: 0x0800, 6: 0x86DD}.get(first, 0), 0
        else:
            return None
        if ethertype == 0x0800:                     # IPv4, inline: most packets
            o = offset
            size = len(frame)
            if size < o + 20 or frame[o] >> 4 != 4:
                return None
            ihl = (frame[o] & 0x0F) * 4
            total = frame[o + 2] << 8 | frame[o + 3]
            if ihl < 20 or total < ihl or frame[o + 6] & 0x1F or frame[o + 7]:
                return None                         # (a later fragment has no transport header)
            return _transport(frame, o, o + ihl, o + total if o + total < size else size, frame[o + 9], 4)
        if ethertype == 0x86DD:
            return _ipv6(frame, offset)
        return None
    except IndexError:
        return None


def _ipv6(frame: bytes, o: int):
    if len(frame) < o + 40 or frame[o] >> 4 != 6:
        return None
    end = min(len(frame), o + 40 + (frame[o + 4] << 8 | frame[o + 5]))
    nxt = frame[o + 6]
    p = o + 40
    for _ in range(8):                            # bounded walk over extension headers
        if nxt not in _V6_EXTENSIONS:
            break
        if p + 2 > end:
            return None
        nxt, p = frame[p], p + (frame[p + 1] + 1) * 8
    if nxt == 44:                                 # fragment header
        if p + 8 > end or (frame[p + 2] << 8 | frame[p + 3]) & 0xFFF8:
            return None
        nxt, p = frame[p], p + 8
    return _transport(frame, o, p, end, nxt, 6)


def _transport(frame, o, p, end, proto, version):
    if proto == TCP:
        if p + 20 > end:
            return None
        hlen = (frame[p + 12] >> 4) * 4
        if hlen < 20 or p + hlen > end:
            return None
        return version, o, TCP, p, p + hlen, end
    if proto == UDP:
        if p + 8 > end:
            return None
        return version, o, UDP, p, p + 8, end
    return None


def flow_key(frame: bytes, at: tuple) -> bytes:
    """A direction's flow as bytes: source and destination address, then ports (12 bytes for
    IPv4, 36 for IPv6, so the two never collide). The same key for the fast path and `Packet`."""
    version, o, _, p, _, _ = at
    return frame[o + 12:o + 20] + frame[p:p + 4] if version == 4 else frame[o + 8:o + 40] + frame[p:p + 4]


def addresses(frame: bytes, at: tuple) -> tuple[int, int, int, int, int]:
    """(IP version, source, destination, source port, destination port) of a located frame,
    addresses as ints: an Observation's fields after its kind and transport."""
    version, o, _, p, _, _ = at
    if version == 4:
        return (4, *_V4_ADDRESSES(frame, o + 12), *_PORTS(frame, p))
    return (6, int.from_bytes(frame[o + 8:o + 24], "big"), int.from_bytes(frame[o + 24:o + 40], "big"),
            *_PORTS(frame, p))


def packet_at(frame: bytes, at: tuple, when: float) -> Packet:
    """The Packet of a located frame."""
    version, src, dst, sport, dport = addresses(frame, at)
    _, _, proto, p, data, end = at
    if proto == TCP:
        return Packet(when, version, src, dst, TCP, sport, dport, bytes(frame[data:end]), frame[p + 13],
                      int.from_bytes(frame[p + 4:p + 8], "big"), flow_key(frame, at))
    return Packet(when, version, src, dst, UDP, sport, dport, bytes(frame[data:end]), flow=flow_key(frame, at))


class Observation(NamedTuple):
    """What a detector looks at: one thing a client did, derived once from one or more packets.
    (An immutable NamedTuple, not a frozen dataclass: one is built per new flow, and a frozen
    dataclass sets each of its twelve fields through object.__setattr__.)

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


QUESTIONS, QUESTION_MAX = 16384, 300         # names remembered, of queries up to this many bytes
_QUESTIONS: dict[bytes | None, str] = {}     # the bytes after a plain query's header -> its name


def observation(when: float, kind: str, transport: str, frame: bytes, at: tuple, sni: str | None = None,
                alpn: tuple[str, ...] = (), name: str | None = None, detail: str = "") -> Observation:
    """The Observation of a located frame: its addresses and ports (as `addresses` reads them)
    after kind and transport. Built as the tuple it is, in one call."""
    version, o, _, p, _, _ = at
    if p == o + 20:                     # IPv4 without options: addresses and ports back to back
        src, dst, sport, dport = _V4_FLOW(frame, o + 12)
        return _tuple_new(Observation, (when, kind, transport, 4, src, dst, sport, dport, sni, alpn, name, detail))
    if version == 4:
        src, dst = _V4_ADDRESSES(frame, o + 12)
    else:
        src, dst = int.from_bytes(frame[o + 8:o + 24], "big"), int.from_bytes(frame[o + 24:o + 40], "big")
    sport, dport = _PORTS(frame, p)
    return _tuple_new(Observation, (when, kind, transport, version, src, dst, sport, dport, sni, alpn, name, detail))


_tuple_new = tuple.__new__


def dns_question(message: bytes) -> str | None:
    """The name a DNS query asks for, or None when it is not a readable query.

    The plain query (not a response, opcode 0, one question, no other records, labels of at
    most 63 bytes without dots or backslashes) is read here; anything else goes to
    resolver.wire.parse_query, whose answer (qname or error) this always equals."""
    n = len(message)
    if n >= 17 and not message[2] & 0xF8 and message[4:12] == _ONE_QUESTION:
        question = message[12:] if n <= QUESTION_MAX else None     # names repeat: short queries
        name = _QUESTIONS.get(question)                              # are remembered by question
        if name is not None:
            return name
        labels = []
        p = 12
        while p < n:
            length = message[p]
            if not length:                  # the root: every label lay inside the message
                if p + 5 <= n and p - 12 <= 255:
                    raw = b".".join(labels)
                    if raw.count(b".") == len(labels) - 1 and b"\\" not in raw:
                        name = raw.decode("latin-1").lower()
                        if question is not None:
                            if len(_QUESTIONS) >= QUESTIONS:
                                forget_oldest(_QUESTIONS)
                            _QUESTIONS[question] = name
                        return name
                break
            if length > 63:
                break
            labels.append(message[p + 1:p + 1 + length])
            p += length + 1
    from resolver.wire import WireError, parse_query     # here: plain queries never need it
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
