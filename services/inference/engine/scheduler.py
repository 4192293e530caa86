"""Continuous batching: which sequences run, and what one engine step computes.

Runs only on the engine's compute thread. Each step: drop cancelled and expired
sequences, admit waiting ones into free slots (reusing cached prefix blocks), then
one forward pass computes a decode token for every sequence past its prompt plus
prompt chunks with what is left of the token budget, so a long prompt never stalls
running streams and the weights are read once per step.
Running sequences occupy cache slots ``0..n-1``: a finished sequence's slot is
refilled by moving the last one down, so the decode batch is one contiguous view.
The waiting queue is ordered by priority, then tenants in turn (wait_queue.py).
When the first waiting sequence finds no free slot, running sequences of lower
priority are preempted: their keys/values go to the prefix cache, their slot is
freed and they wait again at the front of their tenant's line, their stream paused.
Resumed, they prefill prompt + generated tokens (mostly from the prefix cache)
and go on: sampling draws depend only on (seed, position), so the output is the
one an unpreempted run gives, greedy or seeded.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable

import torch

from services.inference.engine.grammar import Grammars
from services.inference.engine.kv_cache import CAPACITY_STEP, DecodeBatch, ModelRunner, SlotCache
from services.inference.engine.prefix_cache import PrefixCache
from services.inference.engine.sampling import Sampled, SampleRow, sample
from services.inference.engine.sequence import Sequence
from services.inference.engine.types import (
    FINISH_CANCELLED,
    FINISH_LENGTH,
    FINISH_STOP,
    NO_TOKEN,
    TokenEvent,
)
from services.inference.engine.wait_queue import WaitQueue

log = logging.getLogger(__name__)
Deliver = Callable[[list[tuple[Sequence, list[TokenEvent]]]], None]


class Scheduler:
    """Owns the running batch, the waiting queue and the KV cache."""

    def __init__(
        self,
        runner: ModelRunner,
        *,
        max_running: int,
        max_batch_tokens: int,
        context_length: int,
        eos_token_ids: frozenset[int],
        prefix_cache: PrefixCache | None,
        deliver: Deliver,
        on_removed: Callable[[Sequence], None],
        grammars: Grammars | None = None,
        initial_capacity: int = CAPACITY_STEP,
    ) -> None:
        self.runner = runner
        self.grammars = grammars  # token masks of structured-output sequences
        self.max_running = max_running
        self.max_batch_tokens = max_batch_tokens
        self.context_length = context_length  # positions a sequence may use
        self.eos_token_ids = eos_token_ids
        self.prefix_cache = prefix_cache
        self._initial_capacity = min(initial_capacity, context_length)
        self.cache: SlotCache = self._new_cache()
        self.running: list[Sequence] = []
        self.waiting = WaitQueue()
        self._deliver = deliver
        self._on_removed = on_removed
        self._out: list[tuple[Sequence, list[TokenEvent]]] = []
        self._removed: list[Sequence] = []  # reported before their last events go out
        self.prefix_hits = 0
        self.prefix_queries = 0
        self.prefix_reused_tokens = 0
        self.total_steps = 0
        self.total_generated = 0
        self.total_cancelled = 0
        self.total_finished = 0
        self.total_prefill_tokens = 0
        self.total_forks = 0
        self.total_preemptions = 0

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence; it joins the batch at a step boundary."""
        self.waiting.push(seq)

    def free_slots(self) -> int:
        """Slots neither running nor reserved for forks (compute thread's view)."""
        return self.max_running - len(self.running) - self._reserved()

    def has_work(self) -> bool:
        """True while anything is running or waiting."""
        return bool(self.running or self.waiting)

    def pending_tokens(self) -> int:
        """Work still owed to admitted and waiting sequences, in tokens."""
        return sum(
            s.pending_tokens() + sum(f.pending_tokens() for f in s.forks)
            for s in itertools.chain(self.running, self.waiting)
        )

    def _reserved(self) -> int:
        """Slots held for forks of running sequences still prefilling."""
        return sum(len(s.forks) for s in self.running)

    # -- removal ---------------------------------------------------------------

    def _free_slot(self, seq: Sequence) -> None:
        """Take a running sequence out of the batch; the last one moves into its slot."""
        last = self.running[-1]
        if last is not seq:
            self.cache.move(last.slot, seq.slot, last.computed)
            last.slot = seq.slot
            self.running[seq.slot] = last
        self.running.pop()
        seq.slot = -1

    def _remove(self, seq: Sequence) -> None:
        if seq.slot >= 0:
            self._free_slot(seq)
        self._removed.append(seq)
        self._drop_forks(seq)

    def _drop_forks(self, seq: Sequence) -> None:
        """End the forks a removed sequence never handed its prompt to, as cancelled."""
        forks, seq.forks = seq.forks, []
        for fork in forks:
            self._cancel(fork)
            self._removed.append(fork)

    def _cancel(self, seq: Sequence) -> None:
        self.total_cancelled += 1
        if not seq.aborted:
            event = TokenEvent(
                NO_TOKEN, None, (), FINISH_CANCELLED, *self._first_event_fields(seq), seq.index
            )
            self._out.append((seq, [event]))

    def cancel_all(self) -> None:
        """End every sequence as cancelled (engine stop)."""
        for seq in [*self.running, *self.waiting]:
            self._cancel(seq)
        for seq in list(reversed(self.running)):
            self._remove(seq)
        while self.waiting:
            self._remove(self.waiting.pop())
        self._flush()

    def fail_all(self) -> list[Sequence]:
        """Drop every sequence without events (after a compute error); returns them."""
        dropped = [*self.running, *self.waiting]
        dropped += [f for s in dropped for f in s.forks]
        for seq in list(reversed(self.running)):
            self._remove(seq)
        while self.waiting:
            self._remove(self.waiting.pop())
        self._out.clear()
        self._flush()
        return dropped

    def _drop_expired(self, now: float) -> None:
        def gone(seq: Sequence) -> bool:
            deadline = seq.request.deadline
            return seq.aborted or (deadline is not None and now >= deadline)

        for seq in [s for s in self.running if gone(s)]:
            self._cancel(seq)
            self._remove(seq)
        if any(gone(s) for s in self.waiting):
            for seq in self.waiting.remove_if(gone):
                self._cancel(seq)
                self._removed.append(seq)
                self._drop_forks(seq)

    # -- admission ---------------------------------------------------------------

    def _admit(self, now: float) -> None:
        while self.waiting:
            # A sequence with forks is admitted once a slot for each is free too.
            head = self.waiting.peek()
            short = 1 + len(head.forks) - self.free_slots()
            if short > 0 and not self._preempt_for(head, short):
                break  # strict order: nothing behind the head overtakes it
            seq = self.waiting.pop()
            seq.admitted_at = now
            seq.slot = len(self.running)
            self.running.append(seq)
            self.cache.ensure_slots(len(self.running))
            if self.prefix_cache is None:
                continue
            self.prefix_queries += 1
            # Keep at least one prompt token to compute: its logits give the first token.
            length, ks, vs = self.prefix_cache.lookup(seq.tokens, seq.n_prefill - 1)
            if length:
                self._ensure_capacity(length + 1)
                self.cache.write(seq.slot, 0, torch.cat(ks, dim=2), torch.cat(vs, dim=2))
                seq.computed = length
                seq.cached_tokens = length
                self.prefix_hits += 1
                self.prefix_reused_tokens += length

    def _preempt_for(self, head: Sequence, count: int) -> bool:
        """Free `count` slots for `head` by preempting lower-priority sequences, or none.

        Victims: lowest priority first, then the latest to arrive (least work lost).
        A sequence still holding slots for its forks is never a victim.
        """
        victims = sorted(
            (s for s in self.running if s.priority < head.priority and not s.forks),
            key=lambda s: (s.priority, -s.order),
        )
        if len(victims) < count:
            return False
        for seq in victims[:count]:
            self._preempt(seq)
        return True

    def _preempt(self, seq: Sequence) -> None:
        """Pause a running sequence: keys/values to the prefix cache, back to waiting."""
        self._store_prefix(seq, seq.computed)
        self._free_slot(seq)
        # Resume = prefill everything it has (prompt, continuation, generated): the
        # last position's logits give its next token, drawn at the same position.
        seq.computed = 0
        seq.n_prefill = len(seq.tokens)
        seq.preemptions += 1
        self.total_preemptions += 1
        self.waiting.push(seq, front=True)

    def _new_cache(self) -> SlotCache:
        """An empty cache holding one slot; more as sequences take them."""
        return self.runner.new_cache(self.max_running, self._initial_capacity, held=1)

    def _ensure_capacity(self, needed: int) -> None:
        self.cache.ensure_capacity(needed, self.context_length)

    def _store_prefix(self, seq: Sequence, limit: int) -> None:
        if self.prefix_cache is None:
            return
        start, end = self.prefix_cache.missing(seq.tokens, limit)
        if end > start:
            k, v = self.cache.read(seq.slot, start, end)
            self.prefix_cache.insert(seq.tokens, start, k, v)

    # -- one step ----------------------------------------------------------------

    def step(self, now: float) -> int:
        """Run one engine step; returns how many tokens it generated."""
        self._drop_expired(now)
        self._admit(now)
        self.total_steps += 1
        decoding = [s for s in self.running if not s.prefilling]
        budget = self.max_batch_tokens - len(decoding)
        planned: list[tuple[Sequence, int]] = []
        prefilling = sorted(
            (s for s in self.running if s.prefilling), key=lambda s: (-s.priority, s.order)
        )
        for seq in prefilling:
            if budget <= 0 or seq.priority < prefilling[0].priority:
                break  # a lower priority's prompt waits: the higher one's first token sooner
            n = seq.n_prefill - seq.computed
            if not self.runner.whole_prompts:
                n = min(n, budget)
            budget -= n
            planned.append((seq, n))
        if not decoding and not planned:
            self._flush()
            return 0
        # Grow first: the flat cache row indices depend on the capacity.
        self._ensure_capacity(
            max(
                max((s.computed + 1 for s in self.running), default=1),
                max((s.computed + n + 1 for s, n in planned), default=1),
            )
        )
        device = self.runner.device
        chunks = [
            (
                seq.slot,
                torch.tensor(seq.tokens[seq.computed : seq.computed + n], device=device),
                seq.computed,
            )
            for seq, n in planned
        ]
        logits = self.runner.forward(self.cache, self._decode_batch(decoding), chunks)
        ready = list(decoding)
        rows = list(range(len(decoding)))
        for seq in decoding:
            seq.computed += 1
        for index, (seq, n) in enumerate(planned):
            seq.computed += n
            self.total_prefill_tokens += n
            if not seq.prefilling:
                self._store_prefix(seq, seq.n_prefill)
                # Its forks sample their first token from the same logits row.
                for member in (seq, *self._fork(seq)):
                    ready.append(member)
                    rows.append(len(decoding) + index)
        if ready:
            if rows != list(range(logits.shape[0])):
                logits = logits[rows]
            sample_rows = [
                SampleRow(s.request.sampling, s.seed, s.generated, s.tokens) for s in ready
            ]
            allowed = None
            if self.grammars is not None:
                allowed = self.grammars.allowed([s.matcher for s in ready], logits.device)
            for seq, choice in zip(ready, sample(logits, sample_rows, allowed), strict=True):
                self._advance(seq, choice)
        self._flush()
        if not self.running and self.cache.capacity > self._initial_capacity:
            # One long request must not pin a large cache for every slot forever.
            self.cache = self._new_cache()
        return len(ready)

    def _fork(self, seq: Sequence) -> list[Sequence]:
        """Give `seq`'s prefilled prompt to its forks, each in a slot of its own."""
        forks, seq.forks = seq.forks, []
        started: list[Sequence] = []
        for fork in forks:
            if fork.aborted:
                self._cancel(fork)
                self._removed.append(fork)
                continue
            fork.slot = len(self.running)
            self.running.append(fork)
            self.cache.ensure_slots(len(self.running))
            self.cache.move(seq.slot, fork.slot, seq.computed)
            fork.computed = seq.computed
            fork.admitted_at = seq.admitted_at
            fork.cached_tokens = seq.cached_tokens
            self.total_forks += 1
            started.append(fork)
        return started

    def _decode_batch(self, decoding: list[Sequence]) -> DecodeBatch | None:
        """One token for each decoding slot; prompt slots ride along as no-ops."""
        if not decoding:
            return None
        length = max(s.computed for s in decoding) + 1
        tokens: list[int] = []
        positions: list[int] = []
        writes: list[int] = []
        limits: list[int] = []
        for seq in self.running:
            if seq.prefilling:
                # Its prompt chunk overwrites position `computed` in the same pass.
                tokens.append(0)
                positions.append(0)
                writes.append(seq.computed)
                limits.append(0)
            else:
                tokens.append(seq.tokens[-1])
                positions.append(seq.computed)
                writes.append(seq.computed)
                limits.append(seq.computed)
        device = self.runner.device
        cols = torch.arange(length, device=device)
        mask = (cols[None] <= torch.tensor(limits, device=device)[:, None])[:, None, None]
        return DecodeBatch(
            tokens=torch.tensor(tokens, dtype=torch.long, device=device),
            positions=torch.tensor(positions, dtype=torch.long, device=device),
            write_index=self.runner.write_rows(self.cache, torch.tensor(writes, device=device)),
            mask=mask,
            rows=torch.tensor([s.slot for s in decoding], device=device),
        )

    def _first_event_fields(self, seq: Sequence) -> tuple[int, float | None]:
        """(cached prompt tokens, admission instant) on the first event, else (0, None)."""
        if seq.first_sent:
            return 0, None
        seq.first_sent = True
        return seq.cached_tokens, seq.admitted_at

    def _advance(self, seq: Sequence, choice: Sampled) -> None:
        sampling = seq.request.sampling
        token = choice.token_id
        seq.tokens.append(token)
        seq.generated += 1
        self.total_generated += 1
        finish: str | None = None
        if (
            (token in self.eos_token_ids and not sampling.ignore_eos)
            or (token in sampling.stop_token_ids)
            or (seq.matcher is not None and self._format_done(seq, token))
        ):
            finish = FINISH_STOP
        elif seq.generated >= seq.max_tokens or len(seq.tokens) >= self.context_length:
            finish = FINISH_LENGTH
        event = TokenEvent(
            token,
            choice.logprob,
            choice.top_logprobs,
            finish,
            *self._first_event_fields(seq),
            seq.index,
        )
        self._out.append((seq, [event]))
        if finish is not None:
            self.total_finished += 1
            self._store_prefix(seq, seq.computed)
            self._remove(seq)

    @staticmethod
    def _format_done(seq: Sequence, token: int) -> bool:
        """Advance the sample's matcher; True once its format is complete.

        The mask allowed only tokens the format accepts, so a refused token means a
        bug; the sample then ends rather than emit text outside the format.
        """
        if not seq.matcher.consume_token(token):
            log.error(
                "structured output: matcher refused token %d: %s", token, seq.matcher.get_error()
            )
            return True
        return bool(seq.matcher.is_stopped())

    def _flush(self) -> None:
        # Removals are counted before the events go out: a caller holding its last
        # event never sees its own request still counted as running or queued.
        removed, self._removed = self._removed, []
        for seq in removed:
            self._on_removed(seq)
        if self._out:
            out, self._out = self._out, []
            self._deliver(out)
