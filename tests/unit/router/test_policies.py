"""Routing policies: which worker each policy picks, under different loads."""

from __future__ import annotations

from services.router.policies import (
    Candidate,
    PrefixTable,
    affinity_key,
    least_load,
    prefix_affinity,
    prefix_blocks,
    round_robin,
)


def workers(*loads: int) -> list[Candidate]:
    return [Candidate(f"w{i}", running=load) for i, load in enumerate(loads)]


def ids(cands: list[Candidate]) -> list[str]:
    return [c.worker_id for c in cands]


def test_least_load_prefers_fewest_queued_and_running() -> None:
    cands = [Candidate("a", running=3, queued=2), Candidate("b", running=4), Candidate("c", 1, 5)]
    assert ids(least_load(cands)) == ["b", "a", "c"]


def test_least_load_breaks_ties_by_pending_tokens() -> None:
    cands = [Candidate("a", running=2, pending_tokens=8000), Candidate("b", running=2)]
    assert ids(least_load(cands))[0] == "b"


def test_round_robin_rotates_through_every_worker() -> None:
    cands = workers(5, 0, 9)
    firsts = [round_robin(cands, n)[0].worker_id for n in range(6)]
    assert firsts == ["w0", "w1", "w2", "w0", "w1", "w2"]
    assert sorted(ids(round_robin(cands, 1))) == ["w0", "w1", "w2"]


def test_affinity_key_is_stable_and_spreads_keys() -> None:
    cands = workers(0, 0, 0, 0)
    chosen = {k: affinity_key(cands, k)[0].worker_id for k in (f"user-{i}" for i in range(200))}
    assert all(affinity_key(cands, k)[0].worker_id == w for k, w in chosen.items())
    assert len(set(chosen.values())) == 4


def test_affinity_key_moves_only_the_keys_of_a_removed_worker() -> None:
    cands = workers(0, 0, 0, 0)
    before = {f"k{i}": affinity_key(cands, f"k{i}")[0].worker_id for i in range(300)}
    after = {k: affinity_key(cands[:3], k)[0].worker_id for k in before}
    moved = [k for k in before if before[k] != after[k]]
    assert moved and all(before[k] == "w3" for k in moved)


def test_affinity_key_without_key_is_least_load() -> None:
    assert affinity_key(workers(4, 1, 3), "")[0].worker_id == "w1"


def test_prefix_blocks_share_entries_exactly_for_shared_prefixes() -> None:
    a = prefix_blocks("x" * 64 + "y" * 64 + "tail a", 64)
    b = prefix_blocks("x" * 64 + "y" * 64 + "z" * 64, 64)
    c = prefix_blocks("q" * 64 + "y" * 64, 64)
    assert len(a) == 2 and len(b) == 3
    assert a == b[:2]
    assert c[1] != a[1]  # same second block, different first: different prefix


def test_prefix_affinity_sends_shared_prefixes_to_the_same_worker() -> None:
    table = PrefixTable()
    cands = workers(2, 0, 1)
    system = "You are a helpful assistant. " * 10
    first = prefix_affinity(cands, prefix_blocks(system + "Q1", 64), table, threshold=4)[0]
    assert first.worker_id == "w1"  # nothing cached yet: least loaded
    table.record(prefix_blocks(system + "Q1", 64), first.worker_id)
    # Now w1 is busier than w2, but within the threshold: the cache wins.
    busier = [Candidate("w0", running=2), Candidate("w1", running=3), Candidate("w2", running=1)]
    again = prefix_affinity(busier, prefix_blocks(system + "Q2", 64), table, threshold=4)
    assert again[0].worker_id == "w1"
    other = prefix_affinity(busier, prefix_blocks("z" * 200, 64), table, threshold=4)
    assert other[0].worker_id == "w2"


def test_prefix_affinity_leaves_an_overloaded_worker() -> None:
    table = PrefixTable()
    blocks = prefix_blocks("p" * 256, 64)
    table.record(blocks, "w0")
    overloaded = [Candidate("w0", running=20), Candidate("w1", running=2)]
    assert prefix_affinity(overloaded, blocks, table, threshold=8)[0].worker_id == "w1"


def test_prefix_affinity_prefers_the_longest_cached_prefix() -> None:
    table = PrefixTable()
    text = "".join(chr(65 + i) * 64 for i in range(4))
    table.record(prefix_blocks(text[:128], 64), "w0")
    table.record(prefix_blocks(text, 64), "w1")
    table.record(prefix_blocks(text[:64], 64), "w2")  # w2 now owns only block 0
    order = prefix_affinity(workers(0, 0, 0), prefix_blocks(text, 64), table, threshold=4)
    assert order[0].worker_id == "w1"


def test_prefix_table_is_bounded_and_ignores_workers_no_longer_candidates() -> None:
    table = PrefixTable(capacity=10)
    for i in range(5):
        table.record(prefix_blocks(str(i) * 192, 64), f"w{i % 2}")
    assert len(table) == 10
    assert table.longest_match(prefix_blocks("4" * 192, 64), {"w0", "w1"}) == ("w0", 3)
    # w0 left the pool: its entries age out of the table, and are never chosen meanwhile.
    assert table.longest_match(prefix_blocks("4" * 192, 64), {"w1"}) == (None, 0)
