"""`tokenyard up`, `tokenyard generate` and `tokenyard chat`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    """Add `up`, `generate` and `chat` to the `tokenyard` parser."""
    from services.common.settings import add_flags
    from services.stack.settings import StackSettings

    up = subparsers.add_parser(
        "up",
        help="run auth, inference workers and the router on this machine",
        description="Settings come from TOKENYARD_UP_* variables (and TOKENYARD_STATE_DIR, "
        "TOKENYARD_AUTH_DATABASE_URL, TOKENYARD_REDIS_URL); flags override them. "
        "See docs/configuration.md.",
    )
    add_flags(up, StackSettings)
    for action in up._actions:  # the generated --model: given twice, refuse (not last wins)
        if action.dest == "model":
            action.__class__ = _OneModel
    up.set_defaults(handler=_up)

    gen = subparsers.add_parser(
        "generate",
        help="stream a generation to the terminal",
        description="The key comes from TOKENYARD_API_KEY or <state>/demo-key.",
    )
    gen.add_argument("prompt", help="what to ask")
    gen.add_argument("--raw", action="store_true", help="send the prompt as is, no chat template")
    gen.add_argument(
        "--n", type=int, default=1, help="samples of one prompt (prefilled once; seed + i each)"
    )
    formats = gen.add_argument_group(
        "structured output", "constrain the reply to a format (at most one of these)"
    ).add_mutually_exclusive_group()
    formats.add_argument(
        "--json-schema", type=Path, metavar="FILE", help="a JSON Schema file: reply valid JSON"
    )
    formats.add_argument("--json-object", action="store_true", help="reply one JSON object")
    formats.add_argument("--regex", help="reply text matching this regular expression")
    formats.add_argument(
        "--grammar", type=Path, metavar="FILE", help="an llguidance Lark grammar file"
    )
    _client_flags(gen)
    gen.set_defaults(handler=_generate)

    chat = subparsers.add_parser(
        "chat",
        help="a conversation with a model (/reset, /exit)",
        description="The key comes from TOKENYARD_API_KEY or <state>/demo-key.",
    )
    _client_flags(chat)
    chat.set_defaults(handler=_chat)

    from services.stack.secrets_env import register as register_compose_secrets

    register_compose_secrets(subparsers)


class _OneModel(argparse._StoreAction):
    """`--model` names one model; a second one would silently replace the first."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        if getattr(namespace, self.dest, None) is not None:
            parser.error("--model names one model; name several with --models A,B or --models-file")
        setattr(namespace, self.dest, values)


def _client_flags(p: argparse.ArgumentParser) -> None:
    from services.common.settings import add_flags
    from services.stack.settings import ClientSettings

    add_flags(p, ClientSettings)
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
    p.add_argument("--tls", action="store_true", help="use TLS with the system's CAs")
    p.add_argument("--tls-ca", type=Path, help="CA certificate of the router (implies TLS)")


def _up(args: argparse.Namespace) -> int:
    from services.common.settings import load_settings
    from services.stack.launcher import run_stack
    from services.stack.settings import StackSettings

    settings = load_settings(StackSettings, os.environ, vars(args))
    return run_stack(settings, sys.stdout)


def _options(args: argparse.Namespace) -> Any:
    from services.client import Sampling
    from services.common.settings import load_settings
    from services.stack.settings import ClientSettings
    from services.stack.state import DEMO_KEY, key_in_state
    from services.stack.terminal import Options

    client = load_settings(ClientSettings, os.environ, vars(args))
    key = client.api_key or key_in_state(client.state_dir, DEMO_KEY)
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
        n=getattr(args, "n", 1),
        response_format=_response_format(args),
    )


def _response_format(args: argparse.Namespace) -> Any:
    """`generate`'s structured-output flags as a ResponseFormat (None: free text)."""
    from services.common.grammars import ResponseFormat

    if getattr(args, "json_object", False):
        return ResponseFormat.of_json_object()
    if getattr(args, "regex", None):
        return ResponseFormat.of_regex(args.regex)
    for flag, make in (
        ("json_schema", ResponseFormat.of_json_schema),
        ("grammar", ResponseFormat.of_grammar),
    ):
        path: Path | None = getattr(args, flag, None)
        if path is not None:
            try:
                return make(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError) as exc:
                raise SystemExit(f"tokenyard: --{flag.replace('_', '-')}: {exc}") from None
    return None


def _generate(args: argparse.Namespace) -> int:
    import asyncio

    from services.stack.terminal import generate

    return asyncio.run(generate(_options(args), args.prompt, sys.stdout, sys.stderr))


def _chat(args: argparse.Namespace) -> int:
    from services.stack.terminal import chat, read_stdin_line

    return chat(_options(args), read_stdin_line(), sys.stdout, sys.stderr)
