"""kopf handlers: thin. A timer per LatencyAutoscaler runs ``control.control_step`` once per its control
period; everything it decides comes from ``policy.py``.

Run with ``recsys operator run`` (``operators/run.py``: peering, liveness endpoint, namespaces).
"""

from __future__ import annotations

import logging
import time

import kopf

from operators.cluster import KubernetesCluster
from operators.control import Memory, control_step

GROUP, VERSION, PLURAL = "autoscaling.recsys.io", "v1alpha1", "latencyautoscalers"
TICK_SECONDS = 5.0  # the timer's own period; each resource acts every spec.controlPeriodSeconds


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_) -> None:
    settings.posting.level = logging.WARNING  # our own Events say what happened; kopf posts only problems
    settings.persistence.finalizer = "autoscaling.recsys.io/finalizer"
    from kubernetes import config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    memo.cluster = KubernetesCluster()


@kopf.timer(GROUP, VERSION, PLURAL, interval=TICK_SECONDS, idle=None)
async def reconcile(body, spec, memo: kopf.Memo, patch, logger, **_) -> None:
    state: Memory = memo.setdefault("state", Memory())
    now = time.time()
    if now - state.last_run < float(spec.get("controlPeriodSeconds", 15)) - 0.5:
        return
    result = await control_step(memo.cluster, dict(body), state, now)
    patch.status.update(result.status)
    for kind, reason, message in result.events:
        await memo.cluster.event(dict(body), kind, reason, message)
        logger.info("%s: %s", reason, message)
