"""Timing and peak-memory measurement for `benchmarks/overhead.py`.

Time: wall clock of one call (after `torch.cuda.synchronize` on a GPU), or the process's CPU time (`--clock cpu`).

Memory: the peak of the bytes held by live torch tensors during the call, above what was held when it started. On a
GPU that is the CUDA caching allocator's `max_memory_allocated`. On a CPU torch keeps no allocator statistics,
Python's `tracemalloc` does not see torch's allocations, and the process's resident high-water mark also counts the
allocator's retained free blocks (the same work measured twice differs by tens of MB). So the CPU measure replays
the allocation and free events that `torch.profiler` records with `profile_memory=True`, in their order, and takes
the maximum of the running sum; a free counts only for a block allocated during the call (state an earlier call
left and this one frees is not this call's saving). It is exact and repeatable (every tensor, SDPA's and the
kernels' workspaces included) and leaves out what is not a torch tensor (Python objects, allocator
fragmentation), which no method changes.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator

import torch
from torch.profiler import ProfilerActivity, profile


def timed(fn: Callable[[], object], device: torch.device, clock: str = "wall") -> float:
    """Seconds one call of `fn` takes: wall clock, or with `clock="cpu"` the process's CPU time (on a shared CPU
    with one thread, this leaves out the time other processes hold the core; it still includes their cache and
    memory-bandwidth pressure)."""
    now = time.process_time if clock == "cpu" and device.type == "cpu" else time.perf_counter
    _sync(device)
    start = now()
    fn()
    _sync(device)
    return now() - start


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes of live tensors during one call of `fn`, above the level at its start (see the module docstring)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((node.start_time_ns, node.extra_fields) for node in _walk(
        prof.profiler.kineto_results.experimental_event_tree())
        if type(node.extra_fields).__name__ == "_ExtraFields_Allocation")
    # frees of blocks allocated before the call (state of an earlier call) are not the call's own: skipped
    mine: dict[int, int] = {}
    live = peak = 0
    for _, event in events:
        if event.alloc_size > 0:
            mine[event.ptr] = event.alloc_size
            live += event.alloc_size
            peak = max(peak, live)
        elif event.ptr in mine:
            live -= mine.pop(event.ptr)
    return peak


def _walk(nodes: list) -> Iterator:
    for node in nodes:
        yield node
        yield from _walk(node.children)


def ratio_stats(values: list[float], base: list[float]) -> tuple[float, float, float]:
    """Median, min and max of the per-round ratios `values[i] / base[i]` (rounds pair each config with the
    unmodified model measured next to it, so a load spike on the shared machine cancels out)."""
    ratios = [v / b for v, b in zip(values, base)]
    return statistics.median(ratios), min(ratios), max(ratios)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
