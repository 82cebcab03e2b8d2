"""The soak run: mixed load for --minutes with policy reloads, upstream failures and a stream of
malformed packets, all at once, against a real `sinkhole serve` on loopback.

    .venv/bin/python bench/soak.py --minutes 10

Passes when the server never crashed, every valid query got an answer, it exits cleanly on
SIGTERM, and its RSS grew by less than --max-growth-mb after warm-up. Prints the figures.
Needs dnsmasq (the upstreams). Every loop is bounded by the deadline.
"""
from __future__ import annotations

import argparse
import re
import json
import collections
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import dns.message  # noqa: E402
import dns.query  # noqa: E402
import yaml  # noqa: E402

from helpers import Dnsmasq, Sinkhole, TEST_POLICY, TEST_SERVICES, write_blocklists  # noqa: E402

UPSTREAM_RECORDS = ["--address=/example.test/192.0.2.10", "--address=/example.test/2001:db8::10", "--address=/chat.test/192.0.2.20",
                    "--address=/files.test/192.0.2.30", "--address=/doh.test/192.0.2.40"]   # doh.test: mobiles resolve it


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.sent = 0
        self.answered = 0
        self.unanswered: list[str] = []
        self.rcodes: Counter = Counter()
        self.malformed = 0
        self.reloads = 0
        self.upstream_kills = 0

    def add(self, name: str, rcode: int | None):
        with self.lock:
            self.sent += 1
            if rcode is None:
                self.unanswered.append(name)
            else:
                self.answered += 1
                self.rcodes[dns.rcode.to_text(rcode)] += 1


def client(server, stats: Stats, deadline: float, seed: int, stop: threading.Event):
    """Closed-loop load from one client address: popular names (cache), unique names (upstream),
    blocked names, ANY; one query in eight over TCP."""
    rng = random.Random(seed)
    source = f"127.0.{1 if seed % 2 else 2}.{10 + seed}"        # desktops and mobiles
    n = 0
    while time.monotonic() < deadline and not stop.is_set():
        n += 1
        kind = rng.random()
        if kind < 0.5:
            name, rdtype = f"popular{rng.randrange(200)}.example.test", "A"
        elif kind < 0.8:
            name, rdtype = f"u{seed}-{n}.example.test", rng.choice(["A", "AAAA"])
        elif kind < 0.95:
            name, rdtype = rng.choice(["www.chat.test", "file-abc.files.test", "doh.test", "help.chat.test"]), "A"
        else:
            name, rdtype = "any.example.test", "ANY"
        query = dns.message.make_query(name, rdtype)
        rcode = None
        for _attempt in range(3):          # a real stub retries a lost UDP datagram
            try:
                if rng.random() < 0.125:
                    reply = dns.query.tcp(query, server.host, port=server.port, timeout=3, source=source)
                else:
                    reply = dns.query.udp(query, server.host, port=server.port, timeout=2, source=source)
                    if reply.flags & dns.flags.TC:
                        reply = dns.query.tcp(query, server.host, port=server.port, timeout=3, source=source)
                rcode = reply.rcode()
                break
            except (dns.exception.Timeout, OSError, EOFError, dns.exception.FormError):
                continue
        stats.add(name, rcode)


def malformed(server, stats: Stats, deadline: float, stop: threading.Event, per_second: int):
    rng = random.Random(1)
    good = dns.message.make_query("m.example.test", "A").to_wire()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.2.250", 0))
        s.setblocking(False)
        while time.monotonic() < deadline and not stop.is_set():
            for _ in range(per_second // 10):
                if rng.random() < 0.5:
                    packet = bytearray(good)
                    for _ in range(rng.randint(1, 5)):
                        packet[rng.randrange(len(packet))] = rng.randrange(256)
                    if rng.random() < 0.3:
                        packet[2] |= 0x80                       # QR set: must never be answered
                else:
                    packet = rng.randbytes(rng.randint(0, 300))
                try:
                    s.sendto(bytes(packet), (server.host, server.port))
                except OSError:
                    pass
                stats.malformed += 1
            try:                                                # drain answers (FORMERR etc.)
                while s.recv(65535):
                    pass
            except (BlockingIOError, OSError):
                pass
            stop.wait(0.1)                                      # paces the stream


def reloader(server, lists: Path, stats: Stats, deadline: float, stop: threading.Event, every: float):
    """Flip the mobile group between blocking nothing and blocking chat, by SIGHUP and by the poll;
    one reload in five is a broken file, which must be rejected while the old policy stays."""
    flip = False
    n = 0
    while not stop.wait(every) and time.monotonic() < deadline:
        n += 1
        if n % 5 == 0:
            (lists / "policy.yaml").write_text("groups: [broken\n")
        else:
            flip = not flip
            policy = yaml.safe_load(yaml.safe_dump(TEST_POLICY))
            policy["groups"]["mobile"]["block"] = ["chat"] if flip else []
            (lists / "policy.yaml").write_text(yaml.safe_dump(policy))
        if n % 2:
            server.proc.send_signal(signal.SIGHUP)
        stats.reloads += 1


def upstream_killer(upstream: Dnsmasq, stats: Stats, deadline: float, stop: threading.Event, every: float):
    """Kill the first upstream and bring it back, again and again: failover to the second."""
    while not stop.wait(every) and time.monotonic() < deadline:
        upstream.proc.kill()
        upstream.proc.wait()
        stats.upstream_kills += 1
        if stop.wait(every / 2):
            return
        upstream.proc = subprocess.Popen(upstream.proc.args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--malformed-rate", type=int, default=500, help="malformed packets per second")
    parser.add_argument("--reload-every", type=float, default=5.0)
    parser.add_argument("--kill-every", type=float, default=10.0)
    parser.add_argument("--max-growth-mb", type=float, default=40.0)
    args = parser.parse_args()
    stats = Stats()
    stop = threading.Event()
    with tempfile.TemporaryDirectory(prefix="sinkhole-soak-") as tmp:
        tmp = Path(tmp)
        lists = write_blocklists(tmp / "blocklists", TEST_POLICY, TEST_SERVICES)
        with Dnsmasq(UPSTREAM_RECORDS) as flaky, Dnsmasq(UPSTREAM_RECORDS) as steady, \
             Sinkhole(tmp, {"upstreams": [flaky.address, steady.address], "blocklists": str(lists),
                            "upstream_timeout": 0.5, "reload_interval": 2,
                            "cache": {"size": 5000, "serve_stale": 60},
                            "query_log": {"target": str(tmp / "queries.jsonl"), "max_bytes": 5_000_000,
                                          "backups": 2, "queue": 10000},
                            "tcp": {"max_connections": 64, "idle_timeout": 5}}) as server:
            pid = server.proc.pid
            started = time.monotonic()
            deadline = started + args.minutes * 60
            threads = [threading.Thread(target=client, args=(server, stats, deadline, i, stop), daemon=True)
                       for i in range(args.clients)]
            threads += [
                threading.Thread(target=malformed, args=(server, stats, deadline, stop, args.malformed_rate), daemon=True),
                threading.Thread(target=reloader, args=(server, lists, stats, deadline, stop, args.reload_every), daemon=True),
                threading.Thread(target=upstream_killer, args=(flaky, stats, deadline, stop, args.kill_every), daemon=True),
            ]
            for t in threads:
                t.start()
            samples = []          # (seconds since start, RSS kB)
            crashed = False
            while time.monotonic() < deadline:
                if server.proc.poll() is not None:
                    crashed = True
                    break
                samples.append((time.monotonic() - started, rss_kb(pid)))
                stop.wait(min(5.0, max(0.1, deadline - time.monotonic())))
            stop.set()
            for t in threads:
                t.join(15)
            alive = server.proc.poll() is None
            if alive:
                samples.append((time.monotonic() - started, rss_kb(pid)))
                server.proc.send_signal(signal.SIGTERM)
                try:
                    exit_code = server.proc.wait(20)
                except subprocess.TimeoutExpired:
                    server.proc.kill()
                    exit_code = "hung on SIGTERM"
            else:
                exit_code = server.proc.returncode
            server.wait_for_log(lambda: True, 1, "log")
            tracebacks = sum("Traceback" in l for l in server.lines)
            if tracebacks:
                at = next(i for i, l in enumerate(server.lines) if "Traceback" in l)
                print("\n".join(server.lines[max(0, at - 2):at + 30]))
            loaded = server.count("loaded (was")
            rejected = server.count("reload rejected")
            servfail = servfail_causes(tmp)
    warm = [kb for t, kb in samples if t >= min(60.0, args.minutes * 60 * 0.2)] or [kb for _, kb in samples]
    growth_mb = (warm[-1] - warm[0]) / 1024 if warm else 0.0
    elapsed = time.monotonic() - started
    print(f"soak: {elapsed / 60:.1f} minutes, {args.clients} clients, pid {pid}")
    print(f"  valid queries: {stats.sent} sent, {stats.answered} answered, {len(stats.unanswered)} unanswered "
          f"({stats.sent / elapsed:.0f}/s); rcodes {dict(stats.rcodes)}")
    print(f"  malformed packets: {stats.malformed}; reloads: {stats.reloads} attempted, {loaded} new policies "
          f"loaded, {rejected} rejected; upstream kills: {stats.upstream_kills}")
    print(f"  RSS: start {samples[0][1] / 1024:.1f} MB, after warm-up {warm[0] / 1024:.1f} MB, "
          f"end {warm[-1] / 1024:.1f} MB, max {max(kb for _, kb in samples) / 1024:.1f} MB; "
          f"growth after warm-up {growth_mb:+.1f} MB (limit {args.max_growth_mb} MB)")
    print(f"  crashed: {crashed}; tracebacks in log: {tracebacks}; exit on SIGTERM: {exit_code}")
    if servfail:
        print("  SERVFAIL answers by (group, name, qtype, decision), from the query log: "
              + ", ".join(f"{k}: {v}" for k, v in servfail.most_common(6)))
    failures = []
    if crashed or not alive:
        failures.append("the server died")
    if stats.unanswered:
        failures.append(f"{len(stats.unanswered)} valid queries unanswered, e.g. {stats.unanswered[:5]}")
    if tracebacks:
        failures.append("tracebacks in the server log")
    if exit_code != 0:
        failures.append(f"exit on SIGTERM: {exit_code}")
    if growth_mb > args.max_growth_mb:
        failures.append(f"RSS grew {growth_mb:.1f} MB")
    if stats.answered == 0 or loaded == 0 or rejected == 0:
        failures.append("the soak did not exercise answers, reloads and rejected reloads")
    print("soak " + ("FAILED: " + "; ".join(failures) if failures else "ok"))
    return 1 if failures else 0


def servfail_causes(tmp: Path) -> collections.Counter:
    """What the SERVFAIL answers were for, read from the server's own query log."""
    causes = collections.Counter()
    for path in tmp.glob("queries.jsonl*"):
        with path.open(errors="replace") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if row.get("rcode") == "SERVFAIL":
                    name = re.sub(r"^u\d+-\d+\.", "u*.", row.get("qname") or "")
                    causes[(row.get("group"), name, row.get("qtype"), row.get("decision"))] += 1
    return causes


if __name__ == "__main__":
    sys.exit(main())
