"""`helm install` of the whole product on a real cluster: the one ``KUBECONFIG`` points to (kind included).

Preconditions (the test is skipped, saying which one is missing, when they do not hold):
- ``KUBECONFIG`` names a cluster with KServe (Standard deployment mode) and cert-manager installed;
- ``RECSYS_E2E_IMAGE`` and ``RECSYS_E2E_OPERATOR_IMAGE`` name images built from
  ``docker/predictor.Dockerfile`` and ``docker/operator.Dockerfile`` that the cluster can pull (on kind:
  ``kind load docker-image ...``), as ``repository:tag``.

What it does, in a throw-away namespace, with the chart as a user would install it for a trial:
1. creates the PostgreSQL Secret, then ``helm install --wait`` with the bundled stores, the bootstrap Job
   (synthetic data → features → materialize → train), the operator and the Feast feature server;
2. waits for the InferenceService to be Ready and calls it over V1 and V2 (through ``kubectl port-forward``);
3. pushes an event through the feature server and checks that the next V1 request still answers from the
   model (no fallback);
4. waits until the operator has written an observed p99 into the LatencyAutoscaler's status;
5. uninstalls and deletes the namespace, whatever happened.

``KUBECONFIG=~/.kube/config RECSYS_E2E_IMAGE=... RECSYS_E2E_OPERATOR_IMAGE=... pytest -m e2e tests/e2e``
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import urllib.request
import uuid
from contextlib import contextmanager

import pytest

from tests.k8s_tools import ROOT, ensure_tools

pytestmark = pytest.mark.e2e

for variable, why in (
    ("KUBECONFIG", "a cluster with KServe"),
    ("RECSYS_E2E_IMAGE", "the predictor image (repository:tag) the cluster can pull"),
    ("RECSYS_E2E_OPERATOR_IMAGE", "the operator image (repository:tag) the cluster can pull"),
):
    if not os.environ.get(variable):
        pytest.skip(
            f"set {variable} ({why}) to run the helm install end-to-end test", allow_module_level=True
        )

RELEASE = "recsys"


def sh(*cmd, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, check=False)
    if check:
        assert done.returncode == 0, f"{' '.join(map(str, cmd))}\n{done.stdout}\n{done.stderr}"
    return done


def split_image(ref: str) -> tuple[str, str]:
    repository, _, tag = ref.rpartition(":") if ":" in ref.rsplit("/", 1)[-1] else (ref, "", "latest")
    return repository, tag


@contextmanager
def port_forward(kubectl, namespace: str, target: str, port: int):
    """``kubectl port-forward`` to a random local port; yields the local base URL."""
    proc = subprocess.Popen(
        [str(kubectl), "-n", namespace, "port-forward", target, f":{port}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        match = re.search(r"127\.0\.0\.1:(\d+)", line)
        assert match, f"port-forward to {target} said: {line}"
        yield f"http://127.0.0.1:{match.group(1)}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def post(url: str, body: dict, timeout: float = 10) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        assert response.status == 200
        return json.loads(response.read() or b"{}")


def test_helm_install_serves_pushes_and_autoscales():
    tools = ensure_tools()
    helm, kubectl = tools["helm"], tools["kubectl"]
    namespace = f"recsys-e2e-{uuid.uuid4().hex[:6]}"
    image_repo, image_tag = split_image(os.environ["RECSYS_E2E_IMAGE"])
    op_repo, op_tag = split_image(os.environ["RECSYS_E2E_OPERATOR_IMAGE"])
    sh(kubectl, "create", "namespace", namespace)
    try:
        sh(
            kubectl,
            "-n",
            namespace,
            "create",
            "secret",
            "generic",
            "recsys-postgres",
            "--from-literal=username=recsys",
            f"--from-literal=password={uuid.uuid4().hex}",
        )
        sh(
            helm,
            "install",
            RELEASE,
            ROOT / "charts" / "recsys",
            "-n",
            namespace,
            "--wait",
            "--timeout",
            "20m",
            "--set",
            f"image.repository={image_repo}",
            "--set",
            f"image.tag={image_tag}",
            "--set",
            f"operator.image.repository={op_repo}",
            "--set",
            f"operator.image.tag={op_tag}",
            "--set",
            f"postgres.host={RELEASE}-postgresql",
            "--set",
            f"redis.host={RELEASE}-redis",
            "--set",
            "bundled.postgres.enabled=true",
            "--set",
            "bundled.redis.enabled=true",
            "--set",
            "bootstrap.enabled=true",
            "--set",
            "bootstrap.size=tiny",
            timeout=1500,
        )
        sh(
            kubectl,
            "-n",
            namespace,
            "wait",
            "--for=condition=Ready",
            f"inferenceservice/{RELEASE}",
            "--timeout=600s",
            timeout=660,
        )

        user = 1
        with port_forward(kubectl, namespace, f"svc/{RELEASE}-predictor", 80) as url:
            v1 = post(f"{url}/v1/models/{RELEASE}:predict", {"instances": [{"user_id": user, "k": 10}]})
            assert len(v1["predictions"][0]["item_ids"]) == 10
            v2 = post(
                f"{url}/v2/models/{RELEASE}/infer",
                {"inputs": [{"name": "user_id", "shape": [1], "datatype": "INT64", "data": [user]}]},
            )
            outputs = {o["name"]: o for o in v2["outputs"]}
            assert outputs["item_ids"]["shape"][0] == 1 and len(outputs["item_ids"]["data"]) >= 1

            with port_forward(kubectl, namespace, f"svc/{RELEASE}-feature-server", 6566) as feast:
                now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
                post(
                    f"{feast}/push",
                    {
                        "push_source_name": "user_recent_items_push",
                        "to": "online",
                        "df": {
                            "user_id": [user],
                            "recent_items": [v1["predictions"][0]["item_ids"][:3]],
                            "seen_items": [sorted(v1["predictions"][0]["item_ids"][:3])],
                            "event_timestamp": [now],
                            "created": [now],
                        },
                    },
                )
            after = post(f"{url}/v1/models/{RELEASE}:predict", {"instances": [{"user_id": user, "k": 10}]})
            assert not after["predictions"][0].get("fallback"), after

        deadline = time.monotonic() + 300
        status: dict = {}
        while time.monotonic() < deadline:
            got = sh(kubectl, "-n", namespace, "get", "latencyautoscalers", "-o", "json").stdout
            items = json.loads(got)["items"]
            status = items[0].get("status", {}) if items else {}
            if status.get("observedP99Ms") is not None:
                break
            time.sleep(10)
        assert status.get("observedP99Ms") is not None, f"the operator never observed a p99: {status}"
        assert status.get("currentReplicas", 0) >= 1
    finally:
        sh(helm, "uninstall", RELEASE, "-n", namespace, "--wait", timeout=600, check=False)
        sh(kubectl, "delete", "namespace", namespace, "--wait=false", check=False)
