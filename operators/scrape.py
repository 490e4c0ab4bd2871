"""Read latency histograms and quality-ladder counters: each ready pod's Prometheus endpoint, or a Prometheus
server.

Parsing uses prometheus_client's own text parser; only the bucket series of one histogram whose labels
match are kept, summed over any other labels (e.g. several model names on one pod). The ladder's series are
``recsys_served_level_total{level}`` (users per level, a counter) and ``recsys_level_cost_seconds{level}``
(the predictor's cost of a lone request per level, a gauge); ``recsys_online_store_lost`` (a gauge, 1 while
the pod finds its online store wiped) is read alongside.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from operators.policy import Buckets

SERVED_LEVEL, LEVEL_COST = "recsys_served_level_total", "recsys_level_cost_seconds"
ONLINE_STORE_LOST = "recsys_online_store_lost"


@dataclass
class PodMetrics:
    buckets: Buckets  # cumulative latency histogram
    served: dict[str, float] = field(default_factory=dict)  # cumulative users per ladder level
    costs: dict[str, float] = field(default_factory=dict)  # seconds of a lone request per level
    online_store_lost: bool | None = None  # None: the pod does not export the gauge


def parse_levels(text: str) -> tuple[dict[str, float], dict[str, float]]:
    """``(served, costs)`` per ladder level from a predictor's metrics page (empty without a ladder)."""
    served: dict[str, float] = {}
    costs: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name not in ("recsys_served_level", LEVEL_COST):  # a counter's family drops its _total
            continue
        for sample in family.samples:
            level = sample.labels.get("level")
            if level is None:
                continue
            if sample.name == SERVED_LEVEL:
                served[level] = served.get(level, 0.0) + sample.value
            elif sample.name == LEVEL_COST:
                costs[level] = sample.value
    return served, costs


def parse_online_store_lost(text: str) -> bool | None:
    for family in text_string_to_metric_families(text):
        if family.name == ONLINE_STORE_LOST:
            return any(sample.value > 0 for sample in family.samples)
    return None


def parse_histogram(text: str, name: str, labels: Mapping[str, str]) -> Buckets:
    """Cumulative buckets (``le`` → count) of histogram ``name`` over the series matching ``labels``."""
    out: Buckets = {}
    for family in text_string_to_metric_families(text):
        if family.name != name:
            continue
        for sample in family.samples:
            if not sample.name.endswith("_bucket"):
                continue
            if any(sample.labels.get(k) != v for k, v in labels.items()):
                continue
            le = float(sample.labels["le"])
            out[le] = out.get(le, 0.0) + sample.value
    if out and math.inf not in out:
        raise ValueError(f"histogram {name} has no +Inf bucket")
    return out


async def scrape_pod(
    session: aiohttp.ClientSession, url: str, name: str, labels: Mapping[str, str], timeout: float
) -> PodMetrics | None:
    """One pod's histogram and ladder series, or None if it did not answer in time or had no such
    histogram."""
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as response:
            if response.status != 200:
                return None
            text = await response.text()
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
        return None
    try:
        buckets = parse_histogram(text, name, labels)
    except ValueError:
        return None
    if not buckets:
        return None
    return PodMetrics(buckets, *parse_levels(text), online_store_lost=parse_online_store_lost(text))


async def scrape_pods(
    urls: Mapping[str, str], name: str, labels: Mapping[str, str], timeout: float
) -> dict[str, PodMetrics | None]:
    """Every pod concurrently: ``{pod: metrics or None}``."""
    async with aiohttp.ClientSession() as session:
        results = await asyncio.gather(
            *(scrape_pod(session, u, name, labels, timeout) for u in urls.values())
        )
    return dict(zip(urls, results))


async def _query(session: aiohttp.ClientSession, base_url: str, query: str, timeout: float) -> list[dict]:
    async with session.get(
        f"{base_url.rstrip('/')}/api/v1/query",
        params={"query": query},
        timeout=aiohttp.ClientTimeout(total=timeout),
    ) as response:
        body = await response.json()
    return body.get("data", {}).get("result", [])


async def prometheus_window(
    base_url: str, name: str, labels: Mapping[str, str], pods: list[str], window_s: float, timeout: float
) -> dict[str, PodMetrics | None]:
    """Per-pod bucket and ladder-counter increases over the window, and the cost gauges, from a
    Prometheus server (``increase()`` does the reset handling there); keyed by the ``pod`` label."""
    selector = ",".join([f'{k}="{v}"' for k, v in labels.items()])
    window = f"[{int(window_s)}s]"
    queries = (
        f"sum by (pod, le) (increase({name}_bucket{{{selector}}}{window}))",
        f"sum by (pod, level) (increase({SERVED_LEVEL}{window}))",
        f"max by (pod, level) ({LEVEL_COST})",
        f"max by (pod) ({ONLINE_STORE_LOST})",
    )
    out: dict[str, PodMetrics | None] = dict.fromkeys(pods)
    try:
        async with aiohttp.ClientSession() as session:
            histogram, served, costs, lost = await asyncio.gather(
                *(_query(session, base_url, q, timeout) for q in queries)
            )
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError):
        return out
    for series in histogram:
        pod = series["metric"].get("pod")
        if pod in out:
            metrics = out[pod] or PodMetrics({})
            metrics.buckets[float(series["metric"]["le"])] = float(series["value"][1])
            out[pod] = metrics
    for rows, attribute in ((served, "served"), (costs, "costs")):
        for series in rows:
            pod, level = series["metric"].get("pod"), series["metric"].get("level")
            if out.get(pod) is not None and level:
                getattr(out[pod], attribute)[level] = float(series["value"][1])
    for series in lost:
        pod = series["metric"].get("pod")
        if out.get(pod) is not None:
            out[pod].online_store_lost = float(series["value"][1]) > 0
    return out
