"""Training loops of the two-stage recommender: retrieval epochs with early stopping, then the ranker on
negatives mined from retrieval's candidates, behind its validation gate.

``TwoStageRecommender.fit`` builds the model's modules and calls :func:`fit_retrieval` then
:func:`fit_ranker`; both train the estimator's modules in place and record what they chose on it (its
history, best epochs, validation scores and whether the ranker serves).

Retrieval trains on windows (``predictor.models.windows``): each user's training events are cut into
chunks of up to ``max_history`` labels; the encoder reads the items before each label (causally) and
predicts it. The user features at each label are the newest ``user_profile`` snapshot strictly before
the label's timestamp (point-in-time), joined once per fit (:class:`TrainingBatches`). Batches are
built by NumPy fancy indexing over the padded sequence matrix: no per-row Python in the loop.

Distributed: under ``torchrun`` (``WORLD_SIZE > 1``) each process takes every ``world``-th example,
gradients are averaged by ``DistributedDataParallel`` (gloo on CPU, NCCL on CUDA), rank 0 evaluates
and decides early stopping for all.

Shapes: B = batch, L = ``max_history``, F_u = user feature width, N = catalog rows (items + 1).
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

from predictor.features.schema import USER_DENSE_COLUMNS
from predictor.models.config import ModelConfig, TrainConfig
from predictor.models.data import SplitData, UserFeatureIndex, to_tensor
from predictor.models.distributed import World
from predictor.models.evaluate import (
    beats_by_more_than_noise,
    evaluate,
    holdout,
    mask_seen_,
    per_user_scores,
    validation_metric,
)
from predictor.models.inference import ranker_history, ranker_inputs
from predictor.models.two_tower import all_items_softmax_loss, exact_softmax_loss, sampled_softmax_loss
from predictor.models.windows import (
    pack_windows,
    shuffled_training_items,
    training_examples,
    training_objective,
    training_windows,
)

if TYPE_CHECKING:
    from predictor.models.recommender import TwoStageRecommender

log = logging.getLogger(__name__)


@dataclass
class TrainingHistory:
    retrieval: list[dict] = field(default_factory=list)  # per epoch: loss, validation metric, seconds
    ranker: list[dict] = field(default_factory=list)
    examples_per_second: float = 0.0
    precision: str = "fp32"  # what the forward passes computed in (TrainConfig.precision, resolved)


class TrainingBatches:
    """One fit's training labels (``training_examples``: user index and position ``[E]`` int64) and their
    point-in-time user features, joined once; :meth:`windows` and :meth:`examples` build a step's
    tensors from them on ``device``."""

    def __init__(
        self,
        split: SplitData,
        max_history: int,
        user_features: UserFeatureIndex | None,
        device: torch.device,
    ):
        self.max_history, self.device = max_history, device
        self.users, self.positions = training_examples(split)
        width = len(USER_DENSE_COLUMNS) + split.n_categories
        # the features at every position of every user, flat, plus one zero row for padding (the last)
        self.offsets = np.concatenate([[0], np.cumsum(split.lengths)[:-1]])
        self.dense_flat = np.zeros((int(split.lengths.sum()) + 1, width), np.float32)
        if user_features is not None and len(self.users):
            self.dense_flat[self.offsets[self.users] + self.positions] = user_features.at(
                split.users.raw(self.users), split.timestamps[self.users, self.positions]
            )

    def windows(self, split: SplitData, users: np.ndarray, ends: np.ndarray):
        """Training windows packed into rows (:func:`pack_windows`: the short windows, each user's oldest,
        share rows instead of padding one each): inputs ``[R, W]``, targets ``[R, W]`` (0 = no label),
        user features ``[R, W, F_u]``, the layout (each token's position in its window ``[R, W]``, and
        its window ``[R, W]``, an index into ``users``, -1 for padding), and the number of labels."""
        lengths = np.minimum(ends - 1, self.max_history)  # labels of each window: positions [end - n, end)
        row, offset, n_rows = pack_windows(lengths, self.max_history)
        window = np.repeat(np.arange(len(users)), lengths)  # each token's window
        position = np.arange(len(window)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        r, c = row[window], offset[window] + position
        width = int(c.max()) + 1 if len(c) else 1
        user, at = users[window], (ends - 1 - lengths)[window] + position  # the input's position
        inputs = np.zeros((n_rows, width), np.int64)
        targets = np.zeros((n_rows, width), np.int64)
        positions = np.zeros((n_rows, width), np.int64)
        segments = np.full((n_rows, width), -1, np.int64)
        flat = np.full((n_rows, width), len(self.dense_flat) - 1)  # the zero row: padding
        inputs[r, c] = split.sequences[user, at]
        targets[r, c] = split.sequences[user, at + 1]
        positions[r, c], segments[r, c] = position, window
        flat[r, c] = self.offsets[user] + at + 1
        layout = (to_tensor(positions, self.device), to_tensor(segments, self.device))
        return (
            to_tensor(inputs, self.device),
            to_tensor(targets, self.device),
            to_tensor(self.dense_flat[flat], self.device),
            layout,
            int((targets > 0).sum()),
        )

    def sets(self, split: SplitData, users: np.ndarray, share: float):
        """The set encoder's examples (users with two or more training items): the first ``share`` of
        each user's training items in ``split``'s order (at least one, never all) are the targets ``[B, T]``,
        up to ``max_history`` of the rest are read ``[B, L]`` (both left-aligned, 0-padded); the user
        features at the last training item ``[B, F_u]``, and the number of targets."""
        n = split.train_len[users]
        k = np.clip(np.round(share * n), 1, n - 1).astype(np.int64)
        read = np.minimum(n - k, self.max_history)
        T, L = int(k.max()), int(read.max())
        columns = np.arange(max(T, L))[None, :]
        width = split.sequences.shape[1] - 1
        targets = np.where(
            columns[:, :T] < k[:, None], split.sequences[users[:, None], np.minimum(columns[:, :T], width)], 0
        )
        at = np.minimum(k[:, None] + columns[:, :L], width)
        inputs = np.where(columns[:, :L] < read[:, None], split.sequences[users[:, None], at], 0)
        dense = self.dense_flat[self.offsets[users] + n - 1]
        return (
            to_tensor(inputs, self.device),
            to_tensor(targets, self.device),
            to_tensor(dense, self.device),
            int(k.sum()),
        )

    def examples(self, split: SplitData, users: np.ndarray, positions: np.ndarray):
        """Single-label examples (ranker): window before ``positions`` ``[B, L]``, lengths ``[B]``, target
        ``[B]``, user features ``[B, F_u]``."""
        window, lengths = split.window(users, positions, self.max_history)
        dense = self.dense_flat[self.offsets[users] + positions]
        return (
            to_tensor(window, self.device),
            to_tensor(lengths, self.device),
            to_tensor(split.sequences[users, positions], self.device),
            to_tensor(dense, self.device),
        )


def fit_retrieval(
    model: TwoStageRecommender,
    split: SplitData,
    batches: TrainingBatches,
    world: World,
    ckpt: Path | None,
    resume: bool,
    progress: bool,
) -> None:
    """Train ``model.retrieval`` on ``split``'s windows, epoch by epoch, keeping the epoch with the best
    validation metric (every epoch, and the last, on a final fit); checkpoints to ``ckpt`` each epoch and
    resumes from it. Records ``model.history.retrieval``, ``model.validation_retrieval`` and
    ``model.best_epochs["retrieval"]``."""
    cfg = model.train_config
    retrieval = model.retrieval
    ddp = torch.nn.parallel.DistributedDataParallel(retrieval) if world.size > 1 else None
    optimizer = adamw(retrieval, cfg)
    set_encoder = model.config.user_encoder == "set"
    if set_encoder and cfg.objective == "next_item":
        raise ValueError("objective='next_item' needs user_encoder='sequence': a set has no next item")
    averaged = (
        torch.optim.swa_utils.AveragedModel(
            retrieval, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.ema_decay)
        )
        if cfg.ema_decay
        else None
    )
    evaluated = retrieval if averaged is None else averaged.module  # what is validated, kept and served
    popularity = torch.as_tensor(split.item_popularity, dtype=torch.float32, device=model.device)
    p_item = (popularity + 1.0) / (popularity + 1.0).sum()
    rng = np.random.default_rng(cfg.seed)
    start_epoch, best, best_state, stale, best_epoch = 0, -1.0, None, 0, 0
    if resume and ckpt and (ckpt / "retrieval.pt").exists():
        state = torch.load(ckpt / "retrieval.pt", map_location=model.device, weights_only=True)
        retrieval.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, best, stale = state["epoch"] + 1, state["best"], state["stale"]
        best_epoch = state.get("best_epoch", 0)
        best_state = state["best_model"]
        if averaged is not None and "averaged" in state:
            averaged.load_state_dict(state["averaged"])
        rng.bit_generator.state = state["rng"]
        model.history.retrieval = list(state["history"])
        log.info("resumed retrieval training at epoch %d (best validation score %.4f)", start_epoch, best)

    local_batch = max(cfg.batch_size // world.size, 2)
    if set_encoder:  # one example per user with something to hold out, drawn afresh every epoch
        rows_user, rows_end = np.flatnonzero(split.train_len >= 2), None
    else:
        rows_user, rows_end = training_windows(split, model.config.max_history)
    metric = validation_metric(split)
    validates = split.validates  # a final fit (nothing held out) runs every epoch
    all_items = training_objective(cfg, split) == "all_items"
    epoch_split = split
    item_tables = (model.item_cats, model.item_dense)
    dtype = training_dtype(cfg, model.device)
    model.history.precision = "bf16" if dtype is torch.bfloat16 else "fp32"
    if world.is_main:
        log.info("training precision: %s (TrainConfig.precision=%s)", model.history.precision, cfg.precision)
    for epoch in range(start_epoch, cfg.epochs):
        started = time.perf_counter()
        retrieval.train()
        if cfg.window_jitter and not set_encoder:
            rows_user, rows_end = training_windows(split, model.config.max_history, rng)
        if split.protocol == "random" or set_encoder:
            # a random split's order means nothing: each epoch reads every user's training items in a
            # fresh order, so the encoder learns to predict any item from any subset of the others (the
            # set encoder holds out the first of them, so it needs the fresh order on any split)
            epoch_split = shuffled_training_items(split, rng)
        n_examples = len(rows_user)
        order = rng.permutation(n_examples)
        if cfg.max_examples_per_epoch:
            order = order[: cfg.max_examples_per_epoch]
        order = order[world.rank :: world.size]
        steps = len(order) // local_batch
        loss_sum, labels = torch.zeros((), device=model.device), 0
        bar = tqdm(
            range(steps),
            desc=f"retrieval epoch {epoch + 1}",
            disable=not (progress and world.is_main),
            leave=False,
        )
        forward = ddp or retrieval
        for step in bar:
            rows = order[step * local_batch : (step + 1) * local_batch]
            later, layout = None, None
            if set_encoder:
                window, targets, udense, n_labels = batches.sets(
                    epoch_split, rows_user[rows], cfg.set_target_share
                )
            else:
                users, ends = rows_user[rows], rows_end[rows]
                window, targets, udense, layout, n_labels = batches.windows(epoch_split, users, ends)
                if all_items:  # per window, unpacked: the window position of each of its user's items
                    unpacked, _ = epoch_split.window(users, ends - 1, model.config.max_history)
                    later = later_items(epoch_split, users, to_tensor(unpacked, model.device))
            loss = retrieval_loss(
                model.config,
                split.n_items,
                forward,
                (window, targets, udense),
                item_tables,
                p_item,
                later,
                dtype,
                layout,
            )
            labels += n_labels
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if averaged is not None:
                averaged.update_parameters(retrieval)
            loss_sum += loss.detach()
            if step % 50 == 49:  # the one host sync, for the progress bar
                bar.set_postfix(loss=f"{loss_sum.item() / (step + 1):.3f}")
        seconds = time.perf_counter() - started
        model.retrieval = evaluated  # validation ranks with the weights that would be kept
        try:
            score = (
                evaluate(model.rank(split, "retrieval", search="exact"), split, "validation")[metric]
                if world.is_main and validates
                else float(epoch)
            )
        finally:
            model.retrieval = retrieval
        score = world.broadcast(score)
        model.history.retrieval.append(
            {
                "epoch": epoch + 1,
                "loss": loss_sum.item() / steps if steps else float("nan"),
                f"validation_{metric}": score if validates else None,
                "seconds": seconds,
                "examples": labels * world.size,
            }
        )
        model.history.examples_per_second = labels * world.size / max(seconds, 1e-9)
        if world.is_main and progress:
            tqdm.write(
                f"retrieval epoch {epoch + 1}: loss {model.history.retrieval[-1]['loss']:.4f}, "
                + (f"validation {metric} {score:.4f}" if validates else "no validation (final fit)")
                + f" ({seconds:.1f} s)"
            )
        if score > best:
            best, stale, best_epoch = score, 0, epoch + 1
            best_state = copy.deepcopy(evaluated.state_dict())
        else:
            stale += 1
        if ckpt and world.is_main:
            ckpt.mkdir(parents=True, exist_ok=True)
            torch.save(
                {
                    "model": retrieval.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "epoch": epoch,
                    "best": best,
                    "stale": stale,
                    "best_epoch": best_epoch,
                    "best_model": best_state,
                    "rng": rng.bit_generator.state,
                    "history": model.history.retrieval,
                    **({"averaged": averaged.state_dict()} if averaged is not None else {}),
                },
                ckpt / "retrieval.pt.tmp",
            )
            os.replace(ckpt / "retrieval.pt.tmp", ckpt / "retrieval.pt")
        if stale >= cfg.patience and epoch + 1 >= cfg.min_epochs:
            break
    if best_state is not None:
        retrieval.load_state_dict(best_state)
    model.validation_retrieval = best if validates else None
    model.best_epochs["retrieval"] = best_epoch


def later_items(split: SplitData, users: np.ndarray, window: torch.Tensor) -> torch.Tensor:
    """``[B, n_items + 1]`` int64: for each window's user, the window position of each of the user's
    training items (the last, if read twice; ``L`` for items outside the window, -1 for items not the
    user's). The items after position ``t`` are the targets of the user state at ``t`` (the all-items
    objective)."""
    L = window.shape[1]
    width = int(split.train_len[users].max()) if len(users) else 0
    owned = np.where(
        np.arange(width)[None, :] < split.train_len[users][:, None], split.sequences[users, :width], 0
    )
    position = torch.full((len(users), split.n_items + 1), -1, dtype=torch.long, device=window.device)
    position.scatter_(1, to_tensor(owned, window.device), L)
    steps = torch.arange(L, device=window.device).expand_as(window)
    # an item read twice in the window takes its last position: it is still to come until then
    position.scatter_(1, window, torch.full_like(window, -1))
    position.scatter_reduce_(1, window, torch.where(window > 0, steps, L), reduce="amax")
    position[:, 0] = -1  # padding is nobody's item
    return position


def has_bf16_units(device: torch.device) -> bool:
    """Whether ``device`` multiplies bf16 matrices in hardware: a CUDA GPU of compute capability 8.0 or
    later, a CPU with AMX tiles or AVX-512 BF16 (oneDNN's bf16 kernels; elsewhere bf16 is emulated and
    slower than fp32). torch exposes the CPU's flags only under private names, hence the getattr."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8
    if device.type != "cpu":
        return False
    probes = (
        getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    )
    return any(bool(probe()) for probe in probes if probe is not None)


def training_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of training's forward passes (``TrainConfig.precision``); None: fp32."""
    if cfg.precision == "bf16" or (cfg.precision == "auto" and has_bf16_units(device)):
        return torch.bfloat16
    return None


def forward_autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` to ``dtype`` on ``device``'s type; a no-op context for None (fp32)."""
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def loss_candidates(
    cfg: ModelConfig, n_items: int, labelled: torch.Tensor, p_item: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """A step's softmax candidates: (item indexes ``[M]``, their ``log q [M]``, whether exact). The exact
    softmax (up to ``cfg.full_softmax_items`` items) scores every catalog item, sampled with certainty, so
    log q = 0; otherwise the step's ``labelled`` items ``[P]`` (other labels of the batch, sampled ∝
    popularity ``p_item [n_items + 1]``) plus optional uniform extras, with the chance of each draw."""
    device = labelled.device
    if 0 < n_items <= cfg.full_softmax_items:
        return torch.arange(1, n_items + 1, device=device), torch.zeros(n_items, device=device), True
    pick = torch.randperm(len(labelled), device=device)[: cfg.in_batch_negatives]
    negatives = labelled[pick]
    log_q = torch.log(p_item[negatives] * len(negatives))
    if cfg.uniform_negatives:
        extra = torch.randint(1, n_items + 1, (cfg.uniform_negatives,), device=device)
        negatives = torch.cat([negatives, extra])
        uniform_log_q = torch.full((len(extra),), math.log(cfg.uniform_negatives / n_items), device=device)
        log_q = torch.cat([log_q, uniform_log_q])
    return negatives, log_q, False


def retrieval_loss(
    cfg: ModelConfig,
    n_items: int,
    forward: torch.nn.Module,
    batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    item_tables: tuple[torch.Tensor, torch.Tensor],
    p_item: torch.Tensor,
    later: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
    layout: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The retrieval loss of one step: ``forward`` (the two-tower model, DDP-wrapped or not) over ``batch`` =
    (windows ``[B, L]``, targets ``[B, L]`` (0: no label), user features ``[B, L, F_u]``; the set
    encoder's: read items ``[B, L]``, held-out targets ``[B, T]``, user features ``[B, F_u]``, from
    :meth:`TrainingBatches.sets`), ``layout`` the packed windows' (positions, windows) ``[B, L]`` each
    from :meth:`TrainingBatches.windows` (None: one window a row, from position 0), with the catalog's
    ``item_tables`` (categories ``[N, C]``, dense ``[N, F_i]``): the exact softmax over all ``n_items`` up
    to ``cfg.full_softmax_items``, else the logQ-corrected sampled softmax (``p_item`` ``[n_items + 1]``:
    the sampling probabilities); ``later`` (:func:`later_items`) switches to the all-items objective; the
    set encoder's states each learn all their held-out targets at once, the items they read left out of
    their softmax. ``dtype`` (:func:`training_dtype`): the forward pass under autocast; the normalised
    embeddings it returns and the loss over them are fp32 either way."""
    window, targets, udense = batch
    device = window.device
    valid = targets > 0
    # the labelled positions, flat: index_select gathers them, its backward cheaper than a mask's
    labelled_at = torch.nonzero(valid.flatten()).squeeze(1)
    labelled = targets.flatten().index_select(0, labelled_at)
    negatives, log_q, exact = loss_candidates(cfg, n_items, labelled, p_item)
    # one call through the (DDP-wrapped) module so gradients synchronise
    with forward_autocast(device, dtype):
        states, positive, neg = forward(window, udense, targets, negatives, *item_tables, layout)
    if cfg.user_encoder == "set":
        rows = item_tables[0].shape[0]

        def marked(items: torch.Tensor) -> torch.Tensor:  # [B, M]: which candidates are each row's items
            mark = torch.zeros(len(items), rows, dtype=torch.bool, device=device).scatter_(1, items, True)
            mark[:, 0] = False
            return mark[:, negatives]

        read = marked(window)
        # an item both read and held out (a log with repeats) is seen, so not something to predict
        return all_items_softmax_loss(states, neg, log_q, marked(targets) & ~read, read, cfg.temperature)
    states = states.flatten(0, -2).index_select(0, labelled_at)
    if later is not None:
        # the state after window position t scores every candidate; its positives are the user's
        # items after t (in this epoch's order), the items up to t are left out of its softmax
        if layout is None:
            step = torch.arange(window.shape[1], device=device).expand_as(window)[valid]
            owner = torch.nonzero(valid)[:, 0]
        else:
            step, owner = layout[0][valid], layout[1][valid]
        where = later[owner][:, negatives]  # [P, M] window position of each candidate
        return all_items_softmax_loss(
            states,
            neg,
            log_q,
            where > step[:, None],
            (where >= 0) & (where <= step[:, None]),
            cfg.temperature,
        )
    if exact:
        # the sampled loss with every item a negative and the label's own column masked and scored as
        # the positive is this cross-entropy over the catalog, without the [P, N] mask and copy
        return exact_softmax_loss(states, neg, labelled - 1, cfg.temperature)
    positive = positive.flatten(0, -2).index_select(0, labelled_at)
    return sampled_softmax_loss(states, positive, labelled, neg, negatives, log_q, cfg.temperature)


def fit_ranker(
    model: TwoStageRecommender, split: SplitData, batches: TrainingBatches, world: World, progress: bool
) -> None:
    """Train ``model.ranker`` listwise on negatives mined from the frozen retrieval model's candidates,
    keeping its best validation epoch, and decide whether it serves: only where it beats retrieval alone on
    validation by more than the noise (on a final fit, where the fit that chose its epochs said so).
    Records ``model.history.ranker``, ``model.use_ranker``, ``model.ranker_gain``,
    ``model.validation_score`` and ``model.best_epochs["ranker"]``."""
    users, positions = batches.users, batches.positions
    cfg = model.train_config
    if cfg.ranker_epochs <= 0:
        model.use_ranker = False
        model.validation_score = model.validation_retrieval
        return
    dtype = training_dtype(cfg, model.device)
    metric = validation_metric(split)
    validates = split.validates
    model.best_epochs["ranker"] = 0
    K = model.config.ranker_negatives
    frozen = model.inference(search="exact")
    tables = frozen.tables
    items = tables.embeddings[: split.n_items + 1]
    rng = np.random.default_rng(cfg.seed + 1)
    # negatives drawn from the retrieval model's own top candidates, the list the ranker reorders at
    # serving time; only the very top ones ("hardest") would teach it to distrust retrieval's best
    pool = max(model.candidates, K + 1)
    # the examples the epochs can draw from, and each epoch's draw, fixed up front: negatives (a
    # user-tower pass each) are mined only for the examples some epoch reads, when it first reads them
    # (four epochs of 20,000 drawn from 80,000 read about 68 % of them)
    per_epoch = cfg.ranker_examples_per_epoch or len(users)
    sample = rng.permutation(len(users))[: min(len(users), 200_000, per_epoch * cfg.ranker_epochs)]
    per_epoch = min(per_epoch, len(sample))
    orders = [
        rng.permutation(len(sample))[:per_epoch][world.rank :: world.size] for _ in range(cfg.ranker_epochs)
    ]
    negatives = np.zeros((len(sample), K), np.int64)
    # the frozen user vector of each mined example, kept: later epochs read it again
    user_vectors = torch.zeros(len(sample), items.shape[1], device=model.device)
    mined = np.zeros(len(sample), bool)
    mining_rng = np.random.default_rng(cfg.seed + 2)

    def mine(indices: np.ndarray) -> None:
        todo = np.unique(indices[~mined[indices]])
        # by history length, so that each tower pass is cut to its batch's longest history
        todo = todo[np.argsort(positions[sample[todo]], kind="stable")]
        for s in range(0, len(todo), 1024):
            idx = todo[s : s + 1024]
            rows = sample[idx]
            window, lengths, target, udense = batches.examples(split, users[rows], positions[rows])
            vectors = frozen.user_vectors(window, lengths, udense)
            user_vectors[torch.from_numpy(idx).to(model.device)] = vectors
            scores = mask_seen_(vectors @ items.T, split, users[rows], positions[rows])
            scores[torch.arange(len(rows)), target] = float("-inf")
            top = torch.topk(scores, min(pool, split.n_items), dim=1).indices.cpu().numpy()
            pick = np.argsort(mining_rng.random(top.shape), axis=1)[:, :K]
            negatives[idx] = np.take_along_axis(top, pick, axis=1)
        mined[todo] = True

    ranker = model.ranker
    optimizer = adamw(ranker, cfg)
    # per-user validation scores of retrieval alone, and of the best ranker epoch: the gate's pairs, on
    # the same (sampled) validation users
    n_validation = len(holdout(split, "validation")[0])
    gate_rows = None
    if 0 < cfg.ranker_validation_users < n_validation:
        gate_rows = np.sort(rng.permutation(n_validation)[: cfg.ranker_validation_users])
    retrieval_scores = (
        per_user_scores(model.rank(split, "retrieval", search="exact"), split, "validation", rows=gate_rows)
        if world.is_main and validates
        else None
    )
    baseline = -1.0
    if validates:  # rank 0 scores; every rank takes its figure
        scored = retrieval_scores is not None and len(retrieval_scores) > 0
        baseline = world.broadcast(float(retrieval_scores.mean()) if scored else -1.0)
    best, best_state, stale = baseline, None, 0
    best_scores = None
    for epoch in range(cfg.ranker_epochs):
        started = time.perf_counter()
        ranker.train()
        order = orders[epoch]
        mine(order)
        local_batch = max(cfg.batch_size // world.size, 2)
        steps, loss_sum = len(order) // local_batch, torch.zeros((), device=model.device)
        for step in tqdm(
            range(steps),
            desc=f"ranker epoch {epoch + 1}",
            disable=not (progress and world.is_main),
            leave=False,
        ):
            idx = order[step * local_batch : (step + 1) * local_batch]
            rows = sample[idx]
            window, lengths, target, udense = batches.examples(split, users[rows], positions[rows])
            cand = torch.cat([target[:, None], to_tensor(negatives[idx], model.device)], dim=1)
            user_vec = user_vectors[torch.from_numpy(idx).to(model.device)]
            hist = ranker_history(window, lengths, model.config.ranker_history)
            with forward_autocast(model.device, dtype):
                logits = ranker(
                    *ranker_inputs(
                        items,
                        tables.item_cats,
                        tables.item_dense,
                        split.n_categories,
                        hist,
                        udense,
                        user_vec,
                        cand,
                    )
                )
            target = torch.zeros(len(rows), dtype=torch.long, device=model.device)
            loss = F.cross_entropy(logits.float(), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if world.size > 1:
                for p in ranker.parameters():
                    if p.grad is not None:
                        dist.all_reduce(p.grad)
                        p.grad /= world.size
            optimizer.step()
            loss_sum += loss.detach()
        model.use_ranker = True
        scores = (
            per_user_scores(
                model.rank(split, "two_stage", search="exact"), split, "validation", rows=gate_rows
            )
            if world.is_main and validates
            else None
        )
        score = world.broadcast(float(scores.mean()) if scores is not None and len(scores) else float(epoch))
        model.history.ranker.append(
            {
                "epoch": epoch + 1,
                "loss": loss_sum.item() / steps if steps else float("nan"),
                f"validation_{metric}": score if validates else None,
                "validation_users": len(scores) if scores is not None else 0,
                "seconds": time.perf_counter() - started,
            }
        )
        if world.is_main and progress and validates:
            tqdm.write(
                f"ranker epoch {epoch + 1}: loss {model.history.ranker[-1]['loss']:.4f}, "
                f"two-stage validation {metric} {score:.4f} (retrieval alone {baseline:.4f})"
            )
        if score > best:
            best, stale, best_state, best_scores = score, 0, copy.deepcopy(ranker.state_dict()), scores
            model.best_epochs["ranker"] = epoch + 1
        else:
            stale += 1
            if stale >= max(2, cfg.patience // 2):
                break
    if best_state is not None:
        ranker.load_state_dict(best_state)
    if not validates:
        # a final fit: whether the ranker serves was decided on validation, by the fit that chose
        # its epochs (``ranker_epochs=0`` where it did not serve)
        model.use_ranker, model.validation_score = True, None
        return
    # the ranker serves only where it beats retrieval alone on validation by more than the noise: the
    # mean per-user gain in the validation metric above one standard error of that mean (paired)
    model.use_ranker = False
    model.ranker_gain = None  # no epoch beat retrieval alone
    if best_state is not None and world.is_main:
        model.use_ranker, model.ranker_gain = beats_by_more_than_noise(best_scores - retrieval_scores)
    model.use_ranker = bool(world.broadcast(float(model.use_ranker)))
    model.validation_score = best if model.use_ranker else model.validation_retrieval
    if world.is_main and progress and best_state is None:
        tqdm.write("ranker: no epoch beat retrieval alone on validation: not served")
    elif world.is_main and progress:
        tqdm.write(
            f"ranker: validation {metric} gain {model.ranker_gain['mean']:+.4f} per user (standard error "
            f"{model.ranker_gain['standard_error']:.4f}): {'serves' if model.use_ranker else 'not served'}"
        )


def adamw(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over ``model``'s parameters with torch's fused kernel (CPU and CUDA): one pass per tensor
    instead of a dozen elementwise ops, which is most of a small ranker step's optimizer time
    (``bench/train.py``'s ``kernels`` probe)."""
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
