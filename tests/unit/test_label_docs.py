"""Every label value the docs, the alert rules and the dashboard select on is one the code can emit:
`reason="..."` and the like are pulled out of README.md, the other READMEs, deploy/prometheus/*.yml
and the Grafana dashboard and checked against resolver/exposition.LABELS, the sidecar's detectors,
the shipped policy and the Prometheus job names. A selector on a value nothing emits matches no
series, so a panel stays empty and an alert never fires, silently."""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import yaml

from exporters.detectors import DETECTORS
from resolver.exposition import LABELS
from resolver.loader import load_policy

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", ROOT / "exporters" / "README.md", ROOT / "deploy" / "README.md",
        ROOT / "deploy" / "grafana" / "README.md", ROOT / "blocklists" / "README.md"]
RULES = sorted((ROOT / "deploy" / "prometheus").glob("**/*.yml"))     # the rules and their promtool tests
DASHBOARD = ROOT / "deploy" / "grafana" / "sinkhole.json"

SELECTOR = re.compile(r"\b(?:sinkhole_[a-z0-9_]+|up)\s*\{([^{}]*)\}")
MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*\"([^\"]*)\"")
FREE = {"instance", "upstream", "le"}        # addresses and bucket bounds: not a fixed set


def matchers(text: str, up: bool = True):
    """(label, operator, value) of every matcher inside a sinkhole_*{...} (or up{...}) selector."""
    for selector in SELECTOR.finditer(text):
        if up or selector.group(0).startswith("sinkhole_"):
            yield from MATCHER.findall(selector.group(1))


def sources():
    """(where, text) of everything that selects on labels; the dashboard's strings unescaped."""
    for path in DOCS:
        if path.exists():
            yield path.relative_to(ROOT), path.read_text()
    for path in RULES:
        yield path.relative_to(ROOT), path.read_text()

    def strings(node):
        if isinstance(node, str):
            yield node
        elif isinstance(node, dict):
            for v in node.values():
                yield from strings(v)
        elif isinstance(node, list):
            for v in node:
                yield from strings(v)
    yield DASHBOARD.relative_to(ROOT), "\n".join(strings(json.loads(DASHBOARD.read_text())))


def known_values() -> dict[str, frozenset]:
    policy = load_policy(str(ROOT / "blocklists"), time.time())
    jobs = {job["job_name"] for job in yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml")
                                                        .read_text())["scrape_configs"]}
    known = {label: values for label, values in LABELS.items() if values is not None}
    known.update(detector=frozenset(DETECTORS), group=frozenset(policy.groups),
                 service=frozenset(policy.services), job=frozenset(jobs))
    return known


def literal_values(op: str, value: str) -> list[str]:
    """The values a matcher names: itself for = and !=, the alternatives of a plain a|b regex."""
    if op in ("=", "!="):
        return [value]
    if "$" in value or not re.fullmatch(r"[A-Za-z0-9_.:-]+(\|[A-Za-z0-9_.:-]+)*", value):
        return []                    # a Grafana variable or a real pattern: nothing to look up
    return value.split("|")


def problems_in(text: str, known, up: bool = True) -> list[str]:
    problems = []
    for label, op, value in matchers(text, up):
        if label in FREE or label == "__name__":
            continue
        if label not in known:
            problems.append(f'{label}{op}"{value}": no such label on any sinkhole series')
            continue
        for v in literal_values(op, value):
            if v not in known[label]:
                problems.append(f'{label}{op}"{value}": {v!r} is not one of {sorted(known[label])}')
    return problems


@pytest.mark.parametrize("where,text", list(sources()), ids=lambda x: str(x) if isinstance(x, Path) else "")
def test_every_label_value_named_is_one_the_code_emits(where, text):
    # promtool's test input may scrape other jobs (up{job="node"}): there only sinkhole series count
    assert problems_in(text, known_values(), up="tests" not in Path(where).parts) == []


def test_the_sources_are_read():
    found = {str(where): list(matchers(text)) for where, text in sources()}
    assert ("reason", "=", "tcp-connections") in found["README.md"]
    assert ("rcode", "=", "SERVFAIL") in found["deploy/prometheus/alerts.yml"]
    assert ("job", "=", "sinkhole-sidecar") in found["deploy/grafana/sinkhole.json"]
    assert ("detector", "=", "doh-sni") in found["deploy/prometheus/tests/alerts_test.yml"]


def test_a_wrong_value_is_caught():
    known = known_values()
    assert problems_in('sinkhole_dns_dropped_total{reason="rate-limit"}', known)
    assert problems_in('sum(rate(sinkhole_bypass_detections_total{detector=~"doh_sni|dot"}[5m]))', known)
    assert problems_in('sinkhole_dns_dropped_total{cause="overload"}', known)
    assert not problems_in('sinkhole_bypass_detections_total{detector=~"doh-sni|dot", group="desktop"}', known)


def test_every_drop_reason_the_resolver_passes_is_a_label_value():
    """observer.dropped(reason) folds a reason outside LABELS["reason"] into "other": a literal the
    server passes must be a declared value, or its drops are counted under the wrong name."""
    passed = {m for path in (ROOT / "resolver").glob("*.py")
              for m in re.findall(r"\.dropped\(\s*\"([^\"]+)\"\s*\)", path.read_text())}
    assert passed, "no observer.dropped(...) calls found: the pattern is out of date"
    assert passed <= LABELS["reason"], f"not declared in exposition.LABELS: {sorted(passed - LABELS['reason'])}"


def test_the_readme_lists_the_drop_reasons_there_are():
    (row,) = [line for line in (ROOT / "README.md").read_text().splitlines()
              if line.startswith("| `sinkhole_dns_dropped_total` |")]
    listed = set(re.findall(r"`([a-z-]+)` \(|or `([a-z-]+)`", row.split("reason is", 1)[1]))
    assert {a or b for a, b in listed} == LABELS["reason"]
