"""The sidecar's engine and its I/O shell: frames -> packets -> observations -> findings -> alerts
and metrics; policy reloads (fingerprint poll + SIGHUP, last good policy kept); the live and pcap
loops. Per-flow state lives in bounded LRUs, so a flood of new flows evicts, never grows.
"""
from __future__ import annotations

import logging
import signal
import struct
import sys
import time
from itertools import islice
from operator import itemgetter
from typing import NamedTuple

from resolver.loader import PolicyError, load_policy
from resolver.policy import Policy

from . import quic
from .alerts import Alerts
from .detectors import DETECTORS, Learned, Settings, build_context, detect
from .lru import LRU
from .packets import (TCP, UDP, Observation, addresses, dns_addresses, dns_question, flow_key, locate,
                      observation)
from .tls import MAX_HELLO, Reassembly, TLSError, hello_from_records, looks_like_tls

log = logging.getLogger("sinkhole.sidecar")
DONE = object()             # a flow that needs no more looking at
UNREAD = object()           # a flow's state not looked up yet (observe looks it up)
HTTP_METHODS = (b"GET ", b"POST ", b"HEAD ")
HTTP_FIRST = frozenset(m[0] for m in HTTP_METHODS)
_HEAD = struct.Struct("!HBxH2xHxB10xHH").unpack_from     # Ethernet + IPv4 + ports, from byte 12
RUN = 512                   # frames handled together (see feed_all)
_FIRST = itemgetter(0)


class Answer(NamedTuple):
    """An address our resolver gave a client (an A or AAAA record read off the wire): learned
    in packet order, among the observations of the packets around it."""
    client: tuple[int, int]
    address: tuple[int, int]
    ttl: int
    time: float


class Engine:
    """Everything between a raw frame and an alert line. `now` is always the packet's time."""

    def __init__(self, policy: Policy, sanctioned: tuple[str, ...], alerts: Alerts, metrics=None,
                 settings: Settings = Settings(), started: float | None = None,
                 max_flows: int = 4096, max_quic: int = 2048, max_udp: int = 65536, enforce=None,
                 triage: bool = True):
        self.settings = settings
        self.triage = triage                # False: every packet takes the full path (the reference)
        self.enforce = enforce              # callable(alert row) or None (see exporters/enforce.py)
        self.sanctioned = sanctioned
        self.learned = Learned(settings)
        self.alerts = alerts
        self.metrics = metrics
        self.started = started
        self.policy = policy
        self.ctx = build_context(policy, sanctioned, self.learned, started or 0.0, settings)
        self.tcp = LRU(max_flows)           # flow -> stream start (int: SYN seen) | Reassembly | DONE
        self.quic = LRU(max_quic)           # flow -> quic.CryptoStream | DONE
        self.udp = LRU(max_udp)             # flow -> True (first datagram seen)
        self.counts = {d: [0, 0, 0] for d in DETECTORS}     # alerted, suppressed, counted only
        self.packets = self.unparsed = 0
        if metrics is not None:
            metrics.groups(policy.groups)

    def swap(self, policy: Policy) -> None:
        """A new policy snapshot: one new Context, learned state kept."""
        self.policy = policy
        self.ctx = build_context(policy, self.sanctioned, self.learned, self.started or 0.0, self.settings)
        if self.metrics is not None:
            self.metrics.groups(policy.groups)

    def flows(self) -> int:
        return len(self.tcp) + len(self.quic) + len(self.udp)

    # -- the processing order, once ----------------------------------------------------------
    def feed(self, when: float, linktype: int, frame: bytes) -> list[dict]:
        return self.feed_all(((when, linktype, frame),))

    def feed_all(self, frames) -> list[dict]:
        """Every (time, linktype, frame) of an iterable, in order; the alert rows they raised.

        Frames are taken RUN at a time (`feed_runs`: as they were read) and handled in three
        steps, each a tight loop over one kind of work (much faster than alternating kinds of work
        packet by packet):

        1. `_locate`: where each frame's headers are, and which flow table its packet can touch.
        2. `_observe`: per table, that table's packets in their order: the triage, then `observe`.
           A table is touched only by its own packets, so it sees what it saw packet by packet.
        3. `_report`: the observations, in packet order. Nothing `observe` reads (flow tables,
           the policy snapshot) is changed by reporting, and our resolver's answers are learned
           in their place among them (`Answer`), so no-dns sees what it saw packet by packet.

        What was read before the frames' iterable raised (a damaged capture) is handled before
        the error goes on."""
        rows = []
        frames = iter(frames)
        while True:
            n, found = self._run(islice(frames, RUN))
            rows += found
            if n < RUN:
                return rows

    def feed_runs(self, runs) -> list[dict]:
        """feed_all for frames that come in lists (capture.read_pcap_runs: one per read of the
        file), each handled as it comes: a pipe's frames are reported before the next read waits."""
        rows = []
        for run in runs:
            rows += self._run(run)[1]
        return rows

    def _run(self, frames) -> tuple[int, list[dict]]:
        """One run of frames through the three steps: (frames read, alert rows)."""
        tables = ([], [], [])
        try:
            n = self._locate(frames, tables)
        except Exception:
            self._report(self._observe(tables), self.ctx)
            raise
        return n, self._report(self._observe(tables), self.ctx)

    def _locate(self, frames, tables: tuple[list, list, list]) -> int:
        """Where things are in each frame (packets.locate), appended as (index, time, frame,
        location, source port, destination port, inline) to the list of the flow table its packet
        can touch: TCP, QUIC (UDP to 443), other UDP. Untagged Ethernet IPv4 without options is
        located inline, from one struct unpack of ethertype, IP version/IHL, total length,
        fragment field, protocol and ports (its flow_key is then bytes 26-38: addresses and ports
        back to back). Returns how many frames it read; unreadable ones are counted unparsed."""
        metrics = self.metrics
        tcp_packets, quic_packets, udp_packets = tables
        n = unparsed = 0
        started = self.started
        try:
            for n, (when, linktype, frame) in enumerate(frames, 1):
                if started is None:                    # a pcap: its first packet starts the clock
                    self.started = started = when
                    self.ctx = build_context(self.policy, self.sanctioned, self.learned, when, self.settings)
                inline = False
                if linktype == 1 and len(frame) >= 42:
                    ethertype, vihl, total, fragment, proto, sport, dport = _HEAD(frame, 12)
                    inline = (ethertype == 0x0800 and vihl == 0x45 and not fragment & 0x1FFF
                              and (proto == 6 or proto == 17))
                if inline:
                    end = 14 + total
                    size = len(frame)
                    if end > size:
                        end = size
                    data = 42
                    if proto == TCP:
                        if end < 54:
                            data = -1
                        else:
                            data = 34 + (frame[46] >> 4) * 4
                            if data < 54 or data > end:
                                data = -1
                    elif end < 42:
                        data = -1
                    at = None if data < 0 else (4, 14, proto, 34, data, end)
                else:
                    at = locate(frame, linktype)
                    if at is not None:
                        proto, p = at[2], at[3]
                        sport, dport = frame[p] << 8 | frame[p + 1], frame[p + 2] << 8 | frame[p + 3]
                if at is None:
                    unparsed += 1
                    continue
                packet = (n, when, frame, at, sport, dport, inline)
                if proto == TCP:
                    tcp_packets.append(packet)
                elif dport == 443:
                    quic_packets.append(packet)
                else:
                    udp_packets.append(packet)
        finally:
            self.packets += n
            self.unparsed += unparsed
            if metrics is not None:                 # counted once per run, not per frame
                metrics.packets.inc(n)
                metrics.unparsed.inc(unparsed)
        return n

    def _observe(self, tables: tuple[list, list, list]) -> list:
        """Each table's packets in order: the triage, then `observe` for those that may tell
        something; their observations (and answers), in packet order.

        Most packets need nothing: ACKs, mid-flow data of flows already read, server traffic,
        short-header QUIC, other UDP. For each, `observe`'s own tests, in its order, are read off
        header bytes before any object is built, and the flow's place in its table is refreshed
        as `observe` would (so state and eviction order stay the same). Only the rest goes to
        `observe`, which reads the frame's bytes too: no Packet object on either path."""
        tcp_packets, quic_packets, udp_packets = tables
        triage, observe, ctx = self.triage, self.observe, self.ctx
        tcp, quic_flows, udp_flows = self.tcp, self.quic, self.udp
        tcp_get, tcp_touch, quic_touch = dict.get, tcp.move_to_end, quic_flows.move_to_end
        found = []
        for i, when, frame, at, sport, dport, inline in tcp_packets:
            sift = triage and sport != 53                       # 53: maybe our resolver's answer
            if sift:
                _, _, _, p, data, end = at
                if frame[p + 13] & 0x12 == 0x02:                # a connection attempt: observed
                    sift = False
                elif data >= end:
                    continue                                    # no payload: ACK, FIN, RST
            key = frame[26:38] if inline else flow_key(frame, at)
            state = UNREAD
            if sift:
                state = tcp_get(tcp, key)                       # LRU.get, inline
                if state is not None:
                    tcp_touch(key)
                    if state is DONE:
                        continue
                else:
                    first = frame[data]                         # (looks_like_tls, inline)
                    if not (first == 0x16 and data + 3 <= end and frame[data + 1] == 3 and frame[data + 2] <= 4
                            or first in HTTP_FIRST and frame.startswith(HTTP_METHODS, data, end)):
                        continue
            seen = observe(when, frame, at, ctx, key, sport, dport, state)
            if seen:
                found.append((i, seen))
        for i, when, frame, at, sport, dport, inline in quic_packets:
            key = frame[26:38] if inline else flow_key(frame, at)
            if triage and sport != 53:
                data, end = at[4], at[5]
                if not (data < end and frame[data] & 0x80):     # not a long header
                    if key in quic_flows:
                        quic_touch(key)
                    continue
            seen = observe(when, frame, at, ctx, key, sport, dport)
            if seen:
                found.append((i, seen))
        for i, when, frame, at, sport, dport, inline in udp_packets:
            sift = triage and sport != 53                       # 53: maybe our resolver's answer
            if sift and dport != 53 and dport != 853:
                continue
            key = frame[26:38] if inline else flow_key(frame, at)
            if sift and key in udp_flows:
                continue
            seen = observe(when, frame, at, ctx, key, sport, dport)
            if seen:
                found.append((i, seen))
        found.sort(key=_FIRST)
        return [x for _, seen in found for x in seen]

    def _report(self, observations, ctx) -> list[dict]:
        """Findings of observations -> counts, alert rows (deduplicated), enforcement, metrics;
        answers learned in their place among them."""
        rows = []
        learn, all_counts, metrics = self.learned.answer, self.counts, self.metrics
        for obs in observations:
            if obs.__class__ is Answer:
                learn(*obs)
                continue
            for f in detect(obs, ctx):
                counts = all_counts[f.detector]
                if metrics is not None:
                    metrics.detections.labels(f.detector, f.group).inc()
                if not f.alert:
                    counts[2] += 1
                    continue
                row = self.alerts.offer(f)
                if row is None:
                    counts[1] += 1
                    if metrics is not None:
                        metrics.suppressed.labels(f.detector).inc()
                else:
                    counts[0] += 1
                    rows.append(row)
                    if self.enforce is not None:
                        self.enforce(row)
                    if metrics is not None:
                        metrics.alerts.labels(f.detector).inc()
        return rows

    def observe(self, when: float, frame: bytes, at: tuple, ctx, flow: bytes, sport: int, dport: int,
                state=UNREAD) -> list:
        """What one located packet tells: our resolver's answers (`Answer`, learned when reported);
        client packets as observations (a new flow, a complete ClientHello, an HTTP request). Read
        off the frame's bytes (`flow` is its flow_key, the ports are _locate's, `state` the TCP
        flow's state when the triage has looked it up); addresses become ints only for an
        observation (`addresses`)."""
        version, o, proto, p, data, end = at
        if sport == 53:
            src = int.from_bytes(frame[o + 12:o + 16] if version == 4 else frame[o + 8:o + 24], "big")
            if (version, src) in ctx.sanctioned:
                message = frame[data + 2 if proto == TCP else data:end]
                client = (version, addresses(frame, at)[2])
                return [Answer(client, (v, address), ttl, when) for v, address, ttl in dns_addresses(message)]
        if proto == UDP:
            if dport == 443:
                return self._quic(when, frame, at, flow)
            if (dport == 53 or dport == 853) and flow not in self.udp:
                self.udp.put(flow, True)
                name = dns_question(bytes(frame[data:end])) if dport == 53 else None
                return [observation(when, "connect", "udp", frame, at, None, (), name)]
            return []
        if proto != TCP:
            return []
        if frame[p + 13] & 0x12 == 0x02:              # SYN without ACK: a connection attempt
            # the stream starts at ISN + 1: that number is the flow's state until a segment
            # needs a Reassembly (most ClientHellos come whole in the first one)
            self.tcp.put(flow, (int.from_bytes(frame[p + 4:p + 8], "big") + 1) & 0xFFFFFFFF)
            return [observation(when, "connect", "tcp", frame, at)]
        if data >= end:
            return []
        if state is UNREAD:
            state = self.tcp.get(flow)
        if state is DONE:
            return []
        payload = bytes(frame[data:end])
        if state is None or state.__class__ is int or not state.data and not state.pending:
            if payload.startswith(HTTP_METHODS):
                self.tcp.put(flow, DONE)
                return self._http(when, frame, at, payload)
            if state is None:
                if not looks_like_tls(payload):
                    return []
                state = Reassembly(None)
                self.tcp.put(flow, state)
        seq = int.from_bytes(frame[p + 4:p + 8], "big")
        if state.__class__ is int:
            first = state == seq
            if not first:
                state = self._reassembly(flow, state)
        else:
            first = state.base == seq and not state.data and not state.pending
        # the first segment at the stream's start is the stream so far (what state.add would
        # return); it is copied into the state only when the hello needs more segments
        stream = payload[:MAX_HELLO] if first else state.add(seq, payload)
        try:
            hello = hello_from_records(stream) if stream else None
        except TLSError:
            self.tcp.put(flow, DONE)
            return []
        if hello is None:
            if first:
                self._reassembly(flow, state).add(seq, payload)
            return []
        self.tcp.put(flow, DONE)
        return [observation(when, "hello", "tcp", frame, at, hello.sni, hello.alpn)]

    def _reassembly(self, flow: bytes, state: Reassembly | int) -> Reassembly:
        """The flow's Reassembly; made (and stored) from the stream start a SYN left."""
        if state.__class__ is int:
            state = Reassembly(state)
            self.tcp.put(flow, state)
        return state

    def _quic(self, when: float, frame: bytes, at: tuple, flow: bytes) -> list[Observation]:
        state = self.quic.get(flow)
        payload = bytes(frame[at[4]:at[5]])
        out = []
        if state is None:
            if quic.first_initial_dcid(payload) is None:
                return []                     # not the start of a connection we saw begin
            out.append(observation(when, "connect", "quic", frame, at))
        if state is DONE:
            return out
        try:
            stream, hello = quic.read_datagram(payload, state)
        except (quic.QUICError, TLSError):
            self.quic.put(flow, DONE)
            return out
        if hello is not None:
            self.quic.put(flow, DONE)
            out.append(observation(when, "hello", "quic", frame, at, hello.sni, hello.alpn))
        else:
            self.quic.put(flow, stream)
        return out

    def _http(self, when: float, frame: bytes, at: tuple, payload: bytes) -> list[Observation]:
        head = payload[:2048].split(b"\r\n")
        parts = head[0].split(b" ")
        if len(parts) < 2:
            return []
        host = None
        for line in head[1:32]:
            if line[:5].lower() == b"host:":
                host = line[5:].strip().decode("ascii", "replace").lower().split(":")[0] or None
                break
        return [observation(when, "http", "tcp", frame, at, None, (), host,
                            parts[1].decode("ascii", "replace")[:512])]

    def summary(self) -> str:
        lines = [f"{'detector':<14}{'alerts':>8}{'repeats':>9}{'counted':>9}"]
        for d in DETECTORS:
            a, s, c = self.counts[d]
            lines.append(f"{d:<14}{a:>8}{s:>9}{c:>9}")
        lines.append(f"packets {self.packets}, unparsed {self.unparsed}, flows held {self.flows()}")
        return "\n".join(lines)


class Reloader:
    """Polls the blocklists directory's fingerprint (as the resolver does) and swaps the policy
    when it changes or on SIGHUP; a bad policy is logged and the last good one stays."""

    def __init__(self, engine: Engine, directory: str, interval: float, metrics=None):
        from resolver.server import fingerprint
        self._fingerprint = fingerprint
        self.engine, self.directory, self.interval, self.metrics = engine, directory, interval, metrics
        self.current = fingerprint(directory)
        self.next_poll = time.monotonic() + interval
        self.requested = False

    def maybe(self) -> None:
        due = self.interval > 0 and time.monotonic() >= self.next_poll
        if not (due or self.requested):
            return
        self.next_poll = time.monotonic() + self.interval
        force, self.requested = self.requested, False
        fp = self._fingerprint(self.directory)
        if fp == self.current and not force:
            return
        self.current = fp
        try:
            policy = load_policy(self.directory, time.time())
        except PolicyError as e:
            for problem in e.problems:
                log.error("reload rejected, keeping policy %s: %s", self.engine.policy.revision, problem)
            self._count("failed")
            return
        except Exception:   # noqa: BLE001 - never die on a reload
            log.exception("reload failed, keeping policy %s", self.engine.policy.revision)
            self._count("failed")
            return
        self.engine.swap(policy)
        log.info("policy %s loaded", policy.revision)
        self._count("ok")

    def _count(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.reloads.labels(result).inc()


def run_pcap(engine: Engine, path: str, health=None) -> int:
    from .capture import CaptureError, read_pcap_runs
    start, cpu, first, waited = time.perf_counter(), time.process_time(), engine.packets, _waited()
    if health is not None:
        health.reading(path)
    try:
        engine.feed_runs(read_pcap_runs(path))
    except (OSError, CaptureError) as e:
        if health is not None:
            health.failed(str(e))
        print(engine.summary(), file=sys.stderr)
        print(f"sinkhole sidecar: {e}", file=sys.stderr)
        return 1
    if health is not None:
        health.finished(engine.packets - first)
    took, cpu = time.perf_counter() - start, time.process_time() - cpu
    print(engine.summary(), file=sys.stderr)
    n = engine.packets - first
    after = _waited()
    wait = f", {after - waited:.2f} s waiting for a CPU" if after is not None and waited is not None else ""
    print(f"read in {took:.2f} s ({cpu:.2f} s CPU{wait}): {n / max(took, 1e-9):,.0f} packets/s "
          f"({n / max(cpu, 1e-9):,.0f} per CPU second)", file=sys.stderr)
    return 0


def _waited() -> float | None:
    """Seconds this thread has waited, runnable, for a CPU (Linux schedstat; None elsewhere): the
    part of wall time that other processes took, so a slow run on a busy machine says so."""
    try:
        with open("/proc/thread-self/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return None


def run_live(engine: Engine, ifaces: list[str], reloader: Reloader, metrics=None, stop=None,
             health=None) -> int:
    """Capture until SIGTERM (or `stop` is set); `health` (metrics.Health) hears every round."""
    from .capture import LiveCapture
    try:
        capture = LiveCapture(ifaces)
    except Exception as e:
        if health is not None:
            health.failed(f"cannot capture on {','.join(ifaces)}: {e}")
        raise
    log.info("capturing on %s", ", ".join(ifaces))
    if health is not None:
        health.capturing(ifaces, time.monotonic())
    stopping = []
    signal.signal(signal.SIGHUP, lambda *_: setattr(reloader, "requested", True))
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    print("sidecar: capturing on " + ",".join(ifaces), file=sys.stderr, flush=True)
    try:
        while not stopping and not (stop and stop.is_set()):
            frames = capture.frames(0.5)
            for when, linktype, frame in frames:
                try:
                    engine.feed(when, linktype, frame)
                except Exception:   # noqa: BLE001 - one odd packet never stops the sidecar
                    log.exception("packet handling failed")
            if health is not None:
                health.went_round(time.monotonic(), len(frames))
            drops = capture.drops()
            if metrics is not None:
                if drops:
                    metrics.kernel_drops.inc(drops)
                metrics.flows.set(engine.flows())
                metrics.learned.set(engine.learned.sizes())
            reloader.maybe()
    except KeyboardInterrupt:
        pass
    finally:
        capture.close()
        print(engine.summary(), file=sys.stderr, flush=True)
    return 0
