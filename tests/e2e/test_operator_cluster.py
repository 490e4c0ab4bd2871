"""The operator's control step against a real cluster: the one ``KUBECONFIG`` points to (kind included).

What it does, in a throw-away namespace:
1. applies ``charts/recsys/crds/latencyautoscaler.yaml``;
2. deploys three pods that serve a Prometheus ``recsys_stage_seconds`` histogram (python:3.11-slim running a
   few lines of stdlib HTTP; latency per pod set by an env var: one pod is 5× slower), each with the
   ``autoscaling.recsys.io/latency-ok`` readiness gate;
3. runs ``control_step`` periods with the real ``KubernetesCluster`` and checks that the slow pod's gate goes
   False (it leaves the Service endpoints), the others' True, and that the pool, on target without the slow
   pod, is not scaled up because of it.

The test runner must reach pod IPs (true for kind on Linux and for a runner inside the cluster):
``KUBECONFIG=~/.kube/config pytest -m e2e tests/e2e``. Without ``KUBECONFIG`` the test is skipped, saying why.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.e2e

if not os.environ.get("KUBECONFIG"):
    pytest.skip("no cluster: set KUBECONFIG to run the operator end-to-end tests", allow_module_level=True)

from kubernetes import client, config

from operators.cluster import KubernetesCluster
from operators.control import Memory, control_step

ROOT = Path(__file__).resolve().parents[2]
GATE = "autoscaling.recsys.io/latency-ok"
SERVER = """
import http.server, os, random
ms = float(os.environ["LATENCY_MS"]); counts = {}
bounds = [0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0, float("inf")]
total = [0]
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        for _ in range(200):
            v = random.expovariate(1000 / ms)
            for b in bounds:
                if v <= b: counts[b] = counts.get(b, 0) + 1
            total[0] += 1
        lines = ["# TYPE recsys_stage_seconds histogram"]
        for b in bounds:
            le = "+Inf" if b == float("inf") else repr(b)
            lines.append(f'recsys_stage_seconds_bucket{{stage="total",le="{le}"}} {counts.get(b, 0)}')
        lines.append(f'recsys_stage_seconds_count{{stage="total"}} {total[0]}')
        body = ("\\n".join(lines) + "\\n").encode()
        self.send_response(200); self.send_header("Content-Type", "text/plain"); self.end_headers()
        self.wfile.write(body)
http.server.HTTPServer(("", 8080), H).serve_forever()
"""


def deployment(name: str, latency_ms: float, replicas: int) -> dict:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name, "pool": "e2e"}},
                "spec": {
                    "readinessGates": [{"conditionType": GATE}],
                    "containers": [
                        {
                            "name": "fake",
                            "image": "python:3.11-slim",
                            "command": ["python", "-c", SERVER],
                            "env": [{"name": "LATENCY_MS", "value": str(latency_ms)}],
                            "ports": [{"containerPort": 8080}],
                        }
                    ],
                },
            },
        },
    }


@pytest.fixture(scope="module")
def namespace():
    config.load_kube_config()
    api = client.ApiClient()
    crd = yaml.safe_load((ROOT / "charts" / "recsys" / "crds" / "latencyautoscaler.yaml").read_text())
    try:
        client.ApiextensionsV1Api(api).create_custom_resource_definition(crd)
    except client.ApiException as exc:
        if exc.status != 409:  # 409: already installed
            raise
    name = f"recsys-e2e-{uuid.uuid4().hex[:6]}"
    client.CoreV1Api(api).create_namespace({"metadata": {"name": name}})
    yield name
    client.CoreV1Api(api).delete_namespace(name)


def wait_running(core, namespace, selector, count, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        pods = core.list_namespaced_pod(namespace, label_selector=selector).items
        running = [
            p
            for p in pods
            if p.status.phase == "Running"
            and p.status.pod_ip
            and all(s.ready for s in (p.status.container_statuses or []))
        ]
        if len(running) >= count:
            return running
        time.sleep(2)
    raise TimeoutError(f"{count} pods for {selector} not running after {timeout} s")


def test_slow_pod_ejected_and_pool_scaled(namespace):
    apps, core = client.AppsV1Api(), client.CoreV1Api()
    apps.create_namespaced_deployment(
        namespace, deployment("fast", 5, 2)
    )  # p99 ≈ 23 ms, under the 50 ms target
    apps.create_namespaced_deployment(namespace, deployment("slow", 60, 1))  # p99 ≈ 280 ms: 12× its peers
    wait_running(core, namespace, "pool=e2e", 3)
    # one LatencyAutoscaler over the "fast" Deployment's scale, but judging the whole pool by label
    body = yaml.safe_load(f"""
    apiVersion: autoscaling.recsys.io/v1alpha1
    kind: LatencyAutoscaler
    metadata: {{name: e2e, namespace: {namespace}, uid: e2e}}
    spec:
      targetRef: {{kind: Deployment, name: fast}}
      p99TargetMs: 50
      minReplicas: 2
      maxReplicas: 6
      metrics: {{port: 8080, minRequests: 10}}
      outlierEjection: {{minRequests: 10}}
    """)
    cluster = KubernetesCluster()
    original = cluster.get_replicas

    async def whole_pool(ns, kind, name):  # the "slow" pods belong to the pool under test too
        replicas, _ = await original(ns, kind, name)
        return replicas, "pool=e2e"

    cluster.get_replicas = whole_pool
    memory = Memory()
    for period in range(3):
        result = asyncio.run(control_step(cluster, body, memory, now=time.time()))
        time.sleep(2)
    pods = core.list_namespaced_pod(namespace, label_selector="pool=e2e").items
    gates = {
        p.metadata.labels["app"]: {c.type: c.status for c in p.status.conditions}.get(GATE) for p in pods
    }
    assert gates["slow"] == "False", result.status
    assert gates["fast"] == "True"
    # with the slow pod out of rotation the pool is on target: no scale-up because of one bad pod
    assert apps.read_namespaced_deployment_scale("fast", namespace).spec.replicas == 2
