"""docker-compose.yml agrees with the code: commands, variables, ports, health, order.

No Docker engine runs here, so the compose model is checked against the CLI parser
and the settings classes instead of being started.
"""

from __future__ import annotations

from typing import Any

import pytest

from services.auth.settings import AuthSettings
from services.cli import build_parser
from services.common.settings import known_variables
from services.inference.settings import InferenceSettings
from services.router.settings import RouterSettings
from tests.unit.stack.compose_file import ROOT, load_compose, read_env_file

OURS = {"migrate": "auth", "auth": "auth", "router": "router"}
OURS |= {"inference-1": "inference", "inference-2": "inference"}
SETTINGS: dict[str, tuple[type[Any], str]] = {
    "auth": (AuthSettings, "auth"),
    "router": (RouterSettings, "router"),
    "inference": (InferenceSettings, "inference"),
}
# The collector image has no shell or probe binary; services only need it started.
NO_HEALTHCHECK = {"migrate", "otel-collector"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose("docker-compose.yml")


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return dict(compose["services"])


def variables(kind: str) -> set[str]:
    cls, svc = SETTINGS[kind]
    return {name for name, _, _ in known_variables(cls, svc)}


def port_of(svc: dict[str, Any], kind: str, default: int) -> int:
    return int(svc["environment"].get(f"TOKENYARD_{kind.upper()}_PORT", default))


def test_the_expected_services_are_defined(services: dict[str, Any]) -> None:
    assert set(services) == set(OURS) | {"postgres", "redis", "otel-collector", "jaeger"}


def test_every_command_and_healthcheck_is_a_real_cli_command(services: dict[str, Any]) -> None:
    parser = build_parser()
    for name, kind in OURS.items():
        command = services[name]["command"]
        args = parser.parse_args(command)
        assert args.command == kind, name
        if name != "migrate":
            test = services[name]["healthcheck"]["test"]
            assert test[:3] == ["CMD", "tokenyard", "health"], name
            parser.parse_args(test[2:])


def test_every_tokenyard_variable_is_one_the_settings_read(services: dict[str, Any]) -> None:
    for name, kind in OURS.items():
        env = services[name]["environment"]
        unknown = {k for k in env if k.startswith(("TOKENYARD_", "OTEL_"))} - variables(kind)
        assert not unknown, f"{name}: {sorted(unknown)}"


def test_the_env_file_only_sets_known_or_compose_variables() -> None:
    env = read_env_file(ROOT / ".env")
    known = set().union(*(variables(k) for k in SETTINGS))
    unknown = {k for k in env if k.startswith("TOKENYARD_")} - known
    assert not unknown


def test_ports_and_addresses_agree(services: dict[str, Any]) -> None:
    auth_port = port_of(services["auth"], "auth", 50052)
    router = services["router"]
    assert router["environment"]["TOKENYARD_ROUTER_AUTH_ADDRESS"] == f"auth:{auth_port}"
    workers = router["environment"]["TOKENYARD_ROUTER_WORKERS"].split(",")
    expected = [f"{n}:{port_of(services[n], 'inference', 50061)}" for n in OURS if "inference" in n]
    assert workers == expected
    router_port = port_of(router, "router", 50051)
    assert any(str(p).endswith(f":{router_port}") for p in router["ports"])
    http_port = router["environment"]["TOKENYARD_ROUTER_HTTP_ADDRESS"].rpartition(":")[2]
    assert any(str(p).endswith(f":{http_port}") for p in router["ports"])
    for name, kind in OURS.items():
        if name == "migrate":
            continue
        svc = services[name]
        default = {"auth": 50052, "router": 50051, "inference": 50061}[kind]
        health_target = svc["healthcheck"]["test"][3]
        assert health_target.endswith(f":{port_of(svc, kind, default)}"), name
        assert svc["environment"][f"TOKENYARD_{kind.upper()}_HOST"] == "0.0.0.0", name


def test_metrics_ports_match_the_collector_scrape_targets(services: dict[str, Any]) -> None:
    import yaml

    config = yaml.safe_load((ROOT / "deploy/otel/collector.yaml").read_text())
    jobs = config["receivers"]["prometheus"]["config"]["scrape_configs"]
    targets = set(jobs[0]["static_configs"][0]["targets"])
    expected = {
        f"{name}:{services[name]['environment'][f'TOKENYARD_{kind.upper()}_METRICS_PORT']}"
        for name, kind in OURS.items()
        if name != "migrate"
    }
    assert targets == expected


def test_every_service_has_a_healthcheck_and_waits_for_healthy_dependencies(
    services: dict[str, Any],
) -> None:
    for name, svc in services.items():
        if name not in NO_HEALTHCHECK:
            assert svc.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
        for dep, cond in (svc.get("depends_on") or {}).items():
            if dep == "migrate":
                assert cond["condition"] == "service_completed_successfully"
            elif dep in NO_HEALTHCHECK:
                assert cond["condition"] == "service_started"
            else:
                assert cond["condition"] == "service_healthy", f"{name} -> {dep}"
    router_deps = set(services["router"]["depends_on"])
    assert {"auth", "inference-1", "inference-2", "redis"} <= router_deps


def test_workers_reserve_a_gpu_and_the_cpu_override_removes_it() -> None:
    gpu = load_compose("docker-compose.yml")["services"]
    cpu = load_compose("docker-compose.yml", "docker-compose.cpu.yml")["services"]
    for name in ("inference-1", "inference-2"):
        devices = gpu[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"] and devices[0]["driver"] == "nvidia"
        assert "deploy" not in cpu[name]
        assert cpu[name]["environment"]["TOKENYARD_INFERENCE_DEVICE"] == "cpu"
        assert "TOKENYARD_SERVICE_TOKEN" in cpu[name]["environment"]
        assert cpu[name]["build"]["args"]["TORCH_INDEX_URL"].endswith("/cpu")


def test_secrets_are_required_and_only_workers_get_torch(services: dict[str, Any]) -> None:
    with pytest.raises(KeyError, match="TOKENYARD_AUTH_KEY_PEPPER"):
        load_compose(
            "docker-compose.yml", env={"POSTGRES_PASSWORD": "x", "TOKENYARD_SERVICE_TOKEN": "y"}
        )
    dockerfile = (ROOT / "Dockerfile").read_text()
    service_stage = dockerfile.split("AS service", 1)[1].split("FROM ", 1)[0]
    worker_stage = dockerfile.split("AS worker", 1)[1]
    assert "inference" not in service_stage and "torch" not in service_stage
    assert "torch==2.13.0" in worker_stage and "'.[inference]'" in worker_stage
    assert (
        services["router"]["image"] == services["auth"]["image"] != services["inference-1"]["image"]
    )


def test_the_dockerfile_copies_files_that_exist_and_are_not_docker_ignored() -> None:
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    copies = [
        line.split()[1:-1]
        for line in (ROOT / "Dockerfile").read_text().splitlines()
        if line.startswith("COPY ")
    ]
    sources = [src for group in copies for src in group]
    assert {"pyproject.toml", "README.md", "gen", "services"} <= set(sources)
    for src in sources:
        assert (ROOT / src).exists(), src
        assert src not in ignored, src
