"""`tokenyard up`, `tokenyard generate` and `tokenyard chat`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

DEFAULT_ADDRESS = "127.0.0.1:50051"


def register(subparsers: Any) -> None:
    """Add `up`, `generate` and `chat` to the `tokenyard` parser."""
    up = subparsers.add_parser(
        "up",
        help="run auth, inference workers and the router on this machine",
        description="Settings come from TOKENYARD_UP_* variables (and TOKENYARD_STATE_DIR); "
        "flags override them. See docs/configuration.md.",
    )
    up.add_argument("--state-dir", help="state folder (default .tokenyard)")
    up.add_argument("--workers", help="inference workers to start (default 2)")
    up.add_argument("--model", help="model to serve (default smollm2-135m)")
    up.add_argument("--model-name", help="name clients use for the model")
    up.add_argument("--host", help="address every service binds (default 127.0.0.1)")
    up.add_argument("--port", help="router port (default 50051)")
    up.add_argument("--http-port", help="router's OpenAI-compatible HTTP port (default 8000)")
    up.add_argument("--auth-port", help="auth port (default 50052)")
    up.add_argument("--worker-port", help="first worker's port (default 50061)")
    up.add_argument("--metrics-port", help="first Prometheus port (router, auth, workers)")
    up.add_argument("--threads", help="torch threads per worker (default cores / workers)")
    up.add_argument("--max-restarts", help="restarts in a row before the stack stops")
    up.add_argument("--startup-timeout", help="seconds a service may take to be SERVING")
    up.add_argument("--tls", action="store_true", default=None, help="TLS outside, mTLS inside")
    up.add_argument("--tls-dir", help="certificate folder (default <state>/tls)")
    up.set_defaults(handler=_up)

    gen = subparsers.add_parser(
        "generate",
        help="stream a generation to the terminal",
        description="The key comes from TOKENYARD_API_KEY or <state>/demo-key.",
    )
    gen.add_argument("prompt", help="what to ask")
    gen.add_argument("--raw", action="store_true", help="send the prompt as is, no chat template")
    _client_flags(gen)
    gen.set_defaults(handler=_generate)

    chat = subparsers.add_parser(
        "chat",
        help="a conversation with a model (/reset, /exit)",
        description="The key comes from TOKENYARD_API_KEY or <state>/demo-key.",
    )
    _client_flags(chat)
    chat.set_defaults(handler=_chat)


def _client_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help=f"router host:port (TOKENYARD_ADDRESS, {DEFAULT_ADDRESS})")
    p.add_argument("--model", help="model name (TOKENYARD_MODEL; default: the first listed)")
    p.add_argument("--system", help="system message")
    p.add_argument("--max-tokens", type=int, help="most tokens to generate")
    p.add_argument("--temperature", type=float, help="0 is greedy (default 1)")
    p.add_argument("--top-p", type=float, help="nucleus sampling, in (0, 1]")
    p.add_argument("--top-k", type=int, help="keep the k most likely tokens (0: off)")
    p.add_argument("--min-p", type=float, help="drop tokens below min_p x the best one's")
    p.add_argument("--repetition-penalty", type=float, help="> 1 discourages repeats")
    p.add_argument("--seed", type=int, help="same seed, same tokens")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", default=None, help="run past EOS")
    p.add_argument("--logprobs", type=int, help="print logprobs with this many alternatives")
    p.add_argument("--timeout", type=float, default=300.0, help="deadline in seconds")
    p.add_argument("--state-dir", help="where demo-key is (TOKENYARD_STATE_DIR, .tokenyard)")
    p.add_argument("--tls", action="store_true", help="use TLS with the system's CAs")
    p.add_argument("--tls-ca", type=Path, help="CA certificate of the router (implies TLS)")


def _up(args: argparse.Namespace) -> int:
    from services.common.settings import load_settings
    from services.stack.launcher import run_stack
    from services.stack.settings import StackSettings

    overrides = {k: v for k, v in vars(args).items() if k not in ("handler", "command")}
    settings = load_settings(StackSettings, os.environ, overrides)
    return run_stack(settings, sys.stdout)


def _options(args: argparse.Namespace) -> Any:
    from services.client import Sampling
    from services.common.settings import load_settings
    from services.stack.settings import ClientSettings
    from services.stack.terminal import Options

    flags = {"address": args.address, "model": args.model, "state_dir": args.state_dir}
    client = load_settings(ClientSettings, os.environ, flags)
    key = client.api_key
    demo = client.state_dir / "demo-key"
    if key is None and demo.is_file():
        key = demo.read_text().strip()
    if key is None:
        raise SystemExit(f"error: no API key: set TOKENYARD_API_KEY or start the stack ({demo})")
    sampling = Sampling(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=tuple(args.stop),
        ignore_eos=args.ignore_eos,
    )
    return Options(
        address=client.address,
        api_key=key,
        model=client.model,
        sampling=sampling,
        logprobs=args.logprobs,
        system=args.system,
        raw=getattr(args, "raw", False),
        tls=args.tls,
        tls_ca=args.tls_ca,
        timeout=args.timeout,
    )


def _generate(args: argparse.Namespace) -> int:
    import asyncio

    from services.stack.terminal import generate

    return asyncio.run(generate(_options(args), args.prompt, sys.stdout, sys.stderr))


def _chat(args: argparse.Namespace) -> int:
    from services.stack.terminal import chat, read_stdin_line

    return chat(_options(args), read_stdin_line(), sys.stdout, sys.stderr)
