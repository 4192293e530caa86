"""What one request is counted as: its subjects, the tokens it reserves, max_tokens.

Role limits count for the user over all their credentials (subject
`user:<id>`); a key's limits that are tighter than the role's count for that key
(`credential:<id>`). The quota counts for the user. A generation reserves an
upper bound of its prompt (ids as given; text as its UTF-8 bytes, which no
tokenizer exceeds by more than its template) plus max_tokens, capped by the
model's context length, which bounds prompt + completion anyway.

max_tokens above the key's `max_tokens_per_request` is INVALID_ARGUMENT naming
`sampling.max_tokens` (asking again cannot help); an unset max_tokens is capped
at the limit instead. A `priority` above the effective `max_priority` (the key's
and its roles', DEFAULT_MAX_PRIORITY where none sets it) is PERMISSION_DENIED
naming `priority`.
"""

from __future__ import annotations

from tokenyard.auth.v1 import resources_pb2 as res
from tokenyard.generation.v1 import generation_service_pb2 as gen

from services.common.errors import InvalidArgument
from services.common.requests import DEFAULT_MAX_PRIORITY, check_priority_cap
from services.router import metrics
from services.router.limits import Admission, LimitSpec, QuotaSpec

CHAT_TURN_TOKENS = 8  # template tokens one chat turn adds at most (role markers)


def _rates(limits: res.Limits) -> tuple[int | None, int | None, int | None]:
    return (
        limits.requests_per_minute if limits.HasField("requests_per_minute") else None,
        limits.tokens_per_minute if limits.HasField("tokens_per_minute") else None,
        limits.concurrent_streams if limits.HasField("concurrent_streams") else None,
    )


def _tighter(value: int | None, than: int | None) -> int | None:
    return value if value is not None and (than is None or value < than) else None


def subjects(principal: res.Principal) -> tuple[LimitSpec, ...]:
    """The user's spec (role limits) and, where the key is tighter, the key's."""
    user = principal.user_limits if principal.HasField("user_limits") else principal.limits
    u_rpm, u_tpm, u_conc = _rates(user)
    specs = [LimitSpec(f"user:{principal.user_id}", u_rpm, u_tpm, u_conc)]
    k_rpm, k_tpm, k_conc = _rates(principal.limits)
    key = LimitSpec(
        f"credential:{principal.credential_id}",
        _tighter(k_rpm, u_rpm),
        _tighter(k_tpm, u_tpm),
        _tighter(k_conc, u_conc),
    )
    if not key.unlimited:
        specs.append(key)
    return tuple(spec for spec in specs if not spec.unlimited)


def quota_of(principal: res.Principal) -> QuotaSpec | None:
    """The user's token quota (the effective one: the key's when tighter)."""
    limits = principal.limits
    if not limits.HasField("token_quota"):
        return None
    return QuotaSpec(
        subject=f"user:{principal.user_id}",
        limit=limits.token_quota,
        monthly=limits.quota_period == res.QUOTA_PERIOD_MONTH,
        used=principal.quota_used_tokens,
    )


def effective_max_tokens(requested: int | None, limits: res.Limits) -> int | None:
    """max_tokens to send the worker; INVALID_ARGUMENT when over the key's limit."""
    if not limits.HasField("max_tokens_per_request"):
        return requested
    cap = limits.max_tokens_per_request
    if requested is None:
        return cap
    if requested > cap:
        metrics.RATE_LIMITED.labels("max_tokens").inc()
        raise InvalidArgument(
            "sampling.max_tokens", f"at most {cap} for this key", reason="MAX_TOKENS_LIMIT"
        )
    return requested


def prompt_bound(request: gen.StreamGenerateRequest | gen.CountTokensRequest) -> int:
    """An upper bound of the request's prompt tokens, computed without a tokenizer."""
    kind = request.WhichOneof("input")
    if kind == "token_ids":
        return len(request.token_ids.ids)
    if kind == "messages":
        turns = request.messages.messages
        return sum(len(t.role.encode()) + len(t.content.encode()) for t in turns) + (
            CHAT_TURN_TOKENS * (len(turns) + 1)
        )
    return len(request.prompt.encode())


def reservation(request: gen.StreamGenerateRequest, context_length: int | None, n: int = 1) -> int:
    """Tokens a generation may use at most: prompt bound + n * max_tokens.

    Each of the `n` samples' completions is bounded by the context too.
    """
    prompt = prompt_bound(request)
    s = request.sampling
    total = prompt + s.max_tokens if s.HasField("max_tokens") else None
    if context_length:
        total = context_length if total is None else min(total, context_length)
    if total is None:
        return prompt
    # The prompt is counted once; every sample may use the whole completion budget.
    return total + (n - 1) * max(total - prompt, 0)


def admission(
    principal: res.Principal, member: str, *, reserve: int = 0, stream: bool = True
) -> Admission:
    """The Admission of one request by `principal`."""
    return Admission(
        tag=principal.user_id,
        member=member,
        specs=subjects(principal),
        quota=quota_of(principal),
        reserve=reserve,
        stream=stream,
    )


def requests_only(principal: res.Principal, member: str) -> Admission:
    """A cheap RPC (ListModels): counted against the request rates, nothing else."""
    specs = tuple(
        LimitSpec(spec.subject, rpm=spec.rpm)
        for spec in subjects(principal)
        if spec.rpm is not None
    )
    return Admission(tag=principal.user_id, member=member, specs=specs, stream=False)


def max_priority_of(limits: res.Limits) -> int:
    """The highest priority the credential may ask for (0 where no level sets one)."""
    return limits.max_priority if limits.HasField("max_priority") else DEFAULT_MAX_PRIORITY


def check_priority(priority: int, limits: res.Limits) -> None:
    """PERMISSION_DENIED naming `priority` when it is above the credential's cap."""
    cap = max_priority_of(limits)
    if priority > cap:
        metrics.RATE_LIMITED.labels("priority").inc()
    check_priority_cap(priority, cap)
