"""Timing and peak-memory measurement for the benchmark scripts in ``tools/analysis``.

Benchmarks compare ratios measured in the same run (machines are noisy), never
absolute numbers against a threshold.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, List, Sequence

import torch


def _sync(device: str) -> None:
    if str(device).startswith('cuda'):
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], object], device: str = 'cpu', repeats: int = 5,
            warmup: int = 2) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_fns(fns: Sequence[Callable[[], object]], device: str = 'cpu', repeats: int = 5,
             warmup: int = 2) -> List[float]:
    """Median wall time (seconds) of each function, measured *interleaved* (one run of
    each per round) so that a slow phase of a noisy machine hits all of them alike."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    _sync(device)
    times: List[List[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, bucket in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            _sync(device)
            bucket.append(time.perf_counter() - t0)
    return [statistics.median(bucket) for bucket in times]


def peak_memory_mib(fn: Callable[[], object], device: str = 'cpu') -> float:
    """Peak of memory allocated by tensors during one call of ``fn()``, in MiB, relative to
    what was allocated before the call.

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: the PyTorch profiler's allocation
    records (each op's own allocations at its start, each free at its time), replayed
    in time order; RSS-based numbers are useless here because the high-water mark of
    importing torch hides everything smaller.
    """
    if str(device).startswith('cuda'):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = []
    for e in prof.events():
        delta = e.cpu_memory_usage if e.name == '[memory]' else e.self_cpu_memory_usage
        if delta:
            events.append((e.time_range.start, delta))
    events.sort(key=lambda t: t[0])
    current = peak = 0
    for _, delta in events:
        current += delta
        peak = max(peak, current)
    return peak / 2**20
