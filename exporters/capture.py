"""The only module that knows scapy: live capture (AF_PACKET with a kernel BPF filter, a large
socket buffer, kernel drop counters) and pcap/pcapng reading. Both yield raw frames
(time, linktype, bytes); parsing happens in packets.py without scapy.
"""
from __future__ import annotations

import logging
import mmap
import os
import select
import socket
import stat
import struct
from itertools import chain
from typing import Iterator

log = logging.getLogger("sinkhole.sidecar")
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


class CaptureError(ValueError):
    """A capture file that cannot be read (not pcap/pcapng, or a damaged record)."""


_CHUNK = 64 << 10               # read size (and a mapped file's run): small enough that the buffer and
                                # its frames stay in the CPU cache while they are handled (4 MiB reads
                                # made --pcap ~7 % slower)
_MAX_RECORD = 1 << 18            # snap lengths go up to 262144
_MAX_BLOCK = 1 << 24             # any pcapng block; a damaged length must not read the file into memory


def read_pcap(path: str) -> Iterator[tuple[float, int, bytes]]:
    """(time, linktype, frame) for every packet of a pcap or pcapng file, streamed in large reads.
    Raises CaptureError, naming the file and byte offset, on anything it cannot read."""
    return chain.from_iterable(read_pcap_runs(path))


def read_pcap_runs(path: str) -> Iterator[list[tuple[float, int, bytes]]]:
    """read_pcap's records as one list per read of the file: each list comes before the next read
    (which may wait, on a pipe), and what was read before an error comes before the error. A
    regular pcap file is read through a memory map instead, a list per _CHUNK bytes of records."""
    with open(path, "rb") as f:
        magic = f.read(4)
        if magic == b"\x0a\x0d\x0d\x0a":
            yield from _pcapng(path, f, magic)
            return
        for endian in "<>":
            kind = _PCAP_MAGIC.get(struct.unpack(endian + "I", magic)[0] if len(magic) == 4 else 0)
            if kind:
                break
        else:
            raise CaptureError(f"{path}: not a pcap or pcapng file")
        head = f.read(20)
        if len(head) < 20:
            raise CaptureError(f"{path}: truncated pcap header")
        linktype = struct.unpack(endian + "I", head[16:20])[0] & 0x0FFFFFFF
        scale = 1e-9 if kind == "ns" else 1e-6
        record = struct.Struct(endian + "III4x").unpack_from      # seconds, fraction, captured length
        info = os.fstat(f.fileno())
        if stat.S_ISREG(info.st_mode) and info.st_size > 24:
            yield from _mapped_records(path, f, record, linktype, scale)
            return
        buf, pos, base = b"", 0, 24                  # base: file offset of buf[0]
        carried = []                                 # the record that straddled two reads
        while True:
            size = len(buf)
            missing = 0                              # of a record begun in buf (read at once)
            run, carried = carried, []
            while pos + 16 <= size:
                sec, frac, caplen = record(buf, pos)
                end = pos + 16 + caplen
                if end > size:
                    if caplen > _MAX_RECORD:
                        if run:
                            yield run
                        raise CaptureError(f"{path}: record at byte {base + pos} claims {caplen} bytes")
                    missing = end - size
                    break
                run.append((sec + frac * scale, linktype, buf[pos + 16:end]))
                pos = end
            if run:
                yield run
            more = f.read(max(_CHUNK, missing))
            if not more:
                if pos < size:
                    raise CaptureError(f"{path}: truncated record at byte {base + pos}")
                return
            if missing and len(more) >= missing:
                # the record begun in buf is put together alone (not buf's rest + the whole read)
                sec, frac, caplen = record(buf, pos)
                carried = [(sec + frac * scale, linktype, buf[pos + 16:] + more[:missing])]
                buf, base, pos = more, base + size, missing
            else:
                buf, base, pos = buf[pos:] + more, base + pos, 0


_PCAP_MAGIC = {0xA1B2C3D4: "us", 0xA1B23C4D: "ns"}


def _mapped_records(path: str, f, record, linktype: int, scale: float) -> Iterator[list[tuple[float, int, bytes]]]:
    """read_pcap_runs for a regular pcap file, through a memory map (frames are sliced from the
    page cache, not from a copy of it made by read()): a run per _CHUNK bytes of records."""
    with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        if hasattr(mm, "madvise"):
            mm.madvise(mmap.MADV_SEQUENTIAL)
        size, pos = len(mm), 24
        while pos + 16 <= size:
            stop = pos + _CHUNK
            run = []
            while pos + 16 <= size:
                sec, frac, caplen = record(mm, pos)
                end = pos + 16 + caplen
                if end > size or caplen > _MAX_RECORD:
                    if run:
                        yield run
                    if caplen > _MAX_RECORD:
                        raise CaptureError(f"{path}: record at byte {pos} claims {caplen} bytes")
                    raise CaptureError(f"{path}: truncated record at byte {pos}")
                run.append((sec + frac * scale, linktype, mm[pos + 16:end]))
                pos = end
                if pos >= stop:
                    break
            yield run
        if pos < size:
            raise CaptureError(f"{path}: truncated record at byte {pos}")


def _pcapng(path: str, f, first: bytes) -> Iterator[list[tuple[float, int, bytes]]]:
    """Runs of records (as read_pcap_runs) of a pcapng file."""
    run: list[tuple[float, int, bytes]] = []
    try:
        for record in _pcapng_records(path, f, first):
            if record is _READING:
                if run:
                    yield run
                    run = []
            else:
                run.append(record)
    except CaptureError:
        if run:
            yield run
        raise
    if run:
        yield run


_READING = object()             # _pcapng_records is about to read more of the file


def _pcapng_records(path: str, f, first: bytes) -> Iterator:
    """pcapng blocks: section headers (byte order), interface descriptions (link type, time
    resolution and offset), enhanced, simple and obsolete packet blocks; other blocks skipped.
    Yields each packet's (time, linktype, frame), and _READING before each read."""
    data = first + f.read(_CHUNK)
    pos, base = 0, 0
    endian = "<"
    interfaces: list[tuple[int, float, float]] = []      # (linktype, units per second, offset)
    last = 0.0
    while True:
        if pos + 12 <= len(data) and data[pos:pos + 4] == b"\x0a\x0d\x0d\x0a":   # a section: byte order
            endian = {b"\x4d\x3c\x2b\x1a": "<", b"\x1a\x2b\x3c\x4d": ">"}.get(data[pos + 8:pos + 12])
            if endian is None:
                raise CaptureError(f"{path}: bad pcapng byte-order mark at byte {base + pos + 8}")
            interfaces = []
        blen = struct.unpack_from(endian + "I", data, pos + 4)[0] if pos + 8 <= len(data) else 12
        if blen < 12 or blen % 4 or blen > _MAX_BLOCK:
            raise CaptureError(f"{path}: bad pcapng block length {blen} at byte {base + pos}")
        if pos + blen > len(data):
            yield _READING
            more = f.read(max(_CHUNK, pos + blen - len(data)))
            if not more:
                if pos < len(data):
                    raise CaptureError(f"{path}: truncated block at byte {base + pos}")
                return
            data, base, pos = data[pos:] + more, base + pos, 0
            continue
        btype = struct.unpack_from(endian + "I", data, pos)[0]
        if btype == 6 or btype == 2:                                   # enhanced / obsolete packet
            if btype == 6:
                iface, high, low, caplen = struct.unpack_from(endian + "IIII", data, pos + 8)
                start = pos + 28
            else:
                iface, _, high, low, caplen = struct.unpack_from(endian + "HHIII", data, pos + 8)
                start = pos + 28
            if iface >= len(interfaces) or start + caplen > pos + blen:
                raise CaptureError(f"{path}: bad packet block at byte {base + pos}")
            linktype, units, offset = interfaces[iface]
            last = ((high << 32) | low) / units + offset
            yield last, linktype, data[start:start + caplen]
        elif btype == 3:                                               # simple packet: no time
            if not interfaces:
                raise CaptureError(f"{path}: packet before any interface at byte {base + pos}")
            caplen = min(struct.unpack_from(endian + "I", data, pos + 8)[0], blen - 16)
            yield last, interfaces[0][0], data[pos + 12:pos + 12 + caplen]
        elif btype == 1:                                               # interface description
            interfaces.append(_interface(data[pos + 8:pos + blen - 4], endian))
        pos += blen


def _interface(body: bytes, endian: str) -> tuple[int, float, float]:
    linktype = struct.unpack_from(endian + "H", body, 0)[0]
    units, offset = 1e6, 0.0
    p = 8
    while p + 4 <= len(body):
        code, length = struct.unpack_from(endian + "HH", body, p)
        value = body[p + 4:p + 4 + length]
        if code == 0:
            break
        if code == 9 and length == 1:                                  # if_tsresol
            units = float(2 ** (value[0] & 0x7F)) if value[0] & 0x80 else float(10 ** value[0])
        elif code == 14 and length == 8:                               # if_tsoffset, seconds
            offset = float(struct.unpack(endian + "q", value)[0])
        p += 4 + length + (-length % 4)
    return linktype, units, offset


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
        for s in self.sockets:
            s.ins.setblocking(False)            # read until the queue is empty: no select per frame
        self.linktypes = {s.ins.fileno(): 1 for s in self.sockets}

    def frames(self, timeout: float, batch: int = 4096) -> list[tuple[float, int, bytes]]:
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
                except OSError as e:             # ENETDOWN while a link flaps: keep capturing
                    log.warning("capture on %s: %s", getattr(sock, "iface", "?"), e)
                    break
                if frame is not None:
                    out.append((ts or 0.0, 1, frame))
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
