"""The rule that sizes a predictor pod's memory from the measured RSS of its model (``docs/performance.md``).

request = the largest RSS a replica of the size reached (``peak_rss_mb`` over every measured configuration,
load and traffic included) × 1.25, rounded up to a multiple of 256 MiB; limit = 2 × request. The peak, not
the steady RSS, because the kubelet kills a container the moment it crosses its limit, and a pod whose
request covers its peak is never scheduled onto memory it will not get. ``bench/frontier.py`` reports the
figures per size; ``tests/test_helm.py`` keeps the chart's defaults equal to the rule for the chart's default
size.
"""

from __future__ import annotations

import math

HEADROOM = 1.25  # over the measured peak: allocator fragmentation, a larger catalog than measured
STEP_MIB = 256
LIMIT_OVER_REQUEST = 2  # a hot swap holds two models at once for a moment


def memory_request_mib(peak_rss_mib: float) -> int:
    return int(math.ceil(peak_rss_mib * HEADROOM / STEP_MIB) * STEP_MIB)


def memory_limit_mib(peak_rss_mib: float) -> int:
    return LIMIT_OVER_REQUEST * memory_request_mib(peak_rss_mib)


def size_peak_mib(frontier: dict, size: str) -> float:
    """The largest peak RSS (MiB) measured for ``size`` over its CPU configurations in a frontier report."""
    peaks = [
        r["peak_rss_mb"]
        for name, r in frontier["serving"][size].items()
        if name != "gpu" and "peak_rss_mb" in r
    ]
    if not peaks:
        raise ValueError(f"no measured replica of size {size!r} in the frontier report")
    return max(peaks)
