"""deploy/kubernetes validated against the Kubernetes schemas shipped in kubernetes-validate
(offline), plus the cross-references a schema cannot see."""
import re
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


def expand(text, env):
    """Kubernetes' $(VAR) expansion of a container's args from its env ($$ is a literal $)."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), text)


def container_env(container, host_ip="192.0.2.10"):
    env = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        else:       # the only downward-API field the manifests use; a node address stands in
            assert var["valueFrom"] == {"fieldRef": {"fieldPath": "status.hostIP"}}, var
            env[var["name"]] = host_ip
    return env


def sidecar_container():
    (ds,) = by_kind("DaemonSet")
    (sidecar,) = [c for c in ds["spec"]["template"]["spec"]["containers"] if c["name"] == "sidecar"]
    return sidecar


def sidecar_command(sidecar):
    """The sidecar container's args as Kubernetes expands them, parsed by `sinkhole`'s own parser."""
    from resolver import cli
    args = [expand(a, container_env(sidecar)) for a in sidecar["args"]]
    assert not [a for a in args if "$(" in a], f"an unexpanded variable in {args}"
    try:
        return cli.build_parser().parse_args(args)
    except SystemExit as e:
        pytest.fail(f"`sinkhole {' '.join(args)}` does not parse (exit {e.code})")


def test_sidecar_args_parse_with_the_real_command_line():
    from resolver.config import parse_hostport
    sidecar = sidecar_container()
    parsed = sidecar_command(sidecar)
    assert parsed.command == "sidecar" and parsed.pcap is None
    assert [i for i in parsed.iface.split(",") if i], "no capture interface"
    assert parsed.metrics, "no --metrics: nothing to scrape and nothing for the probes"
    host, port = parse_hostport(parsed.metrics, None)
    assert host == "192.0.2.10" and port > 0
    assert any(parsed.config.startswith(m["mountPath"] + "/") for m in sidecar["volumeMounts"])


def test_sidecar_probes_ask_healthz_on_the_metrics_port():
    from resolver.config import parse_hostport
    sidecar = sidecar_container()
    _, port = parse_hostport(sidecar_command(sidecar).metrics, None)
    named = {p["name"]: p["containerPort"] for p in sidecar.get("ports", [])}
    assert port in named.values(), f"--metrics port {port} is not a container port {named}"
    for probe in ("readinessProbe", "livenessProbe"):
        get = sidecar[probe]["httpGet"]
        assert get["path"] == "/healthz"
        assert named.get(get["port"], get["port"]) == port, f"{probe} asks port {get['port']}, --metrics is {port}"
        assert "host" not in get     # the kubelet asks the pod's address, the node's under hostNetwork


def test_the_args_check_would_catch_a_sidecar_without_an_interface():
    from resolver import cli
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["sidecar", "-c", "/etc/sinkhole/sinkhole.yaml"])
