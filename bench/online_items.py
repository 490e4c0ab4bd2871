"""How long a replica's read of the whole catalog's online item features takes (``bench/online_items.py``).

Reads ``item_profile`` for every item of an artifact's catalog from the Redis online store that
``bench/frontier.py`` set up (``RedisOnlineFeatures.items_sync``, what a replica runs at start-up and on each
item refresh), ``--repeats`` times, and prints the median seconds with a checksum of what was read, so that
two trees (``PYTHONPATH`` on another checkout) can be compared on the same data.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import time
from pathlib import Path

import numpy as np

from predictor.config import Profile, Settings
from predictor.features.store import open_store
from predictor.models.registry import open_artifact
from predictor.serving.online import RedisOnlineFeatures

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--artifact", default=str(ROOT / ".recsys-bench" / "frontier" / "models" / "small-fp32")
    )
    parser.add_argument("--home", default=str(ROOT / ".recsys-bench" / "frontier"))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    # bench/frontier.py's set-up (DATABASE, PROJECT, REDIS_DB there), named here rather than imported: this
    # script must run against an older checkout's predictor too, which frontier.py's imports may not find
    settings = Settings(
        profile=Profile.production,
        home=Path(args.home),
        pg_database="recsys_frontier",
        feast_project="bench_frontier",
        redis_db=7,
    )
    os.environ.update(settings.feast_environment())
    files, _ = open_artifact(args.artifact)
    ids = np.load(io.BytesIO(files["catalog.npz"]), allow_pickle=False)["item_ids"]
    online = RedisOnlineFeatures(open_store(settings), settings, timeout=5.0)
    times, rows = [], None
    for _ in range(args.repeats):
        started = time.perf_counter()
        rows = online.items_sync(ids)
        times.append(time.perf_counter() - started)
    print(
        json.dumps(
            {
                "items": len(ids),
                "median_s": float(np.median(times)),
                "seconds": times,
                "checksum": float(rows.select_dtypes("number").sum().sum()),
                "category_entries": int(sum(len(c) for c in rows["categories"])),
            }
        )
    )


if __name__ == "__main__":
    main()
