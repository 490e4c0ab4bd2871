"""Start the operator: ``kopf.run`` with peering, a liveness endpoint and the namespaces to watch.

``recsys operator run`` calls :func:`run`; the operator image, which carries no model code, calls the same
function through ``python -m operators run``.

Leader election: kopf's peering. Every running operator writes a keep-alive into one peering object
(``KopfPeering`` when it watches given namespaces, ``ClusterKopfPeering`` when cluster-wide; the chart
installs both CRDs and the object). An operator pauses while it sees a peer of higher priority, and
operators of *equal* priority all freeze, so each process draws a random priority unless one is given:
the highest one is the leader, the others are warm standbys that resume once its keep-alive goes stale.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence

log = logging.getLogger(__name__)
DEFAULT_LIVENESS = "http://0.0.0.0:8080/healthz"


def run_options(
    namespaces: Sequence[str] = (),
    peering: str | None = "recsys-operator",
    priority: int | None = None,
    liveness: str | None = DEFAULT_LIVENESS,
    rng: random.Random | None = None,
) -> dict:
    """The keyword arguments for ``kopf.run``. ``peering=None`` runs standalone (no peers, no pausing)."""
    options: dict = {
        "namespaces": list(namespaces),
        "clusterwide": not namespaces,
        "liveness_endpoint": liveness,
    }
    if peering:
        drawn = priority if priority is not None else (rng or random.SystemRandom()).randint(1, 2**31 - 1)
        options.update(standalone=False, peering_name=peering, priority=drawn)
    else:
        options.update(standalone=True)
    return options


def run(
    namespaces: Sequence[str] = (),
    peering: str | None = "recsys-operator",
    priority: int | None = None,
    liveness: str | None = DEFAULT_LIVENESS,
    verbose: bool = False,
) -> None:
    import kopf

    import operators.handlers  # noqa: F401 - registers the handlers

    options = run_options(namespaces, peering, priority, liveness)
    kopf.configure(verbose=verbose)  # kopf's log format for everything, ours included
    log.info("operator starting: %s", options)
    kopf.run(**options)
