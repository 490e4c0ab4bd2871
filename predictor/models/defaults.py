"""Training settings chosen from the data where the user sets none (`recsys train`, `bench/quality.py`).

The rules come from measurements (``docs/models.md``, "Defaults"): the MovieLens latest-small validation
sweep, and single-seed CPU fits of candidate settings on both MovieLens datasets. Every field the user
sets (``--model-option`` / ``--train-option``) wins over the rule for it.
"""

from __future__ import annotations

from predictor.models.config import ModelConfig, TrainConfig, model_config

# The exact softmax scores every catalog item for every label, so an epoch costs about (events x items)
# scores. The budget is set just above what MovieLens latest-small costs (100,836 events x 9,742 items,
# 1.0e9: 12-13 s an epoch on 2 CPU cores with the settings below; docs/models.md, "Defaults"). A log
# allows the exact softmax up to EXACT_SOFTMAX_SCORES // events items; the model keeps that cap, so a
# warm start on a few more items keeps its objective.
EXACT_SOFTMAX_SCORES = 1_500_000_000
# Early stopping decides within MAX_EPOCHS retrieval epochs. With the exact softmax a fit costs about
# epochs x events x items scores, and its validation curve still rises at 60 epochs on latest-small, so
# the epochs are capped to EXACT_SOFTMAX_FIT_SCORES: 40 latest-small epochs, for the 600 s training budget
# (the whole default train measured 480 s on 2 CPU cores: docs/models.md, "Training speed");
# MovieLens-100K's catalog is 6 x smaller and keeps all 60.
MAX_EPOCHS = 60
EXACT_SOFTMAX_FIT_SCORES = 40_000_000_000
# Random splits: the order-free set encoder, trained to predict a held-out share of each user's items from
# the rest with the exact softmax, its weights averaged (EMA) over steps; one example per user an epoch, so
# an epoch is cheap (users x items scores) and early stopping decides within SET_MAX_EPOCHS. It pools up
# to SET_MAX_HISTORY items (a user with more is read through a fresh random subset each epoch). Dropout
# 0.3 and temperature 0.2 measured best validation Recall@20 on latest-small's random 80/20 split among the
# variants tried (docs/models.md, "Random and published splits"), where the causal sequence encoder with
# the all-items objective stayed level with tuned ALS or below it.
SET_MAX_HISTORY = 1000
SET_MAX_EPOCHS = 400
SET_ENCODER_SETTINGS = {
    "model": {
        "user_encoder": "set",
        "max_history": SET_MAX_HISTORY,
        "dim": 128,
        "dropout": 0.3,
        "temperature": 0.2,
    },
    "train": {
        "batch_size": 64,
        "lr": 1e-3,
        "weight_decay": 1e-3,
        "ema_decay": 0.99,
        "epochs": SET_MAX_EPOCHS,
        "min_epochs": 50,
        "patience": 30,
    },
}
# The latest-small validation sweep's choice (docs/models.md), and 64 windows a step: these logs have
# ~2,300 windows, so 128 a step is 18 updates an epoch. With 64 and 40 epochs latest-small reached 1.36 x
# tuned ALS's test NDCG@10 (3 seeds), where 128 had needed 2,443 s for 1.35 x (one seed); MovieLens-100K
# gave up ~6 % against 128 and stayed at 1.56 x (docs/models.md). The width, dropout and learning rate
# measured no gain without the exact softmax.
EXACT_SOFTMAX_SETTINGS = {
    "model": {"dim": 128, "dropout": 0.3, "temperature": 0.1},
    "train": {"window_jitter": True, "weight_decay": 1e-3, "lr": 3e-3, "batch_size": 64},
}


def choose(
    n_items: int,
    n_events: int,
    size: str = "small",
    model_options: dict | None = None,
    train_options: dict | None = None,
    protocol: str = "temporal",
) -> tuple[ModelConfig, TrainConfig, dict[str, str]]:
    """(model config, train config, {field: why}) for a catalog of ``n_items``, a training log of
    ``n_events`` and a split ``protocol``
    ("temporal", or "random" for a random published split); ``model_options`` / ``train_options`` are
    the user's settings, applied over the rules (their fields are reported as "set by the user"). The
    rules were measured on the ``small`` size and apply to it only."""
    model_options, train_options = dict(model_options or {}), dict(train_options or {})
    model_rules: dict[str, tuple[object, str]] = {}
    train_rules: dict[str, tuple[object, str]] = {}
    max_items = exact_softmax_max_items(n_events)
    why_exact = (
        f"{n_items:,} items ≤ {max_items:,} (what {n_events:,} events afford): exact softmax over the whole"
        " catalog"
    )
    if protocol == "random":
        why = "random split: held-out items are any of the user's, in no order"
        for key, value in SET_ENCODER_SETTINGS["model"].items():
            if key != "dim" or size == "small":  # widths were measured on the small size
                model_rules[key] = (value, why + ": the set encoder, with its settings")
        for key, value in SET_ENCODER_SETTINGS["train"].items():
            train_rules[key] = (value, why + ": the set encoder, with its settings")
        if 0 < n_items <= max_items:
            model_rules["full_softmax_items"] = (max_items, why_exact)
    elif size == "small" and 0 < n_items <= max_items:
        model_rules["full_softmax_items"] = (max_items, why_exact)
        affordable = EXACT_SOFTMAX_FIT_SCORES // max(n_events * n_items, 1)
        if affordable < MAX_EPOCHS:
            why_epochs = (
                f"{MAX_EPOCHS} epochs of the exact softmax over {n_items:,} items x {n_events:,} events"
                f" exceed the {EXACT_SOFTMAX_FIT_SCORES:.0e} scores a fit affords"
            )
            train_rules["epochs"] = (max(affordable, 1), why_epochs)
        for key, value in EXACT_SOFTMAX_SETTINGS["model"].items():
            model_rules[key] = (value, why_exact + ", with its settings")
        for key, value in EXACT_SOFTMAX_SETTINGS["train"].items():
            train_rules[key] = (value, why_exact + ", with its settings")
    reasons: dict[str, str] = {}
    chosen_model = {k: v for k, (v, _) in model_rules.items() if k not in model_options}
    chosen_train = {k: v for k, (v, _) in train_rules.items() if k not in train_options}
    for key, (_, why) in (*model_rules.items(), *train_rules.items()):
        if key in chosen_model or key in chosen_train:
            reasons[key] = why
    for key in (*model_options, *train_options):
        reasons[key] = "set by the user"
    config = model_config(size, **{**chosen_model, **model_options})
    train = TrainConfig(**{"epochs": MAX_EPOCHS, **chosen_train, **train_options})
    return config, train, reasons


def exact_softmax_max_items(n_events: int) -> int:
    """The largest catalog whose exact softmax a log of ``n_events`` affords (``EXACT_SOFTMAX_SCORES``)."""
    return EXACT_SOFTMAX_SCORES // max(n_events, 1)


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
