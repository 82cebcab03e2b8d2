"""The sidecar's /metrics and /healthz, served by resolver.exposition.serve_metrics as the
resolver's are: a real `sinkhole sidecar` process scraped with curl (reading a pcap through a FIFO;
capturing live on the loopback of a network namespace, as root), the stalled-loop answer on the
real endpoint, and the Health states as a table (exporters/metrics.Health)."""
from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "unit"))

from helpers import ROOT, have, is_root  # noqa: E402
from resolver.exposition import serve_metrics  # noqa: E402
from exporters.metrics import Health, SidecarMetrics  # noqa: E402
from sidecar_frames import CHAT_IP, DESKTOP, open_writer, pcap_bytes, sidecar_config, syn  # noqa: E402

# What serve_metrics (the resolver's endpoint too) answers a scraper that sends no Accept header:
# the Prometheus text format 0.0.4, which every Prometheus version reads.
TEXT_FORMAT = "text/plain; version=0.0.4; charset=utf-8"
pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not have("curl"), reason="needs curl (tests/debian-packages.txt)")]


def curl(url: str, netns: str | None = None) -> tuple[int, str, str]:
    """(status, content type, body) from curl, run inside `netns` when given."""
    cmd = ["curl", "-s", "--max-time", "5", "-w", "\n%{http_code} %{content_type}", url]
    out = subprocess.run((["ip", "netns", "exec", netns] if netns else []) + cmd,
                         capture_output=True, text=True, timeout=10)
    body, _, last = out.stdout.rpartition("\n")
    status, _, ctype = last.partition(" ")
    return int(status or 0), ctype, body


def metrics_port(proc: subprocess.Popen, also: str | None = None, deadline: float = 30.0) -> int:
    """Read the sidecar's stderr until 'metrics on HOST port N' (and the line `also`, if given)."""
    port, seen, end = None, [], time.monotonic() + deadline
    for _ in range(1000):
        line = proc.stderr.readline()
        if not line:
            raise AssertionError("sidecar exited:\n" + "".join(seen))
        seen.append(line)
        if "metrics on " in line:
            port = int(line.rsplit("port", 1)[1])
        if port and (also is None or any(also in s for s in seen)):
            return port
        if time.monotonic() > end:
            break
    raise AssertionError("no 'metrics on' line:\n" + "".join(seen))


def test_pcap_run_serves_metrics_and_health_until_the_file_ends(tmp_path):
    """The capture is a FIFO: the sidecar blocks reading it, so its endpoint can be scraped while
    it reads; closing the FIFO ends the file, and the alerts are those of the packets written."""
    config = sidecar_config(tmp_path)
    fifo = tmp_path / "capture.pcap"
    os.mkfifo(fifo)
    proc = subprocess.Popen([sys.executable, "-m", "resolver", "sidecar", "-c", str(config), "--pcap", str(fifo),
                             "--learning", "0", "--metrics", "127.0.0.1:0"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        port = metrics_port(proc)
        with open_writer(fifo) as writer:
            base = f"http://127.0.0.1:{port}"
            status, ctype, body = curl(base + "/metrics")
            assert (status, ctype) == (200, TEXT_FORMAT)
            assert 'sinkhole_bypass_detections_total{detector="blocked-ip",group="desktop"} 0.0' in body
            assert "sinkhole_bypass_packets_total 0.0" in body
            status, ctype, body = curl(base + "/healthz")
            assert (status, ctype, body) == (200, "text/plain; charset=utf-8", f"reading {fifo}\n")
            assert curl(base + "/nothing")[0] == 404
            writer.write(pcap_bytes([syn(DESKTOP, CHAT_IP, 5222)]))
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert [json.loads(line)["detector"] for line in out.splitlines()] == ["blocked-ip"]


def test_a_stalled_capture_loop_is_unhealthy_on_the_real_endpoint():
    health = Health(stall=10)
    endpoint = serve_metrics(SidecarMetrics().registry, "127.0.0.1", 0, health=health)
    try:
        base = f"http://127.0.0.1:{endpoint.port}/healthz"
        status, _, body = curl(base)
        assert (status, body) == (503, "capture not open yet\n")
        health.capturing(["eth1", "eth2"], time.monotonic())
        health.went_round(time.monotonic(), 3)
        status, _, body = curl(base)
        assert status == 200 and body.startswith("capturing on eth1,eth2: 3 packets, last packet ")
        health.round -= 60                                # the loop last went round a minute ago
        status, _, body = curl(base)
        assert status == 503 and "capture loop on eth1,eth2 stalled: last round 60 s ago" in body
    finally:
        endpoint.close()


@pytest.mark.parametrize("steps, now, ok, text", [
    ([], 0.0, False, "capture not open yet"),
    ([("capturing", ["lo"], 100.0)], 105.0, True, "capturing on lo: 0 packets, no packet yet"),
    ([("capturing", ["lo"], 100.0)], 111.0, False, "capture loop on lo stalled: last round 11 s ago"),
    ([("capturing", ["lo"], 100.0), ("went_round", 109.0, 0)], 110.0, True,
     "capturing on lo: 0 packets, no packet yet"),
    ([("capturing", ["lo"], 100.0), ("went_round", 101.0, 5), ("went_round", 3700.0, 0)], 3701.0, True,
     "capturing on lo: 5 packets, last packet 3600 s ago"),       # a quiet link is healthy
    ([("capturing", ["lo"], 100.0), ("went_round", 101.0, 5)], 120.0, False,
     "capture loop on lo stalled: last round 19 s ago"),
    ([("failed", "cannot capture on eth9: no such device")], 0.0, False,
     "capture failed: cannot capture on eth9: no such device"),
    ([("reading", "x.pcap")], 0.0, True, "reading x.pcap"),
    ([("reading", "x.pcap"), ("finished", 7)], 0.0, True, "finished reading x.pcap: 7 packets"),
    ([("reading", "x.pcap"), ("failed", "x.pcap: truncated record at byte 40")], 0.0, False,
     "capture failed: x.pcap: truncated record at byte 40"),
])
def test_health_states(steps, now, ok, text):
    health = Health(stall=10)
    for name, *args in steps:
        getattr(health, name)(*args)
    assert health.check(now) == (ok, text)


@pytest.mark.e2e
@pytest.mark.skipif(not is_root() or not have("ip"), reason="needs root and ip(8) for a network namespace")
def test_live_capture_counts_packets_and_reports_health(tmp_path):
    """`--iface lo` inside a namespace of its own: /healthz says capturing, a UDP datagram to port
    53 is counted in sinkhole_bypass_packets_total and in the health text, SIGTERM ends it cleanly."""
    config = sidecar_config(tmp_path)
    ns = f"sidecar-metrics-{os.getpid()}-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", ns], check=True, timeout=30)
    proc = None
    try:
        subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"], check=True, timeout=30)
        proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "resolver", "sidecar", "-c",
                                 str(config), "--iface", "lo", "--metrics", "127.0.0.1:0"],
                                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))
        port = metrics_port(proc, also="capturing on lo")
        base = f"http://127.0.0.1:{port}"
        status, ctype, body = curl(base + "/healthz", ns)
        assert status == 200 and body.startswith("capturing on lo: "), body
        send = ("import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
                "s.sendto(b'\\x12\\x34' + bytes(10), ('127.0.0.9', 53))")
        subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", send], check=True, timeout=30)
        counted = None
        for _ in range(100):                              # the loop goes round at least every 0.5 s
            status, ctype, body = curl(base + "/metrics", ns)
            counted = [line for line in body.splitlines() if line.startswith("sinkhole_bypass_packets_total ")]
            if counted and float(counted[0].split()[1]) >= 1:
                break
            time.sleep(0.1)
        assert (status, ctype) == (200, TEXT_FORMAT)
        assert counted and float(counted[0].split()[1]) >= 1, body
        status, _, body = curl(base + "/healthz", ns)
        assert status == 200 and "no packet yet" not in body and " 0 packets" not in body, body
        proc.terminate()
        assert proc.wait(10) == 0
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
