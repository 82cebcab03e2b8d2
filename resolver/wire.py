"""DNS messages as bytes: parse a client's query, walk an upstream reply, build our own answers.

The per-query path never builds objects for records: a query is read once into a `Query`, answers
are assembled from bytes. Every reader here bounds its loops and raises `WireError` on bad input.
"""
from __future__ import annotations

import functools
import ipaddress
import struct
from dataclasses import dataclass
from typing import NamedTuple

# RR types and classes we name
A, NS, CNAME, SOA, PTR, MX, TXT, AAAA, SRV, OPT, SVCB, HTTPS = 1, 2, 5, 6, 12, 15, 16, 28, 33, 41, 64, 65
HINFO, IXFR, AXFR, ANY = 13, 251, 252, 255
IN = 1
NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED = 0, 1, 2, 3, 4, 5
RCODE_NAMES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED",
               16: "BADVERS"}
QTYPE_NAMES = {1: "A", 2: "NS", 5: "CNAME", 6: "SOA", 12: "PTR", 13: "HINFO", 15: "MX", 16: "TXT",
               28: "AAAA", 33: "SRV", 41: "OPT", 64: "SVCB", 65: "HTTPS", 251: "IXFR", 252: "AXFR",
               255: "ANY", 43: "DS", 48: "DNSKEY", 257: "CAA", 99: "SPF", 35: "NAPTR"}

QR, AA, TC, RD, RA, AD, CD = 0x8000, 0x0400, 0x0200, 0x0100, 0x0080, 0x0020, 0x0010
OUR_UDP_SIZE = 1232            # DNS flag day 2020: avoids IP fragmentation
ECS_OPTION = 8

_H = struct.Struct("!HHHHHH")
_RR = struct.Struct("!HHIH")
_TTL = struct.Struct("!I")


class WireError(Exception):
    """A message we cannot use. `rcode` is what to answer with, or None to drop it silently."""

    def __init__(self, message: str, rcode: int | None = FORMERR):
        super().__init__(message)
        self.rcode = rcode


class Query(NamedTuple):
    """A client's query, read once. A tuple of plain values: the garbage collector does not track
    it, so memoising many of them (core.begin) costs no collection time."""

    id: int
    flags: int
    qname: str            # lower case, no trailing dot ("" for the root)
    question: bytes       # the question section exactly as the client sent it
    key: bytes            # the question in lower case: the cache key
    qtype: int
    qclass: int
    edns: int | None      # the client's EDNS UDP size, None without EDNS
    do: bool = False
    ecs: tuple | None = None    # (ip address string, source prefix length) from an ECS option

    @property
    def max_udp(self) -> int:
        return 512 if self.edns is None else max(512, min(self.edns, 4096))


def read_name(data: bytes, offset: int) -> tuple[str, int]:
    """Decode a possibly compressed name at `offset`: (lower-case name, offset after it)."""
    labels = []
    end = None
    jumps = 0
    total = 0
    n = len(data)
    while True:
        if offset >= n:
            raise WireError("name runs past the end of the message")
        length = data[offset]
        if length & 0xC0 == 0xC0:
            if offset + 1 >= n:
                raise WireError("truncated compression pointer")
            if end is None:
                end = offset + 2
            target = ((length & 0x3F) << 8) | data[offset + 1]
            jumps += 1
            if jumps > 64 or target >= offset:
                raise WireError("compression pointer loop")
            offset = target
            continue
        if length & 0xC0:
            raise WireError("reserved label type")
        offset += 1
        if length == 0:
            break
        total += length + 1
        if total > 255:
            raise WireError("name longer than 255 bytes")
        if offset + length > n:
            raise WireError("label runs past the end of the message")
        labels.append(data[offset:offset + length])
        offset += length
    name = ".".join(_label_text(l) for l in labels)
    return name, (end if end is not None else offset)


def _label_text(label: bytes) -> str:
    text = label.decode("latin-1").lower()
    if "." in text or "\\" in text:
        text = text.replace("\\", "\\\\").replace(".", "\\.")
    return text


def parse_query(data: bytes) -> Query:
    """Read a client's query. Raises WireError with the rcode to answer, or rcode None to drop."""
    if len(data) < 12:
        raise WireError("shorter than a DNS header", None)
    qid, flags, qdcount, ancount, nscount, arcount = _H.unpack_from(data)
    if flags & QR:
        raise WireError("a response, not a query", None)   # never answer: no reflection loops
    if (flags >> 11) & 0xF != 0:
        raise WireError("opcode not implemented", NOTIMP)
    if qdcount != 1:
        raise WireError(f"QDCOUNT is {qdcount}, not 1")
    # the question: uncompressed labels only
    offset = 12
    n = len(data)
    labels = []
    while True:
        if offset >= n:
            raise WireError("question runs past the end of the message")
        length = data[offset]
        offset += 1
        if length == 0:
            break
        if length > 63:
            raise WireError("compressed or bad label in the question")
        if offset + length > n:
            raise WireError("label runs past the end of the message")
        labels.append(data[offset:offset + length])
        offset += length
        if offset - 12 > 255:
            raise WireError("name longer than 255 bytes")
    if offset + 4 > n:
        raise WireError("question has no type and class")
    qtype, qclass = struct.unpack_from("!HH", data, offset)
    end = offset + 4
    question = data[12:end]
    key = question_key(question)
    raw = b".".join(labels)
    if raw.count(b".") == len(labels) - 1 and b"\\" not in raw:
        qname = raw.decode("latin-1").lower()       # the common case: no dot or backslash in a label
    else:
        qname = ".".join(_label_text(l) for l in labels)
    if ancount or nscount:
        raise WireError("a query with answer or authority records")
    edns = None
    do = False
    ecs = None
    offset = end
    for _ in range(arcount):
        if arcount > 8:
            raise WireError("too many additional records")
        owner_at = offset
        _, offset = read_name(data, offset)
        if offset + 10 > n:
            raise WireError("additional record runs past the end")
        rtype, rclass, ttl, rdlen = _RR.unpack_from(data, offset)
        root_owned = offset == owner_at + 1
        rdata_at = offset + 10
        offset = rdata_at + rdlen
        if offset > n:
            raise WireError("additional record data runs past the end")
        if rtype != OPT:
            continue
        if edns is not None:
            raise WireError("more than one OPT record")
        if not root_owned:
            raise WireError("OPT record not owned by the root")
        version = (ttl >> 16) & 0xFF
        edns = max(512, rclass)
        do = bool(ttl & 0x8000)
        if version != 0:
            raise EdnsVersionError(qid, flags, question, edns)
        ecs = _read_ecs(data, rdata_at, offset)
    return Query(qid, flags, qname, question, key, qtype, qclass, edns, do, ecs)


def question_key(question: bytes) -> bytes:
    """The question with its name in lower case; type and class kept as sent (bytes.lower()
    on the whole question would turn type 65, HTTPS, into 97)."""
    return question[:-4].lower() + question[-4:]


class EdnsVersionError(WireError):
    """EDNS version other than 0: answered BADVERS (RFC 6891 6.1.3)."""

    def __init__(self, qid, flags, question, edns):
        super().__init__("unsupported EDNS version", FORMERR)
        self.query = Query(qid, flags, "", question, question_key(question), 0, 0, edns)


def _read_ecs(data: bytes, start: int, end: int):
    offset = start
    while offset + 4 <= end:
        code, length = struct.unpack_from("!HH", data, offset)
        offset += 4
        if offset + length > end:
            raise WireError("EDNS option runs past the OPT record")
        if code == ECS_OPTION:
            if length < 4:
                raise WireError("short ECS option")
            family, source, _scope = struct.unpack_from("!HBB", data, offset)
            raw = data[offset + 4: offset + length]
            size = 4 if family == 1 else 16 if family == 2 else 0
            if not size or source > size * 8 or len(raw) != (source + 7) // 8:
                raise WireError("malformed ECS option")
            addr = raw + bytes(size - len(raw))
            return str(ipaddress.ip_address(addr)), source
        offset += length
    return None


# -- our own answers ---------------------------------------------------------------------------

def _opt(udp_size: int = OUR_UDP_SIZE, ext_rcode: int = 0) -> bytes:
    return b"\x00" + struct.pack("!HHIH", OPT, udp_size, ext_rcode << 24, 0)


def header(query: Query, rcode: int, an: int = 0, ns: int = 0, ar: int = 0, extra: int = 0) -> bytes:
    flags = QR | RA | (query.flags & (RD | CD)) | extra | (rcode & 0xF)
    return _H.pack(query.id, flags, 1, an, ns, ar)


def error_reply(query: Query, rcode: int) -> bytes:
    """An answer with no records: FORMERR, SERVFAIL, REFUSED, NOTIMP, or BADVERS (16)."""
    edns = query.edns is not None
    return header(query, rcode & 0xF, ar=int(edns)) + query.question + (_opt(ext_rcode=rcode >> 4) if edns else b"")


def formerr_for(data: bytes) -> bytes | None:
    """FORMERR for a message we could not parse, echoing its ID; None when none is safe."""
    if len(data) < 12 or data[2] & 0x80:
        return None
    qid, flags = struct.unpack_from("!HH", data)
    return _H.pack(qid, QR | RA | (flags & (RD | 0x7800)) | FORMERR, 0, 0, 0, 0)


@functools.lru_cache(maxsize=64)
def soa_record(ttl: int) -> bytes:
    rdata = (b"\x08sinkhole\x07invalid\x00" + b"\x0ahostmaster\x08sinkhole\x07invalid\x00"
             + struct.pack("!IIIII", 1, 3600, 600, 86400, ttl))
    return b"\xc0\x0c" + _RR.pack(SOA, IN, ttl, len(rdata)) + rdata


def address_record(rtype: int, packed: bytes, ttl: int) -> bytes:
    return b"\xc0\x0c" + _RR.pack(rtype, IN, ttl, len(packed)) + packed


_NULL = {A: b"\x00" * 4, AAAA: b"\x00" * 16}


def block_reply(query: Query, response: str, ttl: int, sinkhole_a=(), sinkhole_aaaa=()) -> bytes:
    """The block answer for any query type: no address hint leaks (HTTPS/SVCB get no data)."""
    edns = query.edns is not None
    opt = _opt() if edns else b""
    if response == "refused":
        return error_reply(query, REFUSED)
    answers = []
    if response == "null" and query.qtype in _NULL:
        answers = [address_record(query.qtype, _NULL[query.qtype], ttl)]
    elif response == "sinkhole" and query.qtype in (A, AAAA):
        addrs = sinkhole_a if query.qtype == A else sinkhole_aaaa
        answers = [address_record(query.qtype, ipaddress.ip_address(a).packed, ttl) for a in addrs]
    if answers:
        return header(query, NOERROR, an=len(answers), ar=int(edns)) + query.question + b"".join(answers) + opt
    rcode = NXDOMAIN if response == "nxdomain" else NOERROR
    return header(query, rcode, ns=1, ar=int(edns)) + query.question + soa_record(ttl) + opt


def hinfo_reply(query: Query, ttl: int = 3600) -> bytes:
    """RFC 8482: a minimal answer to ANY instead of everything we know."""
    rdata = b"\x07RFC8482\x00"
    rr = b"\xc0\x0c" + _RR.pack(HINFO, IN, ttl, len(rdata)) + rdata
    edns = query.edns is not None
    return header(query, NOERROR, an=1, ar=int(edns)) + query.question + rr + (_opt() if edns else b"")


def truncate(reply: bytes, limit: int) -> bytes:
    """A reply that fits `limit`: as is, or header + question with TC set (the client retries on TCP)."""
    if len(reply) <= limit:
        return reply
    qid, flags, qd, an, ns, ar = _H.unpack_from(reply)
    end = 12
    if qd:
        _, end = read_name(reply, 12)
        end += 4
    # RFC 6891 7: the OPT record stays in a truncated answer to an EDNS client (it is always last)
    opt = reply[-11:] if ar and len(reply) >= end + 11 and reply[-11] == 0 and reply[-10:-8] == b"\x00\x29" else b""
    return _H.pack(qid, flags | TC, qd, 0, 0, int(bool(opt))) + reply[12:end] + opt


def make_query(qid: int, question: bytes, rd: bool = True, cd: bool = False, do: bool = False) -> bytes:
    """A query to an upstream: our own ID, the question, EDNS with our UDP size."""
    flags = (RD if rd else 0) | (CD if cd else 0)
    opt = b"\x00" + struct.pack("!HHIH", OPT, OUR_UDP_SIZE, 0x8000 if do else 0, 0)
    return _H.pack(qid, flags, 1, 0, 0, 1) + question + opt


# -- upstream replies --------------------------------------------------------------------------

@dataclass(slots=True)
class Reply:
    """An upstream reply read once: enough to check it, cache it and re-check its CNAMEs."""

    rcode: int
    flags: int
    body: bytes                 # answer + authority + additional, without the OPT record
    counts: tuple[int, int, int]
    ttl_offsets: tuple[int, ...]   # offsets of each TTL inside body
    ttl: int | None             # how long it may be cached (positive: min TTL; negative: RFC 2308)
    cnames: tuple[str, ...]     # targets of CNAMEs in the answer section
    question_len: int


def parse_reply(data: bytes, question_key: bytes, qid: int) -> Reply:
    """Check an upstream reply matches what we asked, and read it. Raises WireError."""
    if len(data) < 12:
        raise WireError("reply shorter than a header")
    rid, flags, qd, an, ns, ar = _H.unpack_from(data)
    if rid != qid:
        raise WireError("reply ID does not match")
    if not flags & QR:
        raise WireError("not a response")
    if qd != 1:
        raise WireError("reply does not echo one question")
    qend = 12 + len(question_key)
    if len(data) < qend or data[12:qend - 4].lower() + data[qend - 4:qend] != question_key:
        raise WireError("reply is for another question")
    rcode = flags & 0xF
    offset = qend
    body_parts = []
    ttl_offsets = []
    cnames = []
    min_ttl = None
    soa_ttl = None
    kept = [0, 0, 0]
    n = len(data)
    body_len = 0
    for section, count in enumerate((an, ns, ar)):
        if count > 512:
            raise WireError("too many records")
        for _ in range(count):
            start = offset
            _, offset = read_name(data, offset)
            if offset + 10 > n:
                raise WireError("record runs past the end")
            rtype, rclass, ttl, rdlen = _RR.unpack_from(data, offset)
            ttl_at = offset + 4
            rdata_at = offset + 10
            offset = rdata_at + rdlen
            if offset > n:
                raise WireError("record data runs past the end")
            if rtype == OPT:
                if offset != n:
                    raise WireError("OPT record is not last")   # we cut it; it must be last
                continue
            ttl &= 0x7FFFFFFF
            if section == 0:
                min_ttl = ttl if min_ttl is None else min(min_ttl, ttl)
                if rtype == CNAME:
                    cnames.append(read_name(data, rdata_at)[0])
            elif section == 1 and rtype == SOA:
                _, p = read_name(data, rdata_at)
                _, p = read_name(data, p)
                if p + 20 > n:
                    raise WireError("short SOA")
                minimum = struct.unpack_from("!I", data, p + 16)[0]
                soa_ttl = min(ttl, minimum)
            ttl_offsets.append(body_len + (ttl_at - start))
            body_parts.append(data[start:offset])
            body_len += offset - start
            kept[section] += 1
    body = b"".join(body_parts)
    if rcode == NOERROR and an and min_ttl is not None:
        cache_ttl = min_ttl
    elif rcode in (NOERROR, NXDOMAIN):
        cache_ttl = soa_ttl         # RFC 2308: no SOA, no negative caching
    else:
        cache_ttl = None
    return Reply(rcode, flags, body, tuple(kept), tuple(ttl_offsets), cache_ttl, tuple(cnames), len(question_key))


def age_ttls(buf: bytearray, base: int, reply: Reply, age: int, ttl_cap: int | None = None) -> None:
    """Write `reply`'s TTLs, each reduced by `age` seconds (never below 0) and capped at `ttl_cap`,
    into `buf`, whose byte `base` is where reply.body starts (0: a copy of the body itself)."""
    body = reply.body
    for off in reply.ttl_offsets:
        ttl = _TTL.unpack_from(body, off)[0] - age
        if ttl_cap is not None and ttl > ttl_cap:
            ttl = ttl_cap
        _TTL.pack_into(buf, base + off, ttl if ttl > 0 else 0)


def build_reply(query: Query, reply: Reply, age: int = 0, ttl_cap: int | None = None) -> bytes:
    """Our answer to `query` from an upstream reply: the client's ID, question and EDNS; TTLs
    reduced by `age` seconds and capped at `ttl_cap`."""
    body = reply.body
    if age or ttl_cap is not None:
        buf = bytearray(body)
        age_ttls(buf, 0, reply, age, ttl_cap)
        body = bytes(buf)
    an, ns, ar = reply.counts
    edns = query.edns is not None
    flags = QR | RA | (query.flags & (RD | CD)) | (reply.flags & AD if query.do else 0) | reply.rcode
    return (_H.pack(query.id, flags, 1, an, ns, ar + edns) + query.question + body
            + (_opt() if edns else b""))
