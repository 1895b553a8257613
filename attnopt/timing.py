"""Wall-clock latency the way attnopt reports it everywhere: warm-up calls, then the median of
`runs` timed calls, in milliseconds (CPU work and synchronous runtimes such as onnxruntime)."""

from __future__ import annotations

import statistics
import time
from typing import Callable

WARMUP_CALLS = 2


def median_ms(fn: Callable[[], object], runs: int, warmup: int = WARMUP_CALLS) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)
