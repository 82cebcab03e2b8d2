"""The sidecar's fast path gives the same alerts, counts and flow state as the full path: captures
with every detector's case (the detector table), buried in the traffic a gateway mostly sees, read
from pcap and pcapng by exporters.capture (checked against scapy's readers) and decided from header
bytes, against the same frames fed one by one to an engine that parses every packet in full."""
import os
import struct
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from scapy.layers.inet import ICMP, IP, TCP, UDP  # noqa: E402
from scapy.layers.inet6 import IPv6  # noqa: E402
from scapy.layers.l2 import ARP, Dot1Q, Ether  # noqa: E402
from scapy.utils import PcapNgWriter, RawPcapNgReader, RawPcapReader, wrpcap  # noqa: E402

from exporters import quic  # noqa: E402
from exporters.capture import CaptureError, read_pcap  # noqa: E402
from exporters.detectors import DETECTORS  # noqa: E402
from exporters.sidecar import DONE, Engine  # noqa: E402
from helpers import ROOT  # noqa: E402
from sidecar_frames import (DESKTOP, RESOLVER, WEB_IP, dns_answer, engine, frame, udp,  # noqa: E402
                            write_policy)
from test_sidecar_detectors import CASES  # noqa: E402

T0 = 1000.0


def _replies(raw: bytes) -> list[bytes]:
    """What the rest of a connection looks like around one client frame: the server's answer,
    mid-flow data both ways, ACKs, a keep-alive request, short-header QUIC, a client Handshake."""
    pkt = Ether(raw)
    ip = pkt.getlayer(IP) or pkt.getlayer(IPv6)
    if ip is None:
        return []
    back = IPv6(src=ip.dst, dst=ip.src) if ip.version == 6 else IP(src=ip.dst, dst=ip.src)
    fwd = IPv6(src=ip.src, dst=ip.dst) if ip.version == 6 else IP(src=ip.src, dst=ip.dst)
    out = []
    if pkt.haslayer(TCP):
        t = pkt[TCP]
        out.append(frame(back / TCP(sport=t.dport, dport=t.sport, flags="SA" if t.flags.S else "A", seq=5, ack=t.seq + 1)))
        out.append(frame(fwd / TCP(sport=t.sport, dport=t.dport, flags="A", seq=t.seq + 1, ack=6)))
        if t.flags.S:
            return out
        out.append(frame(back / TCP(sport=t.dport, dport=t.sport, flags="PA", seq=6) / (b"\x16\x03\x03\x00\x30" + bytes(48))))
        out.append(frame(back / TCP(sport=t.dport, dport=t.sport, flags="A", seq=60) / os.urandom(1200)))
        out.append(frame(fwd / TCP(sport=t.sport, dport=t.dport, flags="PA", seq=t.seq + 100000) / b"\x17\x03\x03\x00\x10"))
        out.append(frame(fwd / TCP(sport=t.sport, dport=t.dport, flags="PA", seq=t.seq + 200000)
                         / b"GET /d?dn=second.request HTTP/1.1\r\n\r\n"))
    elif pkt.haslayer(UDP):
        u = pkt[UDP]
        out.append(frame(back / UDP(sport=u.dport, dport=u.sport) / (b"\xc0\x00\x00\x00\x01" + bytes(40))))
        out.append(frame(fwd / UDP(sport=u.sport, dport=u.dport) / (b"\x40" + os.urandom(60))))
        out.append(frame(fwd / UDP(sport=u.sport, dport=u.dport) / (b"\xe0\x00\x00\x00\x01" + os.urandom(60))))
        out.append(frame(fwd / UDP(sport=u.sport, dport=u.dport) / bytes(u.payload)))     # a retransmission
    return out


NOISE = [
    bytes(Ether() / ARP()),
    bytes(Ether() / IP(src=DESKTOP, dst=WEB_IP) / ICMP()),
    bytes(Ether() / Dot1Q(vlan=7) / IP(src=DESKTOP, dst="10.9.9.201") / TCP(sport=4000, dport=443, flags="S")),
    bytes(Ether() / IP(src=DESKTOP, dst="192.0.2.202", frag=20) / UDP() / b"later fragment"),
    frame(IP(src=DESKTOP, dst="192.0.2.203") / UDP(sport=123, dport=123) / bytes(48)) + bytes(30),   # trailer
    frame(IP(src=DESKTOP, dst="192.0.2.204") / TCP(sport=4001, dport=443, flags="PA") / b"\x16\x03")[:60],
    frame(IP(src=RESOLVER, dst=DESKTOP) / TCP(sport=53, dport=40999, flags="PA")
          / (len(dns_answer("tcp.example.test", ["192.0.2.205"])).to_bytes(2, "big")
             + dns_answer("tcp.example.test", ["192.0.2.205"]))),
    udp("192.0.2.206", DESKTOP, 40000, b"\x40" + bytes(50), sport=443),
    b"\x00" * 20,                                # ethertype 0
]


def _capture(frames) -> list[bytes]:
    out = list(NOISE)
    for f in frames:
        out += [f] + _replies(f)
    return out + list(NOISE)


def _state(eng: Engine):
    def show(v):
        if v is DONE or v is True:
            return v
        if isinstance(v, quic.CryptoStream):
            return ("quic", v.keys, dict(v.chunks))
        if isinstance(v, int):                   # a SYN's stream start: a Reassembly with nothing yet
            return ("tcp", v, b"", {})
        return ("tcp", v.base, bytes(v.data), dict(v.pending))
    tables = [[(k, show(v)) for k, v in t.items()] for t in (eng.tcp, eng.quic, eng.udp)]
    return tables, eng.counts, eng.packets, eng.unparsed, list(eng.learned.per_client.items())


def _write(path, frames, times, kind):
    if kind == "pcap":
        packets = [Ether(f) for f in frames]
        for p, t in zip(packets, times):
            p.time = t
        wrpcap(str(path), packets)
    else:
        w = PcapNgWriter(str(path))
        for f, t in zip(frames, times):
            p = Ether(f)
            p.time = t
            w.write(p)
        w.close()


def test_the_cases_cover_every_detector():
    assert {d for _, want in CASES.values() for d in want} == set(DETECTORS)


@pytest.mark.parametrize("kind", ["pcap", "pcapng"])
@pytest.mark.parametrize("name", CASES)
def test_fast_path_and_reader_give_what_the_full_path_gives(tmp_path, kind, name):
    frames = _capture(CASES[name][0])
    times = [T0 + i * 0.01 for i in range(len(frames))]
    path = tmp_path / f"x.{kind}"
    _write(path, frames, times, kind)
    read = list(read_pcap(str(path)))
    assert [f for _, _, f in read] == frames and {lt for _, lt, _ in read} == {1}
    assert [round(t, 6) for t, _, _ in read] == [round(t, 6) for t in times]

    fast = engine(tmp_path, started=T0)
    full = engine(tmp_path, started=T0)
    full.triage = False
    fast_rows = fast.feed_all(read)             # one loop, observations reported in batches
    full_rows = [r for t, f in zip(times, frames) for r in full.feed(t, 1, f)]
    assert fast_rows == full_rows
    assert sorted(r["detector"] for r in fast_rows) == sorted(CASES[name][1])
    assert _state(fast) == _state(full)


def test_reader_matches_scapy_on_pcap_and_pcapng(tmp_path):
    frames = _capture(CASES["doh-sni split out of order"][0] + CASES["blocked-sni quic"][0])
    times = [T0 + i * 0.001 for i in range(len(frames))]
    for kind, reader in (("pcap", RawPcapReader), ("pcapng", RawPcapNgReader)):
        path = tmp_path / f"x.{kind}"
        _write(path, frames, times, kind)
        with reader(str(path)) as r:
            theirs = [bytes(f) for f, _ in r]
        assert [f for _, _, f in read_pcap(str(path))] == theirs == frames


def _pcapng_block(btype: int, body: bytes, endian: str = "<") -> bytes:
    body += bytes(-len(body) % 4)
    return struct.pack(endian + "II", btype, 12 + len(body)) + body + struct.pack(endian + "I", 12 + len(body))


def _option(code: int, value: bytes, endian: str = "<") -> bytes:
    return struct.pack(endian + "HH", code, len(value)) + value + bytes(-len(value) % 4)


@pytest.mark.parametrize("endian", ["<", ">"])
def test_pcapng_interfaces_resolution_offset_and_byte_order(tmp_path, endian):
    """Two interfaces (Ethernet at nanoseconds with a time offset, raw IP at 2^-10 s), enhanced,
    simple and obsolete packet blocks, an unknown block skipped; either byte order."""
    e = endian
    eth = udp(DESKTOP, "192.0.2.1", 53, b"q")
    raw = bytes(IP(src=DESKTOP, dst="192.0.2.1") / UDP(sport=1, dport=53) / b"r")
    shb = _pcapng_block(0x0A0D0D0A, struct.pack(e + "IHHq", 0x1A2B3C4D, 1, 0, -1), e)
    idb0 = _pcapng_block(1, struct.pack(e + "HHI", 1, 0, 65535) + _option(9, b"\x09", e)
                         + _option(14, struct.pack(e + "q", 100), e) + _option(0, b"", e), e)
    idb1 = _pcapng_block(1, struct.pack(e + "HHI", 101, 0, 65535) + _option(9, b"\x8a", e), e)
    ns = 5 * 10**9 + 250
    epb = _pcapng_block(6, struct.pack(e + "IIIII", 0, ns >> 32, ns & 0xFFFFFFFF, len(eth), len(eth)) + eth, e)
    epb1 = _pcapng_block(6, struct.pack(e + "IIIII", 1, 0, 3 * 1024, len(raw), len(raw)) + raw, e)
    spb = _pcapng_block(3, struct.pack(e + "I", len(eth)) + eth, e)
    opb = _pcapng_block(2, struct.pack(e + "HHIIII", 1, 0, 0, 1024, len(raw), len(raw)) + raw, e)
    other = _pcapng_block(0x0BAD, b"whatever", e)
    path = tmp_path / "x.pcapng"
    path.write_bytes(shb + idb0 + idb1 + epb + other + epb1 + spb + opb)
    got = list(read_pcap(str(path)))
    assert [(lt, f) for _, lt, f in got] == [(1, eth), (101, raw), (1, eth), (101, raw)]
    assert [round(t, 9) for t, _, _ in got] == [105.00000025, 3.0, 3.0, 1.0]


def test_nanosecond_and_big_endian_pcap(tmp_path):
    f = udp(DESKTOP, "192.0.2.1", 53, b"q")
    for magic, endian, frac, want in ((0xA1B23C4D, "<", 5, 7.000000005), (0xA1B2C3D4, ">", 5, 7.000005)):
        data = (struct.pack(endian + "IHHiIII", magic, 2, 4, 0, 0, 65535, 1)
                + struct.pack(endian + "IIII", 7, frac, len(f), len(f)) + f)
        (tmp_path / "x.pcap").write_bytes(data)
        assert [(round(t, 9), lt, fr) for t, lt, fr in read_pcap(str(tmp_path / "x.pcap"))] == [(want, 1, f)]


def test_records_longer_than_one_read(tmp_path):
    """Frames up to the largest snap length (262,144 bytes), many times the reader's read size,
    among small ones, in pcap and pcapng, with a large pcapng block that is not a packet."""
    from exporters.capture import _CHUNK
    small = udp(DESKTOP, "192.0.2.1", 53, b"q")
    frames = [small, small[:14] + bytes(3 * _CHUNK + 5), small, small[:14] + bytes((1 << 18) - 14), small]
    pcap = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 1 << 18, 1) + b"".join(
        struct.pack("<IIII", i, 0, len(f), len(f)) + f for i, f in enumerate(frames))
    (tmp_path / "x.pcap").write_bytes(pcap)
    shb = _pcapng_block(0x0A0D0D0A, struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1))
    idb = _pcapng_block(1, struct.pack("<HHI", 1, 0, 1 << 18))
    epbs = [_pcapng_block(6, struct.pack("<IIIII", 0, 0, i * 10**6, len(f), len(f)) + f) for i, f in enumerate(frames)]
    (tmp_path / "x.pcapng").write_bytes(shb + idb + epbs[0] + _pcapng_block(0x0BAD, bytes(5 * _CHUNK)) + b"".join(epbs[1:]))
    for name in ("x.pcap", "x.pcapng"):
        assert [(t, f) for t, _, f in read_pcap(str(tmp_path / name))] == [(float(i), f) for i, f in enumerate(frames)]


def test_damaged_captures_are_named_errors(tmp_path):
    f = udp(DESKTOP, "192.0.2.1", 53, b"q")
    good = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1) + struct.pack("<IIII", 1, 0, len(f), len(f)) + f
    cases = {"not.pcap": (b"hello world, not a capture", "not a pcap or pcapng file"),
             "cut.pcap": (good + good[24:-5], f"truncated record at byte {len(good)}"),
             "huge.pcap": (good + struct.pack("<IIII", 1, 0, 1 << 30, 1 << 30) + bytes(64), "claims"),
             "huge.pcapng": (_pcapng_block(0x0A0D0D0A, struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1))
                             + struct.pack("<II", 6, 1 << 30) + bytes(64), "bad pcapng block length"),
             "cut.pcapng": (_pcapng_block(0x0A0D0D0A, struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1))[:20],
                            "truncated block at byte 0")}
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CaptureError, match=message) as e:
            list(read_pcap(str(tmp_path / name)))
        assert name in str(e.value)
    got = []
    with pytest.raises(CaptureError):
        for record in read_pcap(str(tmp_path / "cut.pcap")):
            got.append(record)
    assert len(got) == 1                                                # what was readable came first


def _read_all(path) -> tuple[list, str | None]:
    got = []
    try:
        for record in read_pcap(str(path)):
            got.append(record)
    except CaptureError as e:
        return got, str(e).replace(str(path), "FILE")
    return got, None


def _read_through_a_pipe(tmp_path, data: bytes) -> tuple[list, str | None]:
    """_read_all of `data` written into a FIFO: the streamed reader (a regular file is mapped)."""
    import threading
    fifo = tmp_path / "pipe.pcap"
    os.mkfifo(fifo)

    def write():
        try:
            with open(fifo, "wb") as w:
                w.write(data)
        except BrokenPipeError:             # the reader stopped at an error
            pass
    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    try:
        return _read_all(fifo)
    finally:
        writer.join(10)
        fifo.unlink()


def test_mapped_and_streamed_pcap_reads_agree(tmp_path):
    """The same records, the same error at the same byte, from a file (memory map) and a pipe (reads):
    frames longer than a read, a record straddling reads at every offset, truncated and damaged files."""
    from exporters.capture import _CHUNK
    small = udp(DESKTOP, "192.0.2.1", 53, b"q")
    head = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 1 << 18, 1)
    frames = [small, small[:14] + bytes(3 * _CHUNK + 5), small, small[:14] + bytes((1 << 18) - 14), small]
    frames += [small + bytes(n) for n in range(0, 1500, 7)] * 30          # records across read ends
    records = b"".join(struct.pack("<IIII", i, 0, len(f), len(f)) + f for i, f in enumerate(frames))
    whole = head + records
    cases = [whole, whole[:-3], whole[:len(whole) // 2], whole[:24 + 10],
             head + struct.pack("<IIII", 1, 0, (1 << 18) + 1, 5) + bytes(300000),      # claims too much
             whole[:5000] + struct.pack("<IIII", 1, 0, 1 << 30, 1 << 30) + bytes(64)]
    for data in cases:
        (tmp_path / "x.pcap").write_bytes(data)
        mapped = _read_all(tmp_path / "x.pcap")
        assert _read_through_a_pipe(tmp_path, data) == mapped
        if data is whole:
            assert [f for _, _, f in mapped[0]] == frames and mapped[1] is None
        else:
            assert mapped[1] is not None and "FILE" in mapped[1]


def test_cli_reads_pcapng_and_refuses_a_damaged_capture(tmp_path):
    import yaml
    write_policy(tmp_path / "blocklists")
    (tmp_path / "sinkhole.yaml").write_text(yaml.safe_dump({
        "listen": [f"{RESOLVER}:53"], "upstreams": ["192.0.2.1"], "blocklists": "blocklists"}))
    frames = _capture(CASES["blocked-ip"][0])
    _write(tmp_path / "x.pcapng", frames, [T0 + i for i in range(len(frames))], "pcapng")
    (tmp_path / "bad.pcap").write_bytes(b"\xd4\xc3\xb2\xa1" + bytes(10))
    cmd = [sys.executable, "-m", "resolver", "sidecar", "-c", str(tmp_path / "sinkhole.yaml"), "--learning", "0"]
    out = subprocess.run(cmd + ["--pcap", str(tmp_path / "x.pcapng")], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert [line for line in out.stdout.splitlines() if '"blocked-ip"' in line] and "packets/s" in out.stderr
    bad = subprocess.run(cmd + ["--pcap", str(tmp_path / "bad.pcap")], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 1 and "bad.pcap" in bad.stderr and "truncated pcap header" in bad.stderr


def test_whole_capture_loop_on_the_bench_capture(tmp_path):
    """feed_all over read_pcap (the `--pcap` loop) on the benchmark's generated mixed capture: the
    reader returns every record, and the triaged loop leaves the same counts and flow state as
    the full path fed frame by frame; every ClientHello of the capture is read."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("sidecar_bench", ROOT / "bench" / "sidecar_bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    path = tmp_path / "mixed.pcap"
    counts = bench.write_capture(path, 3000, seed=11)
    read = list(read_pcap(str(path)))
    assert len(read) == counts["packets"] == 3000
    assert {lt for _, lt, _ in read} == {1}
    assert sum(16 + len(f) for _, _, f in read) + 24 == counts["bytes"]
    assert all(b > a for (a, _, _), (b, _, _) in zip(read, read[1:]))
    fast = engine(tmp_path, started=None)
    full = engine(tmp_path, started=None)
    full.triage = False
    fast_rows = fast.feed_all(read_pcap(str(path)))
    full_rows = [r for t, lt, f in read for r in full.feed(t, lt, f)]
    assert fast_rows == full_rows
    assert _state(fast) == _state(full)
    assert fast.packets == 3000 and fast.unparsed == 0
    assert sum(v is DONE for v in fast.tcp.values()) == counts["client_hello"] > 100
