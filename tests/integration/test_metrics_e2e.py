"""End to end: a real Prometheus on loopback scrapes a running resolver (under traffic from dnspython
clients, with dnsmasq as its upstream) and a real bypass sidecar (`sinkhole sidecar --pcap` reading a
capture this test writes into a FIFO); then every query in the Grafana dashboard is evaluated through
Prometheus' HTTP API and must return data, the alert rules load, and the alerts the data calls for
fire, with the sidecar's own detector names.

The sidecar blocks reading the FIFO, so it keeps serving /metrics for the whole test; the capture
is written only once Prometheus holds the sidecar's series at 0, so the detections are an increase.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import queue
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "unit"))

from helpers import (stop_process, ROOT, TEST_POLICY, TEST_SERVICES, Dnsmasq, Sinkhole, ask, free_port,  # noqa: E402
                     have, write_blocklists)
from exporters.capture import _CHUNK  # noqa: E402
from exporters.detectors import DETECTORS  # noqa: E402
from sidecar_frames import (CHAT_IP, DESKTOP, DOH_IP, MOBILE, PCAP_HEADER, open_writer,  # noqa: E402
                            pcap_records, sidecar_config, syn)

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not have("prometheus"), reason="needs prometheus (Debian prometheus)"),
              pytest.mark.skipif(not have("dnsmasq"), reason="needs dnsmasq (Debian dnsmasq-base)"),
              pytest.mark.skipif(not have("curl"), reason="needs curl (Debian curl)")]

DASHBOARD = ROOT / "deploy" / "grafana" / "sinkhole.json"
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
RATE_INTERVAL = "15s"           # what Grafana's $__rate_interval becomes at a 1 s scrape interval

# What the capture holds: desktops reaching a blocked service's address and DNS over TLS, a mobile
# reaching the same (its group blocks nothing, so only the desktop group may fire the alert).
BYPASS = [syn(DESKTOP, CHAT_IP, 5222), syn(DESKTOP, DOH_IP, 853), syn(MOBILE, CHAT_IP, 5222)]
EXPECTED = {("blocked-ip", "desktop"), ("dot", "desktop")}


def capture_chunk() -> bytes:
    """The header and BYPASS, padded with frames of an unknown EtherType (no detector looks at them)
    so that the sidecar's first large read (exporters/capture._CHUNK) is filled and returns now;
    what is over the read is less than a pipe's buffer, so writing it never blocks."""
    records = pcap_records(BYPASS)
    filler = bytes(6) + bytes(6) + b"\x88\xb5" + bytes(60000)
    fillers = -(-(_CHUNK - len(records)) // (16 + len(filler)))
    records += pcap_records([filler] * fillers, first=2000)
    assert _CHUNK <= len(records) < _CHUNK + 65536
    return PCAP_HEADER + records


class Process:
    """A subprocess whose stderr lines are collected; `wait_line` waits for one, bounded."""

    def __init__(self, argv, **kw):
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **kw)
        self.lines: queue.Queue = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=lambda: [self.lines.put(l) for l in self.proc.stderr], daemon=True).start()

    def wait_line(self, text: str, timeout: float) -> str:
        end = time.monotonic() + timeout
        while (left := end - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            self.seen.append(line)
            if text in line:
                return line
        raise TimeoutError(f"no {text!r} within {timeout}s; output:\n" + "".join(self.seen))

    def stop(self):
        stop_process(self.proc)


def port_of(line: str) -> int:
    words = line.split()
    return int(words[words.index("port") + 1])


def api(base: str, path: str, **params):
    url = f"{base}{path}" + ("?" + urllib.parse.urlencode(params) if params else "")
    with urllib.request.urlopen(url, timeout=5) as response:
        body = json.load(response)
    assert body["status"] == "success", body
    return body["data"]


def poll(predicate, timeout: float, what: str, step: float = 0.25):
    """Call predicate() until it returns something truthy, at most `timeout` seconds."""
    end = time.monotonic() + timeout
    pause = threading.Event()
    last = None
    for _ in range(int(timeout / step) + 1):
        try:
            last = predicate()
        except (OSError, ValueError) as e:      # not up yet
            last = e
        if last and not isinstance(last, Exception):
            return last
        if time.monotonic() > end:
            break
        pause.wait(step)
    raise TimeoutError(f"timed out waiting for {what} (last: {last!r})")


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target and query variable, Grafana variables filled in."""
    board = json.loads(DASHBOARD.read_text())
    found = [(p["title"], t["expr"]) for p in board["panels"] for t in p.get("targets", [])]
    for var in board["templating"]["list"]:
        if var["type"] == "query":            # label_values(<selector>, <label>) -> <selector>
            found.append((f"variable {var['name']}", var["definition"].split("(", 1)[1].rsplit(",", 1)[0]))
    return [(title, expr.replace("$__rate_interval", RATE_INTERVAL).replace("$instance", ".*"))
            for title, expr in found]


def traffic(server, stop: threading.Event):
    """Desktop blocks, mobile forwards and cache hits, an exempt desktop, names the upstream refuses."""
    pause = threading.Event()
    for i in range(3000):
        for name, source, rdtype in (("www.chat.test", "127.0.1.5", "A"), ("www.chat.test", "127.0.2.5", "A"),
                                     ("img.chat.test", "127.0.1.9", "A"), ("www.example.test", "127.0.2.6", "AAAA"),
                                     ("doh.test", "127.0.1.6", "HTTPS"), (f"gone{i % 5}.test", "127.0.2.7", "MX")):
            if stop.is_set():
                return
            try:
                ask(server, name, rdtype, source=source, timeout=2)
            except Exception:                 # noqa: BLE001 - a lost answer is the test's problem, not traffic's
                pass
        pause.wait(0.05)


def test_prometheus_scrapes_the_resolver_and_every_dashboard_query_has_data(tmp_path):
    expires = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=3)
    policy = dict(TEST_POLICY, exemptions=[{"id": "EX-E2E", "clients": ["127.0.1.9"], "services": ["chat"],
                                            "approved_by": "Head of IT", "reason": "e2e test",
                                            "expires": expires.isoformat()}])
    blocklists = write_blocklists(tmp_path / "blocklists", policy, TEST_SERVICES)
    stop = threading.Event()
    started: list = []
    try:
        upstream = Dnsmasq(["--host-record=www.chat.test,192.0.2.10", "--host-record=img.chat.test,192.0.2.11",
                            "--host-record=www.example.test,192.0.2.12,2001:db8::12"]).__enter__()
        started.append(upstream)
        server = Sinkhole(tmp_path, {"upstreams": [upstream.address], "blocklists": str(blocklists),
                                     "reload_interval": 1, "metrics": {"listen": "127.0.0.1:0"},
                                     "query_log": {"target": str(tmp_path / "queries.log")}}).__enter__()
        started.append(server)
        server.wait_for_log(lambda: server.count("metrics on 127.0.0.1 port") == 1, 10, "the metrics line")
        metrics_port = port_of(next(l for l in server.lines if "metrics on" in l))
        assert metrics_port != 0

        health = subprocess.run(["curl", "-s", "-w", "\n%{http_code}", f"http://127.0.0.1:{metrics_port}/healthz"],
                                capture_output=True, text=True, timeout=10)
        body, code = health.stdout.rsplit("\n", 1)
        assert code == "200" and "serving DNS with policy" in body, health

        fifo = tmp_path / "capture.pcap"
        os.mkfifo(fifo)
        sidecar = Process([sys.executable, "-m", "resolver", "sidecar", "-c", str(sidecar_config(tmp_path / "sidecar")),
                           "--pcap", str(fifo), "--learning", "0", "--metrics", "127.0.0.1:0"], cwd=ROOT,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"))
        started.append(sidecar)
        sidecar_port = port_of(sidecar.wait_line("metrics on 127.0.0.1 port", 30))
        capture = open_writer(fifo)
        started.append(capture)

        load = threading.Thread(target=traffic, args=(server, stop), daemon=True)
        load.start()

        prom_port = free_port(socket.SOCK_STREAM)
        config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                  "rule_files": [str(RULES)],
                  "scrape_configs": [
                      {"job_name": "sinkhole", "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]},
                      {"job_name": "sinkhole-sidecar", "static_configs": [{"targets": [f"127.0.0.1:{sidecar_port}"]}]}]}
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        prometheus = Process(["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
                              f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{prom_port}",
                              "--log.level=warn"])
        started.append(prometheus)
        base = f"http://127.0.0.1:{prom_port}"

        def targets_up():
            targets = api(base, "/api/v1/targets")["activeTargets"]
            return len(targets) == 2 and all(t["health"] == "up" for t in targets)
        poll(targets_up, 60, "both targets up")

        # the sidecar's series are held at 0 (pre-initialised for every detector and group); now the capture
        def detections():
            return api(base, "/api/v1/query", query='sinkhole_bypass_detections_total{job="sinkhole-sidecar"}')["result"]
        zero = poll(detections, 60, "the sidecar's detections at 0")
        assert {r["metric"]["detector"] for r in zero} == set(DETECTORS)
        assert all(float(r["value"][1]) == 0 for r in zero), zero
        capture.write(capture_chunk())
        capture.flush()

        # every alert rule loaded and evaluates without error
        rules = {r["name"]: r for g in api(base, "/api/v1/rules")["groups"] for r in g["rules"]}
        wanted = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
        assert wanted <= set(rules)

        # every dashboard query returns data: a non-empty result with a finite number in it (a panel
        # split by label may hold NaN series, e.g. a latency quantile of an action nobody triggered)
        failures = {}
        for title, expr in dashboard_queries():
            def has_data(expr=expr):
                result = api(base, "/api/v1/query", query=expr)["result"]
                return any(math.isfinite(float(r["value"][1])) for r in result)
            try:
                poll(has_data, 60, expr, step=0.5)
            except TimeoutError as e:
                failures[title] = str(e)
        assert not failures, json.dumps(failures, indent=1)

        # the data says: an exemption expires in 3 days, and a desktop tried to bypass the resolver
        def firing():
            alerts = api(base, "/api/v1/alerts")["alerts"]
            names = {a["labels"]["alertname"] for a in alerts if a["state"] == "firing"}
            return {"SinkholeExemptionExpiringSoon", "SinkholeBypassFromDesktop"} <= names and names
        names = poll(firing, 60, "the exemption and bypass alerts to fire")
        bypass = {a["labels"]["detector"] for a in api(base, "/api/v1/alerts")["alerts"]
                  if a["labels"]["alertname"] == "SinkholeBypassFromDesktop" and a["state"] == "firing"}
        assert bypass == {detector for detector, _ in EXPECTED}
        counted = {(r["metric"]["detector"], r["metric"]["group"]): float(r["value"][1]) for r in detections()}
        assert {key for key, n in counted.items() if n} == EXPECTED | {("blocked-ip", "mobile")}, counted
        assert "SinkholeResolverDown" not in names and "SinkholePolicyReloadFailing" not in names
        assert all(r["health"] == "ok" for r in rules.values()), rules

        # and the counts Prometheus holds are the resolver's own
        blocked = api(base, "/api/v1/query", query='sum(sinkhole_dns_blocked_total{group="desktop", service="chat"})')
        assert float(blocked["result"][0]["value"][1]) > 0
        revision = api(base, "/api/v1/query", query="sinkhole_policy_info")["result"][0]["metric"]["revision"]
        assert revision in body
    finally:
        stop.set()
        for part in reversed(started):
            if isinstance(part, Process):
                part.stop()
            elif hasattr(part, "close"):       # the capture FIFO's write end
                part.close()
            else:
                part.__exit__(None, None, None)


def scrape(port: int) -> dict[str, float]:
    """The resolver's /metrics read with curl: {'name{labels}': value}."""
    out = subprocess.run(["curl", "-sf", f"http://127.0.0.1:{port}/metrics"], capture_output=True, text=True,
                         timeout=10, check=True).stdout
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in out.splitlines()
            if line and not line.startswith("#")}


def test_reload_metrics_follow_a_rejected_and_a_fixed_policy(tmp_path, blocklists):
    with Dnsmasq(["--host-record=www.example.test,192.0.2.10"]) as upstream, \
         Sinkhole(tmp_path, {"upstreams": [upstream.address], "blocklists": str(blocklists), "reload_interval": 0.2,
                             "metrics": {"listen": "127.0.0.1:0"}}) as server:
        server.wait_for_log(lambda: server.count("metrics on") == 1, 10, "the metrics line")
        port = port_of(next(l for l in server.lines if "metrics on" in l))
        first = scrape(port)
        assert first["sinkhole_policy_last_reload_successful"] == 1 and first["sinkhole_policy_reloads_total"] == 0
        # unchanged files: each poll confirms the policy, which moves the timestamp but is no reload
        poll(lambda: scrape(port)["sinkhole_policy_last_reload_success_timestamp_seconds"]
             > first["sinkhole_policy_last_reload_success_timestamp_seconds"], 20, "a confirmation")
        assert scrape(port)["sinkhole_policy_reloads_total"] == 0

        policy_file = blocklists / "policy.yaml"
        good = policy_file.read_text()
        policy_file.write_text(good.replace("desktop:", "desktop: [", 1))
        server.wait_for_log(lambda: server.count("reload rejected") >= 1, 20, "the rejected reload")
        broken = poll(lambda: (m := scrape(port))["sinkhole_policy_reload_failures_total"] == 1 and m, 10, "failure")
        assert broken["sinkhole_policy_last_reload_successful"] == 0 and broken["sinkhole_policy_reloads_total"] == 1
        stamp = broken["sinkhole_policy_last_reload_success_timestamp_seconds"]
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5).status == 200  # old policy serves

        policy_file.write_text(good.replace("nxdomain", "refused"))
        server.wait_for_log(lambda: server.count(" loaded (was ") >= 1, 20, "the fixed policy")
        fixed = poll(lambda: (m := scrape(port))["sinkhole_policy_last_reload_successful"] == 1 and m, 10, "success")
        assert fixed["sinkhole_policy_reloads_total"] == 2 and fixed["sinkhole_policy_reload_failures_total"] == 1
        assert fixed["sinkhole_policy_last_reload_success_timestamp_seconds"] > stamp
