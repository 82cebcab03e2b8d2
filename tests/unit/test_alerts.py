"""The Prometheus deploy files: alert rules pass `promtool check rules` and their unit tests
(deploy/prometheus/tests/alerts_test.yml) fire and stay silent for every alert; the scrape config is
valid; the rules and the Grafana dashboard name only metrics the code declares."""
from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
import yaml
from prometheus_client import CollectorRegistry

from helpers import ROOT, have
from resolver.exposition import bypass_detections
from resolver.metrics import PrometheusObserver

PROM = ROOT / "deploy" / "prometheus"
RULES = PROM / "alerts.yml"
RULE_TESTS = PROM / "tests" / "alerts_test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "sinkhole.json"

needs_promtool = pytest.mark.skipif(not have("promtool"), reason="needs promtool (Debian prometheus)")


def promtool(*args, cwd=None):
    return subprocess.run(["promtool", *map(str, args)], capture_output=True, text=True, timeout=60, cwd=cwd)


def alerts() -> dict[str, dict]:
    return {r["alert"]: r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}


@needs_promtool
def test_rules_pass_promtool_check():
    result = promtool("check", "rules", RULES)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in result.stdout


@needs_promtool
def test_rule_unit_tests_pass():
    result = promtool("test", "rules", RULE_TESTS)
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr


def test_every_alert_has_a_firing_and_a_silent_case():
    cases = [case for test in yaml.safe_load(RULE_TESTS.read_text())["tests"] for case in test["alert_rule_test"]]
    wanted = {"SinkholeResolverDown", "SinkholeUpstreamFailing", "SinkholeServfailRatioHigh",
              "SinkholePolicyReloadFailing", "SinkholePolicyStale", "SinkholeExemptionExpiringSoon",
              "SinkholeBypassFromDesktop"}
    assert wanted <= set(alerts())
    for name in alerts():
        fired = [c for c in cases if c["alertname"] == name and c.get("exp_alerts")]
        silent = [c for c in cases if c["alertname"] == name and not c.get("exp_alerts")]
        assert fired and silent, f"{name}: needs a test that fires ({len(fired)}) and one that does not ({len(silent)})"


@needs_promtool
@pytest.mark.parametrize("before, after", [
    ("      > 0.25\n", "      > 0.75\n"),                              # upstream threshold too lax
    ('{group="desktop"}', '{group="mobile"}'),                         # bypass alert on the wrong group
    ("< 7 * 86400", "< 1 * 86400"),                                   # exemption warning too late
])
def test_rule_tests_catch_a_wrong_rule(tmp_path, before, after):
    text = RULES.read_text()
    assert before in text
    (tmp_path / "tests").mkdir()
    (tmp_path / "alerts.yml").write_text(text.replace(before, after))
    shutil.copy(RULE_TESTS, tmp_path / "tests" / "alerts_test.yml")
    result = promtool("test", "rules", tmp_path / "tests" / "alerts_test.yml")
    assert result.returncode != 0 and "FAILED" in result.stdout + result.stderr


@needs_promtool
def test_scrape_config_is_valid():
    result = promtool("check", "config", PROM / "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    jobs = {job["job_name"] for job in yaml.safe_load((PROM / "prometheus.yml").read_text())["scrape_configs"]}
    assert jobs == {"sinkhole", "sinkhole-sidecar"}         # the names the rules and the dashboard select


def dashboard_queries() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in board["templating"]["list"] if v["type"] == "query"]
    return exprs


def declared_metrics() -> set[str]:
    """Every sample name the resolver and the sidecar helper can expose."""
    registry = CollectorRegistry()
    observer = PrometheusObserver(None, registry)
    bypass_detections(registry, ["doh-sni"], ["desktop"])
    names = set()
    for family in [*registry.collect(), *observer.gauges.describe()]:   # scrape-time gauges: unbound here
        names.add(family.name)
        names.update(s.name for s in family.samples)
        suffix = {"counter": "_total", "info": "_info"}.get(family.type)
        if suffix:
            names.add(family.name + suffix)
        if family.type == "histogram":
            names.update(family.name + s for s in ("_bucket", "_count", "_sum"))
    return names


@pytest.mark.parametrize("where", ["rules", "dashboard"])
def test_only_declared_metrics_are_used(where):
    text = RULES.read_text() if where == "rules" else "\n".join(dashboard_queries())
    used = set(re.findall(r"\bsinkhole_[a-z0-9_]+", text))
    assert used, "no sinkhole metric referenced at all"
    unknown = used - declared_metrics()
    assert not unknown, f"{where} use metrics nobody declares: {sorted(unknown)}"


def test_dashboard_covers_the_issue():
    exprs = "\n".join(dashboard_queries())
    for metric in ("sinkhole_dns_queries_total", "sinkhole_dns_blocked_total", "sinkhole_dns_responses_total",
                   "sinkhole_dns_request_duration_seconds_bucket", "sinkhole_cache_hits_total",
                   "sinkhole_upstream_failures_total", "sinkhole_policy_last_reload_successful",
                   "sinkhole_exemptions_next_expiry_timestamp_seconds", "sinkhole_bypass_detections_total"):
        assert metric in exprs, metric
