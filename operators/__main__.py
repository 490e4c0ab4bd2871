"""``python -m operators run [--namespace NS ...] [--peering NAME | --standalone] [--priority N]``: the
operator image's entry point (it has no model code, so no ``recsys`` command); the same as
``recsys operator run``."""

from __future__ import annotations

import argparse

from operators.run import DEFAULT_LIVENESS, run


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m operators", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("run", help="run the LatencyAutoscaler operator until stopped")
    start.add_argument(
        "--namespace", action="append", default=[], help="watch only this namespace (repeatable)"
    )
    start.add_argument("--peering", default="recsys-operator", help="kopf peering object (leader election)")
    start.add_argument("--standalone", action="store_true", help="no peering: the only operator instance")
    start.add_argument("--priority", type=int, default=None, help="peering priority (default: random)")
    start.add_argument("--liveness", default=DEFAULT_LIVENESS, help="health endpoint URL to serve")
    start.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    run(args.namespace, None if args.standalone else args.peering, args.priority, args.liveness, args.verbose)


if __name__ == "__main__":
    main()
