"""deploy/kubernetes validated against the Kubernetes schemas shipped in kubernetes-validate
(offline), plus the cross-references a schema cannot see."""
from pathlib import Path

import pytest
import yaml

kv = pytest.importorskip("kubernetes_validate", reason="needs kubernetes-validate (the `test` extra)")

DIR = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
VERSION = "1.30.0"


def documents():
    return [(path.name, doc) for path in sorted(DIR.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc]


def by_kind(kind):
    return [doc for _, doc in documents() if doc["kind"] == kind]


@pytest.mark.parametrize("name,doc", [(f"{n}:{d['kind']}/{d['metadata']['name']}", d) for n, d in documents()
                                      if d["kind"] != "ServiceMonitor"])
def test_schema(name, doc):
    kv.validate(doc, VERSION, strict=True)


def test_the_validator_rejects_a_broken_manifest():
    doc = by_kind("Deployment")[0]
    broken = yaml.safe_load(yaml.safe_dump(doc))
    broken["spec"]["replicas"] = "three"
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, VERSION, strict=True)


def test_resolver_shape():
    (deploy,) = by_kind("Deployment")
    assert deploy["spec"]["replicas"] >= 2
    pod = deploy["spec"]["template"]["spec"]
    names = {c["name"] for c in pod["containers"]}
    assert {"resolver", "git-sync"} <= names
    resolver = next(c for c in pod["containers"] if c["name"] == "resolver")
    for probe in ("readinessProbe", "livenessProbe"):
        assert resolver[probe]["httpGet"]["path"] == "/healthz"
    config = yaml.safe_load(by_kind("ConfigMap")[0]["data"]["sinkhole.yaml"])
    assert config["metrics"]["listen"].endswith(":9153")
    ports = {(p["port"], p["protocol"]) for s in by_kind("Service") for p in s["spec"]["ports"]}
    assert {(53, "UDP"), (53, "TCP")} <= ports
    labels = deploy["spec"]["template"]["metadata"]["labels"]
    (pdb,) = by_kind("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["minAvailable"] < deploy["spec"]["replicas"]


def test_service_monitor_finds_the_metrics_port():
    (monitor,) = by_kind("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    wanted = monitor["spec"]["selector"]["matchLabels"]
    services = [s for s in by_kind("Service") if wanted.items() <= s["metadata"]["labels"].items()]
    assert len(services) == 1
    port_names = {p["name"] for p in services[0]["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= port_names


def test_sidecar_adds_only_net_raw():
    (ds,) = by_kind("DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True and pod["nodeSelector"]
    for c in pod["containers"] + pod.get("initContainers", []):
        caps = c.get("securityContext", {}).get("capabilities", {})
        assert caps.get("drop") == ["ALL"]
        assert caps.get("add", []) in ([], ["NET_RAW"])
    assert any(c.get("securityContext", {}).get("capabilities", {}).get("add") == ["NET_RAW"] for c in pod["containers"])
