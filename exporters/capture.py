"""The only module that knows scapy: live capture (AF_PACKET with a kernel BPF filter, a large
socket buffer, kernel drop counters) and pcap/pcapng reading. Both yield raw frames
(time, linktype, bytes); parsing happens in packets.py without scapy.
"""
from __future__ import annotations

import select
import socket
import struct
from typing import Iterator

SOL_PACKET, PACKET_STATISTICS = 263, 6
RCVBUF = 64 << 20            # asked for; the kernel caps it at net.core.rmem_max (raise that too)


def _v4_v6(v4: str, v6: str) -> str:
    return f"(ip and ({v4})) or (ip6 and ({v6}))"


# What the detectors need, and only that. IPv4 uses tcp[]/udp[] offsets; those match IPv4 only, so
# the IPv6 half reads fixed offsets after a 40-byte header (packets with extension headers are
# missed by the IPv6 half: rare for TCP/UDP from desktops).
#  - DNS both ways on 53 (queries to other servers; our resolver's answers teach no-dns)
#  - TCP SYN without ACK (dot, blocked-ip, httpdns, no-dns)
#  - TCP with payload to 443/853 (ClientHellos, also their later segments) or any port when
#    the payload starts a TLS handshake record; HTTP requests (GET/POST) for httpdns
#  - UDP to 853, and QUIC long-header packets to 443
_TCP4_PAYLOAD = "(ip[2:2] - ((ip[0] & 0x0f) << 2) - ((tcp[12] & 0xf0) >> 2)) > 0"
_TCP4_FIRST = "tcp[((tcp[12] & 0xf0) >> 2):4]"
_TCP6_PAYLOAD = "(ip6[4:2] - ((ip6[52] & 0xf0) >> 2)) > 0"
_TCP6_FIRST = "ip6[(40 + ((ip6[52] & 0xf0) >> 2)):4]"
_STARTS = "({f} & 0xffff0000 = 0x16030000 or {f} = 0x47455420 or {f} = 0x504f5354)"   # TLS, "GET ", "POST"
BPF_FILTER = (
    "(udp port 53 or tcp port 53 or udp dst port 853)"
    " or " + _v4_v6(
        "tcp and ((tcp[13] & 0x12 = 0x02)"
        f" or ((dst port 443 or dst port 853) and {_TCP4_PAYLOAD})"
        f" or ({_TCP4_PAYLOAD} and {_STARTS.format(f=_TCP4_FIRST)}))"
        " or (udp dst port 443 and udp[8] & 0x80 = 0x80)",
        "(ip6[6] = 6 and ((ip6[53] & 0x12 = 0x02)"
        f" or ((dst port 443 or dst port 853) and {_TCP6_PAYLOAD})"
        f" or ({_TCP6_PAYLOAD} and {_STARTS.format(f=_TCP6_FIRST)})))"
        " or (ip6[6] = 17 and dst port 443 and ip6[48] & 0x80 = 0x80)")
)


def check_filter(bpf: str = BPF_FILTER, linktype: int = 1) -> int:
    """Compile the filter with libpcap; returns the instruction count, raises on a bad filter."""
    from scapy.arch.common import compile_filter
    return compile_filter(bpf, linktype=linktype).bf_len


def read_pcap(path: str) -> Iterator[tuple[float, int, bytes]]:
    """(time, linktype, frame) for every packet of a pcap or pcapng file, streamed."""
    from scapy.utils import RawPcapNgReader, RawPcapReader
    with RawPcapReader(path) as reader:
        if isinstance(reader, RawPcapNgReader):
            for frame, meta in reader:
                yield ((meta.tshigh << 32) | meta.tslow) / meta.tsresol, meta.linktype, frame
        else:
            scale = 1e-9 if getattr(reader, "nano", False) else 1e-6
            for frame, meta in reader:
                yield meta.sec + meta.usec * scale, reader.linktype, frame


class LiveCapture:
    """AF_PACKET listeners on one or more interfaces, filtered in the kernel."""

    def __init__(self, ifaces: list[str], bpf: str = BPF_FILTER, bufsize: int = RCVBUF):
        from scapy.arch.linux import L2ListenSocket
        from scapy.config import conf
        conf.bufsize = bufsize
        self.sockets = []
        try:
            for iface in ifaces:
                self.sockets.append(L2ListenSocket(iface=iface, filter=bpf))
        except Exception:
            self.close()
            raise
        self.linktypes = {s.ins.fileno(): 1 for s in self.sockets}

    def frames(self, timeout: float, batch: int = 256) -> list[tuple[float, int, bytes]]:
        """Whatever arrived within `timeout` seconds, up to `batch` frames per socket."""
        ready, _, _ = select.select([s.ins for s in self.sockets], [], [], timeout)
        out = []
        for sock in self.sockets:
            if sock.ins not in ready:
                continue
            for _ in range(batch):
                try:
                    _, frame, ts = sock.recv_raw(65535)
                except (BlockingIOError, InterruptedError):
                    break
                if frame is None:
                    break
                out.append((ts or 0.0, 1, frame))
                if not select.select([sock.ins], [], [], 0)[0]:
                    break
        return out

    def drops(self) -> int:
        """Kernel drops since the last call (PACKET_STATISTICS resets on read), all sockets."""
        total = 0
        for s in self.sockets:
            try:
                raw = s.ins.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8)
                total += struct.unpack("II", raw)[1]
            except OSError:
                pass
        return total

    def close(self) -> None:
        for s in self.sockets:
            try:
                s.close()
            except (OSError, socket.error):
                pass
        self.sockets = []
