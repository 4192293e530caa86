"""The raw server-sent-events framing, read with curl (no client library smoothing it)."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import urllib.error
import urllib.request
from typing import Any

import pytest

from tests.integration.openai.conftest import MODEL, Auth, http_router
from tests.integration.router.conftest import Launcher, make_user

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")


def curl(url: str, key: str, body: dict[str, Any], *headers: str) -> tuple[str, str]:
    """POST `body` with curl -N; returns (response headers, raw body)."""
    args = ["curl", "-sS", "-N", "-D", "-", url, "-H", f"Authorization: Bearer {key}"]
    args += ["-H", "Content-Type: application/json", "--data-binary", json.dumps(body)]
    for header in headers:
        args += ["-H", header]
    out = subprocess.run(args, capture_output=True, check=True, timeout=60).stdout.decode()
    head, _, raw = out.partition("\r\n\r\n")
    return head, raw


def events(raw: str) -> list[str]:
    """The data of each event; asserts every event is one `data:` line and a blank line."""
    assert raw.endswith("\n\n"), raw[-200:]
    blocks = raw[:-2].split("\n\n")
    assert all(b.startswith("data: ") and "\n" not in b for b in blocks), blocks
    return [b.removeprefix("data: ") for b in blocks]


def test_chat_stream_framing_role_usage_done_and_request_id(auth: Auth, launcher: Launcher) -> None:
    user = make_user(auth.proc, auth.admin)
    # The server setting forces the usage chunk on although the client did not ask.
    router = http_router(
        launcher,
        auth.proc,
        [launcher.fake_worker()],
        TOKENYARD_ROUTER_HTTP_INCLUDE_USAGE="true",
        TOKENYARD_LOG_LEVEL="info",
    )
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        "max_tokens": 3,
        "stream": True,
    }
    head, raw = curl(f"{router.base_url}/chat/completions", user.key, body, "X-Request-Id: abc-1")
    assert head.startswith("HTTP/1.1 200")
    assert "content-type: text/event-stream" in head.lower()
    assert "x-request-id: abc-1" in head.lower()
    data = events(raw)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all("role" not in c["choices"][0]["delta"] for c in chunks[1:-1])
    assert {c["id"] for c in chunks} == {"chatcmpl-abc-1"}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    reasons = [c["choices"][0]["finish_reason"] for c in chunks[:-1]]
    assert reasons[-1] == "length" and set(reasons[:-1]) == {None}
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == 3
    # One access line with the caller's request id, labelled http; never the key.
    router.proc.stop()
    log = router.proc.output()
    access = [json.loads(x) for x in log.splitlines() if '"tokenyard.access"' in x]
    [line] = [a for a in access if a.get("protocol") == "http"]
    assert line["request_id"] == "abc-1" and line["code"] == 200
    assert line["method"] == "http.chat"
    assert user.key not in log


def test_an_error_after_the_stream_started_is_an_error_event_then_done(
    auth: Auth, launcher: Launcher
) -> None:
    user = make_user(auth.proc, auth.admin)
    # The only worker dies after 3 tokens: nobody can resume the stream.
    worker = launcher.fake_worker("--token-delay", "0.01", "--die-after-tokens", "3")
    router = http_router(launcher, auth.proc, [worker])
    body = {"model": MODEL, "prompt": "doomed", "max_tokens": 50, "stream": True}
    head, raw = curl(f"{router.base_url}/completions", user.key, body)
    assert head.startswith("HTTP/1.1 200")
    data = events(raw)
    assert data[-1] == "[DONE]"
    error = json.loads(data[-2])["error"]
    assert error["code"] == "stream_interrupted" and error["type"] == "server_error"
    texts = [json.loads(d)["choices"][0]["text"] for d in data[:-2]]
    assert len("".join(texts).split()) == 3


def test_an_error_before_the_first_token_is_a_real_status_with_the_envelope(
    auth: Auth, launcher: Launcher
) -> None:
    router = http_router(launcher, auth.proc, [launcher.fake_worker()])
    body = {"model": MODEL, "prompt": "hi", "stream": True}
    head, raw = curl(f"{router.base_url}/completions", "ty_sk_wrong", body)
    assert head.startswith("HTTP/1.1 401")
    assert json.loads(raw)["error"]["type"] == "authentication_error"


def test_health_and_unknown_routes(auth: Auth, launcher: Launcher) -> None:
    router = http_router(launcher, auth.proc, [launcher.fake_worker()])
    root = router.base_url.removesuffix("/v1")
    with urllib.request.urlopen(f"{root}/health", timeout=10) as reply:
        assert reply.status == 200 and json.loads(reply.read()) == {"status": "ok"}
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"{root}/v1/embeddings", timeout=10)
    assert info.value.code == 404
    assert json.loads(info.value.read())["error"]["code"] == "not_found"


def test_sigterm_lets_a_running_http_stream_finish(auth: Auth, launcher: Launcher) -> None:
    user = make_user(auth.proc, auth.admin)
    worker = launcher.fake_worker("--token-delay", "0.02")
    router = http_router(launcher, auth.proc, [worker])
    body = {"model": MODEL, "prompt": "finish me", "max_tokens": 100, "stream": True}
    args = [
        "curl",
        "-sS",
        "-N",
        f"{router.base_url}/completions",
        "-H",
        "Content-Type: application/json",
    ]
    args += ["-H", f"Authorization: Bearer {user.key}", "--data-binary", json.dumps(body)]
    with subprocess.Popen(args, stdout=subprocess.PIPE) as curl_proc:
        assert curl_proc.stdout is not None
        assert curl_proc.stdout.readline().startswith(b"data: ")  # streaming has begun
        router.proc.signal(signal.SIGTERM)  # 100 tokens take 2 s; the grace period is 10 s
        raw = curl_proc.stdout.read().decode()
    assert router.proc.popen.wait(30) == 0
    data = events(raw.lstrip("\n"))  # the end of the event read above
    assert data[-1] == "[DONE]"
    texts = [json.loads(d)["choices"][0]["text"] for d in data[:-1]]
    assert len("".join(texts).split()) == 99  # the first line was read above
