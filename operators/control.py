"""One control period for one LatencyAutoscaler: observe → decide (``policy.py``) → act → report.

``control_step`` is what the kopf timer calls; it takes the cluster as an argument (``cluster.py`` in
production, the same class pointed at an in-process API stand-in in tests) and the memory of the previous
period (last cumulative histogram per pod, stabilisation window, ejections), and returns the new memory,
the ``status`` to write and the Events to post.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone

from operators import scrape
from operators.cluster import KubernetesCluster
from operators.policy import (
    EjectionPolicy,
    ScalingPolicy,
    Stabilizer,
    counter_delta,
    desired_with_ladder,
    full_quality_demand,
    limit_step,
    merge,
    online_store_condition,
    outliers,
    quantile,
    read_ladder,
    window_delta,
)

log = logging.getLogger(__name__)


@dataclass
class Memory:
    """What one LatencyAutoscaler remembers between periods (kopf ``memo``; lost on restart, which only
    costs one period without a window: the policy then holds)."""

    last_scrape: dict[str, dict[float, float]] = field(default_factory=dict)
    last_served: dict[str, dict[str, float]] = field(
        default_factory=dict
    )  # cumulative users per level per pod
    stabilizer: Stabilizer = field(default_factory=Stabilizer)
    ejected: dict[str, float] = field(default_factory=dict)
    strikes: dict[str, int] = field(
        default_factory=dict
    )  # ejections per pod (repeat offenders cool off longer)
    last_run: float = -math.inf
    last_scale_time: str | None = None


@dataclass
class StepResult:
    status: dict
    events: list[tuple[str, str, str]]  # (type, reason, message)


def policies(spec: dict) -> tuple[ScalingPolicy, EjectionPolicy]:
    behavior, metrics, ej = spec.get("behavior", {}), spec.get("metrics", {}), spec.get("outlierEjection", {})
    scaling = ScalingPolicy(
        target_p99_ms=float(spec["p99TargetMs"]),
        min_replicas=int(spec.get("minReplicas", 1)),
        max_replicas=int(spec.get("maxReplicas", 10)),
        tolerance=float(behavior.get("tolerance", 0.1)),
        headroom=float(behavior.get("headroom", ScalingPolicy.headroom)),
        max_step_up=int(behavior.get("scaleUp", {}).get("maxStep", 4)),
        max_step_up_percent=float(behavior.get("scaleUp", {}).get("maxStepPercent", 100)),
        max_step_down=int(behavior.get("scaleDown", {}).get("maxStep", 1)),
        scale_up_stabilization_s=float(behavior.get("scaleUp", {}).get("stabilizationWindowSeconds", 0)),
        scale_down_stabilization_s=float(
            behavior.get("scaleDown", {}).get("stabilizationWindowSeconds", 300)
        ),
        min_requests=int(metrics.get("minRequests", 20)),
        max_degraded_share=float(spec.get("ladder", {}).get("maxDegradedShare", 0.05)),
    )
    ejection = EjectionPolicy(
        enabled=bool(ej.get("enabled", True)),
        ratio=float(ej.get("ratio", 2.0)),
        readmit_ratio=float(ej.get("readmitRatio", 1.3)),
        cooloff_s=float(ej.get("cooloffSeconds", 30)),
        min_in_rotation=float(ej.get("minShareInRotation", 0.5)),
        min_requests=int(ej.get("minRequests", 10)),
    )
    return scaling, ejection


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


async def control_step(cluster: KubernetesCluster, body: dict, memory: Memory, now: float) -> StepResult:
    spec, meta = body["spec"], body["metadata"]
    namespace = meta["namespace"]
    target = spec["targetRef"]
    metrics = spec.get("metrics", {})
    scaling, ejection = policies(spec)
    condition_type = spec.get("outlierEjection", {}).get("conditionType", "autoscaling.recsys.io/latency-ok")
    events: list[tuple[str, str, str]] = []

    current, selector = await cluster.get_replicas(namespace, target["kind"], target["name"])
    pods = [p for p in await cluster.list_pods(namespace, selector) if p.ready_containers and p.ip]

    # --- observe: per-pod windows -------------------------------------------------------------------
    labels = metrics.get("labels", {"stage": "total"})
    name = metrics.get("histogram", "recsys_stage_seconds")
    timeout = float(metrics.get("scrapeTimeoutSeconds", 2))
    served: dict[str, dict[str, float]] = {}  # users per ladder level in the window, per pod
    if metrics.get("source", "pods") == "prometheus":
        scraped = await scrape.prometheus_window(
            metrics["prometheusUrl"],
            name,
            labels,
            [p.name for p in pods],
            float(metrics.get("windowSeconds", 60)),
            timeout,
        )
        windows = {pod: (m.buckets or None) if m else None for pod, m in scraped.items()}
        served = {pod: m.served for pod, m in scraped.items() if m}
    else:
        port, path = int(metrics.get("port", 8080)), metrics.get("path", "/metrics")
        scraped = await scrape.scrape_pods(
            {p.name: f"http://{p.ip}:{port}{path}" for p in pods}, name, labels, timeout
        )
        windows = {}
        for pod, m in scraped.items():
            windows[pod] = window_delta(m.buckets, memory.last_scrape.get(pod)) if m else None
            if m:
                memory.last_scrape[pod] = m.buckets
                if m.served:
                    served[pod] = counter_delta(m.served, memory.last_served.get(pod))
                    memory.last_served[pod] = m.served
        memory.last_scrape = {p: b for p, b in memory.last_scrape.items() if p in scraped}
        memory.last_served = {p: b for p, b in memory.last_served.items() if p in scraped}
    costs = {pod: m.costs for pod, m in scraped.items() if m and m.costs}

    pod_p99 = {
        p: (quantile(w, 0.99) * 1000 if w and quantile(w, 0.99) is not None else None)
        for p, w in windows.items()
    }
    pod_requests = {p: (w or {}).get(math.inf, 0.0) for p, w in windows.items()}

    # --- decide: outliers first, then size from the pods in rotation --------------------------------
    before = dict(memory.ejected)
    # a pod whose ladder holds its p99 by serving cheaper levels hides its slowness there: it is judged on
    # its p99 at full quality, estimated as p99 × its full-quality demand (1 for a pod at full quality)
    judged = {
        p: v * full_quality_demand([(served[p], costs[p])])
        if v is not None and p in served and p in costs
        else v
        for p, v in pod_p99.items()
    }
    memory.ejected = outliers(
        judged,
        pod_requests,
        memory.ejected,
        now,
        ejection,
        memory.strikes,
        peer_ceiling_ms=scaling.target_p99_ms,
    )
    in_rotation = [p for p in windows if p not in memory.ejected]
    pooled = merge([w for p, w in windows.items() if p in in_rotation and w])
    requests = pooled.get(math.inf, 0.0)
    observed = quantile(pooled, 0.99) if pooled else None
    observed_ms = observed * 1000 if observed is not None else None
    # the quality ladder, pooled over the pods in rotation: users served below the best level, and the work
    # serving them all at it would take (each pod's level costs weigh its own users)
    ladder = read_ladder([(served.get(pod, {}), costs[pod]) for pod in in_rotation if pod in costs])
    share, demand, best = ladder.share, ladder.demand, ladder.best
    wanted = desired_with_ladder(current, observed_ms, requests, share, demand, scaling)
    stabilised = memory.stabilizer.recommend(now, current, wanted, scaling)
    new_size = limit_step(current, stabilised, scaling)
    # one line per decision with everything it was made from, so any scale or ejection can be replayed
    log.info(
        "decision %s/%s: p99 %s ms over %d requests (target %g ms) from %d of %d pods; replicas %d, "
        "wanted %d, stabilised %d, new %d; degraded share %s, full-quality demand %.2f; ejected %s; "
        "per-pod p99 %s",
        namespace,
        meta["name"],
        f"{observed_ms:.1f}" if observed_ms is not None else "none",
        int(requests),
        scaling.target_p99_ms,
        len(in_rotation),
        len(pods),
        current,
        wanted,
        stabilised,
        new_size,
        f"{share:.3f}" if share is not None else "none",
        demand,
        sorted(memory.ejected),
        {p: round(v, 1) if v is not None else None for p, v in sorted(pod_p99.items())},
    )

    # --- act ----------------------------------------------------------------------------------------
    for pod in pods:
        out = pod.name in memory.ejected
        status_now = pod.conditions.get(condition_type)
        if out and status_now != "False":
            await cluster.set_pod_condition(
                namespace,
                pod.name,
                condition_type,
                False,
                "SlowerThanPeers",
                f"p99 {pod_p99.get(pod.name) or 0:.1f} ms, much slower than its peers",
            )
            events.append(
                (
                    "Warning",
                    "Ejected",
                    f"pod {pod.name} out of rotation: p99 {pod_p99.get(pod.name) or 0:.1f} ms",
                )
            )
        elif not out and status_now != "True":
            await cluster.set_pod_condition(
                namespace, pod.name, condition_type, True, "LatencyOk", "in rotation"
            )
            if pod.name in before:
                events.append(("Normal", "Readmitted", f"pod {pod.name} back in rotation"))
    if new_size != current:
        await cluster.set_replicas(namespace, target["kind"], target["name"], new_size)
        memory.last_scale_time = _iso(now)
        p99_text = f"{observed_ms:.1f} ms" if observed_ms is not None else "no data"
        degraded_text = f", {share:.0%} of users degraded" if share else ""
        events.append(
            (
                "Normal",
                "Scaled",
                (
                    f"{target['kind']} {target['name']}: {current} → {new_size} replicas "
                    f"(p99 {p99_text}, target {scaling.target_p99_ms:g} ms{degraded_text})"
                ),
            )
        )
    memory.last_run = now

    conditions = [
        {
            "type": "MetricsAvailable",
            "status": "True" if observed_ms is not None else "False",
            "reason": "Scraped" if observed_ms is not None else "NoData",
            "message": f"{len(pods)} ready pods, {int(requests)} requests in the window",
        },
        {
            "type": "OnTarget",
            "status": (
                "Unknown"
                if observed_ms is None
                else "True"
                if observed_ms <= scaling.target_p99_ms
                else "False"
            ),
            "reason": "Observed",
            "message": f"p99 {observed_ms:.1f} ms" if observed_ms is not None else "no data",
        },
        {
            "type": "FullQuality",
            "status": (
                "Unknown" if share is None else "True" if share <= scaling.max_degraded_share else "False"
            ),
            "reason": "Ladder" if share is not None else "NoLadderData",
            "message": (
                f"{share:.1%} of users served below {best} (at most {scaling.max_degraded_share:.0%})"
                if share is not None
                else "no quality-ladder series in the window"
            ),
        },
        online_store_condition({pod: m.online_store_lost if m else None for pod, m in scraped.items()}),
    ]
    for c in conditions:
        c["lastTransitionTime"] = _iso(now)
    status = {
        "observedGeneration": meta.get("generation"),
        "observedP99Ms": round(observed_ms, 3) if observed_ms is not None else None,
        "windowRequests": requests,
        "currentReplicas": current,
        "desiredReplicas": new_size,
        "lastScaleTime": memory.last_scale_time,
        "degradedShare": round(share, 4) if share is not None else None,
        "servedLevels": ladder.served,
        "fullQualityDemand": round(demand, 3),
        "ejectedCount": len(memory.ejected),
        "ejectedPods": [{"name": p, "since": _iso(t)} for p, t in sorted(memory.ejected.items())],
        "pods": [
            {
                "name": p,
                "p99Ms": round(v, 3) if v is not None else None,
                "requests": pod_requests[p],
                "inRotation": p not in memory.ejected,
            }
            for p, v in sorted(pod_p99.items())
        ],
        "recommendations": memory.stabilizer.to_list(),
        "conditions": conditions,
    }
    return StepResult(status, events)
