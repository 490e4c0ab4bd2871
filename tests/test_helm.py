"""The Helm chart, validated without a cluster: `helm lint`, `helm template` for every toggle combination,
every rendered object against the Kubernetes OpenAPI schemas of a pinned version (kubernetes-validate), the
LatencyAutoscaler against our CRD's schema, the InferenceService against the kserve SDK's model classes, and
the secure defaults."""

from __future__ import annotations

import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.k8s_tools import KUBERNETES_VERSION, ROOT, ensure_tools

CHART = ROOT / "charts" / "recsys"
CRD = CHART / "crds" / "latencyautoscaler.yaml"

# every on/off switch of values.yaml; turning one on (or off) may need companion values, given here
TOGGLES: dict[str, tuple[dict, dict]] = {  # path → (values when off, values when on)
    "predictor.gpu.enabled": ({}, {}),
    "operator.enabled": ({}, {}),
    "retrain.enabled": ({}, {}),
    "feast.applyHook": ({}, {}),
    "feast.materialize.enabled": ({}, {}),
    "feast.featureServer.enabled": ({}, {}),
    "events.enabled": ({}, {"events.nats.existingSecret": "nats-auth", "events.nats.caSecret": "nats-ca"}),
    "redis.tls.enabled": ({}, {"redis.tls.caSecret": "redis-ca", "redis.existingSecret": "redis-auth"}),
    "models.pvc.enabled": ({"models.artifacts": "s3://models/recsys"}, {}),
    "bundled.redis.enabled": ({}, {}),
    "bundled.postgres.enabled": ({}, {}),
    "bootstrap.enabled": ({}, {}),
    "monitoring.serviceMonitor.enabled": ({}, {}),
    "networkPolicy.enabled": ({}, {}),
    "predictor.podDisruptionBudget.enabled": ({}, {}),
}


def covering_rows(factors: int, strength: int) -> list[tuple[bool, ...]]:
    """A deterministic greedy covering array: boolean rows in which every combination of values of any
    ``strength`` factors appears at least once (all 2**13 toggle sets would be 8,192 renders; the 3-way
    array is a few dozen and still exercises every interaction of three switches)."""
    from itertools import combinations, product

    uncovered = {
        (cols, vals)
        for cols in combinations(range(factors), strength)
        for vals in product((False, True), repeat=strength)
    }
    rows: list[tuple[bool, ...]] = []

    def gain(row):
        return sum(
            (cols, tuple(row[c] for c in cols)) in uncovered
            for cols in combinations(range(factors), strength)
        )

    while uncovered:
        # seed the row with one uncovered interaction, then set each other factor greedily
        cols, vals = min(uncovered)
        row = [None] * factors
        for c, v in zip(cols, vals):
            row[c] = v
        for f in range(factors):
            if row[f] is None:
                row[f] = max(
                    (False, True),
                    key=lambda v: gain(
                        [v if i == f else (x if x is not None else False) for i, x in enumerate(row)]
                    ),
                )
        rows.append(tuple(row))
        uncovered -= {(c, tuple(row[i] for i in c)) for c in combinations(range(factors), strength)}
    return rows


def toggle_values(row: tuple[bool, ...]) -> dict:
    values: dict = {}
    for (path, (off, on)), enabled in zip(TOGGLES.items(), row):
        values[path] = "true" if enabled else "false"
        values.update(on if enabled else off)
    return values


COVERING = {f"3way-{i:02d}": toggle_values(row) for i, row in enumerate(covering_rows(len(TOGGLES), 3))}

COMBINATIONS = {
    "default": {},
    "gpu": {"predictor.gpu.enabled": "true"},
    "all-optional-on": {
        "bundled.redis.enabled": "true",
        "bundled.postgres.enabled": "true",
        "bootstrap.enabled": "true",
        "monitoring.serviceMonitor.enabled": "true",
        "networkPolicy.enabled": "true",
        "predictor.podDisruptionBudget.enabled": "true",
        "predictor.gpu.enabled": "true",
    },
    "minimal": {
        "operator.enabled": "false",
        "retrain.enabled": "false",
        "feast.applyHook": "false",
        "feast.materialize.enabled": "false",
        "feast.featureServer.enabled": "false",
        "events.enabled": "false",
        "models.pvc.enabled": "false",
        "models.artifacts": "s3://models/recsys",
    },
    **COVERING,
}


def test_toggle_combinations_cover_every_three_switches():
    rows = [tuple(values[p] == "true" for p in TOGGLES) for values in COVERING.values()]
    from itertools import combinations, product

    for cols in combinations(range(len(TOGGLES)), 3):
        assert {tuple(r[c] for c in cols) for r in rows} == set(product((False, True), repeat=3)), cols
    assert len(rows) < 40  # a covering array, not the 8,192 exhaustive sets


@pytest.fixture(scope="module")
def helm() -> Path:
    return ensure_tools()["helm"]


def run(cmd: list, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=120, check=False)
    if check:
        assert done.returncode == 0, done.stdout + done.stderr
    return done


def sets(values: dict) -> list[str]:
    return [a for k, v in values.items() for a in ("--set", f"{k}={v}")]


def render(helm: Path, values: dict, release: str = "demo") -> list[dict]:
    out = run([helm, "template", release, CHART, "--namespace", "recsys", *sets(values)]).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def containers(obj: dict) -> list[dict]:
    spec = obj.get("spec", {})
    if obj["kind"] == "InferenceService":
        return spec["predictor"]["containers"]
    if obj["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    template = spec.get("template", {}).get("spec")
    return template["containers"] if template else []


def pod_spec(obj: dict) -> dict | None:
    spec = obj.get("spec", {})
    if obj["kind"] == "InferenceService":
        return spec["predictor"]
    if obj["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    return spec.get("template", {}).get("spec")


@pytest.mark.parametrize("name", COMBINATIONS)
def test_lint(helm, name):
    run([helm, "lint", "--strict", CHART, *sets(COMBINATIONS[name])])


@pytest.mark.parametrize("name", COMBINATIONS)
def test_rendered_objects_validate_against_their_schemas(helm, name):
    objects = render(helm, COMBINATIONS[name])
    crd_schemas = {  # kind → the schema of our own CRDs (crds/): the LatencyAutoscaler and kopf's peering
        crd["spec"]["names"]["kind"]: crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        for path in sorted((CHART / "crds").glob("*.yaml"))
        for crd in yaml.safe_load_all(path.read_text())
        if crd
    }
    kinds = set()
    for obj in objects:
        kinds.add(obj["kind"])
        if obj["kind"] in crd_schemas:
            jsonschema.Draft4Validator(crd_schemas[obj["kind"]]).validate(obj)  # OpenAPI 3.0 follows draft 4
        elif obj["kind"] == "InferenceService":
            assert_kserve_model(obj)
        elif obj["kind"] == "ServiceMonitor":
            assert obj["apiVersion"] == "monitoring.coreos.com/v1" and obj["spec"]["endpoints"]
        else:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    assert {"InferenceService", "ConfigMap"} <= kinds


def assert_kserve_model(obj: dict) -> None:
    """Every field is one the kserve SDK's models know (V1beta1InferenceService, ...Spec, ...PredictorSpec),
    and the pod part of the predictor (containers, volumes, security, scheduling, readiness gates) is a valid
    core/v1 PodSpec for the pinned Kubernetes version."""
    from kserve.models import (
        V1beta1InferenceService,
        V1beta1InferenceServiceSpec,
        V1beta1PredictorSpec,
    )

    assert obj["apiVersion"] == "serving.kserve.io/v1beta1"
    assert set(obj) <= set(V1beta1InferenceService.attribute_map.values())
    assert set(obj["spec"]) <= set(V1beta1InferenceServiceSpec.attribute_map.values())
    predictor = obj["spec"]["predictor"]
    unknown = set(predictor) - set(V1beta1PredictorSpec.attribute_map.values())
    assert not unknown, f"fields the kserve SDK does not know: {unknown}"
    kserve_only = {
        "minReplicas",
        "maxReplicas",
        "scaleTarget",
        "scaleMetric",
        "containerConcurrency",
        "timeout",
        "canaryTrafficPercent",
        "logger",
        "batcher",
        "labels",
        "annotations",
        "deploymentStrategy",
        "autoScaling",
        "model",
        "workerSpec",
    }
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "predictor"},
        "spec": {k: v for k, v in predictor.items() if k not in kserve_only},
    }
    kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("name", COMBINATIONS)
def test_secure_defaults_everywhere(helm, name):
    for obj in render(helm, COMBINATIONS[name]):
        labels = obj["metadata"].get("labels", {})
        assert {
            "app.kubernetes.io/name",
            "app.kubernetes.io/instance",
            "app.kubernetes.io/managed-by",
        } <= set(labels), obj["kind"]
        assert obj["kind"] != "Secret", "credentials come from existing Secrets, never from the chart"
        spec = pod_spec(obj)
        if spec is None:
            continue
        assert spec["securityContext"]["runAsNonRoot"] is True, obj["metadata"]["name"]
        for c in containers(obj):
            where = f"{obj['metadata']['name']}/{c['name']}"
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            assert c["resources"]["requests"] and c["resources"]["limits"], where
            for env in c.get("env", []):
                if "PASSWORD" in env["name"] or env["name"].endswith("_USER"):
                    assert "valueFrom" in env and "value" not in env, (
                        f"{where}: {env['name']} must come from a Secret"
                    )


def test_gpu_toggle(helm):
    (isvc,) = [o for o in render(helm, COMBINATIONS["gpu"]) if o["kind"] == "InferenceService"]
    predictor = isvc["spec"]["predictor"]
    (container,) = predictor["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "cuda" in container["image"]
    assert {"name": "RECSYS_SERVE_DEVICE", "value": "cuda"} in container["env"]
    assert predictor["nodeSelector"]["nvidia.com/gpu.present"] == "true"
    assert any(t["key"] == "nvidia.com/gpu" for t in predictor["tolerations"])


def test_operator_toggle_sets_external_autoscaler_and_readiness_gate(helm):
    (on,) = [o for o in render(helm, {}) if o["kind"] == "InferenceService"]
    (off,) = [o for o in render(helm, COMBINATIONS["minimal"]) if o["kind"] == "InferenceService"]
    assert on["metadata"]["annotations"]["serving.kserve.io/autoscalerClass"] == "external"
    assert on["spec"]["predictor"]["readinessGates"] == [
        {"conditionType": "autoscaling.recsys.io/latency-ok"}
    ]
    assert "serving.kserve.io/autoscalerClass" not in off["metadata"]["annotations"]
    assert "readinessGates" not in off["spec"]["predictor"]
    assert on["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Standard"


def test_predictor_and_autoscaler_aim_at_the_same_p99_target(helm):
    """The predictor's quality ladder and the LatencyAutoscaler get one p99 target and the ladder setting."""
    objects = render(
        helm, {"operator.p99TargetMs": "80", "operator.maxDegradedShare": "1"}
    )  # --set: no floats
    (isvc,) = [o for o in objects if o["kind"] == "InferenceService"]
    (las,) = [o for o in objects if o["kind"] == "LatencyAutoscaler"]
    env = {e["name"]: e.get("value") for c in containers(isvc) for e in c.get("env", [])}
    assert env["RECSYS_SERVE_P99_TARGET_MS"] == "80" and las["spec"]["p99TargetMs"] == 80
    assert las["spec"]["ladder"] == {"maxDegradedShare": 1}


def test_operator_replicas_elect_a_leader_through_kopf_peering(helm):
    objects = render(helm, {"operator.replicas": "2"})
    deployment = next(
        o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "demo-recsys-operator"
    )
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert deployment["spec"]["replicas"] == 2
    assert container["args"][:2] == ["run", "--namespace"] and "--peering" in container["args"]
    peering_name = container["args"][container["args"].index("--peering") + 1]
    peering = [o for o in objects if o["kind"] == "KopfPeering"]
    assert [(p["metadata"]["name"], p["metadata"]["namespace"]) for p in peering] == [
        (peering_name, "recsys")
    ]
    assert any(e["name"] == "POD_ID" for e in container["env"])  # kopf's identity among the peers
    role = next(o for o in objects if o["kind"] == "ClusterRole")
    assert any("kopfpeerings" in r["resources"] and "patch" in r["verbs"] for r in role["rules"])
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    crds = {
        c["metadata"]["name"] for c in yaml.safe_load_all((CHART / "crds" / "kopf-peering.yaml").read_text())
    }
    assert crds == {"kopfpeerings.kopf.dev", "clusterkopfpeerings.kopf.dev"}
    for crd in yaml.safe_load_all((CHART / "crds" / "kopf-peering.yaml").read_text()):
        kubernetes_validate.validate(crd, KUBERNETES_VERSION, strict=True)


def test_retrain_cronjob_is_safe_to_overlap_and_bounded(helm):
    (cron,) = [
        o for o in render(helm, {}) if o["kind"] == "CronJob" and o["metadata"]["name"].endswith("-retrain")
    ]
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    job = cron["spec"]["jobTemplate"]["spec"]
    assert job["activeDeadlineSeconds"] > 0 and job["backoffLimit"] >= 0
    assert job["template"]["spec"]["containers"][0]["args"][0] == "retrain"


def test_feast_config_map_is_the_production_feature_store_yaml(helm):
    (cm,) = [o for o in render(helm, {}) if o["kind"] == "ConfigMap"]
    committed = (ROOT / "feature_repo" / "production" / "feature_store.yaml").read_text()
    assert cm["data"]["feature_store.yaml"].strip() == committed.strip()
    assert (CHART / "files" / "feature_store.yaml").read_text() == committed


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"predictor.port": "0"}, "predictor.port"),
        ({"events.nats.url": "http://nats:4222"}, "events.nats.url"),
        ({"events.consumer.fetchBatch": "0"}, "events.consumer.fetchBatch"),
        ({"postgres.password": "hunter2"}, "password"),
        ({"retrain.schedule": "daily"}, "retrain.schedule"),
        ({"feast.project": "Bad-Name"}, "feast.project"),
        ({"operator.maxDegradedShare": "2"}, "maxDegradedShare"),
    ],
)
def test_values_schema_rejects_bad_values(helm, values, message):
    done = run([helm, "template", "demo", CHART, *sets(values)], check=False)
    assert done.returncode != 0 and message in done.stderr, done.stderr


def test_checkov_finds_nothing_unreviewed(helm, tmp_path):
    """checkov over the rendered manifests of every toggle set, in one run: no failed check. Reviewed
    exceptions are `checkov.io/skipN` annotations in the chart (templates/_helpers.tpl: recsys.checkovSkips),
    each with its reason."""
    import json

    from tests.k8s_tools import ensure_checkov

    for name, values in COMBINATIONS.items():
        (tmp_path / f"{name}.yaml").write_text(
            run([helm, "template", "recsys", CHART, "--namespace", "recsys", *sets(values)]).stdout
        )
    done = run(
        [ensure_checkov(), "-d", tmp_path, "--framework", "kubernetes", "-o", "json", "--quiet"], check=False
    )
    report = json.loads(done.stdout)
    report = report[0] if isinstance(report, list) else report
    failed = report.get("results", {}).get("failed_checks", [])
    assert not failed, sorted({(f["check_id"], f["resource"], f["file_path"]) for f in failed})
    assert report["summary"]["passed"] > 100 * len(COMBINATIONS) and report["summary"]["parsing_errors"] == 0


def test_predictor_memory_follows_the_measured_rule():
    """The predictor's default memory request and limit are ``bench/memory_rule.py`` applied to the measured
    peak RSS of the chart's default model size (``bench/results/frontier.json``): re-measure, and the chart
    must follow (docs/performance.md, "Memory")."""
    import json

    from bench.memory_rule import memory_limit_mib, memory_request_mib, size_peak_mib

    values = yaml.safe_load((CHART / "values.yaml").read_text())
    frontier = json.loads((ROOT / "bench" / "results" / "frontier.json").read_text())
    peak = size_peak_mib(frontier, values["bootstrap"]["size"])
    resources = values["predictor"]["resources"]

    def mib(quantity: str) -> int:
        number, unit = quantity[:-2], quantity[-2:]
        return int(number) * {"Mi": 1, "Gi": 1024}[unit]

    assert mib(resources["requests"]["memory"]) == memory_request_mib(peak)
    assert mib(resources["limits"]["memory"]) == memory_limit_mib(peak)
    assert memory_request_mib(peak) >= peak  # the rule itself: never below what was measured


def test_events_service_and_consumers_reach_jetstream_with_credentials_from_secrets(helm):
    objects = render(
        helm,
        {
            "events.nats.existingSecret": "nats-auth",
            "events.nats.caSecret": "nats-ca",
            "events.nats.url": "tls://nats.messaging:4222",
            "events.consumer.replicas": "3",
        },
    )
    deployments = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Deployment"}
    service = next(
        o for o in objects if o["kind"] == "Service" and o["metadata"]["name"] == "demo-recsys-events"
    )
    assert service["spec"]["ports"][0]["port"] == 8090
    assert deployments["demo-recsys-events-consumer"]["spec"]["replicas"] == 3
    for name, command in (
        ("demo-recsys-events", ["events", "serve"]),
        ("demo-recsys-events-consumer", ["events", "consume"]),
    ):
        pod = deployments[name]["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert container["args"][:2] == command
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        env = {e["name"]: e for e in container["env"]}
        assert env["RECSYS_NATS_URL"]["value"] == "tls://nats.messaging:4222"
        assert env["RECSYS_NATS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
            "name": "nats-auth",
            "key": "password",
        }
        assert "value" not in env["RECSYS_NATS_PASSWORD"]  # by reference only
        ca = env["RECSYS_NATS_TLS_CA"]["value"]
        mount = next(m for m in container["volumeMounts"] if m["name"] == "nats-ca")
        assert ca.startswith(mount["mountPath"])
        assert {"name": "nats-ca", "secret": {"secretName": "nats-ca"}} in pod["volumes"]
    assert not any(
        o["kind"] == "Deployment" and "events" in o["metadata"]["name"]
        for o in render(helm, {"events.enabled": "false"})
    )


@pytest.mark.parametrize(
    "values",
    [
        {},
        {"redis.db": "2", "redis.existingSecret": "redis-auth"},
        {
            "redis.type": "redis_cluster",
            "redis.nodes": "r1:7000\\,r2:7001",
            "redis.existingSecret": "redis-auth",
            "redis.usernameKey": "user",
            "redis.tls.enabled": "true",
            "redis.tls.caSecret": "redis-ca",
        },
        {"redis.type": "redis_sentinel", "redis.nodes": "s1:26379", "redis.tls.enabled": "true"},
    ],
    ids=["plain", "auth", "cluster-tls", "sentinel"],
)
def test_chart_redis_connection_is_the_one_recsys_builds(helm, values):
    """Feast CLI pods (feast serve, apply) read RECSYS_REDIS_CONNECTION from the chart; recsys commands
    build it from RECSYS_REDIS_*: both must be the same string for the same values."""
    from predictor.config import Settings

    objects = render(helm, values)
    isvc = next(o for o in objects if o["kind"] == "InferenceService")
    env = {e["name"]: e for e in containers(isvc)[0]["env"]}

    def value(name: str) -> str | None:
        return env[name].get("value")

    def secret(name: str) -> str:  # what Kubernetes expands for a variable from a Secret
        return f"$({name})" if name in env else ""

    settings = Settings(
        redis_host=value("RECSYS_REDIS_HOST"),
        redis_port=int(value("RECSYS_REDIS_PORT")),
        redis_db=int(value("RECSYS_REDIS_DB")),
        redis_type=value("RECSYS_REDIS_TYPE"),
        redis_nodes=value("RECSYS_REDIS_NODES"),
        redis_username=secret("RECSYS_REDIS_USERNAME"),
        redis_password=secret("RECSYS_REDIS_PASSWORD"),
        redis_tls=value("RECSYS_REDIS_TLS") == "true",
        redis_ca_file=value("RECSYS_REDIS_CA_FILE") if "RECSYS_REDIS_CA_FILE" in env else None,
    )
    assert value("RECSYS_REDIS_CONNECTION") == settings.redis_connection
    if "RECSYS_REDIS_PASSWORD" in env:
        assert "value" not in env["RECSYS_REDIS_PASSWORD"]  # from the Secret only


def test_chart_readme_lists_every_value():
    """charts/recsys/README.md's table is the one made from values.yaml (`python -m tests.chart_readme`), and
    every value has a `# --` description there."""
    from tests.chart_readme import chart_values, readme_with_table

    values = chart_values((CHART / "values.yaml").read_text())
    assert len(values) > 100
    assert [v.key for v in values if not v.description] == [], "values without a `# --` description"
    flat = set()

    def walk(node, prefix=""):
        for key, value in node.items():
            if isinstance(value, dict) and value and f"{prefix}{key}" not in {v.key for v in values}:
                walk(value, f"{prefix}{key}.")
            else:
                flat.add(f"{prefix}{key}")

    walk(yaml.safe_load((CHART / "values.yaml").read_text()))
    assert flat == {v.key for v in values}  # the comment scan found every leaf YAML has
    readme = (CHART / "README.md").read_text()
    assert readme == readme_with_table(readme, values), (
        "charts/recsys/README.md is stale: python -m tests.chart_readme"
    )


def test_one_template_per_kind(helm):
    """Each template renders objects of one kind (the external-dns chart's layout), with every switch on."""
    on = {
        "predictor.podDisruptionBudget.enabled": "true",
        "networkPolicy.enabled": "true",
        "bootstrap.enabled": "true",
        "monitoring.serviceMonitor.enabled": "true",
        "bundled.redis.enabled": "true",
        "bundled.postgres.enabled": "true",
    }
    rendered = run([helm, "template", "recsys", CHART, *sets(on)]).stdout
    kinds: dict[str, set[str]] = {}
    source = None
    for line in rendered.splitlines():
        if line.startswith("# Source: "):
            source = line.removeprefix("# Source: ")
        elif line.startswith("kind: ") and source:
            kinds.setdefault(source, set()).add(line.removeprefix("kind: "))
    assert len(kinds) >= 20
    assert {source: k for source, k in kinds.items() if len(k) > 1} == {}
