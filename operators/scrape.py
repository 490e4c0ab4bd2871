"""Read latency histograms: each ready pod's Prometheus endpoint, or a Prometheus server.

Parsing uses prometheus_client's own text parser; only the bucket series of one histogram whose labels
match are kept, summed over any other labels (e.g. several model names on one pod).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from operators.policy import Buckets


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


async def scrape_pod(session: aiohttp.ClientSession, url: str, name: str, labels: Mapping[str, str],
                     timeout: float) -> Buckets | None:  # fmt: skip
    """One pod's histogram, or None if it did not answer in time or had no such series."""
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
    return buckets or None


async def scrape_pods(urls: Mapping[str, str], name: str, labels: Mapping[str, str],
                      timeout: float) -> dict[str, Buckets | None]:  # fmt: skip
    """Every pod concurrently: ``{pod: buckets or None}``."""
    async with aiohttp.ClientSession() as session:
        results = await asyncio.gather(
            *(scrape_pod(session, u, name, labels, timeout) for u in urls.values())
        )
    return dict(zip(urls, results))


async def prometheus_window(base_url: str, name: str, labels: Mapping[str, str], pods: list[str],
                            window_s: float, timeout: float) -> dict[str, Buckets | None]:  # fmt: skip
    """Per-pod bucket increases over the window from a Prometheus server (``increase()`` does the reset
    handling there); keyed by the ``pod`` label."""
    selector = ",".join([f'{k}="{v}"' for k, v in labels.items()])
    query = f"sum by (pod, le) (increase({name}_bucket{{{selector}}}[{int(window_s)}s]))"
    out: dict[str, Buckets | None] = dict.fromkeys(pods)
    try:
        async with aiohttp.ClientSession() as session, session.get(
            f"{base_url.rstrip('/')}/api/v1/query", params={"query": query},
            timeout=aiohttp.ClientTimeout(total=timeout),
        ) as response:  # fmt: skip
            body = await response.json()
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError):
        return out
    for series in body.get("data", {}).get("result", []):
        pod = series["metric"].get("pod")
        if pod in out:
            buckets = out[pod] or {}
            buckets[float(series["metric"]["le"])] = float(series["value"][1])
            out[pod] = buckets
    return out
