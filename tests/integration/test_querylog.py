"""The audit query log of a real `sinkhole serve`: one line per query with the right fields, size
rotation keeping the configured number of files, and a log target that fails (a FIFO nobody opens,
a full tmpfs) costing log lines, counted, never answers."""
from __future__ import annotations

import datetime
import json
import os
import re
import subprocess
import time
import uuid

import dns.message
import dns.query
import dns.rdataclass
import pytest

from helpers import TEST_POLICY, TEST_SERVICES, Dnsmasq, Sinkhole, ask, have, is_root, write_blocklists

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not have("dnsmasq"), reason="needs dnsmasq (Debian dnsmasq-base)")]

RECORDS = ["--host-record=www.chat.test,192.0.2.10", "--host-record=plain.test,192.0.2.11",
           "--host-record=exempt.chat.test,192.0.2.12"]
SUMMARY = re.compile(r"query log: (\d+) lines written, (\d+) dropped")


def stop(server: Sinkhole) -> tuple[int, int]:
    """SIGTERM the server (which flushes the log) and return (written, dropped) from its summary."""
    server.__exit__(None, None, None)
    server.wait_for_log(lambda: any(SUMMARY.search(l) for l in server.lines), 10, "the log summary")
    written, dropped = SUMMARY.search(next(l for l in server.lines if SUMMARY.search(l))).groups()
    return int(written), int(dropped)


def read_lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_each_query_once_with_its_fields(tmp_path):
    expires = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=1)
    policy = dict(TEST_POLICY, exemptions=[{
        "id": "EX-LOG", "clients": ["127.0.1.7"], "services": ["chat"], "approved_by": "Head of IT",
        "reason": "ticket CHG-2", "expires": expires.isoformat()}])
    blocklists = write_blocklists(tmp_path / "bl", policy, TEST_SERVICES)
    log_path = tmp_path / "query.log"
    with Dnsmasq(RECORDS) as upstream:
        server = Sinkhole(tmp_path, {"upstreams": [upstream.address], "blocklists": str(blocklists),
                                     "query_log": {"target": str(log_path)}}).__enter__()
        try:
            started = time.time()
            assert ask(server, "www.chat.test", source="127.0.1.5").rcode() == 3       # blocked
            assert ask(server, "plain.test", source="127.0.2.5").rcode() == 0          # forwarded
            assert ask(server, "plain.test", "A", source="127.0.2.6").rcode() == 0     # cached
            assert ask(server, "exempt.chat.test", source="127.0.1.7").rcode() == 0    # exemption
            chaos = dns.message.make_query("version.bind", "TXT", rdclass=dns.rdataclass.CH)
            assert dns.query.udp(chaos, server.host, port=server.port, timeout=3,
                                 source="127.0.2.8").rcode() == 5                      # refused
            assert ask(server, "plain.test", "ANY", source="127.0.2.9").rcode() == 0   # local
            ended = time.time()
        finally:
            written, dropped = stop(server)
    lines = read_lines(log_path)
    assert (written, dropped) == (6, 0) and len(lines) == 6
    for line in lines:
        assert list(line) == ["time", "client", "group", "qname", "qtype", "decision", "service",
                              "rule", "exemption", "rcode", "duration_ms"]
        when = datetime.datetime.fromisoformat(line["time"]).timestamp()
        assert started - 1 <= when <= ended + 1 and line["duration_ms"] >= 0
    by_client = {line["client"]: line for line in lines}
    assert len(by_client) == 6                           # each query once
    rule = by_client["127.0.1.5"]["rule"]
    assert rule.endswith("services/chat.yaml:" + str(_line(blocklists / "services/chat.yaml", "chat.test")))
    assert {k: by_client["127.0.1.5"][k] for k in ("group", "qname", "qtype", "decision", "service",
                                                   "exemption", "rcode")} == \
        {"group": "desktop", "qname": "www.chat.test", "qtype": "A", "decision": "blocked",
         "service": "chat", "exemption": None, "rcode": "NXDOMAIN"}
    assert [by_client["127.0.2.5"][k] for k in ("group", "decision", "service", "rule", "rcode")] == \
        ["mobile", "forwarded", None, None, "NOERROR"]
    assert by_client["127.0.2.6"]["decision"] == "cached"
    exempt = by_client["127.0.1.7"]
    assert [exempt[k] for k in ("group", "decision", "service", "exemption", "rcode")] == \
        ["desktop", "forwarded", "chat", "EX-LOG", "NOERROR"]
    assert exempt["rule"] is not None
    assert [by_client["127.0.2.8"][k] for k in ("qname", "qtype", "decision", "rcode")] == \
        ["version.bind", "TXT", "refused", "REFUSED"]
    assert [by_client["127.0.2.9"][k] for k in ("qtype", "decision")] == ["ANY", "local"]


def _line(path, text: str) -> int:
    return next(n for n, line in enumerate(path.read_text().splitlines(), 1) if text in line)


def test_rotation_keeps_the_configured_number_of_files(tmp_path, blocklists):
    log_path = tmp_path / "query.log"
    max_bytes, backups, queries = 3000, 2, 120
    with Dnsmasq(RECORDS) as upstream:
        server = Sinkhole(tmp_path, {"upstreams": [upstream.address], "blocklists": str(blocklists),
                                     "query_log": {"target": str(log_path), "max_bytes": max_bytes,
                                                   "backups": backups}}).__enter__()
        try:
            for i in range(queries):
                assert ask(server, f"q{i}.chat.test", source="127.0.1.5").rcode() == 3
        finally:
            written, dropped = stop(server)
    assert (written, dropped) == (queries, 0)
    files = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("query.log"))
    assert files == ["query.log", "query.log.1", "query.log.2"]
    kept = []
    for name in ("query.log.2", "query.log.1", "query.log"):
        assert 0 < (tmp_path / name).stat().st_size <= max_bytes
        kept += [line["qname"] for line in read_lines(tmp_path / name)]
    # the newest lines, in order, none twice; older ones fell off with the rotation
    assert kept == [f"q{i}.chat.test" for i in range(queries - len(kept), queries)]
    assert len(kept) < queries


def test_fifo_nobody_reads_costs_lines_not_answers(tmp_path, blocklists):
    fifo = tmp_path / "query.log"
    os.mkfifo(fifo)                   # opening it for writing blocks until a reader comes: never
    queries = 200
    with Dnsmasq(RECORDS) as upstream:
        server = Sinkhole(tmp_path, {"upstreams": [upstream.address], "blocklists": str(blocklists),
                                     "query_log": {"target": str(fifo), "queue": 10}}).__enter__()
        try:
            for i in range(queries):
                name = "www.chat.test" if i % 2 else "plain.test"
                source = "127.0.1.5" if i % 2 else "127.0.2.5"
                assert ask(server, name, source=source, timeout=2).rcode() == (3 if i % 2 else 0)
        finally:
            written, dropped = stop(server)
    assert written == 0 and dropped == queries


@pytest.mark.skipif(not is_root(), reason="mounting a tiny tmpfs needs root")
def test_full_disk_costs_lines_not_answers(tmp_path, blocklists):
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", f"tmpfs-{uuid.uuid4().hex[:8]}", str(disk)],
                   check=True)
    try:
        filler = disk / "filler"
        subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=4k", "count=100"],
                       stderr=subprocess.DEVNULL)           # fails with ENOSPC once it is full
        assert os.statvfs(disk).f_bavail == 0
        with Dnsmasq(RECORDS) as upstream:
            server = Sinkhole(tmp_path, {"upstreams": [upstream.address], "blocklists": str(blocklists),
                                         "query_log": {"target": str(disk / "query.log")}}).__enter__()
            try:
                for i in range(50):
                    assert ask(server, f"full{i}.chat.test", source="127.0.1.5").rcode() == 3
                server.wait_for_log(lambda: server.count("No space left on device") >= 1, 10,
                                    "the query log to report the full disk")
                filler.unlink()                              # space again: logging resumes
                for i in range(50):
                    assert ask(server, f"free{i}.chat.test", source="127.0.1.5").rcode() == 3
                server.wait_for_log(lambda: server.count("writing again") >= 1, 10,
                                    "the query log to recover")
            finally:
                written, dropped = stop(server)
        assert server.count("No space left on device") == 1         # said once, not per line
        assert dropped > 0 and written + dropped == 100
        # the writer may still be behind when space comes back, so the lines written are the
        # newest ones: every query after the disk was freed, and maybe a few before it
        names = [line["qname"] for line in read_lines(disk / "query.log")]
        asked = [f"full{i}.chat.test" for i in range(50)] + [f"free{i}.chat.test" for i in range(50)]
        assert len(names) == written >= 50 and names == asked[-written:]
    finally:
        subprocess.run(["umount", str(disk)], check=True)
