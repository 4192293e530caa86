"""deploy/k8s validates offline against the Kubernetes schemas and agrees with the code."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from services.auth.settings import AuthSettings
from services.cli import build_parser
from services.common.settings import known_variables
from services.inference.settings import InferenceSettings
from services.router.settings import RouterSettings
from tests.unit.stack.compose_file import ROOT

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
    known = {n for n, _, _ in known_variables(cls, prefix)}
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
    redis_host = env["TOKENYARD_REDIS_URL"].split("//")[1].split(":")[0]
    assert ("Service", redis_host) in res
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
