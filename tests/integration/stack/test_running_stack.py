"""One running `tokenyard up` (2 workers, tiny model) as users run it: the first
start's key, streaming, chat, traces, metrics, a killed worker, a clean stop, and
a second start reusing the state. Tests run in file order."""

from __future__ import annotations

import json
import re
import ssl
import stat
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from services.stack.certs import make_dev_certs
from tests.integration.stack.launcher import READY, StackProcess, alive, run_cli
from tests.integration.stack.otlp_sink import OtlpSink


@pytest.fixture(scope="module")
def sink() -> Iterator[OtlpSink]:
    receiver = OtlpSink()
    yield receiver
    receiver.stop()


@pytest.fixture(scope="module")
def stack(
    tiny_model: Path, tmp_path_factory: pytest.TempPathFactory, sink: OtlpSink
) -> Iterator[StackProcess]:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": sink.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "200"}
    proc = StackProcess(
        tmp_path_factory.mktemp("running") / "state", tiny_model, workers=2, env=env
    )
    try:
        proc.wait_for(READY)
        yield proc
    finally:
        proc.stop()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_first_start_printed_the_key_once_and_keeps_secrets_private(
    stack: StackProcess,
) -> None:
    state = stack.state_dir
    key = (state / "demo-key").read_text().strip()
    assert key.startswith("ty_") and stack.output.count(key) == 1
    assert "tokenyard generate" in stack.output
    assert mode(state) == 0o700
    for name in ("demo-key", "service-token", "key-pepper", "admin-key"):
        assert mode(state / name) == 0o600, name
    for name in ("service-token", "key-pepper", "admin-key"):
        assert (state / name).read_text().strip() not in stack.output, name


def generate(stack: StackProcess, *args: str) -> tuple[int, str, str]:
    done = run_cli(
        "generate", "--address", stack.address, "--state-dir", str(stack.state_dir),
        "--model", "tiny", *args,
    )  # fmt: skip
    return done.returncode, done.stdout, done.stderr


def test_generate_streams_with_every_sampling_flag(stack: StackProcess) -> None:
    code, out, err = generate(
        stack, "--max-tokens", "6", "--temperature", "0.7", "--top-p", "0.9", "--top-k", "20",
        "--min-p", "0.01", "--repetition-penalty", "1.1", "--seed", "7", "--stop", "zzz",
        "--stop", "qqq", "--ignore-eos", "--logprobs", "2", "--system", "Be brief.", "Hi",
    )  # fmt: skip
    assert code == 0, err
    assert "completion 6 tokens" in err and "ttft" in err
    assert len([ln for ln in err.splitlines() if ln.startswith("  ")]) == 6  # logprob rows
    assert out.endswith("\n")


def test_generate_with_a_json_schema_file_and_a_regex(stack: StackProcess, tmp_path: Path) -> None:
    schema = {"type": "object", "properties": {"ok": {"enum": ["yes", "no"]}},
              "required": ["ok"], "additionalProperties": False}  # fmt: skip
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(schema))
    code, out, err = generate(stack, "--json-schema", str(path), "--max-tokens", "30", "Hi")
    assert code == 0, err
    assert json.loads(out) in ({"ok": "yes"}, {"ok": "no"})
    assert "STOP" in err
    code, out, err = generate(stack, "--regex", "[0-9]{3}", "--n", "2", "--seed", "1", "Hi")
    assert code == 0, err
    samples = [ln for ln in out.splitlines() if not ln.startswith("---")]
    assert len(samples) == 2 and all(re.fullmatch("[0-9]{3}", s) for s in samples)
    code, _, err = generate(stack, "--regex", "[0-9", "Hi")
    assert code == 1 and "INVALID_ARGUMENT" in err and "response_format.regex" in err


def test_errors_print_status_and_field_not_a_traceback(stack: StackProcess) -> None:
    code, _, err = generate(stack, "--top-p", "1.5", "Hi")
    assert code == 1
    assert "INVALID_ARGUMENT" in err and "sampling.top_p" in err
    assert "Traceback" not in err
    bad = run_cli("generate", "--address", stack.address, "--model", "tiny", "Hi",
                  env={"TOKENYARD_API_KEY": "ty_sk_not_a_real_key"})  # fmt: skip
    assert bad.returncode == 1 and "UNAUTHENTICATED" in bad.stderr
    assert "ty_sk_not_a_real_key" not in bad.stderr + bad.stdout


def test_chat_keeps_the_conversation(stack: StackProcess) -> None:
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "services.cli", "chat", "--address", stack.address,
         "--state-dir", str(stack.state_dir), "--model", "tiny", "--max-tokens", "3",
         "--ignore-eos"],
        input="first question\nsecond question\n", capture_output=True, text=True, timeout=60,
        check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    prompts = [
        int(part.split()[1])
        for line in proc.stderr.splitlines()
        for part in line.strip("[]").split(" · ")
        if part.startswith("prompt ")
    ]
    assert len(prompts) == 2 and prompts[1] > prompts[0] + 3  # the history was sent again


def test_one_trace_spans_router_auth_and_worker_without_secrets(
    stack: StackProcess, sink: OtlpSink
) -> None:
    prompt = f"trace-me-{uuid.uuid4().hex}"
    # A fresh key makes the router ask auth (a cached key would skip that hop).
    code, _, err = generate(stack, "--max-tokens", "2", "--raw", prompt)
    assert code == 0, err
    key = (stack.state_dir / "demo-key").read_text().strip()
    wanted = {"tokenyard-router", "tokenyard-auth", "tokenyard-inference"}
    deadline = time.monotonic() + 90
    by_trace: dict[str, set[str]] = {}
    while time.monotonic() < deadline:
        by_trace = {}
        for span in sink.spans():
            by_trace.setdefault(span.trace_id, set()).add(span.service)
        if any(wanted <= services for services in by_trace.values()):
            break
        time.sleep(0.3)
    assert any(wanted <= services for services in by_trace.values()), by_trace
    for span in sink.spans():
        for value in span.attributes.values():
            assert prompt not in value and key not in value, span


def test_every_service_serves_prometheus_metrics(stack: StackProcess) -> None:
    for offset in range(2 + stack.workers):
        url = f"http://127.0.0.1:{stack.metrics_port + offset}/metrics"
        with urllib.request.urlopen(url, timeout=10) as reply:
            text = reply.read().decode()
        assert "tokenyard_grpc_requests_total" in text, url


def test_the_printed_openai_base_url_serves_the_model_to_the_official_client(
    stack: StackProcess, sink: OtlpSink
) -> None:
    import grpc
    import openai
    from tokenyard.generation.v1 import generation_service_pb2 as gen
    from tokenyard.generation.v1 import generation_service_pb2_grpc as gen_grpc

    base_url = f"http://127.0.0.1:{stack.http_port}/v1"
    assert f"export OPENAI_BASE_URL={base_url}" in stack.output
    key = (stack.state_dir / "demo-key").read_text().strip()
    messages: list[Any] = [{"role": "user", "content": "Say something"}]
    with openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=60) as client:
        assert [m.id for m in client.models.list()] == ["tiny"]
        chunks = list(
            client.chat.completions.create(
                model="tiny", messages=messages, max_tokens=6, temperature=0,
                logprobs=True, top_logprobs=2, stream=True, stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
            )
        )  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    entries = [
        e
        for c in chunks
        if c.choices and c.choices[0].logprobs
        for e in c.choices[0].logprobs.content or []
    ]
    assert len(entries) == 6 and all(len(e.top_logprobs) == 2 for e in entries)
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None and usage.completion_tokens == 6

    request = gen.StreamGenerateRequest(model="tiny")
    request.messages.messages.append(gen.ChatMessage(role="user", content="Say something"))
    request.sampling.max_tokens, request.sampling.temperature = 6, 0
    request.sampling.ignore_eos = True
    with grpc.insecure_channel(stack.address) as channel:
        stub = gen_grpc.GenerationServiceStub(channel)
        replies = list(stub.StreamGenerate(request, metadata=(("authorization", f"Bearer {key}"),)))
    assert text == "".join(r.text for r in replies)  # greedy: the same text both ways
    assert usage.prompt_tokens == replies[-1].usage.prompt_tokens
    # The HTTP request's span and the worker's share one trace.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        http = {s.trace_id for s in sink.spans() if s.name == "HTTP chat"}
        worker = {s.trace_id for s in sink.spans() if s.service == "tokenyard-inference"}
        if http & worker:
            break
        time.sleep(0.3)
    assert http & worker


def test_a_killed_worker_is_restarted_and_the_stack_keeps_serving(stack: StackProcess) -> None:
    import os
    import signal

    pid = stack.children()[f"inference:{stack.worker_port}"]
    os.kill(pid, signal.SIGKILL)
    stack.wait_for("worker-1 exited with code -9; restarting", timeout=30)
    stack.wait_for("worker-1 is SERVING again", timeout=90)
    code, _, err = generate(stack, "--max-tokens", "3", "--ignore-eos", "again")
    assert code == 0, err
    assert stack.children()[f"inference:{stack.worker_port}"] != pid


def test_sigterm_stops_every_child(stack: StackProcess) -> None:
    pids = stack.children()
    assert len(pids) == 4
    assert stack.stop() == 0
    assert not [name for name, pid in pids.items() if alive(pid)]
    assert "stopping: router (drains), then workers, then auth" in stack.output


def test_a_second_start_reuses_the_key_and_runs_over_tls(
    stack: StackProcess, tiny_model: Path, tmp_path: Path
) -> None:
    """Restarted on the same state with --tls-dir: the key is reused (not printed),
    the router speaks TLS and auth and the workers demand the router's certificate."""
    key = (stack.state_dir / "demo-key").read_text().strip()
    certs = make_dev_certs(tmp_path / "tls")
    stranger = make_dev_certs(tmp_path / "other-ca")
    second = StackProcess(stack.state_dir, tiny_model, extra=["--tls-dir", str(certs)])
    try:
        second.wait_for(READY)
        assert key not in second.output
        assert f"Demo API key: in {stack.state_dir / 'demo-key'}" in second.output
        assert f"--tls-ca {certs / 'ca.pem'}" in second.output
        assert (stack.state_dir / "demo-key").read_text().strip() == key
        ca = str(certs / "ca.pem")
        again = run_cli(
            "generate", "--address", second.address, "--tls-ca", ca, "--model", "tiny",
            "--max-tokens", "4", "--ignore-eos", "Hello", env={"TOKENYARD_API_KEY": key},
        )  # fmt: skip
        assert again.returncode == 0, again.stderr
        assert "completion 4 tokens" in again.stderr
        plain = run_cli(
            "generate", "--address", second.address, "--model", "tiny", "--timeout", "5", "Hi",
            env={"TOKENYARD_API_KEY": key},
        )  # fmt: skip
        assert plain.returncode == 1 and "UNAVAILABLE" in plain.stderr
        # The OpenAI-compatible HTTP API is served over TLS too.
        https = f"https://127.0.0.1:{second.http_port}"
        assert f"export OPENAI_BASE_URL={https}/v1" in second.output
        trusted = ssl.create_default_context(cafile=ca)
        with urllib.request.urlopen(f"{https}/health", context=trusted, timeout=10) as reply:
            assert reply.status == 200
        with pytest.raises(OSError):  # plain HTTP is refused by the TLS handshake
            urllib.request.urlopen(f"http://127.0.0.1:{second.http_port}/health", timeout=10)

        worker, auth = f"127.0.0.1:{second.worker_port}", f"127.0.0.1:{second.auth_port}"
        as_router = [
            "--tls-cert",
            str(certs / "router.pem"),
            "--tls-key",
            str(certs / "router.key"),
        ]
        foreign = [
            "--tls-cert", str(stranger / "router.pem"), "--tls-key", str(stranger / "router.key"),
        ]  # fmt: skip
        assert run_cli("health", worker, "--tls-ca", ca, *as_router).returncode == 0
        assert run_cli("health", worker, "--tls-ca", ca).returncode == 1  # no client cert
        assert run_cli("health", worker, "--tls-ca", ca, *foreign).returncode == 1
        assert run_cli("health", worker).returncode == 1  # plaintext
        assert run_cli("health", auth, "--tls-ca", ca).returncode == 1
        assert run_cli("health", auth, "--tls-ca", ca, *as_router).returncode == 0
    finally:
        assert second.stop() == 0
