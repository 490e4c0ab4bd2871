"""The operator's control step and kopf timer against an in-process stand-in for the Kubernetes endpoints it
uses (deployment scale, pods list, pods/status, events, InferenceService), through the real ``kubernetes``
client; the "pods" serve real Prometheus histograms on their own loopback addresses."""

from __future__ import annotations

import asyncio
import copy
import math
import socket

import pytest
from aiohttp import web
from kubernetes import client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from operators.cluster import KubernetesCluster
from operators.control import Memory, control_step
from operators.policy import ScalingPolicy
from predictor.serving.metrics import LATENCY_BUCKETS

NS = "recsys"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakePod:
    def __init__(self, name: str, ip: str):
        self.name, self.ip = name, ip
        self.registry = CollectorRegistry()
        self.hist = Histogram(
            "recsys_stage_seconds",
            "stage latency",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.hist.labels(stage="total")  # as the predictor does: the series exists, at zero, from the start
        # the predictor's quality-ladder series, with the same names, labels and kinds
        self.levels = Counter(
            "recsys_served_level_total", "users per level", ["level"], registry=self.registry
        )
        self.costs = Gauge("recsys_level_cost_seconds", "cost per level", ["level"], registry=self.registry)
        for level, cost in (
            ("full", 0.004),
            ("reduced", 0.002),
            ("retrieval", 0.001),
            ("popularity", 0.0005),
        ):
            self.levels.labels(level=level)
            self.costs.labels(level=level).set(cost)
        self.lost = Gauge("recsys_online_store_lost", "online store wiped", registry=self.registry)
        self.conditions: dict[str, dict] = {}
        self.healthy_metrics = True

    def serve(self, n: int, ms: float, level: str = "full") -> None:
        for _ in range(n):
            self.hist.labels(stage="total").observe(ms / 1000)
        self.levels.labels(level=level).inc(n)

    def manifest(self) -> dict:
        return {
            "metadata": {"name": self.name, "namespace": NS, "labels": {"app": "predictor"}},
            "status": {
                "phase": "Running",
                "podIP": self.ip,
                "containerStatuses": [
                    {"name": "predictor", "ready": True, "restartCount": 0, "image": "x", "imageID": "x"}
                ],
                "conditions": [{"type": "Ready", "status": "True"}, *self.conditions.values()],
            },
        }


class FakeKubernetes:
    """The handful of API endpoints the operator calls, with state the test inspects."""

    def __init__(self, pods: list[FakePod], replicas: int):
        self.pods = {p.name: p for p in pods}
        self.replicas = replicas
        self.isvc = {
            "apiVersion": "serving.kserve.io/v1beta1",
            "kind": "InferenceService",
            "metadata": {"name": "recsys", "namespace": NS},
            "spec": {"predictor": {"minReplicas": 2, "maxReplicas": 4}},
        }
        self.events: list[dict] = []
        self.scale_patches: list[int] = []
        app = web.Application()
        app.router.add_get(f"/apis/apps/v1/namespaces/{NS}/deployments/{{name}}/scale", self.get_scale)
        app.router.add_patch(f"/apis/apps/v1/namespaces/{NS}/deployments/{{name}}/scale", self.patch_scale)
        app.router.add_get(f"/api/v1/namespaces/{NS}/pods", self.list_pods)
        app.router.add_patch(f"/api/v1/namespaces/{NS}/pods/{{name}}/status", self.patch_pod_status)
        app.router.add_post(f"/api/v1/namespaces/{NS}/events", self.create_event)
        app.router.add_get(
            f"/apis/serving.kserve.io/v1beta1/namespaces/{NS}/inferenceservices/recsys", self.get_isvc
        )
        app.router.add_patch(
            f"/apis/serving.kserve.io/v1beta1/namespaces/{NS}/inferenceservices/recsys", self.patch_isvc
        )
        self.app = app

    def scale(self, name: str) -> dict:
        return {
            "apiVersion": "autoscaling/v1",
            "kind": "Scale",
            "metadata": {"name": name, "namespace": NS},
            "spec": {"replicas": self.replicas},
            "status": {"replicas": self.replicas, "selector": "app=predictor"},
        }

    async def get_scale(self, request):
        return web.json_response(self.scale(request.match_info["name"]))

    async def patch_scale(self, request):
        body = await request.json()
        self.replicas = int(body["spec"]["replicas"])
        self.scale_patches.append(self.replicas)
        return web.json_response(self.scale(request.match_info["name"]))

    async def list_pods(self, request):
        assert request.query.get("labelSelector") in (
            "app=predictor",
            "serving.kserve.io/inferenceservice=recsys",
        )
        return web.json_response(
            {
                "apiVersion": "v1",
                "kind": "PodList",
                "metadata": {},
                "items": [p.manifest() for p in self.pods.values()],
            }
        )

    async def patch_pod_status(self, request):
        pod = self.pods[request.match_info["name"]]
        for condition in (await request.json())["status"]["conditions"]:
            pod.conditions[condition["type"]] = condition  # strategic merge on "type"
        return web.json_response(pod.manifest())

    async def create_event(self, request):
        event = await request.json()
        self.events.append(event)
        return web.json_response(event, status=201)

    async def get_isvc(self, request):
        return web.json_response(self.isvc)

    async def patch_isvc(self, request):
        patch = await request.json()
        self.isvc["spec"]["predictor"].update(patch["spec"]["predictor"])
        return web.json_response(self.isvc)


async def metrics_site(pod: FakePod, port: int) -> web.AppRunner:
    async def metrics(_):
        if not pod.healthy_metrics:
            return web.Response(status=500)
        return web.Response(body=generate_latest(pod.registry), content_type="text/plain")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, pod.ip, port).start()
    return runner


def autoscaler(kind: str = "Deployment", **spec) -> dict:
    return {
        "apiVersion": "autoscaling.recsys.io/v1alpha1",
        "kind": "LatencyAutoscaler",
        "metadata": {"name": "predictor", "namespace": NS, "uid": "u-1", "generation": 1},
        "spec": {
            "targetRef": {"kind": kind, "name": "recsys"},
            "p99TargetMs": 10,
            "minReplicas": 2,
            "maxReplicas": 12,
            **spec,
        },
    }


@pytest.fixture
def stack():
    """(fake API, pods, cluster client, metrics port, loop) with everything running on one event loop."""
    loop = asyncio.new_event_loop()
    pods = [FakePod(f"predictor-{i}", f"127.0.0.{i + 2}") for i in range(4)]
    api = FakeKubernetes(pods, replicas=4)
    port = free_port()
    runners = []

    async def start():
        runner = web.AppRunner(api.app)
        await runner.setup()
        api_port = free_port()
        await web.TCPSite(runner, "127.0.0.1", api_port).start()
        runners.append(runner)
        for pod in pods:
            runners.append(await metrics_site(pod, port))
        return api_port

    api_port = loop.run_until_complete(start())
    configuration = client.Configuration(host=f"http://127.0.0.1:{api_port}")
    cluster = KubernetesCluster(client.ApiClient(configuration))
    yield api, pods, cluster, port, loop
    for runner in runners:
        loop.run_until_complete(runner.cleanup())
    loop.close()


def run_step(loop, cluster, body, memory, now):
    return loop.run_until_complete(control_step(cluster, copy.deepcopy(body), memory, now))


def test_scale_up_on_p99_above_target_and_hold_without_data(stack):
    api, pods, cluster, port, loop = stack
    body = autoscaler(metrics={"port": port, "minRequests": 20}, outlierEjection={"enabled": False})
    memory = Memory()
    first = run_step(loop, cluster, body, memory, now=0)  # no window yet: hold
    assert first.status["desiredReplicas"] == 4 and api.scale_patches == []
    assert first.status["observedP99Ms"] is None
    for pod in pods:
        pod.serve(100, 18.0)  # p99 ~18 ms against a 10 ms target
    second = run_step(loop, cluster, body, memory, now=15)
    assert api.scale_patches == [8], second.status  # ceil(4 × 18 / 6.5) = 12, at most +4 → 8
    assert 15 <= second.status["observedP99Ms"] <= 20
    assert any(e["reason"] == "Scaled" and "4 → 8" in e["message"] for e in api.events) or any(
        r == "Scaled" for _, r, _ in second.events
    )
    # metrics disappear: hold at the current size, never scale down
    for pod in pods:
        pod.healthy_metrics = False
    third = run_step(loop, cluster, body, memory, now=30)
    assert third.status["desiredReplicas"] == 8 and api.scale_patches == [8]
    assert {c["type"]: c["status"] for c in third.status["conditions"]}["MetricsAvailable"] == "False"


def test_slow_pod_leaves_rotation_then_returns(stack):
    api, pods, cluster, port, loop = stack
    body = autoscaler(metrics={"port": port}, outlierEjection={"cooloffSeconds": 30, "minRequests": 10})
    memory = Memory()
    run_step(loop, cluster, body, memory, now=0)
    assert all(p.conditions["autoscaling.recsys.io/latency-ok"]["status"] == "True" for p in pods)
    for pod in pods[:3]:
        pod.serve(200, 4.0)
    pods[3].serve(200, 30.0)  # 7× slower than its peers
    step = run_step(loop, cluster, body, memory, now=15)
    assert pods[3].conditions["autoscaling.recsys.io/latency-ok"]["status"] == "False"
    assert step.status["ejectedPods"][0]["name"] == "predictor-3"
    assert ("Warning", "Ejected") == step.events[0][:2]
    # the pool's p99 is judged on the pods in rotation: on target, so no scale-up because of one bad pod
    assert step.status["observedP99Ms"] <= 10 and api.scale_patches == []
    # recovered and past the cool-off: back in rotation
    for pod in pods:
        pod.serve(200, 4.0)
    step = run_step(loop, cluster, body, memory, now=50)
    assert pods[3].conditions["autoscaling.recsys.io/latency-ok"]["status"] == "True"
    assert step.status["ejectedPods"] == [] and any(r == "Readmitted" for _, r, _ in step.events)


def test_inference_service_target_scales_through_min_replicas(stack):
    api, pods, cluster, port, loop = stack
    body = autoscaler("InferenceService", metrics={"port": port}, outlierEjection={"enabled": False})
    memory = Memory()
    run_step(loop, cluster, body, memory, now=0)
    for pod in pods:
        pod.serve(100, 25.0)
    run_step(loop, cluster, body, memory, now=15)
    predictor = api.isvc["spec"]["predictor"]
    # p99 ≈ 25 ms against a setpoint of 6.5 (10 ms less the default 35 % headroom): ceil(2 × 3.8) = 8, at
    # most +4 → 6;
    # maxReplicas (4) grows with it so that KServe accepts the spec
    assert predictor["minReplicas"] == 6 and predictor["maxReplicas"] == 6


def test_kopf_timer_handler_writes_status_and_posts_events(stack):
    import kopf

    from operators import handlers

    api, pods, cluster, port, loop = stack
    body = autoscaler(metrics={"port": port}, controlPeriodSeconds=1)
    memo = kopf.Memo()
    memo.cluster = cluster
    patch = kopf.Patch()

    class Log:
        def info(self, *a):
            pass

    async def tick():
        await handlers.reconcile(body=body, spec=body["spec"], memo=memo, patch=patch, logger=Log())

    loop.run_until_complete(tick())
    for pod in pods:
        pod.serve(100, 30.0)
    memo.state.last_run -= 2  # one control period later
    loop.run_until_complete(tick())
    assert patch["status"]["desiredReplicas"] > 4
    assert any(e["reason"] == "Scaled" for e in api.events)
    assert api.events[0]["involvedObject"]["kind"] == "LatencyAutoscaler"


def test_degraded_share_scales_up_with_p99_on_target_and_shows_in_status(stack):
    api, pods, cluster, port, loop = stack
    body = autoscaler(
        metrics={"port": port}, outlierEjection={"enabled": False}, ladder={"maxDegradedShare": 0.1}
    )
    memory = Memory()
    run_step(loop, cluster, body, memory, now=0)
    for pod in pods:  # p99 4 ms, on target (10 ms) and under the setpoint; 30 % served at popularity
        pod.serve(70, 4.0)
        pod.serve(30, 4.0, level="popularity")
    step = run_step(loop, cluster, body, memory, now=15)
    assert step.status["degradedShare"] == pytest.approx(0.3)
    assert step.status["servedLevels"]["popularity"] == 120 and step.status["servedLevels"]["full"] == 280
    # full-quality work / work done = 100 × 4 / (70 × 4 + 30 × 0.5) per pod
    assert step.status["fullQualityDemand"] == pytest.approx(400 / 295, abs=1e-3)
    assert api.scale_patches == [6]  # ceil(4 × 1.356) = 6, although p99 alone would scale down
    assert {c["type"]: c["status"] for c in step.status["conditions"]}["FullQuality"] == "False"
    assert any("30% of users degraded" in message for _, _, message in step.events)
    # a window at full quality and low p99: the plain rule again (hold within the down stabilisation window)
    for pod in pods:
        pod.serve(100, 4.0)
    step = run_step(loop, cluster, body, memory, now=30)
    assert step.status["degradedShare"] == 0.0
    assert {c["type"]: c["status"] for c in step.status["conditions"]}["FullQuality"] == "True"


def test_a_pod_that_finds_its_online_store_wiped_shows_in_the_status_condition(stack):
    _, pods, cluster, port, loop = stack
    body = autoscaler(metrics={"port": port}, outlierEjection={"enabled": False})
    memory = Memory()

    def online_store(now: float) -> dict:
        for pod in pods:
            pod.serve(10, 4.0)
        step = run_step(loop, cluster, body, memory, now=now)
        return next(c for c in step.status["conditions"] if c["type"] == "OnlineStore")

    assert online_store(0)["status"] == "True"
    pods[1].lost.set(1)
    lost = online_store(15)
    assert lost["status"] == "False" and lost["reason"] == "Lost" and pods[1].name in lost["message"]
    pods[1].lost.set(0)
    assert online_store(30)["status"] == "True"


def test_a_pod_holding_its_p99_by_degrading_is_judged_at_full_quality(stack):
    """A slow pod whose ladder serves popularity shows a p99 like its peers'; its full-quality demand (8 ×
    the work here) gives it away, and it leaves rotation."""
    _, pods, cluster, port, loop = stack
    body = autoscaler(metrics={"port": port}, outlierEjection={"cooloffSeconds": 30, "minRequests": 10})
    memory = Memory()
    run_step(loop, cluster, body, memory, now=0)
    for pod in pods[:3]:
        pod.serve(200, 4.0)
    pods[3].serve(200, 5.0, level="popularity")  # 1.25 × its peers' p99: not an outlier on p99 alone
    step = run_step(loop, cluster, body, memory, now=15)
    assert [p["name"] for p in step.status["ejectedPods"]] == ["predictor-3"]
    assert {p["name"]: p["p99Ms"] for p in step.status["pods"]}[
        "predictor-3"
    ] <= 5.0  # status shows the real p99


def test_run_options_elect_a_leader_through_peering():
    import random

    from operators.run import run_options

    namespaced = run_options(["recsys"], "recsys-operator", rng=random.Random(1))
    assert namespaced["namespaces"] == ["recsys"] and not namespaced["clusterwide"]
    assert namespaced["standalone"] is False and namespaced["peering_name"] == "recsys-operator"
    assert namespaced["liveness_endpoint"] == "http://0.0.0.0:8080/healthz"
    # equal priorities make every kopf peer freeze: each replica draws its own unless one is given
    drawn = {run_options(["recsys"], "p", rng=random.Random(seed))["priority"] for seed in range(20)}
    assert len(drawn) == 20 and min(drawn) >= 1
    assert run_options(["recsys"], "p", priority=7)["priority"] == 7
    cluster_wide = run_options([], None)
    assert (
        cluster_wide["clusterwide"]
        and cluster_wide["standalone"] is True
        and "peering_name" not in cluster_wide
    )


def test_each_decision_is_logged_with_its_inputs(stack, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="operators.control")
    test_scale_up_on_p99_above_target_and_hold_without_data(stack)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("decision ")]
    assert lines, "no decision was logged"
    assert all("target" in line and "replicas" in line and "per-pod p99" in line for line in lines)
    # the scale-up: the HPA rule aims at 10 ms less the default headroom (within maxReplicas, 12), the step
    # limit (+4) makes it 8
    wanted = min(12, math.ceil(4 * 20.0 / (10 * (1 - ScalingPolicy.headroom))))
    assert any(
        "p99 20.0 ms over 400 requests" in line
        and f"replicas 4, wanted {wanted}, stabilised {wanted}, new 8" in line
        for line in lines
    ), lines


def test_operator_process_serves_its_liveness_endpoint(tmp_path):
    """The image's entry point (``python -m operators run``) starts kopf with the /healthz endpoint the chart
    probes, before any API server answers."""
    import subprocess
    import sys
    import time
    import urllib.request

    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\nclusters: [{name: c, cluster: {server: 'http://127.0.0.1:1'}}]\n"
        "users: [{name: u, user: {token: x}}]\ncontexts: [{name: c, context: {cluster: c, user: u}}]\n"
        "current-context: c\n"
    )
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "operators",
            "run",
            "--standalone",
            "--namespace",
            "x",
            "--liveness",
            f"http://127.0.0.1:{port}/healthz",
        ],
        env={**__import__("os").environ, "KUBECONFIG": str(kubeconfig)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline, status = time.monotonic() + 30, None
        while time.monotonic() < deadline and status is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
                    status = response.status
            except OSError:
                assert proc.poll() is None, proc.stdout.read().decode()
                time.sleep(0.3)
        assert status == 200
    finally:
        proc.terminate()
        proc.wait(timeout=10)
