"""benchmarks/timing.py: the order of the interleaved calls and what comes back."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.timing import interleaved_medians  # noqa: E402


def test_calls_warm_up_once_each_then_alternate_and_report_the_warm_up():
    calls = []
    fns = [lambda name=name: calls.append(name) for name in "abc"]
    warmup = []
    medians = interleaved_medians(fns, torch.device("cpu"), repeats=2, warmup_seconds=warmup)
    # a run that timed a's rounds before b's would let a drift in the machine's load favour one of them
    assert calls == list("abc") * 3
    assert len(medians) == 3 and len(warmup) == 3 and all(seconds >= 0 for seconds in medians + warmup)
