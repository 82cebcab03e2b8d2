"""The audit query log: one JSON line per query, written by a thread of its own.

The resolver only appends a tuple to a bounded buffer (a deque: no lock, no wake-up per query);
the writer thread takes what is there every FLUSH_INTERVAL seconds. If the buffer is full (a slow,
stalled or full disk) the line is dropped and counted, and the answer goes out regardless. The writer thread writes
batches with os.write, so a failed write drops exactly the lines it held, and those are counted too.

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
import re
import threading
import time
from collections import deque

from .wire import QTYPE_NAMES, RCODE_NAMES

FIELDS = ("time", "client", "group", "qname", "qtype", "decision", "service", "rule", "exemption",
          "rcode", "duration_ms")
BATCH = 512
FLUSH_INTERVAL = 0.05            # seconds: how stale the file may be behind the answers
_QTYPES = {code: f'"{name}"' for code, name in QTYPE_NAMES.items()}
_RCODES = {code: f'"{name}"' for code, name in RCODE_NAMES.items()}
_PLAIN = re.compile(r"[A-Za-z0-9._:/*@+=-]*\Z").match     # needs no JSON escaping

log = logging.getLogger("sinkhole")


class QueryLog:
    def __init__(self, target: str = "off", max_bytes: int = 50 << 20, backups: int = 10,
                 queue_size: int = 10000):
        self.target, self.max_bytes, self.backups = target, max_bytes, backups
        self.enabled = target != "off"
        self.written = 0
        self.errors = 0             # failed opens, writes and rotations
        self._full = 0              # lines lost because the queue was full (event loop thread)
        self._failed = 0            # lines lost because a write failed (writer thread)
        self._limit = max(1, queue_size)
        self._buf: deque = deque()
        self._enqueued = 0          # lines appended (event loop thread only)
        self._taken = 0             # lines taken by the writer, written or lost (writer only)
        self._thread = None
        self._fd: int | None = None
        self._size = 0
        self._failing = False
        self._inflight = 0          # lines the writer thread holds right now
        self._wake = threading.Event()
        self._progress = threading.Condition()
        self._second = -1
        self._stamp = ""

    @property
    def dropped(self) -> int:
        """Lines lost: queue full, or the write failed."""
        return self._full + self._failed

    def start(self) -> None:
        if self.enabled and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="querylog", daemon=True)
            self._thread.start()

    def log(self, when: float, outcome, duration: float) -> None:
        if self.enabled:
            self._append(self.format(when, outcome, duration))

    def write(self, when: float, client: str, middle: str, duration: float) -> None:
        """log() for an answer the server reuses: `middle` is what middle() made of its Outcome,
        `client` an address as the kernel wrote it (it needs no escaping)."""
        if self.enabled:
            self._append(self._line(when, f'"{client}"', middle, duration))

    def _append(self, line: str) -> None:
        buf = self._buf
        if len(buf) >= self._limit:
            self._full += 1
            return
        buf.append(line)
        self._enqueued += 1

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every line logged so far is written or dropped (tests, shutdown). False if
        the writer is stuck (e.g. a FIFO nobody reads)."""
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
            self._full += len(self._buf) + self._inflight
        if self.enabled:
            log.info("query log: %d lines written, %d dropped", self.written, self.dropped)
        if idle:
            self._close_fd()

    # -- writer thread -------------------------------------------------------------------------
    def format(self, when: float, o, duration: float) -> str:
        """One JSON object, formatted on the serving thread: one thread, no handoffs."""
        return self._line(when, _s(o.client), self.middle(o), duration)

    def _line(self, when: float, client: str, middle: str, duration: float) -> str:
        second = int(when)
        if second != self._second:
            self._second = second
            self._stamp = datetime.datetime.fromtimestamp(second, datetime.timezone.utc).strftime(
                "%Y-%m-%dT%H:%M:%S")
        return (f'{{"time":"{self._stamp}.{int((when - second) * 1000):03d}+00:00","client":{client},'
                f'{middle}"duration_ms":{duration * 1000:.3f}}}')

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

    def _run(self) -> None:
        buf = self._buf
        while True:
            self._wake.wait(FLUSH_INTERVAL)
            self._wake.clear()
            while buf:
                items = []
                while buf and len(items) < BATCH:
                    items.append(buf.popleft())
                self._inflight = len(items)
                lines = []
                for start in range(0, len(items), 128):
                    lines += [(line + "\n").encode() for line in items[start:start + 128]]
                    time.sleep(0)       # let the event loop have the interpreter between chunks:
                                        # otherwise it may wait a whole switch interval (5 ms)
                self._write_lines(lines)
                self._inflight = 0
                self._taken += len(items)
            with self._progress:
                self._progress.notify_all()

    def _write_lines(self, lines: list[bytes]) -> None:
        """Write a batch, rotating by size between lines; count the lines that did not make it."""
        i = 0
        while i < len(lines):
            try:
                fd = self._open()
            except OSError as e:
                self._lost(len(lines) - i, e)
                return
            j, size = i, 0
            if fd == 1 or not self.max_bytes:
                j = len(lines)
            else:
                while j < len(lines) and (self._size + size == 0
                                          or self._size + size + len(lines[j]) <= self.max_bytes):
                    size += len(lines[j])
                    j += 1
            if j == i:                    # the file is full: rotate, then write to the new one
                self._rotate()
                continue
            data = b"".join(lines[i:j])
            done = 0
            try:
                while done < len(data):
                    done += os.write(fd, data[done:])
            except OSError as e:
                lost = _lines_after(lines[i:j], done)
                self._size += done
                self.written += j - i - lost
                self._close_fd()
                self._lost(lost + len(lines) - j, e)
                return
            self._size += done
            self.written += j - i
            i = j
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


def _lines_after(chunk: list[bytes], done: int) -> int:
    """How many lines of `chunk` were not completely written when `done` bytes were."""
    total = 0
    for i, line in enumerate(chunk):
        total += len(line)
        if total > done:
            return len(chunk) - i
    return 0


def _s(value) -> str:
    """A JSON string (or null) for a log field."""
    if value is None:
        return "null"
    if _PLAIN(value):
        return f'"{value}"'
    return json.dumps(value)
