"""The kustomize install path (`kubectl apply -k k8s/overlays/{cpu,gpu}`): built with the real kubectl,
validated like the chart, and kept equal to the chart (k8s/base is generated from it by k8s/render.py)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.k8s_tools import ROOT, ensure_tools
from tests.test_helm import CHART, assert_kserve_model, render, run

OVERLAYS = {"cpu": {}, "gpu": {"predictor.gpu.enabled": "true"}}  # overlay → equivalent chart values


@pytest.fixture(scope="module")
def tools() -> dict[str, Path]:
    return ensure_tools()


def kustomize(kubectl: Path, overlay: str) -> list[dict]:
    out = run([kubectl, "kustomize", ROOT / "k8s" / "overlays" / overlay]).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def test_base_is_what_the_chart_renders(tools, tmp_path):
    """k8s/base is generated; a chart change without `python k8s/render.py` fails here."""
    copy = tmp_path / "repo"
    shutil.copytree(ROOT / "k8s", copy / "k8s")
    shutil.copytree(CHART, copy / "charts" / "recsys")
    # only k8s/ and the chart: the script must not need the tests or the product packages
    done = subprocess.run(
        [sys.executable, str(copy / "k8s" / "render.py"), "--helm", str(tools["helm"])],
        capture_output=True,
        text=True,
        check=False,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr
    fresh = {p.name: p.read_text() for p in (copy / "k8s" / "base").glob("*.yaml")}
    committed = {p.name: p.read_text() for p in (ROOT / "k8s" / "base").glob("*.yaml")}
    assert fresh == committed, "k8s/base is stale: run `python k8s/render.py`"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_validates(tools, overlay):
    import jsonschema
    import kubernetes_validate

    from tests.k8s_tools import KUBERNETES_VERSION

    objects = kustomize(tools["kubectl"], overlay)
    # the overlay's own CRDs (the LatencyAutoscaler, kopf's peering) validate the custom resources
    schemas = {
        o["spec"]["names"]["kind"]: o["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        for o in objects
        if o["kind"] == "CustomResourceDefinition"
    }
    assert {"LatencyAutoscaler", "KopfPeering", "ClusterKopfPeering"} <= set(schemas)
    for obj in objects:
        assert obj["metadata"].get("namespace", "recsys") == "recsys" or obj["kind"] in ("ClusterRole",)
        if obj["kind"] in schemas:
            jsonschema.Draft4Validator(schemas[obj["kind"]]).validate(obj)
        elif obj["kind"] == "InferenceService":
            assert_kserve_model(obj)
        else:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_and_chart_render_the_same_resources(tools, overlay):
    chart = render(tools["helm"], OVERLAYS[overlay], release="recsys")
    kust = kustomize(tools["kubectl"], overlay)
    key = lambda o: (o["kind"], o["metadata"]["name"])
    crds = [
        c
        for path in sorted((CHART / "crds").glob("*.yaml"))
        for c in yaml.safe_load_all(path.read_text())
        if c
    ]
    assert {key(o) for o in chart} | {key(c) for c in crds} == {
        key(o) for o in kust if o["kind"] != "Namespace"
    }
    # and the same predictor: the overlay's patches reproduce the chart's GPU toggle exactly
    (chart_isvc,) = [o for o in chart if o["kind"] == "InferenceService"]
    (kust_isvc,) = [o for o in kust if o["kind"] == "InferenceService"]
    assert kust_isvc["spec"] == chart_isvc["spec"]
