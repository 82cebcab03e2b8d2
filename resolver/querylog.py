"""The audit query log: one JSON line per query.

The serving thread formats each line (a UDP batch's lines at once, with one join: they share a
time and a duration) into a short list; every CHUNK lines (and every FLUSH_INTERVAL, from the
server's event loop) it joins them into one block of bytes and queues the block. A writer thread
of its own only writes blocks: it needs the interpreter for a few bytecodes per block, not per
line, so it hardly competes with the serving thread for it. If the queue is full (a slow, stalled
or full disk) the lines are dropped and counted, and the answers go out regardless; a failed write
drops exactly the lines it held, and those are counted too.

Fields: time (UTC, ms), client (the address policy used: the ECS address behind a trusted
forwarder), group, qname, qtype, decision, service, rule (path:line), exemption (id), rcode,
duration_ms. `decision` is core.Outcome.action: forwarded, cached, blocked, refused, error, plus
stale (served from the cache while every upstream failed) and local (answered by the resolver
itself, e.g. ANY).
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import threading
from collections import deque

from .wire import QTYPE_NAMES, RCODE_NAMES

FIELDS = ("time", "client", "group", "qname", "qtype", "decision", "service", "rule", "exemption",
          "rcode", "duration_ms")
CHUNK = 128                      # lines queued for the writer at once by the serving thread
LINE = '{"time":"%s","client":%s,%s"duration_ms":%.3f}\n'
FLUSH_INTERVAL = 0.01            # seconds: how stale the file may be behind the answers; also how
                                 # much the writer has to write at once (a 50 ms burst delayed queries)
_QTYPES = {code: f'"{name}"' for code, name in QTYPE_NAMES.items()}
_RCODES = {code: f'"{name}"' for code, name in RCODE_NAMES.items()}

log = logging.getLogger("sinkhole")


class QueryLog:
    """`lock` guards the serving side (the fields list, the counters it owns): the server passes
    its own lock, which it holds whenever it logs; flush() and render() take it themselves."""

    def __init__(self, target: str = "off", max_bytes: int = 50 << 20, backups: int = 10,
                 queue_size: int = 10000, lock=None):
        self.target, self.max_bytes, self.backups = target, max_bytes, backups
        self.enabled = target != "off"
        self.lock = lock if lock is not None else threading.RLock()
        self.written = 0
        self.errors = 0             # failed opens, writes and rotations
        self._full = 0              # lines lost because the queue was full (serving side)
        self._failed = 0            # lines lost because a write failed (writer thread)
        self._limit = max(1, queue_size)
        self._text: list = []       # lines not queued yet, as text (serving side)
        self._lines = 0             # how many lines _text holds
        self._blocks: deque = deque()   # (bytes, lines) rendered, waiting for the writer
        self._enqueued = 0          # lines queued as blocks (serving side only)
        self._taken = 0             # lines taken by the writer, written or lost (writer only)
        self._thread = None
        self._fd: int | None = None
        self._size = 0
        self._failing = False
        self._wake = threading.Event()
        self._progress = threading.Condition()
        self._second = -1
        self._stamp = ""
        self._milli = -1
        self._text_time = ""

    @property
    def dropped(self) -> int:
        """Lines lost: queue full, or the write failed."""
        return self._full + self._failed

    def start(self) -> None:
        if self.enabled and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="querylog", daemon=True)
            self._thread.start()

    # -- the serving side (callers hold self.lock) ---------------------------------------------
    def log(self, when: float, outcome, duration: float) -> None:
        if self.enabled:
            self._add(LINE % (self._time(when), _s(outcome.client), self.middle(outcome), duration * 1000), 1)

    def write_many(self, when: float, duration: float, tails: list) -> None:
        """One line per entry of `tails` for a batch of answers that share a time and a duration
        (the server's UDP batch): each tail is client(...) + middle(...) of one answer. The lines
        are one join: LINE's start and end are formatted once for the batch."""
        if self.enabled and tails:
            head = '{"time":"%s",' % self._time(when)
            end = '"duration_ms":%.3f}\n' % (duration * 1000)
            self._add(head + (end + head).join(tails) + end, len(tails))

    @staticmethod
    def client(address: str) -> str:
        """The client field of a line for an address as the kernel wrote it (no escaping needed),
        with its comma: what write_many's tails start with."""
        return f'"client":"{address}",'

    def _time(self, when: float) -> str:
        """The time field's text, made once per millisecond (a quiet resolver's lone queries come
        a few per millisecond, and formatting was a third of write_many for a batch of one)."""
        second = int(when)
        milli = int((when - second) * 1000)
        if milli == self._milli and second == self._second:
            return self._text_time
        if second != self._second:
            self._second = second
            self._stamp = datetime.datetime.fromtimestamp(second, datetime.timezone.utc).strftime(
                "%Y-%m-%dT%H:%M:%S")
        self._milli = milli
        self._text_time = text = "%s.%03d+00:00" % (self._stamp, milli)
        return text

    def _add(self, text: str, lines: int) -> None:
        self._text.append(text)
        self._lines += lines
        if self._lines >= CHUNK:
            self.render()

    def render(self) -> None:
        """Queue the lines kept so far as one block for the writer (or count them lost if the queue
        is full). The server calls this every FLUSH_INTERVAL too, so a quiet resolver's lines do
        not wait for CHUNK more."""
        with self.lock:
            count = self._lines
            if not count:
                return
            text, self._text, self._lines = self._text, [], 0
            if self._enqueued - self._taken + count > self._limit:
                self._full += count
                return
            self._blocks.append(("".join(text).encode("utf-8", "backslashreplace"), count))
            self._enqueued += count
            if self._enqueued - self._taken > self._limit >> 2 and not self._wake.is_set():
                self._wake.set()        # a busy resolver: the writer need not wait out FLUSH_INTERVAL
                                        # (once per wake: Event.set takes a lock, 1.6 % at peak)

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every line logged so far is written or dropped (tests, shutdown). False if
        the writer is stuck (e.g. a FIFO nobody reads)."""
        self.render()
        if self._thread is None:
            return True
        target = self._enqueued
        self._wake.set()
        with self._progress:
            return self._progress.wait_for(lambda: self._taken >= target, timeout)

    def close(self, timeout: float = 3.0) -> None:
        idle = self.flush(timeout)
        if not idle:
            # the writer is stuck (a FIFO nobody reads, a hung disk): what it holds is lost
            self._full += self._enqueued - self._taken
        if self.enabled:
            log.info("query log: %d lines written, %d dropped", self.written, self.dropped)
        if idle:
            self._close_fd()

    def format(self, when: float, o, duration: float) -> str:
        """The line log() writes for this Outcome (without its newline)."""
        return (LINE % (self._time(when), _s(o.client), self.middle(o), duration * 1000))[:-1]

    @staticmethod
    def middle(o) -> str:
        """The fields from group to rcode, built by hand: json.dumps costs several times more.
        Group, service and action are names the loader and core vouch for; what could hold anything
        (qname, rule path, exemption id) goes through _s. Ends with a comma."""
        group, service, rule, exemption = o.group, o.service, o.rule, o.exemption
        return (f'"group":{_s(group) if group is not None else "null"},"qname":{_s(o.qname)},'
                f'"qtype":{_QTYPES.get(o.qtype) or _s(str(o.qtype))},"decision":"{o.action}",'
                f'"service":{_s(service) if service is not None else "null"},'
                f'"rule":{_s(rule) if rule is not None else "null"},'
                f'"exemption":{_s(exemption) if exemption is not None else "null"},'
                f'"rcode":{_RCODES.get(o.rcode) or _s(str(o.rcode))},')

    # -- the writer thread ---------------------------------------------------------------------
    def _run(self) -> None:
        blocks = self._blocks
        while True:
            self._wake.wait(FLUSH_INTERVAL)
            self._wake.clear()
            while blocks:
                data, count = blocks.popleft()
                self._write(data, count)
                self._taken += count
            with self._progress:
                self._progress.notify_all()

    def _write(self, data: bytes, count: int) -> None:
        """Write one block of `count` lines, rotating by size between lines; count the lines that
        did not make it."""
        block = data
        while data:
            try:
                fd = self._open()
            except OSError as e:
                self._lost(data.count(b"\n"), e)
                return
            part = data
            if fd != 1 and self.max_bytes and self._size + len(data) > self.max_bytes:
                cut = data.rfind(b"\n", 0, self.max_bytes - self._size) + 1     # whole lines that fit
                if cut == 0:
                    if self._size:              # the file is full: rotate, then write to the new one
                        self._rotate()
                        continue
                    cut = data.find(b"\n") + 1  # one line longer than max_bytes: it gets a file
                part = data[:cut]
            data = data[len(part):]
            done = 0
            try:
                while done < len(part):
                    done += os.write(fd, part[done:])
            except OSError as e:
                whole = part.count(b"\n", 0, done)     # a line cut short counts as lost
                self._size += done
                self.written += whole
                self._close_fd()
                self._lost(part.count(b"\n") - whole + data.count(b"\n"), e)
                return
            self._size += done
            # a block written whole needs no counting (bytes.count was 2 % of a busy server)
            self.written += count if part is block else part.count(b"\n")
            if data:
                self._rotate()
        if self._failing:
            self._failing = False
            log.warning("query log %s: writing again; %d lines dropped so far", self.target, self.dropped)

    def _lost(self, count: int, error: OSError) -> None:
        self._failed += count
        self.errors += 1
        if not self._failing:
            self._failing = True
            log.warning("query log %s: %s; dropping lines until it works again (answers are not "
                        "affected)", self.target, error)

    def _open(self) -> int:
        if self._fd is None:
            if self.target in ("stdout", "-"):
                self._fd = 1
            else:
                self._fd = os.open(self.target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
                self._size = os.fstat(self._fd).st_size
        return self._fd

    def _close_fd(self) -> None:
        if self._fd not in (None, 1):
            try:
                os.close(self._fd)
            except OSError:
                pass
        self._fd = None

    def _rotate(self) -> None:
        """target -> target.1 -> ... -> target.<backups>; the oldest falls off. If renaming fails
        the current file just grows (counted in `errors`, logged): lines matter more than size."""
        try:
            for i in range(self.backups - 1, 0, -1):
                older = f"{self.target}.{i}"
                if os.path.exists(older):
                    os.replace(older, f"{self.target}.{i + 1}")
            if self.backups > 0:
                os.replace(self.target, f"{self.target}.1")
            else:
                os.remove(self.target)
        except OSError as e:
            self.errors += 1
            log.warning("query log %s: could not rotate: %s", self.target, e)
            self._size = 0
            return
        self._close_fd()
        self._size = 0


def _s(value) -> str:
    """A JSON string (or null) for a log field."""
    if value is None:
        return "null"
    if value.isascii() and value.isprintable() and '"' not in value and "\\" not in value:
        return f'"{value}"'             # what json.dumps would write, without its cost
    return json.dumps(value)
