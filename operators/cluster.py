"""The few Kubernetes calls the operator makes, through the official ``kubernetes`` client (each call in a
worker thread: the client is blocking and kopf's handlers are async).

* replicas: the ``scale`` subresource of a Deployment; for a KServe InferenceService,
  ``spec.predictor.minReplicas`` (and ``maxReplicas`` when it must grow) — see ``docs/operator.md`` for why
  that field and not the Deployment KServe generates;
* pods: list by the target's selector; readiness-gate condition patched through ``pods/status``;
* events: ``core/v1`` Events on the LatencyAutoscaler.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime, timezone

from kubernetes import client

KSERVE_GROUP, KSERVE_VERSION, KSERVE_PLURAL = "serving.kserve.io", "v1beta1", "inferenceservices"
ISVC_POD_LABEL = "serving.kserve.io/inferenceservice"


@dataclass
class Pod:
    name: str
    ip: str | None
    ready_containers: bool  # every container ready (the readiness gate aside)
    conditions: dict[str, str]  # condition type → status


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class KubernetesCluster:
    def __init__(self, api: client.ApiClient | None = None):
        self.api = api or client.ApiClient()
        self.core = client.CoreV1Api(self.api)
        self.apps = client.AppsV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)

    # --- replicas ---------------------------------------------------------------------------------
    async def get_replicas(self, namespace: str, kind: str, name: str) -> tuple[int, str]:
        """(current replicas, pod label selector) of the target."""
        if kind == "Deployment":
            scale = await asyncio.to_thread(self.apps.read_namespaced_deployment_scale, name, namespace)
            return int(scale.spec.replicas or 0), scale.status.selector or ""
        isvc = await asyncio.to_thread(
            self.custom.get_namespaced_custom_object,
            KSERVE_GROUP,
            KSERVE_VERSION,
            namespace,
            KSERVE_PLURAL,
            name,
        )
        predictor = isvc.get("spec", {}).get("predictor", {})
        return int(predictor.get("minReplicas") or 1), f"{ISVC_POD_LABEL}={name}"

    async def set_replicas(self, namespace: str, kind: str, name: str, replicas: int) -> None:
        if kind == "Deployment":
            await asyncio.to_thread(
                self.apps.patch_namespaced_deployment_scale, name, namespace, {"spec": {"replicas": replicas}}
            )
            return
        isvc = await asyncio.to_thread(
            self.custom.get_namespaced_custom_object,
            KSERVE_GROUP,
            KSERVE_VERSION,
            namespace,
            KSERVE_PLURAL,
            name,
        )
        predictor = {"minReplicas": replicas}
        if int(isvc.get("spec", {}).get("predictor", {}).get("maxReplicas") or 0) < replicas:
            predictor["maxReplicas"] = replicas
        await asyncio.to_thread(
            self.custom.patch_namespaced_custom_object,
            KSERVE_GROUP,
            KSERVE_VERSION,
            namespace,
            KSERVE_PLURAL,
            name,
            {"spec": {"predictor": predictor}},
        )

    # --- pods -------------------------------------------------------------------------------------
    async def list_pods(self, namespace: str, selector: str) -> list[Pod]:
        pods = await asyncio.to_thread(self.core.list_namespaced_pod, namespace, label_selector=selector)
        out = []
        for p in pods.items:
            if p.metadata.deletion_timestamp is not None or (p.status.phase or "") != "Running":
                continue
            statuses = p.status.container_statuses or []
            conditions = {c.type: c.status for c in (p.status.conditions or [])}
            out.append(
                Pod(
                    p.metadata.name,
                    p.status.pod_ip,
                    bool(statuses) and all(s.ready for s in statuses),
                    conditions,
                )
            )
        return out

    async def set_pod_condition(
        self, namespace: str, pod: str, condition: str, ok: bool, reason: str, message: str
    ) -> None:
        body = {
            "status": {
                "conditions": [
                    {
                        "type": condition,
                        "status": "True" if ok else "False",
                        "reason": reason,
                        "message": message,
                        "lastTransitionTime": _now(),
                    }
                ]
            }
        }
        await asyncio.to_thread(self.core.patch_namespaced_pod_status, pod, namespace, body)

    # --- events -----------------------------------------------------------------------------------
    async def event(self, owner: dict, kind: str, reason: str, message: str) -> None:
        meta = owner["metadata"]
        body = client.CoreV1Event(
            metadata=client.V1ObjectMeta(generate_name=f"{meta['name']}.", namespace=meta["namespace"]),
            involved_object=client.V1ObjectReference(
                api_version=owner["apiVersion"],
                kind=owner["kind"],
                name=meta["name"],
                namespace=meta["namespace"],
                uid=meta.get("uid"),
            ),
            reason=reason,
            message=message,
            type=kind,
            first_timestamp=_now(),
            last_timestamp=_now(),
            count=1,
            source=client.V1EventSource(component="recsys-operator"),
        )
        await asyncio.to_thread(self.core.create_namespaced_event, meta["namespace"], body)
