"""The floor of a Python DNS server on this machine, a reference for the benchmark (not a product,
not a competitor): one UDP socket, blocking recvfrom/sendto, a set of blocked names as wire-format
bytes (NXDOMAIN for the name and every name below it, whoever asks), and a cache keyed by the query
bytes after the 2-byte ID holding the reply minus its ID, filled by a blocking forward to the
upstream on a miss. No policy, no metrics, no log, no TTLs: what is left is the cost of Python
moving packets.

    python bench/pyraw.py --port 5300 --upstream 127.0.0.1:5301 --list names.txt [--list more.txt]

A list file has one name per line ('#' comments and blank lines skipped)."""
from __future__ import annotations

import argparse
import socket
import sys

NXDOMAIN = 3
SERVFAIL = 2


def wire_name(name: str) -> bytes:
    """'cdn.Example.com' -> b'\\x03cdn\\x07example\\x03com\\x00' (lower case)."""
    labels = name.strip().rstrip(".").lower().encode("ascii").split(b".")
    return b"".join(bytes([len(l)]) + l for l in labels) + b"\0"


def load_names(paths: list[str]) -> frozenset[bytes]:
    names = set()
    for path in paths:
        with open(path, encoding="ascii") as f:
            for line in f:
                line = line.split("#", 1)[0].strip()
                if line:
                    names.add(wire_name(line))
    return frozenset(names)


def question_end(data: bytes) -> int | None:
    """Offset just past QNAME in a plain query (QR clear, opcode 0, one question, no compression);
    None for anything else."""
    if len(data) < 17 or data[2] & 0xF8 or data[4:6] != b"\0\1":
        return None
    i, end = 12, len(data)
    for _ in range(128):
        n = data[i]
        if n == 0:
            return i + 1 if i + 5 <= end else None
        if n > 63 or i + 1 + n >= end:
            return None
        i += 1 + n
    return None


def is_blocked(qname: bytes, blocked: frozenset[bytes]) -> bool:
    """The name or any parent of it in the set (qname is lower-cased wire format)."""
    i = 0
    for _ in range(128):
        if qname[i:] in blocked:
            return True
        n = qname[i]
        if n == 0:
            return False
        i += 1 + n
    return False


def refusal(data: bytes, qend: int, rcode: int) -> bytes:
    """The query's ID and question, QR and RA set, RD copied, no records, `rcode`."""
    return (data[:2] + bytes([0x80 | (data[2] & 0x01), 0x80 | rcode]) + b"\0\1\0\0\0\0\0\0"
            + data[12:qend + 4])


class Forwarder:
    """A blocking forward on one connected socket; stale replies (an earlier timeout's) skipped."""

    def __init__(self, host: str, port: int, timeout: float):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.connect((host, port))
        self.sock.settimeout(timeout)

    def ask(self, data: bytes, qend: int) -> bytes | None:
        self.sock.send(data)
        for _ in range(16):
            try:
                reply = self.sock.recv(65535)
            except OSError:
                return None
            if len(reply) >= qend + 4 and reply[:2] == data[:2] and reply[12:qend + 4] == data[12:qend + 4]:
                return reply
        return None


def serve(sock: socket.socket, blocked: frozenset[bytes], upstream: Forwarder, cache_size: int) -> None:
    cache: dict[bytes, bytes] = {}
    recvfrom, sendto, get = sock.recvfrom, sock.sendto, cache.get
    while True:
        data, addr = recvfrom(4096)
        hit = get(data[2:])
        if hit is not None:
            sendto(data[:2] + hit, addr)
            continue
        qend = question_end(data)
        if qend is None:                                    # not a plain query: no answer
            continue
        if is_blocked(data[12:qend].lower(), blocked):
            sendto(refusal(data, qend, NXDOMAIN), addr)
            continue
        reply = upstream.ask(data, qend)
        if reply is None:
            sendto(refusal(data, qend, SERVFAIL), addr)
            continue
        if not reply[2] & 0x02 and reply[3] & 0x0F in (0, NXDOMAIN):     # not truncated, answer
            if len(cache) >= cache_size:
                del cache[next(iter(cache))]                              # the oldest entry
            cache[data[2:]] = reply[2:]
        sendto(reply, addr)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--listen", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", required=True, help="HOST:PORT")
    p.add_argument("--list", action="append", default=[], help="a file of blocked names (repeatable)")
    p.add_argument("--cache-size", type=int, default=10_000)
    p.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for the upstream")
    args = p.parse_args(argv)
    host, _, port = args.upstream.rpartition(":")
    blocked = load_names(args.list)
    upstream = Forwarder(host, int(port), args.timeout)
    # bound only once the list is in: the harness's first answer marks "loaded"
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((args.listen, args.port))
    print(f"pyraw: listening on {args.listen} port {args.port} ({len(blocked)} blocked names)", flush=True)
    try:
        serve(sock, blocked, upstream, args.cache_size)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
