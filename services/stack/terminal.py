"""`tokenyard generate` and `tokenyard chat`: stream tokens to the terminal.

Text is written as it arrives; a last line (on stderr) gives the time to first
token, tokens per second and token counts. A failed call prints its status,
message and details, never a traceback.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from services.client import (
    Client,
    Message,
    ResponseFormat,
    Sampling,
    StreamEvent,
    TokenyardCallError,
    Usage,
)


@dataclass
class Options:
    """What the commands need besides the prompt (from flags and the environment)."""

    address: str
    api_key: str | None
    model: str | None
    sampling: Sampling
    logprobs: int | None = None
    system: str | None = None
    raw: bool = False
    tls: bool = False
    tls_ca: Path | None = None
    timeout: float = 300.0
    n: int = 1  # samples (generate only)
    response_format: ResponseFormat | None = None  # structured output (generate only)


@dataclass
class Stats:
    """Timing and counts of one streamed generation."""

    started: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    finished: float | None = None
    usage: Usage | None = None
    finish_reason: str | None = None
    tokens: int = 0

    def line(self) -> str:
        """`[ttft 85 ms · 42.1 tokens/s · prompt 12 · completion 64 · LENGTH]`."""
        end = self.finished or time.perf_counter()
        completion = self.usage.completion_tokens if self.usage else self.tokens
        parts = []
        if self.first_token is not None:
            parts.append(f"ttft {1000 * (self.first_token - self.started):.0f} ms")
            span = end - self.first_token
            if completion > 1 and span > 0:
                parts.append(f"{(completion - 1) / span:.1f} tokens/s")
        if self.usage is not None:
            parts.append(f"prompt {self.usage.prompt_tokens} tokens")
        parts.append(f"completion {completion} tokens")
        if self.finish_reason:
            parts.append(self.finish_reason)
        return "[" + " · ".join(parts) + "]"


def describe_error(err: TokenyardCallError) -> str:
    """One line: status, message, reason and retry delay."""
    extra = []
    if err.reason and err.reason != err.status:
        extra.append(f"reason {err.reason}")
    if "field" in err.metadata:
        extra.append(f"field {err.metadata['field']}")
    if err.retry_after is not None:
        extra.append(f"retry after {err.retry_after:.1f} s")
    tail = f" ({', '.join(extra)})" if extra else ""
    return f"error: {err.status}: {err.message}{tail}"


async def _pick_model(client: Client, options: Options) -> str:
    if options.model:
        return options.model
    models = await client.list_models()
    if not models:
        raise SystemExit("error: the router serves no model yet (are the workers up?)")
    return models[0].name


async def stream_reply(
    client: Client,
    options: Options,
    model: str,
    *,
    prompt: str | None = None,
    messages: Sequence[Message] | None = None,
    out: IO[str],
    err: IO[str],
) -> str:
    """Stream one generation to `out`, the stats line to `err`; return the whole text."""
    stats = Stats()
    text: list[str] = []
    logprobs: list[str] = []
    event: StreamEvent
    async for event in client.stream_events(
        prompt,
        messages=messages,
        model=model,
        sampling=options.sampling,
        logprobs=options.logprobs,
        timeout=options.timeout,
        response_format=options.response_format,
    ):
        if event.token_ids and stats.first_token is None:
            stats.first_token = time.perf_counter()
        stats.tokens += len(event.token_ids)
        if event.text:
            out.write(event.text)
            out.flush()
            text.append(event.text)
        for lp in event.logprobs:
            top = " ".join(f"{t}:{p:.3f}" for t, p in lp.top)
            logprobs.append(f"  {lp.token_id:>7} {lp.logprob:8.3f}  {top}".rstrip())
        if event.finish_reason:
            stats.finish_reason = event.finish_reason
            stats.usage = event.usage
    stats.finished = time.perf_counter()
    out.write("\n")
    out.flush()
    if logprobs:
        err.write("logprobs (token id, logprob, top alternatives):\n" + "\n".join(logprobs) + "\n")
    err.write(stats.line() + "\n")
    err.flush()
    return "".join(text)


async def print_samples(
    client: Client,
    options: Options,
    model: str,
    given: dict[str, Any],
    *,
    out: IO[str],
    err: IO[str],
) -> None:
    """`generate --n`: the samples one after another, each under a header line."""
    stats = Stats()
    reply = await client.generate(
        model=model,
        sampling=options.sampling,
        logprobs=options.logprobs,
        timeout=options.timeout,
        n=options.n,
        response_format=options.response_format,
        **given,
    )
    stats.finished = time.perf_counter()
    for choice in reply.choices:
        out.write(f"--- sample {choice.index} ({choice.finish_reason}) ---\n{choice.text}\n")
    out.flush()
    stats.usage = reply.usage
    err.write(stats.line() + "\n")
    err.flush()


def _client(options: Options) -> Client:
    return Client(
        options.address,
        options.api_key,
        tls=options.tls,
        tls_ca=options.tls_ca,
        timeout=options.timeout,
    )


async def generate(options: Options, prompt: str, out: IO[str], err: IO[str]) -> int:
    """`tokenyard generate`: one streamed generation; 0 on success, 1 on a failed call."""
    async with _client(options) as client:
        try:
            model = await _pick_model(client, options)
            given: dict[str, Any] = {"prompt": prompt}
            if not options.raw:
                turns = [Message("system", options.system)] if options.system else []
                turns.append(Message("user", prompt))
                given = {"messages": turns}
            if options.n > 1:
                await print_samples(client, options, model, given, out=out, err=err)
            else:
                await stream_reply(client, options, model, **given, out=out, err=err)
        except TokenyardCallError as exc:
            err.write(describe_error(exc) + "\n")
            return 1
    return 0


def chat(options: Options, read_line: Callable[[], str | None], out: IO[str], err: IO[str]) -> int:
    """`tokenyard chat`: a conversation; each reply is streamed and kept in the history.

    `/reset` forgets the conversation, `/exit` or end of input leaves. Input is read
    between replies on this thread (not a worker thread), so Ctrl-C at the prompt
    exits at once.
    """
    history: list[Message] = [Message("system", options.system)] if options.system else []
    loop = asyncio.new_event_loop()
    client: Client | None = None
    try:
        client = loop.run_until_complete(_open(options))
        try:
            model = loop.run_until_complete(_pick_model(client, options))
        except TokenyardCallError as exc:
            err.write(describe_error(exc) + "\n")
            return 1
        while True:
            line = read_line()
            if line is None or line.strip() == "/exit":
                return 0
            if line.strip() == "/reset":
                history = history[:1] if options.system else []
                continue
            if not line.strip():
                continue
            history.append(Message("user", line.rstrip("\n")))
            turn = stream_reply(client, options, model, messages=history, out=out, err=err)
            try:
                reply = loop.run_until_complete(turn)
            except TokenyardCallError as exc:
                history.pop()
                err.write(describe_error(exc) + "\n")
                continue
            history.append(Message("assistant", reply))
    finally:
        if client is not None:
            loop.run_until_complete(client.close())
        loop.close()


async def _open(options: Options) -> Client:
    """A client created inside the running loop (grpc.aio binds channels to it)."""
    return _client(options)


def read_stdin_line(prompt: str = "you> ") -> Callable[[], str | None]:
    """A reader for `chat`: a prompt on a terminal, plain lines from a pipe; None at EOF."""

    def read() -> str | None:
        if sys.stdin.isatty():
            try:
                return input(prompt)
            except EOFError:
                return None
        line = sys.stdin.readline()
        return line or None

    return read
