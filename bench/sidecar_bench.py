"""The sidecar's throughput beside tshark's, on the same generated capture, in the same run; and
live capture in a pair of network namespaces under a bounded tcpreplay, kernel drops counted.

The capture (raw bytes, no scapy: a million packets in seconds) mixes TLS ClientHellos with SNI
(each after its SYN), QUIC Initial-like long-header datagrams to 443, DNS queries to 53 and
plain TCP segments. tshark extracts the SNIs (`-Y tls.handshake.extensions_server_name -T fields
-e tls.handshake.extensions_server_name`); its count must equal the ClientHellos written.

    python bench/sidecar_bench.py                        # 1,000,000 packets, `sinkhole sidecar`
    python bench/sidecar_bench.py --packets 200000 --no-live
    python bench/sidecar_bench.py --sidecar "sinkhole sidecar -c CONF --pcap {pcap}"
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import re
import shlex
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import workload as wl  # noqa: E402


# -- the capture -----------------------------------------------------------------------------------
def _csum(header: bytes) -> int:
    s = sum(struct.unpack(f"!{len(header) // 2}H", header))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def ipv4(src: bytes, dst: bytes, proto: int, payload: bytes) -> bytes:
    head = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0x4000, 64, proto, 0, src, dst)
    return head[:10] + struct.pack("!H", _csum(head)) + head[12:] + payload


def tcp(sport: int, dport: int, flags: int, payload: bytes = b"", seq: int = 1) -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, seq, 1 if flags & 0x10 else 0, 5 << 4, flags, 65535, 0, 0) + payload


def udp(sport: int, dport: int, payload: bytes) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def ether(ip_packet: bytes) -> bytes:
    return b"\x02\0\0\0\0\x02" + b"\x02\0\0\0\0\x01" + b"\x08\x00" + ip_packet


def client_hello(sni: str, rng: random.Random) -> bytes:
    name = sni.encode()
    sni_ext = struct.pack("!HHHBH", 0, len(name) + 5, len(name) + 3, 0, len(name)) + name
    versions = struct.pack("!HHB", 43, 3, 2) + b"\x03\x04"
    groups = struct.pack("!HHH", 10, 4, 2) + b"\x00\x1d"
    exts = sni_ext + versions + groups
    body = (b"\x03\x03" + rng.randbytes(32) + b"\x00" + struct.pack("!H", 4) + b"\x13\x01\x13\x02"
            + b"\x01\x00" + struct.pack("!H", len(exts)) + exts)
    hs = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + struct.pack("!H", len(hs)) + hs


def dns_query(name: str, qid: int) -> bytes:
    return (struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0)
            + b"".join(bytes([len(l)]) + l.encode() for l in name.split(".")) + b"\0\0\1\0\1")


def write_capture(path: Path, packets: int, seed: int = 5) -> dict:
    """A pcap (Ethernet) of `packets` frames; returns how many of each kind it holds."""
    rng = random.Random(seed)
    snis = [f"www{i}.{rng.choice(['example', 'chat', 'files', 'cdn'])}{i % 37}.test" for i in range(500)]
    snis[:3] = ["web.whatsapp.com", "drive.google.com", "dns.google"]
    clients = [bytes([10, 1, i // 250, 1 + i % 250]) for i in range(1000)]
    servers = [bytes([198, 51, 100, 1 + i % 250]) for i in range(250)] + [bytes([203, 0, 113, 1 + i % 250]) for i in range(250)]
    counts = {"syn": 0, "client_hello": 0, "quic": 0, "dns": 0, "tcp_data": 0}
    t = 1_700_000_000.0
    written = 0
    with open(path, "wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
        buf = []
        while written < packets:
            kind = rng.random()
            c, s, sport = rng.choice(clients), rng.choice(servers), rng.randrange(1024, 65535)
            if kind < 0.10 and written + 1 < packets:       # SYN (seq 1), then the ClientHello (seq 2: SYN + 1)
                frames = [ether(ipv4(c, s, 6, tcp(sport, 443, 0x02))),
                          ether(ipv4(c, s, 6, tcp(sport, 443, 0x18, client_hello(rng.choice(snis), rng), seq=2)))]
                counts["syn"] += 1
                counts["client_hello"] += 1
            elif kind < 0.15:                                  # QUIC long header (Initial) to 443
                payload = b"\xc3\x00\x00\x00\x01\x08" + rng.randbytes(8) + b"\x00" + rng.randbytes(1180)
                frames = [ether(ipv4(c, s, 17, udp(sport, 443, payload)))]
                counts["quic"] += 1
            elif kind < 0.30:                                  # DNS query to some resolver
                frames = [ether(ipv4(c, bytes([192, 0, 2, 53]), 17,
                                     udp(sport, 53, dns_query(rng.choice(snis), rng.randrange(65536)))))]
                counts["dns"] += 1
            else:                                              # plain TCP data to 80/8080/22
                frames = [ether(ipv4(c, s, 6, tcp(sport, rng.choice((80, 8080, 22)), 0x18, rng.randbytes(rng.choice((40, 200, 1000))))))]
                counts["tcp_data"] += 1
            for frame in frames:
                t += 0.00002
                sec = int(t)
                buf.append(struct.pack("<IIII", sec, int((t - sec) * 1e6), len(frame), len(frame)) + frame)
                written += 1
            if len(buf) >= 4096:
                f.write(b"".join(buf))
                buf.clear()
        f.write(b"".join(buf))
    counts["packets"] = written
    counts["bytes"] = path.stat().st_size
    return counts


# -- the two readers -----------------------------------------------------------------------------
def timed(cmd: list[str], timeout: float, stdout=subprocess.PIPE) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.monotonic()
    out = subprocess.run(cmd, stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=timeout, cwd=ROOT)
    return time.monotonic() - t0, out


def run_tshark(pcap: Path, timeout: float) -> dict:
    if shutil.which("tshark") is None:
        return {"skipped": "tshark not installed (Debian: tshark)"}
    cmd = ["tshark", "-n", "-r", str(pcap), "-Y", "tls.handshake.extensions_server_name", "-T", "fields",
           "-e", "tls.handshake.extensions_server_name"]
    elapsed, out = timed(cmd, timeout)
    names = [l for l in out.stdout.splitlines() if l.strip()]
    return {"seconds": round(elapsed, 2), "snis": len(names), "exit": out.returncode,
            "stderr": out.stderr[-300:] if out.returncode else ""}


def sidecar_command(template: str | None, pcap: Path, conf: Path) -> list[str]:
    if template:
        return [a.format(pcap=pcap, conf=conf) for a in shlex.split(template)]
    return [sys.executable, "-m", "resolver", "sidecar", "-c", str(conf), "--pcap", str(pcap), "--learning", "0"]


def sidecar_exists(template: str | None) -> str | None:
    """None when the sidecar command is there, else why not."""
    cmd = sidecar_command(template, Path("x"), Path("x"))
    probe = cmd[: cmd.index("--pcap")] if "--pcap" in cmd else cmd
    try:
        out = subprocess.run(probe[:4] + ["--help"] if not template else probe + ["--help"], capture_output=True,
                             text=True, timeout=60, cwd=ROOT)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"cannot run {probe[0]}: {e}"
    if out.returncode != 0 or "--pcap" not in out.stdout:
        return "`sinkhole sidecar` does not exist in this build (no --pcap in its help)"
    return None


def run_sidecar(cmd: list[str], timeout: float) -> dict:
    elapsed, out = timed(cmd, timeout, stdout=subprocess.DEVNULL)
    m = re.search(r"packets (\d+), unparsed (\d+)", out.stderr)
    result = {"seconds": round(elapsed, 2), "exit": out.returncode}
    if m:
        result["packets_seen"], result["unparsed"] = int(m.group(1)), int(m.group(2))
    # the sidecar's own account of its read loop: wall, CPU and (Linux) time spent waiting for a CPU
    m = re.search(r"read in ([\d.]+) s \(([\d.]+) s CPU(?:, ([\d.]+) s waiting for a CPU)?\)", out.stderr)
    if m:
        result["loop_seconds"], result["loop_cpu_seconds"] = float(m.group(1)), float(m.group(2))
        if m.group(3) is not None:
            result["cpu_wait_seconds"] = float(m.group(3))
    summary = [l for l in out.stderr.splitlines() if re.match(r"\S+\s+\d+\s+\d+\s+\d+$", l)]
    result["detector_lines"] = summary
    if out.returncode:
        result["stderr"] = out.stderr[-500:]
    return result


# -- live capture in namespaces ------------------------------------------------------------------
def live(cmd_template: str | None, conf: Path, pcap: Path, tmp: Path, pps: int, packets: int) -> dict:
    if os.geteuid() != 0:
        return {"skipped": "needs root (network namespaces)"}
    if shutil.which("tcpreplay") is None or shutil.which("ip") is None:
        return {"skipped": "needs tcpreplay and iproute2 (Debian)"}
    if cmd_template:
        return {"skipped": "live mode runs `sinkhole sidecar --iface`; not with a custom --sidecar command"}
    tag = f"{os.getpid() % 100000}{random.randrange(1000)}"
    ns_src, ns_cap = f"sbsrc{tag}", f"sbcap{tag}"
    veth_a, veth_b = f"sba{tag}"[:15], f"sbb{tag}"[:15]
    metrics_port = _free_port()

    def sh(*args, check=True):
        return subprocess.run(list(args), capture_output=True, text=True, timeout=30, check=check)
    proc = None
    try:
        sh("ip", "netns", "add", ns_src)
        sh("ip", "netns", "add", ns_cap)
        sh("ip", "link", "add", veth_a, "netns", ns_src, "type", "veth", "peer", "name", veth_b, "netns", ns_cap)
        for ns, dev in ((ns_src, veth_a), (ns_cap, veth_b)):
            sh("ip", "-n", ns, "link", "set", dev, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        log = open(tmp / "sidecar-live.log", "w")
        proc = subprocess.Popen(["ip", "netns", "exec", ns_cap, sys.executable, "-m", "resolver", "sidecar",
                                 "-c", str(conf), "--iface", veth_b, "--learning", "0",
                                 "--metrics", f"127.0.0.1:{metrics_port}", "--alerts", os.devnull],
                                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        for _ in range(600):
            if "capturing on" in (tmp / "sidecar-live.log").read_text() or proc.poll() is not None:
                break
            time.sleep(0.1)
        if proc.poll() is not None:
            return {"error": "sidecar exited: " + (tmp / "sidecar-live.log").read_text()[-500:]}
        t0 = time.monotonic()
        replay = sh("ip", "netns", "exec", ns_src, "tcpreplay", "-i", veth_a, f"--pps={pps}", f"--limit={packets}",
                    str(pcap), check=False) if packets / pps < 25 else None
        if replay is None:
            replay = subprocess.run(["ip", "netns", "exec", ns_src, "tcpreplay", "-i", veth_a, f"--pps={pps}",
                                     f"--limit={packets}", str(pcap)], capture_output=True, text=True,
                                    timeout=packets / pps + 60)
        replay_s = time.monotonic() - t0
        time.sleep(1.5)                          # the sidecar reads drop counters every 0.5 s
        metrics = _scrape(ns_cap, metrics_port)
        sent = re.search(r"Successful packets:\s+(\d+)", replay.stdout)
        return {"offered_pps": pps, "packets": packets, "replay_s": round(replay_s, 2),
                "sent": int(sent.group(1)) if sent else None,
                "captured": metrics.get("sinkhole_bypass_packets_total"),
                "kernel_drops": metrics.get("sinkhole_bypass_kernel_drops_total"),
                "tcpreplay": replay.stdout[-400:] if replay.returncode else ""}
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        for ns in (ns_src, ns_cap):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


def _scrape(ns: str, port: int) -> dict:
    out = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c",
                          f"import urllib.request;print(urllib.request.urlopen('http://127.0.0.1:{port}/metrics',"
                          " timeout=5).read().decode())"], capture_output=True, text=True, timeout=30)
    values = {}
    for line in out.stdout.splitlines():
        if line.startswith("sinkhole_bypass_") and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            base = name.split("{")[0]
            values[base] = values.get(base, 0) + float(value)
    return values


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--packets", type=int, default=1_000_000)
    p.add_argument("--sidecar", help="command template; {pcap} and {conf} are filled in "
                   "(default: sinkhole sidecar -c {conf} --pcap {pcap} --learning 0)")
    p.add_argument("--timeout", type=float, default=1200)
    p.add_argument("--no-live", action="store_true")
    p.add_argument("--live-pps", type=int, default=50_000)
    p.add_argument("--live-packets", type=int, default=500_000)
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args(argv)
    why = sidecar_exists(args.sidecar)
    if why:
        print(f"sidecar bench: skipped: {why}", file=sys.stderr)
        return 0
    tmp = Path(tempfile.mkdtemp(prefix="sinkhole-sidecar-bench-"))
    try:
        blocklists = wl.write_blocklists(tmp / "blocklists", wl.blocked_names(1000))
        conf = tmp / "sinkhole.yaml"
        conf.write_text(f"listen: ['127.0.0.1:5399']\nupstreams: ['127.0.0.1:5398']\nblocklists: {blocklists}\n")
        pcap = tmp / "mixed.pcap"
        t0 = time.monotonic()
        counts = write_capture(pcap, args.packets)
        print(f"capture: {counts} written in {time.monotonic() - t0:.1f} s", file=sys.stderr)
        result = {"started": datetime.datetime.now().strftime("%Y%m%d-%H%M%S"), "capture": counts,
                  "loadavg": Path("/proc/loadavg").read_text().split()[:3]}
        cmd = sidecar_command(args.sidecar, pcap, conf)
        # interleaved: sidecar, tshark, sidecar, tshark; the better of two each
        runs = {"sidecar": [], "tshark": []}
        for _ in range(2):
            runs["sidecar"].append(run_sidecar(cmd, args.timeout))
            runs["tshark"].append(run_tshark(pcap, args.timeout))
        for name, rs in runs.items():
            ok = [r for r in rs if "seconds" in r and not r.get("exit")]
            best = min(ok, key=lambda r: r["seconds"]) if ok else rs[-1]
            if "seconds" in best:
                best["pps"] = round(counts["packets"] / best["seconds"])
            best["all_seconds"] = [r.get("seconds") for r in rs]
            result[name] = best
        ts = result["tshark"]
        if "snis" in ts and ts["snis"] != counts["client_hello"]:
            ts["warning"] = f"tshark found {ts['snis']} SNIs, the capture holds {counts['client_hello']} ClientHellos"
        if not args.no_live:
            result["live"] = live(args.sidecar, conf, pcap, tmp, args.live_pps, args.live_packets)
        s, t = result["sidecar"], result["tshark"]
        lines = [f"Sidecar benchmark: {counts['packets']} packets ({counts['client_hello']} ClientHellos, "
                 f"{counts['quic']} QUIC, {counts['dns']} DNS, {counts['tcp_data'] + counts['syn']} plain TCP), "
                 f"load average {result['loadavg']}", "",
                 "| reader | seconds (best of 2) | packets/s | notes |", "|---|---:|---:|---|",
                 f"| sinkhole sidecar --pcap | {s.get('seconds')} | {s.get('pps')} | seen {s.get('packets_seen')}, "
                 f"unparsed {s.get('unparsed')}; read loop {s.get('loop_seconds')} s, {s.get('loop_cpu_seconds')} s CPU, "
                 f"{s.get('cpu_wait_seconds', '-')} s waiting for a CPU"
                 f"{' ERROR ' + s.get('stderr', '') if s.get('exit') else ''} |",
                 f"| tshark SNI extraction | {t.get('seconds', '-')} | {t.get('pps', '-')} | "
                 f"{t.get('snis', t.get('skipped'))} SNIs {t.get('warning', '')} |"]
        if s.get("pps") and t.get("pps"):
            lines.append(f"\nsidecar / tshark: {s['pps'] / t['pps']:.2f}x; target >= 200000 pps and >= tshark: "
                         f"{'met' if s['pps'] >= 200000 and s['pps'] >= t['pps'] else 'NOT met'}")
        if "live" in result:
            lv = result["live"]
            lines.append(f"\nLive (netns, tcpreplay): {json.dumps(lv)}")
        text = "\n".join(lines)
        print(text)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"sidecar-{result['started']}.json").write_text(json.dumps(result, indent=1))
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
