"""Only the engine's compute thread runs multi-threaded kernels.

PyTorch's CPU wheels use libgomp, which keeps a pool of worker threads for every
thread that has run a parallel kernel. When the pools together hold more threads
than the process has CPUs, libgomp makes the workers sleep between kernels instead
of spinning ("throttled" spinning), and a decode step is hundreds of small parallel
kernels: each one then pays a futex wake-up. Loading the model on one thread and
decoding on another made a 64-sequence decode step 1.5x slower on 2 cores (160 vs
105 ms, the demo model in bf16).

So a worker calls `confine_torch_threads` before any torch work and loads the model
single-threaded; the engine's compute thread claims the threads when it starts
(`Engine(compute_threads=...)`), and the default for threads started later goes
back to one. torch keeps the count per thread, but a thread's first torch call
resets its count to the process default (the last `set_num_threads` anywhere), so
a claim reads the count once before setting it.
"""

from __future__ import annotations

import torch


def confine_torch_threads() -> int:
    """Run torch ops single-threaded in this and later threads; returns the count.

    The count is what the process had (``OMP_NUM_THREADS`` or the number of cores),
    for `Engine(compute_threads=...)`. Call it before the process runs any torch
    op: a thread pool created earlier stays for the life of its thread.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    return threads


def claim_torch_threads(threads: int) -> None:
    """Give the calling thread (the compute thread) `threads` intra-op threads."""
    torch.get_num_threads()  # this thread's first call: takes the default now, not later
    torch.set_num_threads(threads)


def release_default_threads() -> None:
    """Threads started from now on (and the caller) run torch ops single-threaded.

    Called by a confined thread after the compute thread claimed its count, which
    also became the default for new threads.
    """
    torch.set_num_threads(1)
