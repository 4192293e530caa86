"""A request's sample inside the engine: its tokens, progress and cache slot."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from services.inference.engine.types import EngineRequest

_order = itertools.count()


@dataclass(eq=False)
class Sequence:
    """A request's state inside the engine."""

    request: EngineRequest
    seed: int
    sink: Any  # opaque here: the engine's weak reference to the request's stream
    max_tokens: int  # the request's resolved budget
    tokens: list[int] = field(default_factory=list)  # prompt + continuation + generated
    n_prefill: int = 0  # tokens fed by prefill (prompt + continuation)
    generated: int = 0  # continuation + newly generated
    computed: int = 0  # positions whose keys/values are in the cache
    slot: int = -1
    cached_tokens: int = 0
    admitted_at: float | None = None  # time.monotonic() when it got a slot
    first_sent: bool = False
    aborted: bool = False  # set from any thread when the consumer goes away
    order: int = field(default_factory=lambda: next(_order))
    index: int = 0  # which of the request's samples
    # Sibling samples that take this one's prompt keys/values once its prefill is
    # done (prefill once); they hold slots reserved from this one's admission on.
    forks: list[Sequence] = field(default_factory=list)
    matcher: Any = None  # this sample's llguidance matcher when the request has a grammar

    @classmethod
    def create(cls, request: EngineRequest, seed: int, sink: Any, index: int = 0) -> Sequence:
        """State for a new request: the continuation counts as already generated."""
        tokens = [*request.prompt_ids, *request.continuation_ids]
        assert request.sampling.max_tokens is not None  # Engine._check
        grammar = request.grammar
        matcher = None if grammar is None else grammar.start(request.continuation_ids)
        return cls(
            request=request,
            seed=seed,
            sink=sink,
            max_tokens=request.sampling.max_tokens,
            tokens=tokens,
            n_prefill=len(tokens),
            generated=len(request.continuation_ids),
            index=index,
            matcher=matcher,
        )

    @property
    def prefilling(self) -> bool:
        """True until the whole prompt (and continuation) is in the cache."""
        return self.computed < self.n_prefill

    def pending_tokens(self) -> int:
        """Prompt tokens still to compute plus tokens still allowed to generate."""
        return (self.n_prefill - min(self.computed, self.n_prefill)) + max(
            self.max_tokens - self.generated, 0
        )
