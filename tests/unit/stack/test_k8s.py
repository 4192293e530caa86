"""deploy/k8s validates offline against the Kubernetes schemas and agrees with the code."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from services.auth.settings import AuthSettings
from services.cli import build_parser
from services.common.settings import known_variables
from services.inference.settings import InferenceSettings
from services.router.settings import RouterSettings
from tests.unit.stack.compose_file import ROOT
from tests.unit.stack.netpol import Peer, connects, peer_matches, selects

K8S = ROOT / "deploy" / "k8s"
VERSION = "1.37.0"
SETTINGS: dict[str, tuple[type[Any], str]] = {
    "auth": (AuthSettings, "auth"),
    "router": (RouterSettings, "router"),
    "inference": (InferenceSettings, "inference"),
}
DEFAULT_PORTS = {"auth": 50052, "router": 50051, "inference": 50061}


def documents() -> list[tuple[Path, dict[str, Any]]]:
    out: list[tuple[Path, dict[str, Any]]] = []
    for path in sorted(K8S.rglob("*.yaml")):
        out.extend((path, doc) for doc in yaml.safe_load_all(path.read_text()) if doc)
    return out


def resources() -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (d["kind"], d["metadata"]["name"]): d
        for _, d in documents()
        if d["kind"] != "Kustomization"
    }


def containers(kind: str, name: str) -> list[dict[str, Any]]:
    spec = resources()[(kind, name)]["spec"]
    return list(spec["template"]["spec"]["containers"])


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


@pytest.mark.parametrize(
    "path,doc",
    [(p, d) for p, d in documents() if d["kind"] != "Kustomization"],
    ids=lambda v: v.name if isinstance(v, Path) else v["metadata"]["name"],
)
def test_every_manifest_is_valid_for_kubernetes(path: Path, doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, VERSION, strict=True)


def test_every_kustomization_lists_files_that_exist() -> None:
    for path, doc in documents():
        if doc["kind"] != "Kustomization":
            continue
        for entry in doc["resources"]:
            assert (path.parent / entry).exists(), f"{path}: {entry}"
    listed = {
        (path.parent / e).resolve()
        for path, doc in documents()
        if doc["kind"] == "Kustomization"
        for e in doc["resources"]
    }
    for path, doc in documents():
        if doc["kind"] != "Kustomization":
            assert path.resolve() in listed, f"{path} is in no kustomization"


# Variables only other variables use ($(VAR) expansion), not settings.
HELPER_VARIABLES = {"router": {"REDIS_PASSWORD"}}
WORKLOADS = [
    ("Deployment", "tokenyard-auth", "auth"),
    ("Job", "tokenyard-auth-migrate", "auth"),
    ("Deployment", "tokenyard-router", "router"),
    ("StatefulSet", "tokenyard-inference", "inference"),
]


@pytest.mark.parametrize("kind,name,service", WORKLOADS)
def test_commands_variables_ports_and_probes_agree_with_the_code(
    kind: str, name: str, service: str
) -> None:
    parser = build_parser()
    (container,) = containers(kind, name)
    args = parser.parse_args(container["args"])
    assert args.command == service
    env = env_of(container)
    cls, prefix = SETTINGS[service]
    known = {n for n, _, _ in known_variables(cls, prefix)} | HELPER_VARIABLES.get(service, set())
    assert set(env) <= known, sorted(set(env) - known)
    if kind == "Job":
        return
    port = int(env.get(f"TOKENYARD_{service.upper()}_PORT", DEFAULT_PORTS[service]))
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["grpc"] == port
    assert ports["metrics"] == int(env[f"TOKENYARD_{service.upper()}_METRICS_PORT"])
    assert env[f"TOKENYARD_{service.upper()}_HOST"] == "0.0.0.0"
    probe = container["readinessProbe"]["exec"]["command"]
    assert probe[:2] == ["tokenyard", "health"] and probe[2] == f"127.0.0.1:{port}"
    parser.parse_args(probe[1:])
    service_obj = resources()[("Service", name)]
    # The router's Service also publishes its OpenAI-compatible HTTP port.
    public = ["grpc", "http"] if service == "router" else ["grpc"]
    assert [p["targetPort"] for p in service_obj["spec"]["ports"]] == public
    assert service_obj["spec"]["ports"][0]["port"] == port
    if service == "router":
        assert f"0.0.0.0:{ports['http']}" == env["TOKENYARD_ROUTER_HTTP_ADDRESS"]
        assert service_obj["spec"]["ports"][1]["port"] == ports["http"]


def test_the_router_finds_auth_redis_and_workers_by_their_service_names() -> None:
    res = resources()
    env = env_of(containers("Deployment", "tokenyard-router")[0])
    host, port = env["TOKENYARD_ROUTER_AUTH_ADDRESS"].split(":")
    assert res[("Service", host)]["spec"]["ports"][0]["port"] == int(port)
    host, port = env["TOKENYARD_ROUTER_WORKER_DNS"].split(":")
    workers = res[("Service", host)]
    assert workers["spec"]["clusterIP"] == "None"
    assert workers["spec"]["ports"][0]["port"] == int(port)
    assert res[("StatefulSet", "tokenyard-inference")]["spec"]["serviceName"] == host
    redis = urlsplit(env["TOKENYARD_REDIS_URL"])
    assert res[("Service", redis.hostname)]["spec"]["ports"][0]["port"] == redis.port
    assert "TOKENYARD_ROUTER_WORKERS" not in env


def test_workers_request_a_gpu_and_secrets_come_from_secret_refs() -> None:
    (worker,) = containers("StatefulSet", "tokenyard-inference")
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    for kind, name, _ in WORKLOADS:
        env = env_of(containers(kind, name)[0])
        for secret in ("TOKENYARD_AUTH_KEY_PEPPER", "TOKENYARD_SERVICE_TOKEN",
                       "TOKENYARD_AUTH_DATABASE_URL"):  # fmt: skip
            if secret in env:
                assert "secretKeyRef" in env[secret], f"{name}: {secret} must come from a Secret"


def test_the_hpa_scales_the_router_deployment() -> None:
    hpa = resources()[("HorizontalPodAutoscaler", "tokenyard-router")]
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "tokenyard-router")
    assert hpa["spec"]["minReplicas"] >= 2


# Secure by default (security issue 12, item 15): NetworkPolicies and Redis's password.
NAMESPACE = "tokenyard"
APP = "app.kubernetes.io/name"
POD_KINDS = {"Deployment", "StatefulSet", "Job"}
# Peers outside the namespace the policies name, and impostors that must not pass.
OUTSIDERS = [
    Peer("prometheus", "monitoring", {APP: "prometheus"}, {"web": 9090}),
    Peer("prometheus-elsewhere", "default", {APP: "prometheus"}),
    Peer("kube-dns", "kube-system", {"k8s-app": "kube-dns"}, {"dns": 53}),
    Peer("otel-collector", "observability", {APP: "otel-collector"}, {"otlp": 4317}),
    Peer("router-lookalike", "default", {APP: "tokenyard-router"}, {"grpc": 50051}),
    Peer("client", None, ip="203.0.113.7", ports={"https": 443}),
    Peer("database", None, ip="192.0.2.10", ports={"postgres": 5432}),
]
# A pod someone starts in the namespace (`kubectl run debug`): it reaches nothing.
INTRUDER = Peer("intruder", NAMESPACE, {APP: "debug"})
OURS = {"router", "auth", "auth-migrate", "inference", "redis"}
OUTSIDE = {p.name for p in OUTSIDERS}
# Who may open a connection to (destination, port); everything else is refused.
ALLOWED = {
    ("router", 50051): OUTSIDE,  # the public port
    ("router", 9464): {"prometheus"},
    ("auth", 50052): {"router"},
    ("auth", 9464): {"prometheus"},
    ("inference", 50061): {"router"},
    ("inference", 9464): {"prometheus"},
    ("redis", 6379): {"router"},
    ("kube-dns", 53): OURS | {"intruder"},
    ("otel-collector", 4317): {"router", "auth", "inference"},
    ("database", 5432): {"auth", "auth-migrate"},
}


def policies() -> list[dict[str, Any]]:
    return [d for _, d in documents() if d["kind"] == "NetworkPolicy"]


def our_pods() -> list[Peer]:
    pods = []
    for (kind, name), doc in resources().items():
        if kind in POD_KINDS:
            template = doc["spec"]["template"]
            ports = {
                p["name"]: p["containerPort"]
                for c in template["spec"]["containers"]
                for p in c.get("ports", [])
            }
            labels = template["metadata"]["labels"]
            pods.append(Peer(name.removeprefix("tokenyard-"), NAMESPACE, labels, ports))
    return pods


def test_the_namespace_denies_by_default_in_both_directions() -> None:
    deny = [p for p in policies() if p["spec"]["podSelector"] == {}]
    assert any(
        set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
        and not p["spec"].get("ingress")
        and not p["spec"].get("egress")
        for p in deny
    )
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["namespace"] == NAMESPACE and "network" in kustomization["resources"]


def test_every_policy_selector_matches_the_pods_it_names() -> None:
    pods = our_pods()
    assert {p.name for p in pods} == OURS
    assert {f"tokenyard-{n}" for n in OURS} <= {p["metadata"]["name"] for p in policies()}
    for policy in policies():
        name, spec = policy["metadata"]["name"], policy["spec"]
        if spec["podSelector"]:
            selected = [p.name for p in pods if selects(spec["podSelector"], p.labels)]
            assert [f"tokenyard-{n}" for n in selected] == [name], name
        for rule in [*spec.get("ingress", []), *spec.get("egress", [])]:
            for peer in [*rule.get("from", []), *rule.get("to", [])]:
                candidates = OUTSIDERS if "namespaceSelector" in peer else pods
                matched = [p for p in candidates if peer_matches(peer, NAMESPACE, p)]
                assert len(matched) == 1, f"{name}: {peer} matches {[p.name for p in matched]}"


def test_each_port_accepts_exactly_the_intended_peers() -> None:
    """Every (source, destination, port) with one end in the namespace, evaluated."""
    rules = policies()
    peers = [*our_pods(), INTRUDER, *OUTSIDERS]
    for dst in peers:
        for port in dst.ports.values():
            for protocol in ("TCP", "UDP") if port == 53 else ("TCP",):
                sources = [
                    src
                    for src in peers
                    if src is not dst and NAMESPACE in (src.namespace, dst.namespace)
                ]
                allowed = {
                    src.name
                    for src in sources
                    if connects(rules, NAMESPACE, src, dst, port, protocol)
                }
                expected = ALLOWED.get((dst.name, port), set()) & {s.name for s in sources}
                assert allowed == expected, f"{dst.name}:{port}/{protocol}"


def secret_ref(env: dict[str, Any], name: str) -> tuple[str, str]:
    ref = env[name]["secretKeyRef"]
    return ref["name"], ref["key"]


def test_redis_requires_a_password_from_a_secret_and_the_router_sends_it() -> None:
    (redis,) = containers("Deployment", "tokenyard-redis")
    (router,) = containers("Deployment", "tokenyard-router")
    redis_env, router_env = env_of(redis), env_of(router)
    assert secret_ref(redis_env, "REDISCLI_AUTH") == ("tokenyard-redis", "password")
    assert secret_ref(router_env, "REDIS_PASSWORD") == ("tokenyard-redis", "password")
    assert redis["command"][:2] == ["sh", "-c"]
    script = redis["command"][2]
    assert "exec redis-server - " in script and "requirepass ${REDISCLI_AUTH}" in script
    probe = redis["readinessProbe"]["exec"]["command"]
    assert "redis-cli ping" in " ".join(probe) and not {"-a", "--pass"} & set(probe)
    # $(VAR) is expanded by the kubelet only from variables defined earlier in the list.
    names = [e["name"] for e in router["env"]]
    assert names.index("REDIS_PASSWORD") < names.index("TOKENYARD_REDIS_URL")
    url = urlsplit(router_env["TOKENYARD_REDIS_URL"])
    assert (url.scheme, url.password, url.port) == ("redis", "$(REDIS_PASSWORD)", 6379)
    service = resources()[("Service", str(url.hostname))]
    assert selects({"matchLabels": service["spec"]["selector"]}, {APP: "tokenyard-redis"})


def test_the_tls_guide_names_each_services_tls_variables_in_full() -> None:
    """docs/kubernetes.md says which variables each service sets, each one a real setting."""
    doc = (ROOT / "docs" / "kubernetes.md").read_text()
    reference = (ROOT / "docs" / "configuration.md").read_text()
    tls = {
        name
        for service in ("auth", "inference")
        for name, _, _ in known_variables(*SETTINGS[service])
        if "_TLS_" in name and not name.endswith("_NAMES")
    }
    tls |= {"TOKENYARD_ROUTER_TLS_CERT", "TOKENYARD_ROUTER_TLS_KEY"}
    named = set(re.findall(r"\b(TOKENYARD_[A-Z0-9_]*[A-Z0-9])\b(?![{_<])", doc))
    assert tls <= named, sorted(tls - named)
    assert {n for n in named if f"`{n}`" not in reference} == set()
    assert "cert-manager" in doc and "OTLP" in doc
    assert not re.search(r"traces and metrics by OTLP|metrics (are sent|by) OTLP", doc)


# Elastic scaling (issue 18 §2): workers scale on queue time and leave drained.
ADAPTER_VALUES = ROOT / "deploy" / "prometheus-adapter" / "values.yaml"


def test_workers_scale_on_queue_time_through_prometheus_adapter() -> None:
    from prometheus_client import REGISTRY

    import services.inference.metrics  # noqa: F401  (registers the worker's metrics)

    hpa = resources()[("HorizontalPodAutoscaler", "tokenyard-inference")]
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("StatefulSet", "tokenyard-inference")
    names = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert "tokenyard_inference_queue_seconds_p95" in names
    exported = {s.name for family in REGISTRY.collect() for s in family.samples}
    rules = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]
    served = {rule["name"]["as"]: rule for rule in rules}
    for name in names:
        assert name in exported, f"the HPA scales on {name}, which no worker exports"
        assert name in served, f"prometheus-adapter serves no {name}"
        assert name in served[name]["seriesQuery"]
        assert set(served[name]["resources"]["overrides"]) == {"namespace", "pod"}
    # The HPA owns the replica count: a fixed one would fight it on every apply.
    assert "replicas" not in resources()[("StatefulSet", "tokenyard-inference")]["spec"]
    assert hpa["spec"]["behavior"]["scaleDown"]["policies"][0]["value"] == 1


@pytest.mark.parametrize("name", ["tokenyard-inference", "tokenyard-router"])
def test_a_disruption_budget_covers_each_scaled_workload(name: str) -> None:
    pdb = resources()[("PodDisruptionBudget", name)]
    kind = "StatefulSet" if name == "tokenyard-inference" else "Deployment"
    labels = resources()[(kind, name)]["spec"]["template"]["metadata"]["labels"]
    selector = pdb["spec"]["selector"]["matchLabels"]
    assert selector.items() <= labels.items()
    if name == "tokenyard-inference":
        assert pdb["spec"]["maxUnavailable"] == 1
    else:
        assert pdb["spec"]["minAvailable"] >= 1


def test_a_worker_is_drained_before_sigterm_and_given_time_to_finish() -> None:
    (container,) = containers("StatefulSet", "tokenyard-inference")
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "tokenyard"
    args = build_parser().parse_args(command[1:])
    assert (args.command, args.inference_command) == ("inference", "drain")
    port = {p["name"]: p["containerPort"] for p in container["ports"]}["grpc"]
    assert args.address == f"127.0.0.1:{port}"
    grace = float(env_of(container)["TOKENYARD_INFERENCE_GRACE_PERIOD"])
    spec = resources()[("StatefulSet", "tokenyard-inference")]["spec"]["template"]["spec"]
    assert spec["terminationGracePeriodSeconds"] > args.timeout + grace


def test_every_metric_the_scaling_guide_names_is_exported() -> None:
    from prometheus_client import REGISTRY

    import services.inference.metrics
    import services.router.metrics

    assert services.inference.metrics.QUEUE_P95 and services.router.metrics.POOLS is not None

    doc = (ROOT / "docs" / "kubernetes.md").read_text()
    named = set(re.findall(r"\b(tokenyard_(?:inference|router)_[a-z0-9_]*[a-z0-9])\b", doc))
    exported = set()
    for family in REGISTRY.collect():
        exported.add(family.name)
        exported |= {s.name for s in family.samples}
        if family.type == "counter":
            exported.add(family.name + "_total")
    assert len(named) > 20
    assert named <= exported, sorted(named - exported)
