"""Training settings chosen from the data where the user sets none (`recsys train`, `bench/quality.py`).

The rules come from measurements (``docs/models.md``, "Defaults"): the MovieLens latest-small validation
sweep, and single-seed CPU fits of candidate settings on both MovieLens datasets. Every field the user
sets (``--model-option`` / ``--train-option``) wins over the rule for it.
"""

from __future__ import annotations

from predictor.models.config import ModelConfig, TrainConfig, model_config

# The exact softmax scores every item for every label, so its cost grows with the catalog. Measured on 2 CPU
# cores with the settings below (docs/models.md, "Defaults"): 1,682 items (MovieLens-100K) 6.6 s an
# epoch, 436 s a fit, validation NDCG@10 +27 % over the model's own defaults; 9,742 items (MovieLens
# latest-small) over 1,200 s a fit, above the training-time budget. The width, dropout and learning rate
# belong with it: without the exact softmax they measured no gain (docs/models.md).
FULL_SOFTMAX_MAX_ITEMS = 5_000
# Random splits: the all-items objective with 32 windows a step (4 x the steps of 128: 60 an epoch on
# MovieLens-100K) passed tuned ALS's validation Recall@20 at epoch 27; the next-item objective with 128 sat
# at popularity's level for 12 epochs and stopped at 0.245, and at max_history 200 neither left it. The two
# settings were measured together, not apart (docs/models.md, "Random and published splits").
RANDOM_SPLIT_BATCH = 32
SMALL_CATALOG_SETTINGS = {  # the latest-small validation sweep's choice (docs/models.md)
    "model": {"dim": 128, "dropout": 0.3, "temperature": 0.1},
    "train": {"window_jitter": True, "weight_decay": 1e-3, "lr": 3e-3},
}


def choose(
    n_items: int,
    size: str = "small",
    model_options: dict | None = None,
    train_options: dict | None = None,
    protocol: str = "temporal",
) -> tuple[ModelConfig, TrainConfig, dict[str, str]]:
    """(model config, train config, {field: why}) for a catalog of ``n_items`` and a split ``protocol``
    ("temporal", or "random" for a random published split); ``model_options`` / ``train_options`` are
    the user's settings, applied over the rules (their fields are reported as "set by the user"). The
    rules were measured on the ``small`` size and apply to it only."""
    model_options, train_options = dict(model_options or {}), dict(train_options or {})
    model_rules: dict[str, tuple[object, str]] = {}
    train_rules: dict[str, tuple[object, str]] = {}
    if protocol == "random":
        why = "random split: held-out items are any of the user's"
        train_rules["objective"] = ("all_items", why + ", so each state learns all the items it has not read")
        train_rules["batch_size"] = (
            RANDOM_SPLIT_BATCH,
            why + f"; {RANDOM_SPLIT_BATCH} windows a step, measured with that objective (docs/models.md)",
        )
    if size == "small" and 0 < n_items <= FULL_SOFTMAX_MAX_ITEMS:
        why = f"{n_items:,} items ≤ {FULL_SOFTMAX_MAX_ITEMS:,}: exact softmax over the whole catalog"
        model_rules["full_softmax_items"] = (FULL_SOFTMAX_MAX_ITEMS, why)
        for key, value in SMALL_CATALOG_SETTINGS["model"].items():
            model_rules[key] = (value, why + ", with its settings")
        for key, value in SMALL_CATALOG_SETTINGS["train"].items():
            train_rules[key] = (value, why + ", with its settings")
    reasons: dict[str, str] = {}
    chosen_model = {k: v for k, (v, _) in model_rules.items() if k not in model_options}
    chosen_train = {k: v for k, (v, _) in train_rules.items() if k not in train_options}
    for key, (_, why) in (*model_rules.items(), *train_rules.items()):
        if key in chosen_model or key in chosen_train:
            reasons[key] = why
    for key in (*model_options, *train_options):
        reasons[key] = "set by the user"
    config = model_config(size, **{**chosen_model, **model_options})
    return config, TrainConfig(**{**chosen_train, **train_options}), reasons


def explained(config: ModelConfig, train: TrainConfig, reasons: dict[str, str]) -> dict[str, dict]:
    """``{setting: {"value", "why"}}`` for the settings ``reasons`` names, from whichever config has each."""
    return {
        key: {"value": getattr(config, key) if hasattr(config, key) else getattr(train, key), "why": why}
        for key, why in reasons.items()
    }


def describe(config: ModelConfig, train: TrainConfig, reasons: dict[str, str]) -> str:
    """One line for the console: each chosen setting, its value and why."""
    return "settings: " + "; ".join(
        f"{key}={e['value']} ({e['why']})" for key, e in explained(config, train, reasons).items()
    )
