"""Model sizes: one code path from ``tiny`` (tests, seconds) to ``large`` (≥ 100 M parameters).

Most parameters sit in the id embedding tables. ``item_capacity`` reserves rows beyond the current
catalog so that new items get embeddings at retraining without reallocating (or losing) old rows; the
``large`` size reserves 400k item rows of width 256 (102 M parameters in that table alone).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace

USER_ENCODERS = ("sequence", "set")


@dataclass(frozen=True)
class ModelConfig:
    size: str = "small"
    dim: int = 64  # embedding and tower output width
    max_history: int = 50  # items of the user's history the encoders read
    # the user tower's encoder: "sequence" (causal self-attention over the history in its order, a state
    # after every item: temporal logs) or "set" (an order-free pooling of the history: random splits,
    # whose held-out items are any of the user's)
    user_encoder: str = "sequence"
    encoder_layers: int = 2
    encoder_heads: int = 2
    dropout: float = 0.2
    item_capacity: int = 0  # embedding rows reserved for items (0: exactly the catalog)
    embedding_fp16: bool = False  # store id embedding tables in float16 (half the memory)
    temperature: float = 0.07
    in_batch_negatives: int = 1024  # other labels of the batch used as negatives (logQ-corrected)
    uniform_negatives: int = 0  # extra uniformly sampled negatives per batch ("mixed negatives")
    # catalogs up to this many items train with an exact softmax over every item instead of sampled
    # negatives: on small catalogs that costs little and removes the sampling bias entirely
    full_softmax_items: int = 0
    ranker_hidden: tuple[int, ...] = (256, 128)
    ranker_negatives: int = 30  # retrieval candidates per training example for the ranker
    ranker_history: int = 20  # newest history items the ranker's target attention reads

    def __post_init__(self):
        if self.user_encoder not in USER_ENCODERS:
            raise ValueError(
                f"user_encoder must be one of {', '.join(USER_ENCODERS)}, got {self.user_encoder!r}"
            )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> ModelConfig:
        values = dict(values)
        if "ranker_hidden" in values:
            values["ranker_hidden"] = tuple(values["ranker_hidden"])
        return cls(**values)


SIZES: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        size="tiny",
        dim=16,
        max_history=10,
        encoder_layers=1,
        encoder_heads=1,
        dropout=0.1,
        ranker_hidden=(32,),
        ranker_negatives=8,
    ),
    "small": ModelConfig(size="small"),
    "base": ModelConfig(
        size="base", dim=128, max_history=100, encoder_layers=2, encoder_heads=4, ranker_hidden=(512, 256)
    ),
    "large": ModelConfig(
        size="large",
        dim=256,
        max_history=200,
        encoder_layers=4,
        encoder_heads=8,
        item_capacity=400_000,
        embedding_fp16=True,
        ranker_hidden=(1024, 512, 256),
    ),
}


def model_config(size: str = "small", **overrides) -> ModelConfig:
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}: expected one of {', '.join(SIZES)}")
    return replace(SIZES[size], **overrides)


OBJECTIVES = ("auto", "next_item", "all_items")
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 40
    batch_size: int = 128  # windows of up to max_history labels each
    lr: float = 2e-3
    weight_decay: float = 1e-5
    patience: int = 8  # epochs without validation NDCG@10 improvement before stopping
    min_epochs: int = 20  # no early stopping before this: the loss often plateaus for a while first
    ranker_epochs: int = 4
    ranker_examples_per_epoch: int = 20_000
    # the ranker's per-epoch validation and its gate score this many validation users (a seeded sample,
    # the same users on both sides of the paired comparison; 0: all). Each scores 200 candidates through
    # the ranker, a training example 31: the 200k-event log's 9,593 validation users were 1.9 M pairs an
    # epoch against the 0.62 M it trained on
    ranker_validation_users: int = 2_000
    seed: int = 0
    max_examples_per_epoch: int = 0  # 0: all training positions
    # cut each user's history at a fresh random offset every epoch (the newest window always ends at the
    # last training event), so the same items are not always the first, context-free labels of a window
    window_jitter: bool = False
    # what each user state learns to predict: "next_item" (the item after it), "all_items" (every item of
    # the user not yet read: random splits), or "auto" (chosen from the split's protocol)
    objective: str = "auto"
    # the dtype the models' forward passes compute in while training: "fp32"; "bf16" (torch.autocast:
    # losses, normalised embeddings, weights and optimiser state stay fp32); or "auto": bf16 where the
    # device has bf16 matrix units (a CPU with AMX or AVX-512 BF16, a CUDA GPU of compute capability 8.0
    # or later), else fp32. fp32 by default: on a 2-core AMX CPU bf16 bought the `small` model 1.02x
    # labels/s and nothing on the 200k-event fit, for 18 % more peak memory (docs/models.md, "Training
    # precision"), and its price in test quality is not measured. Evaluation and serving always run the
    # fp32 inference path
    precision: str = "fp32"
    # the set encoder's examples: each epoch, this share of each user's training items (at least one) is
    # held out as the targets and the rest is read, as a random split holds out a share of the user's items
    set_target_share: float = 0.2
    # evaluate, keep and serve an exponential moving average of the retrieval weights, updated after every
    # step with this decay (0: off, the raw weights). It smooths the step-to-step noise of small logs'
    # few updates per epoch (docs/models.md, "Random and published splits")
    ema_decay: float = 0.0

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if not 0 < self.set_target_share < 1:
            raise ValueError(f"set_target_share must be in (0, 1), got {self.set_target_share}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")


def parse_overrides(pairs: list[str], config_class: type) -> dict:
    """``["dropout=0.3", "window_jitter=true"]`` → ``{"dropout": 0.3, "window_jitter": True}``, checked
    against the fields of ``config_class`` (ModelConfig or TrainConfig); numbers, booleans and lists are
    JSON."""
    known = {f.name for f in fields(config_class)}
    out: dict = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"expected KEY=VALUE, got {pair!r}")
        if key not in known:
            raise ValueError(
                f"{config_class.__name__} has no field {key!r}; fields: {', '.join(sorted(known))}"
            )
        looks_json = value[:1].isdigit() or value[:1] in "-[{" or value in ("true", "false")
        out[key] = json.loads(value) if looks_json else value
    return out
