"""docker-compose.yml agrees with the code: commands, variables, ports, health, order.

No Docker engine runs here, so the compose model is checked against the CLI parser
and the settings classes instead of being started.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

import pytest

from services.auth.settings import AuthSettings
from services.cli import build_parser
from services.common.settings import known_variables
from services.inference.settings import InferenceSettings
from services.router.settings import RouterSettings
from services.stack.secrets_env import SECRET_NAMES
from tests.unit.stack.compose_file import ROOT, filled_env, load_compose, read_env_file

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
            "docker-compose.yml",
            env={"POSTGRES_PASSWORD": "x", "REDIS_PASSWORD": "z", "TOKENYARD_SERVICE_TOKEN": "y"},
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


# Secure by default (security issue 12, item 14): the router's gRPC and HTTP ports.
PUBLISHED = {"router": [50051, 8000], "jaeger": [16686]}


def published(services: dict[str, Any]) -> dict[str, list[tuple[str, int]]]:
    """(host address, container port) of every published port, by service."""
    out: dict[str, list[tuple[str, int]]] = {}
    for name, svc in services.items():
        for port in svc.get("ports") or []:
            parts = str(port).split(":")
            host_ip = parts[0] if len(parts) == 3 else "0.0.0.0"  # compose's default
            out.setdefault(name, []).append((host_ip, int(parts[-1])))
    return out


def test_only_the_router_and_the_jaeger_ui_are_published_on_loopback_by_default() -> None:
    env = filled_env()
    for bare in (env, {k: v for k, v in env.items() if not k.endswith("_BIND_ADDRESS")}):
        ports = published(load_compose("docker-compose.yml", env=bare)["services"])
        assert ports == {
            name: [("127.0.0.1", port) for port in want] for name, want in PUBLISHED.items()
        }
    cpu = load_compose("docker-compose.yml", "docker-compose.cpu.yml")["services"]
    assert set(published(cpu)) == set(PUBLISHED)
    wide = load_compose("docker-compose.yml", env=env | {"ROUTER_BIND_ADDRESS": "0.0.0.0"})
    assert published(wide["services"])["router"] == [("0.0.0.0", 50051), ("0.0.0.0", 8000)]
    assert published(wide["services"])["jaeger"] == [("127.0.0.1", 16686)]


def test_the_env_file_ships_every_secret_empty_and_compose_refuses_to_start_so() -> None:
    shipped = read_env_file(ROOT / ".env")
    assert {name: shipped.get(name) for name in SECRET_NAMES} == dict.fromkeys(SECRET_NAMES, "")
    with pytest.raises(KeyError, match="secrets_env"):
        load_compose("docker-compose.yml", env=shipped)
    for name in SECRET_NAMES:
        env = filled_env() | {name: ""}
        with pytest.raises(KeyError, match=rf"^'{name}: empty in \.env - run python3 -m "):
            load_compose("docker-compose.yml", env=env)


def test_no_secret_has_a_default_anywhere_in_the_compose_files() -> None:
    for path in sorted(ROOT.glob("docker-compose*.yml")):
        text = path.read_text()
        for name in SECRET_NAMES:
            uses = re.findall(rf"\$\{{{name}(?![A-Z_])(.?.?)", text)
            assert all(op == ":?" for op in uses), f"{path.name}: {name} used as {uses}"
            assert not re.search(rf"(?<!\{{)\b{name}\s*[:=]\s*[^$\s]", text), f"{path.name}: {name}"


def test_redis_requires_the_password_from_env_and_the_router_sends_it() -> None:
    env = filled_env()
    services = load_compose("docker-compose.yml", env=env)["services"]
    redis, router = services["redis"], services["router"]
    password = env["REDIS_PASSWORD"]
    assert redis["environment"]["REDISCLI_AUTH"] == password
    script = redis["command"][-1]
    assert redis["command"][:2] == ["sh", "-c"]
    assert "exec redis-server - <<EOF" in script and "requirepass ${REDISCLI_AUTH}" in script
    url = urlsplit(router["environment"]["TOKENYARD_REDIS_URL"])
    assert (url.scheme, url.hostname, url.port, url.password) == ("redis", "redis", 6379, password)
    health = redis["healthcheck"]["test"]
    assert "redis-cli ping" in " ".join(health)
    for argv in (redis["command"], health):  # what `ps` shows
        assert not any(password in arg or arg in ("-a", "--pass") for arg in argv)


def test_the_quickstart_names_the_images_compose_runs() -> None:
    doc = (ROOT / "docs" / "quickstart-compose.md").read_text()
    services = load_compose("docker-compose.yml")["services"]
    rows = re.findall(r"^\| (`[^|]+) \| ([^|]+) \|", doc, flags=re.MULTILINE)
    documented = {
        name: image.strip().strip("`")
        for names, image in rows
        for name in re.findall(r"`([a-z0-9-]+)`", names)
    }
    assert documented == {name: svc["image"] for name, svc in services.items()}


def test_the_quickstart_runs_admin_commands_inside_the_compose_network() -> None:
    """auth's port is not published: admin commands go through `docker compose exec`."""
    doc = (ROOT / "docs" / "quickstart-compose.md").read_text()
    parser = build_parser()
    admin = re.compile(r"\btokenyard (users|roles|keys|usage|audit)\b")
    lines = [line.strip() for line in doc.splitlines() if admin.search(line)]
    assert lines
    for line in lines:
        prefix = "$ docker compose exec -e TOKENYARD_API_KEY auth tokenyard "
        assert line.startswith(prefix), line
        args = parser.parse_args(line.removeprefix(prefix).split("#")[0].split())
        assert args.command in {"users", "roles", "keys", "usage", "audit"}


def test_otlp_carries_traces_only_in_the_collector_and_the_quickstart() -> None:
    """The services export traces by OTLP; metrics are Prometheus endpoints, scraped."""
    import yaml

    config = yaml.safe_load((ROOT / "deploy/otel/collector.yaml").read_text())
    pipelines = config["service"]["pipelines"]
    assert pipelines["traces"]["receivers"] == ["otlp"]
    assert pipelines["metrics"]["receivers"] == ["prometheus"]
    doc = (ROOT / "docs" / "quickstart-compose.md").read_text()
    assert not re.search(r"OTLP traces and metrics|traces and metrics (by|over) OTLP", doc)
    assert "Metrics are not exported by OTLP" in doc
