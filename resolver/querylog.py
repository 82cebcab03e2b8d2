"""The audit query log: one JSON line per query, written by a thread of its own.

The resolver only puts a tuple on a bounded queue; if the queue is full (a slow or full disk) the
line is dropped and counted, and the answer goes out regardless.
"""
from __future__ import annotations

import datetime
import json
import os
import queue
import sys
import threading

from .wire import QTYPE_NAMES, RCODE_NAMES

FIELDS = ("time", "client", "group", "qname", "qtype", "decision", "service", "rule", "exemption",
          "rcode", "duration_ms")


class QueryLog:
    def __init__(self, target: str = "off", max_bytes: int = 50 << 20, backups: int = 10,
                 queue_size: int = 10000):
        self.target, self.max_bytes, self.backups = target, max_bytes, backups
        self.enabled = target != "off"
        self.dropped = 0            # lines lost (queue full or write failed)
        self.written = 0
        self.errors = 0
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, queue_size))
        self._thread = None
        self._file = None
        self._size = 0
        self._idle = threading.Event()
        self._idle.set()

    def start(self) -> None:
        if self.enabled and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="querylog", daemon=True)
            self._thread.start()

    def log(self, when: float, outcome, duration: float) -> None:
        if not self.enabled:
            return
        try:
            self._idle.clear()
            self._queue.put_nowait((when, outcome, duration))
        except queue.Full:
            self.dropped += 1

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every queued line is written (tests, shutdown)."""
        if self._thread is None:
            return True
        self._queue.put(None, timeout=timeout)
        return self._idle.wait(timeout)

    def close(self) -> None:
        self.flush()
        if self._file not in (None, sys.stdout):
            self._file.close()
        self._file = None

    # -- writer thread -------------------------------------------------------------------------
    @staticmethod
    def format(when: float, o, duration: float) -> str:
        return json.dumps({
            "time": datetime.datetime.fromtimestamp(when, datetime.timezone.utc).isoformat(timespec="milliseconds"),
            "client": o.client, "group": o.group, "qname": o.qname,
            "qtype": QTYPE_NAMES.get(o.qtype, str(o.qtype)), "decision": o.action,
            "service": o.service, "rule": o.rule, "exemption": o.exemption,
            "rcode": RCODE_NAMES.get(o.rcode, str(o.rcode)), "duration_ms": round(duration * 1000, 3),
        }, separators=(",", ":"))

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                if self._file is not None:
                    try:
                        self._file.flush()
                    except (OSError, ValueError):   # ValueError: closed by close() meanwhile
                        self.errors += 1
                if self._queue.empty():
                    self._idle.set()
                continue
            line = self.format(*item) + "\n"
            try:
                self._write(line)
                self.written += 1
            except (OSError, ValueError):
                self.dropped += 1
                self.errors += 1
                self._file = None      # reopen on the next line
            if self._queue.empty():
                try:
                    if self._file is not None:
                        self._file.flush()
                except (OSError, ValueError):
                    self.errors += 1
                self._idle.set()

    def _write(self, line: str) -> None:
        if self.target in ("stdout", "-"):
            sys.stdout.write(line)
            return
        if self._file is None:
            self._file = open(self.target, "a", encoding="utf-8")
            self._size = self._file.tell()
        if self.max_bytes and self._size + len(line) > self.max_bytes and self._size > 0:
            self._rotate()
        self._file.write(line)
        self._size += len(line)

    def _rotate(self) -> None:
        self._file.close()
        self._file = None
        for i in range(self.backups - 1, 0, -1):
            older = f"{self.target}.{i}"
            if os.path.exists(older):
                os.replace(older, f"{self.target}.{i + 1}")
        if self.backups > 0:
            os.replace(self.target, f"{self.target}.1")
        else:
            os.remove(self.target)
        self._file = open(self.target, "a", encoding="utf-8")
        self._size = 0
