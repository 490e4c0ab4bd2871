"""What loading a model artifact costs a replica, in a fresh interpreter: ``bench/model_load.py URI...``.

For each artifact, in its own child process (so memory figures are that load's alone): seconds for
``load_model`` (read, verify, build the modules) and for the serving engine's item side (exact search, or with
``--hnsw`` the HNSW index too; fp32, 1 torch thread), RSS after each and peak RSS (MiB; the keys say ``mb``).
Prints one JSON object per artifact. To compare two trees, run the same command with ``PYTHONPATH`` pointing
at the other tree's checkout: the child imports ``predictor`` from there.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import json, sys, time
from pathlib import Path
import faiss, torch
torch.set_num_threads(1)
faiss.omp_set_num_threads(1)  # as a replica runs (RECSYS_SERVE_TORCH_THREADS=1)

def rss():
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return {k: int(status[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM")}

from predictor.models.lifecycle import load_model
from predictor.serving.engine import ServingEngine
imported = rss()
started = time.perf_counter()
model = load_model(sys.argv[1], "cpu")
load_s = time.perf_counter() - started
loaded = rss()
started = time.perf_counter()
engine = ServingEngine(model, "probe", "cpu", "fp32", hnsw_threshold=int(sys.argv[2]))
engine.self_check()
item_side_s = time.perf_counter() - started
print(json.dumps({"uri": sys.argv[1], "load_model_s": load_s, "item_side_and_self_check_s": item_side_s,
                  "rss_after_imports_mb": imported["VmRSS"], "rss_after_load_mb": loaded["VmRSS"],
                  "rss_after_item_side_mb": rss()["VmRSS"], "peak_rss_mb": rss()["VmHWM"]}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("uris", nargs="+")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per artifact")
    parser.add_argument(
        "--hnsw",
        action="store_true",
        help="build the item side with HNSW (hnsw_threshold 0: the graph is built or reused)",
    )
    args = parser.parse_args()
    for uri in args.uris:
        uri = str(Path(uri).resolve()) if Path(uri).exists() else uri
        runs = []
        for _ in range(args.repeats):
            # from a neutral directory: the child imports predictor from PYTHONPATH or the installed tree,
            # never from the current directory
            threshold = "0" if args.hnsw else str(10**9)
            done = subprocess.run(
                [sys.executable, "-c", CHILD, uri, threshold],
                capture_output=True,
                text=True,
                check=False,
                cwd=tempfile.gettempdir(),
            )
            if done.returncode != 0:
                sys.exit(f"{uri}: the loader exited {done.returncode}:\n{done.stderr[-3000:]}")
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        keys = [k for k in runs[0] if k != "uri"]
        print(
            json.dumps(
                {
                    "uri": uri,
                    "runs": len(runs),
                    **{k: sorted(r[k] for r in runs)[len(runs) // 2] for k in keys},
                }
            )
        )


if __name__ == "__main__":
    main()
