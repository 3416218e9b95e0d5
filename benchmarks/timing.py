"""Side-by-side timing for the benchmarks: one warm-up call each, then interleaved rounds, the median of each.

    from benchmarks.timing import interleaved_medians
"""

import statistics
import time

import torch


def synchronize(device):
    """Wait for the device's queued work, so that wall time measures it (a no-op off CUDA)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    """Wall seconds of one call of `fn`, its queued device work included."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def interleaved_medians(fns, device, repeats=3, warmup_seconds=None):
    """Median wall time in seconds of each of `fns` over `repeats` rounds, after one warm-up call of each.

    The calls alternate (round 1: a, b, c; round 2: a, b, c; ...), so a change in the machine's load during the
    run hits every function alike, and their ratios hold on a shared machine where absolute times do not.
    A list passed as `warmup_seconds` receives the warm-up calls' durations (a compiler's first call, say).
    """
    first = [timed(fn, device) for fn in fns]
    if warmup_seconds is not None:
        warmup_seconds.extend(first)
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, fn_times in zip(fns, times):
            fn_times.append(timed(fn, device))
    return [statistics.median(fn_times) for fn_times in times]
