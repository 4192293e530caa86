"""`tokenyard up`: auth, inference workers and the router as supervised child processes.

On first start it makes the state folder, a service token and a key pepper,
migrates the SQLite database, bootstraps an admin and a demo user with a
`generate` role, and prints the demo API key once. Later starts reuse all of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import grpc

from services.common.settings import SettingsError
from services.stack.certs import make_dev_certs
from services.stack.models import ServedModel, alias_map, served_models
from services.stack.settings import StackSettings
from services.stack.state import (
    ADMIN_KEY,
    ADMIN_PASSWORD,
    KEY_PEPPER,
    SERVICE_TOKEN,
    StateDir,
    write_private,
)
from services.stack.supervisor import ChildSpec, Policy, StackError, Supervisor

CLI = (sys.executable, "-m", "services.cli")


def served_model_name(settings: StackSettings) -> str:
    """The name clients put in requests for the (first) model."""
    return served_models(settings)[0].name


def threads_per_worker(settings: StackSettings) -> int:
    """torch threads of each worker: the machine's cores shared out, at least one."""
    if settings.threads:
        return settings.threads
    workers = sum(m.workers for m in served_models(settings))
    return max(1, (os.cpu_count() or 1) // workers)


@dataclass(frozen=True)
class Tls:
    """The certificate folder: ca.pem and <service>.pem/.key."""

    folder: Path

    def cert(self, name: str) -> str:
        return str(self.folder / f"{name}.pem")

    def key(self, name: str) -> str:
        return str(self.folder / f"{name}.key")

    @property
    def ca(self) -> str:
        return str(self.folder / "ca.pem")

    def client_credentials(self, mutual: bool) -> Callable[[], grpc.ChannelCredentials]:
        """Credentials the launcher probes health with (the router's client certificate)."""

        def make() -> grpc.ChannelCredentials:
            ca = Path(self.ca).read_bytes()
            if not mutual:
                return grpc.ssl_channel_credentials(ca)
            key = Path(self.key("router")).read_bytes()
            return grpc.ssl_channel_credentials(ca, key, Path(self.cert("router")).read_bytes())

        return make


@dataclass(frozen=True)
class Layout:
    """Addresses of every service of one stack."""

    settings: StackSettings

    @property
    def connect_host(self) -> str:
        host = self.settings.host
        return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host

    def address(self, port: int) -> str:
        return f"{self.connect_host}:{port}"

    @property
    def router(self) -> str:
        return self.address(self.settings.port)

    @property
    def http(self) -> str:
        """host:port of the router's OpenAI-compatible HTTP API."""
        host = self.connect_host
        host = f"[{host}]" if ":" in host else host
        return f"{host}:{self.settings.http_port}"

    @property
    def auth(self) -> str:
        return self.address(self.settings.auth_port)

    def workers(self) -> list[tuple[int, ServedModel]]:
        """(port, model) of every worker: each model's workers on the next ports."""
        models = served_models(self.settings)
        each = [m for m in models for _ in range(m.workers)]
        return [(self.settings.worker_port + i, m) for i, m in enumerate(each)]

    def worker_ports(self) -> list[int]:
        return [port for port, _ in self.workers()]

    def metrics(self, index: int) -> dict[str, str]:
        """Metrics port variables for service number `index` (router 0, auth 1, workers 2…)."""
        if self.settings.metrics_port is None:
            return {}
        return {"port": str(self.settings.metrics_port + index)}


def base_env(state: StateDir, tls: Tls | None) -> dict[str, str]:
    """What every child gets: the inherited environment, the service token, internal TLS."""
    env = dict(os.environ)
    env.setdefault("TOKENYARD_LOG_FORMAT", "text")
    env["PYTHONUNBUFFERED"] = "1"
    env["TOKENYARD_SERVICE_TOKEN"] = state.secret(SERVICE_TOKEN)
    if tls is not None:
        env["TOKENYARD_INTERNAL_TLS_CA"] = tls.ca
        env["TOKENYARD_INTERNAL_TLS_CERT"] = tls.cert("router")
        env["TOKENYARD_INTERNAL_TLS_KEY"] = tls.key("router")
    return env


def auth_env(settings: StackSettings, state: StateDir, tls: Tls | None) -> dict[str, str]:
    """Environment of the auth service (also used to bootstrap its database)."""
    env = base_env(state, tls)
    env.pop("TOKENYARD_AUTH_KEY_PEPPER", None)
    state.secret(KEY_PEPPER)
    env.update(
        TOKENYARD_AUTH_HOST=settings.host,
        TOKENYARD_AUTH_PORT=str(settings.auth_port),
        TOKENYARD_AUTH_DATABASE_URL=settings.database_url or state.database_url,
        TOKENYARD_AUTH_KEY_PEPPER_FILE=str(state.path(KEY_PEPPER)),
    )
    _server_tls(env, "AUTH", tls, "auth", mutual=True)
    return env


def _server_tls(env: dict[str, str], svc: str, tls: Tls | None, name: str, mutual: bool) -> None:
    if tls is None:
        return
    env[f"TOKENYARD_{svc}_TLS_CERT"] = tls.cert(name)
    env[f"TOKENYARD_{svc}_TLS_KEY"] = tls.key(name)
    if mutual:
        env[f"TOKENYARD_{svc}_TLS_CLIENT_CA"] = tls.ca


def plan(settings: StackSettings, state: StateDir, tls: Tls | None) -> list[ChildSpec]:
    """The child processes: auth and the workers start together, then the router."""
    layout = Layout(settings)
    specs: list[ChildSpec] = []
    env = auth_env(settings, state, tls)
    if m := layout.metrics(1):
        env["TOKENYARD_AUTH_METRICS_PORT"] = m["port"]
    internal = tls.client_credentials(mutual=True) if tls else _plaintext
    specs.append(
        ChildSpec(
            "auth", [*CLI, "auth", "serve"], env, layout.auth, internal, start_order=0, stop_order=2
        )
    )
    threads = str(threads_per_worker(settings))
    for i, (port, model) in enumerate(layout.workers()):
        env = base_env(state, tls)
        env.update(
            TOKENYARD_INFERENCE_HOST=settings.host,
            TOKENYARD_INFERENCE_PORT=str(port),
            TOKENYARD_INFERENCE_MODEL=model.source,
            TOKENYARD_INFERENCE_SERVED_MODEL_NAME=model.name,
            TOKENYARD_INFERENCE_QUANTIZE=settings.quantize,
            OMP_NUM_THREADS=threads,
            MKL_NUM_THREADS=threads,
        )
        if m := layout.metrics(2 + i):
            env["TOKENYARD_INFERENCE_METRICS_PORT"] = m["port"]
        _server_tls(env, "INFERENCE", tls, "worker", mutual=True)
        argv = [*CLI, "inference", "serve"]
        specs.append(
            ChildSpec(f"worker-{i + 1}", argv, env, layout.address(port), internal, 0, stop_order=1)
        )
    env = base_env(state, tls)
    env.update(
        TOKENYARD_ROUTER_HOST=settings.host,
        TOKENYARD_ROUTER_PORT=str(settings.port),
        TOKENYARD_ROUTER_AUTH_ADDRESS=layout.auth,
        TOKENYARD_ROUTER_WORKERS=",".join(layout.address(p) for p in layout.worker_ports()),
        TOKENYARD_ROUTER_HTTP_ADDRESS=_host_port(settings.host, settings.http_port),
    )
    env.pop("TOKENYARD_ROUTER_WORKER_DNS", None)
    if aliases := alias_map(served_models(settings)):
        env["TOKENYARD_ROUTER_MODEL_ALIASES"] = aliases
    if settings.redis_url:
        env["TOKENYARD_REDIS_URL"] = settings.redis_url
    if m := layout.metrics(0):
        env["TOKENYARD_ROUTER_METRICS_PORT"] = m["port"]
    _server_tls(env, "ROUTER", tls, "router", mutual=False)
    public = tls.client_credentials(mutual=False) if tls else _plaintext
    specs.append(
        ChildSpec("router", [*CLI, "router", "serve"], env, layout.router, public, 1, stop_order=0)
    )
    return specs


def refuse_overridden(environ: Mapping[str, str], specs: list[ChildSpec]) -> None:
    """Refuse a TOKENYARD_* variable the stack would silently replace for a service.

    `tokenyard up` sets the services' addresses, ports, model, secrets and TLS
    itself; a user's value for one of those would otherwise be ignored.
    """
    for spec in specs:
        for name, value in sorted(environ.items()):
            if name.startswith("TOKENYARD_") and spec.env.get(name) != value:
                raise SettingsError(
                    f"{name}: `tokenyard up` sets this itself for its {spec.name} service; "
                    "unset it and use `tokenyard up`'s flags (see tokenyard up --help)"
                )


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _plaintext() -> grpc.ChannelCredentials | None:
    return None


def prepare_auth(settings: StackSettings, state: StateDir, tls: Tls | None) -> tuple[str, bool]:
    """Migrate, bootstrap the admin and demo user; return (demo key, created now)."""
    from services.auth.bootstrap import bootstrap_admin, ensure_demo
    from services.auth.settings import load_auth_settings
    from services.common.errors import FailedPrecondition

    auth = load_auth_settings(auth_env(settings, state, tls))
    previous = state.demo_key()
    if previous is None:
        password = state.secret(ADMIN_PASSWORD, 18)
        with contextlib.suppress(FailedPrecondition):
            admin_key = asyncio.run(bootstrap_admin(auth, "admin", password))
            write_private(state.path(ADMIN_KEY), admin_key)
    key = ensure_demo(auth, state.path("demo-key"))
    state.path("demo-key").chmod(0o600)
    return key, key != previous


def banner(
    settings: StackSettings, state: StateDir, key: str, created: bool, tls: Tls | None
) -> str:
    """What `tokenyard up` prints once the stack is SERVING."""
    layout = Layout(settings)
    models = served_models(settings)
    model = models[0].name
    key_file = state.path("demo-key")
    tls_flag = f" --tls-ca {tls.ca}" if tls else ""
    serving = ", ".join(f"{m.workers} worker(s) serving {_names(m)}" for m in models)
    lines = [
        f"tokenyard is up: router {layout.router}, {serving}, auth {layout.auth}, "
        f"state in {state.root}",
    ]
    if created:
        lines += [
            "",
            f"Your demo API key (shown once; saved to {key_file}, mode 0600):",
            "",
            f"    {key}",
        ]
    else:
        lines += [f"Demo API key: in {key_file}"]
    address = "" if settings.port == 50051 else f" --address {layout.router}"
    lines += [
        "",
        "Stream tokens:",
        "",
        f'    tokenyard generate{address}{tls_flag} --model {model} "Write a haiku about gRPC"',
        "",
        "Or any OpenAI client (docs/openai.md):",
        "",
        f"    export OPENAI_BASE_URL={'https' if tls else 'http'}://{layout.http}/v1",
        f"    export OPENAI_API_KEY=$(cat {key_file})",
        "",
        "Press Ctrl-C to stop.",
        "",
    ]
    return "\n".join(lines)


def _names(model: ServedModel) -> str:
    if not model.aliases:
        return model.name
    return f"{model.name} (also {', '.join(model.aliases)})"


async def supervise(
    specs: list[ChildSpec], policy: Policy, out: IO[str], ready_message: str
) -> int:
    """Start the stack, print `ready_message`, run until a signal or an unrecoverable crash."""
    sup = Supervisor(specs, policy, out)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, sup.request_stop)
    code = 0
    try:
        await sup.start()
        if not sup.stopping:
            out.write(ready_message + "\n")
            out.flush()
            await sup.run()
    except StackError as exc:
        sup.say(f"error: {exc}")
        code = 1
    finally:
        sup.say("stopping: router (drains), then workers, then auth")
        await sup.stop()
        sup.say("stopped")
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    return code


def run_stack(settings: StackSettings, out: IO[str]) -> int:
    """Everything `tokenyard up` does; returns its exit status."""
    served_models(settings)  # a bad model list stops the start before anything is made
    state = StateDir(settings.state_dir)
    state.ensure()
    tls: Tls | None = None
    if settings.tls or settings.tls_dir is not None:
        folder = settings.tls_dir or state.path("tls")
        if not (folder / "ca.pem").is_file():
            make_dev_certs(folder)
        tls = Tls(folder)
    specs = plan(settings, state, tls)
    refuse_overridden(os.environ, specs)
    key, created = prepare_auth(settings, state, tls)
    policy = Policy(max_restarts=settings.max_restarts, startup_timeout=settings.startup_timeout)
    message = banner(settings, state, key, created, tls)
    return asyncio.run(supervise(specs, policy, out, message))
